"""The command line launched for real: torchrun starts 2 CPU processes (gloo), they train the
smoke preset's batch-hard recipe on the emoji data for one epoch, and one process loads the
saved model and finds the metrics the two reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from utils_cv.common.device import set_seed
from utils_cv.similarity import compare
from utils_cv.similarity.launch import RUN_FILE, load_model, recipe_config
from utils_cv.similarity.metrics import retrieval_metrics
from utils_cv.similarity.models import embed
from utils_cv.similarity.presets import lesson_settings

COMMAND = [
    sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
    "-m", "utils_cv.similarity.launch",
    "--method", "batch_hard", "--preset", "smoke", "--epochs", "1", "--cpu",
]  # fmt: skip


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    out = tmp_path_factory.mktemp("launch") / "run"
    done = subprocess.run(
        [*COMMAND, "--out", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out, done.stdout


def test_two_processes_train_and_report_once(launched):
    out, stdout = launched
    run = json.loads((out / RUN_FILE).read_text())
    assert run["processes"] == 2
    assert stdout.count("test recall@1") == 1  # the first process reports, the other is quiet
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "run.json"]
    assert run["recipe"]["epochs"] == 1 and len(run["history"]) == 1
    assert run["steps"] >= 1 and run["seconds_per_step"] > 0
    assert all(0 <= run["metrics"][f"recall@{k}"] <= 1 for k in (1, 2, 4, 8))


def test_the_saved_model_gives_the_reported_metrics_in_one_process(launched):
    out, _ = launched
    model, run = load_model(out)
    config, setting = recipe_config(run["recipe"])
    settings = lesson_settings(config, "emoji")
    test = settings[setting].test
    # torchrun runs each process on one thread; the same here, so that every batch is
    # computed as it was there, and the metrics are equal, not merely close.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        embeddings = embed(model, test.images)
    finally:
        torch.set_num_threads(threads)
    metrics = retrieval_metrics(embeddings, test.labels, ks=(1, 2, 4, 8), nmi=True)
    assert {name: float(value) for name, value in metrics.items()} == run["metrics"]
    # ... and it is a trained model: the seeded initialization (an untrained network already
    # scores about 0.35 on the smoke preset's test split) moved in the epoch's steps.
    set_seed(run["recipe"]["seed"])
    start = compare.method_recipe("batch_hard", settings[setting], config)["model"]()
    moved = [
        name
        for name, tensor in start.state_dict().items()
        if tensor.is_floating_point() and not torch.equal(tensor, model.state_dict()[name])
    ]
    assert len(moved) > len(start.state_dict()) / 2


def test_a_missing_run_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="name the --out folder of a finished launch"):
        load_model(tmp_path)
