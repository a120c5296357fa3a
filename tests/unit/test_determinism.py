"""A seeded CPU run repeats exactly: the same recipe and seed, trained twice in this process
and once in each of two fresh processes, gives identical metrics, identical per-epoch history
and a byte-identical checkpoint. docs/reliability.md says what is and is not repeatable
across machines and on GPUs.

The recipe is the command line's (``utils_cv.similarity.launch``): notebook 07's batch-hard
recipe at the smoke preset, one epoch on a small generated image folder (a few seconds a
training on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.image_folders import write_image_folder
from utils_cv.similarity import launch

ARGS = ["--method", "batch_hard", "--preset", "smoke", "--epochs", "1", "--cpu", "--seed", "3"]


def _result(out: Path) -> tuple[bytes, dict, list]:
    run = json.loads((out / launch.RUN_FILE).read_text())
    return (out / launch.MODEL_FILE).read_bytes(), run["metrics"], run["history"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("determinism")
    data = write_image_folder(root / "images", classes=30, domains=(), per_domain=6)
    args = [*ARGS, "--dataset", str(data)]
    # The two fresh processes train while this one does (2 cores: slower, not different).
    # Each uses as many threads as this process: the thread count decides how sums are split.
    command = [sys.executable, "-m", "utils_cv.similarity.launch", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    children = {
        name: subprocess.Popen(
            [*command, "--out", str(root / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for name in ("process_1", "process_2")
    }
    for name in ("in_process_1", "in_process_2"):
        assert launch.main([*args, "--out", str(root / name)]) == 0
    for child in children.values():
        output, _ = child.communicate(timeout=600)
        assert child.returncode == 0, output[-3000:]
    results = {name: _result(root / name) for name in (*children, "in_process_1", "in_process_2")}
    return {"args": args, **results}


@pytest.mark.parametrize("other", ["in_process_2", "process_1", "process_2"])
def test_the_same_seed_gives_identical_metrics_and_history(runs, other):
    _, metrics, history = runs["in_process_1"]
    assert runs[other][1] == metrics
    assert runs[other][2] == history


@pytest.mark.parametrize("other", ["in_process_2", "process_1", "process_2"])
def test_the_same_seed_gives_a_byte_identical_checkpoint(runs, other):
    assert runs[other][0] == runs["in_process_1"][0]


def test_another_seed_gives_another_model(tmp_path, runs):
    """The comparison above can fail: a different seed changes the checkpoint."""
    args = runs["args"]
    seed = args.index("--seed") + 1
    args = [*args[:seed], "4", *args[seed + 1 :]]
    assert launch.main([*args, "--out", str(tmp_path / "other")]) == 0
    assert _result(tmp_path / "other")[0] != runs["in_process_1"][0]
