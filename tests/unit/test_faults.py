"""Faults injected on purpose: each test breaks something the way the world does and checks
that nothing is lost and the error says what to do.

- a dataset build killed with SIGKILL halfway, and two processes building one cache at once;
- a notebook killed during ``make run`` (a fake papermill on a ``BIN`` of its own);
- a training that diverges;
- a checkpoint and a saved index cut short on disk.

Elsewhere: an interrupted download (``test_download``), a build that fails in-process
(``test_emoji.test_failed_build_leaves_existing_data_and_no_temporary_files``), built data
changed on disk (``test_emoji.test_check_emoji_detects_changes``), NaN embeddings
(``test_bad_inputs``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from utils_cv.common.results import load_metrics, record_metrics
from utils_cv.similarity import training
from utils_cv.similarity.callbacks import load_checkpoint
from utils_cv.similarity.datasets import emoji
from utils_cv.similarity.index import EmbeddingIndex

from .test_emoji import needs_fonts
from .test_index import clustered
from .test_training import new_learner, new_model, state_of, stripes

ROOT = Path(__file__).resolve().parents[2]
# The emoji data the subprocesses build: small, but every step of a real build.
BUILD = {"designs": ["openmoji", "noto"], "max_classes": 12}
IMAGES = 2 * BUILD["max_classes"]  # both designs draw every class
# Runs load_emoji(root) once the file `go` exists, after writing `ready`. Every PNG the build
# writes is logged and then takes `delay` seconds, so that the build can be killed halfway or
# overlapped by another.
CHILD = f"""
import sys, time
from pathlib import Path
from PIL import Image
from utils_cv.similarity.datasets import emoji

root, log, ready, go = map(Path, sys.argv[1:5])
delay = float(sys.argv[5])
save = Image.Image.save

def slow_save(image, fp, *args, **kwargs):
    save(image, fp, *args, **kwargs)
    with open(log, "a") as file:
        file.write(f"{{fp}}\\n")
    time.sleep(delay)

Image.Image.save = slow_save
ready.touch()
while not go.exists():
    time.sleep(0.01)
emoji.load_emoji(root, **{BUILD!r})
print(emoji.fingerprint(root))
"""


def _wait_for(condition, what: str, processes=(), timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        failed = [p for p in processes if p.poll() is not None]
        if failed or time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen: {[p.communicate() for p in failed]}")
        time.sleep(0.01)


def _start_builds(
    root: Path, count: int, delay: float
) -> tuple[list[subprocess.Popen], list[Path], Path]:
    """``count`` processes that each load (and so build) the emoji data in ``root``."""
    work = root.parent.parent / "children"
    work.mkdir()
    go = work / "go"
    processes, logs = [], []
    for n in range(count):
        logs.append(work / f"log{n}")
        args = [str(root), str(logs[-1]), str(work / f"ready{n}"), str(go), str(delay)]
        processes.append(
            subprocess.Popen(
                [sys.executable, "-c", CHILD, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes, logs, go


def _leftovers(root: Path) -> list[str]:
    """Hidden build or set-aside folders of ``root`` beside it."""
    return sorted(p.name for p in root.parent.glob(f".{root.name}.*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same data built once without interruption: its fingerprint.json."""
    root = emoji.build_emoji(tmp_path_factory.mktemp("reference") / "emoji", **BUILD)
    return (root / "fingerprint.json").read_bytes()


@needs_fonts
def test_a_build_killed_halfway_is_not_loaded_and_the_rerun_gives_the_same_data(
    tmp_path, reference
):
    root = tmp_path / "data" / "emoji"
    processes, logs, go = _start_builds(root, 1, delay=60)  # it stops after its first image
    try:
        go.touch()
        _wait_for(lambda: logs[0].exists() and logs[0].read_text(), "a first image", processes)
        processes[0].send_signal(signal.SIGKILL)
        processes[0].communicate(timeout=30)
    finally:
        processes[0].kill()
    assert processes[0].returncode == -signal.SIGKILL
    assert len(logs[0].read_text().splitlines()) == 1, "killed after its first image"
    assert not root.exists(), "a build writes beside the folder and renames it when complete"
    with pytest.raises(FileNotFoundError, match="manifest.csv missing"):
        emoji.load_emoji(root, build=False, **BUILD)
    data = emoji.load_emoji(root, **BUILD)
    assert len(data) == IMAGES
    assert (root / "fingerprint.json").read_bytes() == reference
    assert _leftovers(root) == [], "the killed build's folder must be cleaned up"


@needs_fonts
def test_two_processes_building_one_cache_at_once_build_it_once_and_both_load_it(
    tmp_path, reference
):
    root = tmp_path / "data" / "emoji"
    processes, logs, go = _start_builds(root, 2, delay=0.1)
    try:
        ready = [tmp_path / "children" / f"ready{n}" for n in range(2)]
        _wait_for(lambda: all(r.exists() for r in ready), "both processes started", processes)
        go.touch()  # both find no data and start building at the same moment
        results = [p.communicate(timeout=120) for p in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err
    fingerprints = {out.strip() for out, _ in results}
    assert fingerprints == {emoji.fingerprint(root)}
    assert (root / "fingerprint.json").read_bytes() == reference
    written = sum(len(log.read_text().splitlines()) for log in logs if log.exists())
    assert written == IMAGES, "the second process must wait and load the first one's build"
    assert _leftovers(root) == []


def _fake_bin(folder: Path) -> Path:
    """A BIN for `make run`: papermill records a metrics.json for 00_*, is killed for 01_*.

    It reads the recipe's arguments by position: ``--cwd notebooks NOTEBOOK OUTPUT ...``.
    """
    folder.mkdir()
    (folder / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (folder / "papermill").write_text(
        "#!/bin/sh\n"
        'out=$(dirname "$4")\n'
        'case "$(basename "$3")" in\n'
        f'  00_*) exec "{sys.executable}" -c "import sys; from utils_cv.common.results '
        "import record_metrics; record_metrics(sys.argv[1], {'preset': 'new'})\" \"$out\" ;;\n"
        "  *) kill -9 $$ ;;\n"
        "esac\n"
    )
    for name in ("python", "papermill"):
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_loading_waits_for_a_rebuild_in_another_process_to_finish(tmp_path, monkeypatch):
    """A rebuild moves the data folder away before the new one takes its place: a reader
    must neither check nor read files meanwhile. The build's lock is held here on a file
    description of its own, as another process would hold it."""
    import threading

    root = tmp_path / "emoji"
    root.mkdir()
    (root / "manifest.csv").write_text("path,class_name,design,split\n", encoding="utf-8")
    checked = threading.Event()
    monkeypatch.setattr(emoji, "check_emoji", lambda *args, **kwargs: checked.set())
    reader = threading.Thread(target=emoji.load_emoji, args=(root,), daemon=True)
    with emoji._build_lock(root):
        reader.start()
        reader.join(timeout=2)
        assert reader.is_alive() and not checked.is_set()  # waiting for the build
    reader.join(timeout=60)
    assert not reader.is_alive() and checked.is_set()
    with emoji._build_lock(root, shared=True), emoji._build_lock(root, shared=True):
        pass  # readers do not wait for each other


def test_a_notebook_killed_during_make_run_leaves_no_stale_metrics(tmp_path):
    outputs = tmp_path / "outputs"
    notebooks = ["notebooks/00_first.ipynb", "notebooks/01_killed.ipynb"]
    for name in ("00_first", "01_killed"):  # an earlier run's results
        record_metrics(outputs / name, {"preset": "stale", "summary": {"recall@1": 0.5}})
        (outputs / name / "wall_seconds").write_text("60\n")
    done = subprocess.run(
        # -o data: the fake BIN stands for .venv, which `data` would install and build.
        ["make", "-s", "-o", "data", "run", f"BIN={_fake_bin(tmp_path / 'bin')}",
         f"NOTEBOOKS={' '.join(notebooks)}", f"OUTPUTS={outputs}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")},
    )  # fmt: skip
    assert done.returncode != 0, done.stdout + done.stderr
    assert load_metrics(outputs / "00_first")["preset"] == "new"
    assert (outputs / "00_first" / "wall_seconds").exists()
    assert sorted(p.name for p in (outputs / "01_killed").iterdir()) == []
    summary = (outputs / "summary.md").read_text()
    assert "| 01_killed |  |  | not measured | did not finish: no metrics.json |" in summary
    assert "stale" not in summary


@pytest.mark.parametrize("val", [False, True], ids=["without_val", "with_val"])
def test_a_training_that_diverges_stops_in_that_epoch_naming_the_learning_rate(val):
    learn = new_learner(val=stripes(1) if val else None)
    with pytest.raises(FloatingPointError, match=r"diverged at learning rate 1e\+06") as info:
        with learn.no_bar(), learn.no_logging():
            learn.fit(5, lr=1e6)
    assert f"became nan in epoch {learn.epoch} (first in batch " in str(info.value)
    assert learn.epoch < 4


class NaNFrom(torch.nn.Module):
    """``loss``, and NaN from its ``first``-th training call on (1 = the first)."""

    def __init__(self, loss: torch.nn.Module, first: int):
        super().__init__()
        self.loss, self.first, self.calls = loss, first, 0

    def forward(self, embeddings, labels):
        self.calls += 1
        value = self.loss(embeddings, labels)
        return value * float("nan") if self.calls >= self.first else value


def test_the_divergence_error_names_the_batch_and_its_rate_not_the_epochs_last():
    """Under one-cycle the rate changes every batch: the error names the first batch whose
    loss was NaN (the 5th: epoch 1, batch 2 of 3) and that batch's rate."""
    learn = new_learner()
    training.replace_loss(learn, NaNFrom(learn.loss_func, first=5))
    with pytest.raises(FloatingPointError) as info, learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(4, lr_max=1e-2)  # both groups at one rate
    message, rates = str(info.value), learn.recorder.lrs  # the rate of each batch
    assert "became nan in epoch 1 (first in batch 2 of 3)" in message, message
    assert f"diverged at learning rate {rates[4]:.3g} and {rates[4]:.3g} " in message, message
    assert f"{rates[5]:.3g}" != f"{rates[4]:.3g}"  # the epoch's last rate is another


def _cut(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "half" else b"")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The bytes of a checkpoint written by a one-epoch training."""
    path = tmp_path_factory.mktemp("checkpoint") / "best.pth"
    learn = new_learner(val=stripes(1), checkpoint_path=path)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=1e-2)
    return path.read_bytes()


@pytest.mark.parametrize("how", ["half", "empty"])
def test_a_checkpoint_cut_short_is_refused_naming_the_file_and_the_fix(tmp_path, checkpoint, how):
    path = tmp_path / "best.pth"
    path.write_bytes(checkpoint)
    model = new_model(seed=1)
    load_checkpoint(path, model)  # the whole file loads
    before = state_of(model)
    _cut(path, how)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))} .*cut short.*train again"):
        load_checkpoint(path, model)
    for name, tensor in state_of(model).items():
        assert torch.equal(tensor, before[name]), f"{name} changed by a refused load"


@pytest.mark.parametrize("kind", ["flat", "binary_flat"])
@pytest.mark.parametrize("name", ["index.faiss", "meta.json"])
@pytest.mark.parametrize("how", ["half", "empty"])
def test_a_saved_index_cut_short_is_refused_naming_the_file_and_the_fix(tmp_path, kind, name, how):
    x = clustered(n=50, dim=16)
    folder = EmbeddingIndex(16, kind).add(x).save(tmp_path / "index")
    assert len(EmbeddingIndex.load(folder)) == 50
    _cut(folder / name, how)
    file = re.escape(str(folder / name))
    with pytest.raises(ValueError, match=rf"{file} .*cut short.*save the index again"):
        EmbeddingIndex.load(folder)
