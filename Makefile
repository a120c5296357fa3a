# Two commands matter: `make run` (all notebooks on the built-in data) and `make test`.
# Every target creates .venv and installs the system packages first when they are missing.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
OUTPUTS ?= outputs
PRESET ?= auto

# Debian packages that hold the built-in data.
APT_PACKAGES := fonts-noto-color-emoji fonts-symbola fonts-unifont dataset-fashion-mnist
SYSDEP_FILES := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf \
                /usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf \
                /usr/share/fonts/opentype/unifont/unifont_upper.otf \
                /usr/share/datasets/fashion-mnist
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
# The exact versions that last passed `make test`; `make env` installs them, `make lock`
# refreshes them (then run `make test` and commit the file if it passes).
LOCK := constraints.txt

.PHONY: env sysdeps data run docs test test-unit test-notebooks test-gpu test-thorough lock lab lint format compare paper benchmark clean

env: sysdeps $(STAMP) $(LAB_OVERRIDES)

# JupyterLab settings for learners: no news pop-up, no update check (make env, make lab).
$(LAB_OVERRIDES): .jupyter/lab/settings/overrides.json $(STAMP)
	install -D -m 644 $< $@

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade -c $(LOCK) pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[dev]"
	@# Strip notebook outputs on commit (a git filter, attributes in the tracked .gitattributes,
	@# which exempts notebooks/recipes.ipynb); harmless outside a git checkout.
	@$(BIN)/nbstripout --install --attributes .gitattributes >/dev/null 2>&1 || true
	@touch $(STAMP)

# Refresh $(LOCK): the newest versions pyproject.toml allows, resolved in a scratch
# environment (so nothing installed by hand creeps in), written as name==version pins, pip
# and setuptools included (make env installs that pip before anything else).
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# The exact versions that passed \`make test\` (Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), $$(uname -sm))."; \
	  echo "# make env installs them (pip -c); refresh with \`make lock\`, then run make test and commit."; \
	  $(LOCK_VENV)/bin/python -m pip list --format=freeze --exclude-editable; } > $(LOCK).new
	mv $(LOCK).new $(LOCK) && rm -rf $(LOCK_VENV)
	@echo "Wrote $(LOCK); now run make test, and commit it if it passes."

sysdeps:
	@missing=""; for f in $(SYSDEP_FILES); do [ -e "$$f" ] || missing="$$missing $$f"; done; \
	if [ -n "$$missing" ]; then \
	  echo "Missing system data:$$missing"; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PACKAGES); \
	  elif command -v apt-get >/dev/null; then \
	    echo "Install them with:  sudo apt-get install $(APT_PACKAGES)"; exit 1; \
	  else \
	    echo "This needs the Noto Color Emoji, Symbola and GNU Unifont fonts and Fashion-MNIST."; \
	    echo "  Debian/Ubuntu: sudo apt-get install $(APT_PACKAGES)"; \
	    echo "  Other systems: install those fonts and point UTILS_CV_FONT_DIR at them (see data/README.md)."; \
	    exit 1; \
	  fi; \
	fi
	@# Chromium, the browser of the JupyterLab test (tests/browser): installed as root with
	@# apt like the fonts; elsewhere that test is skipped, with this message.
	@if [ ! -x /usr/bin/chromium ] && ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	      || echo "chromium did not install: the JupyterLab test will be skipped"; \
	  else \
	    echo "No Chromium: the JupyterLab test will be skipped (sudo apt-get install chromium)"; \
	  fi; \
	fi

# The emoji benchmark, built once into data/emoji from the fonts and the npm packages of its
# image designs (fetched into data/npm, checksums pinned); rebuilt only when stale.
data: env
	$(BIN)/python -c "from utils_cv.similarity.datasets.emoji import main; main()"

# Each notebook's wall time goes to outputs/<notebook>/wall_seconds; at the end (or at the
# first failure) outputs/summary.md tables every notebook's key numbers and time.
run: data
	@mkdir -p $(OUTPUTS)
	@# Clear every notebook's old results first, so a failed run never shows stale ones.
	@rm -f $(OUTPUTS)/[0-9][0-9]_*/metrics.json $(OUTPUTS)/[0-9][0-9]_*/wall_seconds
	@for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb .ipynb); \
	  echo "== $$name (PRESET=$(PRESET))"; mkdir -p $(OUTPUTS)/$$name; \
	  start=$$(date +%s); \
	  $(BIN)/papermill --cwd notebooks $$nb $(OUTPUTS)/$$name/$$name.ipynb \
	    -p PRESET $(PRESET) -p OUTPUT_DIR $(abspath $(OUTPUTS))/$$name \
	    || { $(BIN)/python -m utils_cv.common.summary $(OUTPUTS) >/dev/null; exit 1; }; \
	  seconds=$$(( $$(date +%s) - start )); echo $$seconds > $(OUTPUTS)/$$name/wall_seconds; \
	  echo "== $$name took $$seconds s"; \
	done
	@$(BIN)/python -m utils_cv.common.summary $(OUTPUTS)
	@echo "Executed notebooks and metrics.json files are under $(OUTPUTS)/"

lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: env
	$(BIN)/nbstripout $(NOTEBOOKS)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The smoke runs keep their executed notebooks in outputs/smoke; the docs site is then built
# from them and checked (links, images, nothing fetched from the web).
SMOKE_OUTPUTS := $(OUTPUTS)/smoke

test: data lint
	@rm -rf $(SMOKE_OUTPUTS)
	UTILS_CV_SMOKE_OUTPUTS=$(abspath $(SMOKE_OUTPUTS)) $(BIN)/python -m pytest
	$(BIN)/python docs/site/build.py --outputs $(SMOKE_OUTPUTS) --require-outputs

# The docs site, offline, from the notebooks `make run` executed (those not run yet are shown
# without outputs): build/docs/html/index.html.
docs: env
	$(BIN)/python docs/site/build.py --outputs $(OUTPUTS)

test-unit: data
	$(BIN)/python -m pytest tests/unit

test-notebooks: data
	$(BIN)/python -m pytest tests/notebooks

test-gpu: data
	$(BIN)/python -m pytest -m gpu tests/gpu

# The property suite with many more generated inputs than `make test` tries (minutes).
test-thorough: env
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest tests/property -p no:nbval -o addopts=""

# Notebook 07's stored results (results/compare/): every method x setting x seed that is not
# stored yet, and the ablations (close to three hours on 2 idle cores from nothing; PRESET=gpu
# on a GPU).
compare: data
	$(BIN)/python benchmarks/compare.py --preset $(PRESET)

# One paper's recipe (utils_cv/similarity/paper.py) on a benchmark in its official layout:
# make paper RECIPE=norm_softmax_512 DATASET=cub ROOT=/data/CUB_200_2011 [OUT=results/paper]
# (hours on a GPU at the recipe's size; ARGS="--epochs 2 --image-size 64 --cpu" and the like for a quick run).
RECIPE ?= norm_softmax_512
DATASET ?= cub
OUT ?= results/paper
paper: env
	@test -n "$(ROOT)" || { echo "Name the dataset's folder: make paper ROOT=/path/to/CUB_200_2011"; exit 1; }
	$(BIN)/python -m utils_cv.similarity.paper --recipe $(RECIPE) --dataset $(DATASET) \
	  --root "$(ROOT)" --out "$(OUT)" $(ARGS)

benchmark: env
	$(BIN)/python benchmarks/eval_speed.py
	$(BIN)/python benchmarks/train_speed.py

lab: env
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf $(OUTPUTS) .pytest_cache .ruff_cache
