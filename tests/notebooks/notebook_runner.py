"""Execute a notebook with papermill after checking that every parameter passed exists."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from unittest import mock

import papermill

from utils_cv.similarity import compare
from utils_cv.similarity.runner import TRAINING_LOG, read_training_log

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK_DIR = ROOT / "notebooks"


# Beside the metrics: every training the run made (runner.TRAINING_LOG), one JSON line each.
TRAININGS = "trainings.jsonl"


def assert_every_method(names) -> None:
    """Notebook 07's rows in one setting name every compared method; EE's by its base
    ("multi_similarity + EE")."""
    names = set(names)
    assert set(compare.METHODS) - {"ee"} <= names and any(n.endswith(" + EE") for n in names)


def trainings(output_dir: Path) -> list[dict]:
    """The trainings a ``run_notebook`` into ``output_dir`` made, in the order they ended."""
    return read_training_log(output_dir / TRAININGS)


# With this environment variable set to a folder (make test sets outputs/smoke), each smoke
# run's executed notebook is kept as <folder>/<name>/<name>.ipynb, where `make run` keeps its
# own: the docs site is then built and checked on them (docs/site/build.py).
SMOKE_OUTPUTS = "UTILS_CV_SMOKE_OUTPUTS"


def keep_executed(name: str, output_dir: Path) -> None:
    """Copy ``output_dir/<name>.ipynb`` to ``$UTILS_CV_SMOKE_OUTPUTS/<name>/`` (if set)."""
    folder = os.environ.get(SMOKE_OUTPUTS)
    if folder:
        (Path(folder) / name).mkdir(parents=True, exist_ok=True)
        shutil.copy(output_dir / f"{name}.ipynb", Path(folder) / name / f"{name}.ipynb")


def notebook_path(name: str) -> Path:
    return NOTEBOOK_DIR / f"{name}.ipynb"


def run_notebook(name: str, output_dir: Path, **parameters) -> dict:
    """Run ``notebooks/<name>.ipynb`` with ``parameters`` and return its metrics.json; its
    trainings are logged to ``output_dir / TRAININGS`` (``trainings``).

    papermill silently ignores a parameter the notebook does not declare, which once let a
    test run a notebook with its default (slow) settings unnoticed; so refuse that here.
    """
    path = notebook_path(name)
    output_dir.mkdir(parents=True, exist_ok=True)
    parameters = {"OUTPUT_DIR": str(output_dir), **parameters}
    declared = papermill.inspect_notebook(str(path))
    unknown = sorted(set(parameters) - set(declared))
    assert not unknown, f"{name} has no parameter(s) {unknown}; it declares {sorted(declared)}"
    log = output_dir / TRAININGS
    log.unlink(missing_ok=True)
    # The kernel inherits the variable: one line per training; the old value comes back after.
    with mock.patch.dict(os.environ, {TRAINING_LOG: str(log)}):
        papermill.execute_notebook(
            str(path),
            str(output_dir / f"{name}.ipynb"),
            parameters=parameters,
            cwd=str(NOTEBOOK_DIR),
            kernel_name="python3",
            progress_bar=False,
        )
    metrics_file = output_dir / "metrics.json"
    assert metrics_file.exists(), f"{name} did not record {metrics_file}"
    return json.loads(metrics_file.read_text())


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Nested metrics as ``{"a/b": value}`` for easy assertions."""
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = value
    return flat


def assert_sane(metrics: dict) -> None:
    """Every number finite; every recall, precision and NMI inside [0, 1]."""
    for key, value in flatten(metrics).items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        assert math.isfinite(value), f"{key} = {value} is not finite"
        leaf = key.rsplit("/", 1)[-1]
        if leaf.startswith(("recall@", "map@", "r_precision", "nmi", "accuracy")) or (
            "active_fraction" in leaf
        ):
            assert 0.0 <= value <= 1.0, f"{key} = {value} is outside [0, 1]"
