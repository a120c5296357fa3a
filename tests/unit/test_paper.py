"""The papers' recipes (utils_cv.similarity.paper): their numbers, and the command end to end
on small datasets written in the official layouts."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from tests.image_folders import pattern
from utils_cv.similarity import compare, record_files
from utils_cv.similarity.backbones import BACKBONES
from utils_cv.similarity.datasets import write_cub_layout, write_inshop_layout
from utils_cv.similarity.paper import (
    DATASETS,
    FIELDS,
    PAPER_RECIPES,
    WEIGHTS,
    main,
    recipe,
    scaled_schedule,
    train_recipe,
)
from utils_cv.similarity.runner import lr_schedule

# Recall@1 in percent as METHODS.md states it, written here once on purpose:
# a typo in the recipes or here fails the test.
PAPER = {
    "norm_softmax_512": {"cub": 61.3, "cars196": 84.2},
    "norm_softmax_2048": {"cub": 65.4, "cars196": 89.5, "sop": 79.6, "inshop": 89.4},
    "proxy_nca": {"cub": 49.2, "cars196": 73.2, "sop": 73.7},
    "ee_batch_hard": {"cub": 51.7, "cars196": 71.6},
    "ranking_regularizer": {},
}
NORM_SOFTMAX_BINARY = {"cub": 63.7, "cars196": 89.3, "sop": 78.0, "inshop": 88.8}
OVERRIDES = ["--backbone", "small_cnn", "--image-size", "32", "--batch-size", "16",
             "--workers", "0", "--cpu"]  # fmt: skip
CLASSES, PER_CLASS, SIZE = 8, 4, 32


def images_and_labels():
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    variants = [k % PER_CLASS for k in range(len(labels))]
    images = torch.stack(
        [
            torch.from_numpy(pattern(int(c), v, SIZE)).permute(2, 0, 1)
            for c, v in zip(labels, variants, strict=True)
        ]
    )
    return images, labels


def run(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the loaders warn: 8 classes, not the official count
        return main(argv)


def test_every_recipe_is_complete_and_states_the_papers_numbers():
    assert set(PAPER_RECIPES) == set(PAPER)
    for name, spec in PAPER_RECIPES.items():
        missing = [field for field in FIELDS if field not in spec]
        assert not missing, (name, missing)
        assert spec["paper"] == PAPER[name], name
        assert set(spec["lr"]) == set(DATASETS), name
        S = spec["samples_per_class"]
        assert S is None or set(S) == set(DATASETS), name
        assert spec["method"] in compare.METHODS
        assert spec["backbone"] in BACKBONES and spec["weights"] == WEIGHTS[spec["backbone"]]
        if spec["backbone"] != spec["paper_backbone"].lower().replace("-", ""):
            assert spec["differs"][0].startswith("backbone:"), name
    assert PAPER_RECIPES["norm_softmax_2048"]["paper_binary"] == NORM_SOFTMAX_BINARY
    for name in ("norm_softmax_512", "norm_softmax_2048"):
        spec = PAPER_RECIPES[name]
        assert spec["batch_size"] == 75 and spec["temperature"] == 0.05 and spec["layer_norm"]
        assert spec["samples_per_class"] == {"cub": 25, "cars196": 25, "sop": 5, "inshop": 5}
        assert spec["lr"]["cub"] == 0.001 and spec["lr"]["sop"] == 0.01
        assert spec["optimizer"] == {"name": "SGD", "momentum": 0.9, "weight_decay": 1e-4}
        assert (spec["epochs"], spec["frozen_epochs"]) == (31, 1)
    assert PAPER_RECIPES["norm_softmax_512"]["embedding_size"] == 512
    assert PAPER_RECIPES["norm_softmax_2048"]["embedding_size"] == 2048
    proxy = PAPER_RECIPES["proxy_nca"]
    assert (proxy["embedding_size"], proxy["batch_size"], proxy["label_smoothing"]) == (64, 32, 0.1)
    assert proxy["scale"]["cub"] == 9.0 and proxy["scale"]["sop"] == 8.0
    assert proxy["optimizer"]["eps"] == 1.0 and proxy["lr"]["cub"] == 0.045
    ranking = PAPER_RECIPES["ranking_regularizer"]
    assert (ranking["batch_size"], ranking["samples_per_class"]["cub"]) == (32, 4)
    assert (ranking["embedding_size"], ranking["margin"]) == (256, 0.2)
    assert PAPER_RECIPES["ee_batch_hard"]["n_points"] == 2
    # torchvision's closest to GoogLeNet and BN-Inception (issue 28)
    assert PAPER_RECIPES["ee_batch_hard"]["backbone"] == proxy["backbone"] == "googlenet"
    # The schedules METHODS.md states, and each valid for its recipe's loss phase.
    assert PAPER_RECIPES["norm_softmax_512"]["lr_schedule"] == {
        "name": "step", "milestones": [15], "gamma": 0.1}  # fmt: skip
    assert proxy["lr_schedule"] == {"name": "exponential", "gamma": 0.94}
    assert ranking["lr_schedule"] == "linear"
    for spec in PAPER_RECIPES.values():
        lr_schedule(spec["lr_schedule"], spec["epochs"] - spec.get("frozen_epochs", 0))
        assert (spec["train_crop"], spec["eval_resize"]) in ((224, 256), (227, 256))


def test_a_shorter_run_moves_the_milestones_to_the_same_share_of_its_epochs():
    step = {"name": "step", "milestones": [15], "gamma": 0.1}
    assert scaled_schedule(step, 30, 30) is step
    assert scaled_schedule(step, 30, 10) == {"name": "step", "milestones": [5], "gamma": 0.1}
    assert scaled_schedule(step, 30, 1) == "constant"  # no epoch left after the milestone
    assert scaled_schedule({"name": "step", "milestones": [10, 20]}, 30, 4)["milestones"] == [1, 3]
    assert scaled_schedule(step, 30, 5)["milestones"] == [3]  # 2.5 rounds up, not to even
    # two milestones on one epoch keep both steps: x 0.01 from epoch 1 of 2
    assert scaled_schedule({"name": "step", "milestones": [14, 16]}, 30, 2)["milestones"] == [1, 1]
    assert lr_schedule(scaled_schedule({"name": "step", "milestones": [14, 16]}, 30, 2), 2)(
        0.5
    ) == pytest.approx(0.01)
    # exponential: after the same share of the phase, the paper's factor (0.94^20 after 20 of 20)
    fast = scaled_schedule({"name": "exponential", "gamma": 0.94}, 20, 4)
    assert fast["gamma"] ** 4 == pytest.approx(0.94**20)
    assert scaled_schedule("linear", 40, 2) == "linear"


def test_unknown_recipe_or_dataset_names_the_choices(tmp_path, capsys):
    with pytest.raises(ValueError, match="norm_softmax_512"):
        recipe("norm_softmax")
    with pytest.raises(ValueError, match="'cub', 'cars196', 'sop', 'inshop'"):
        train_recipe("proxy_nca", "cub200", tmp_path, tmp_path)
    for argv in (
        ["--recipe", "nope", "--dataset", "cub"],
        ["--recipe", "proxy_nca", "--dataset", "x"],
    ):
        with pytest.raises(SystemExit):
            main([*argv, "--root", str(tmp_path), "--out", str(tmp_path)])
        error = capsys.readouterr().err
        assert "invalid choice" in error and ("norm_softmax_512" in error or "inshop" in error)


def test_cub_run_writes_a_checksummed_record_and_the_comparison(tmp_path):
    images, labels = images_and_labels()
    root = write_cub_layout(
        tmp_path / "CUB_200_2011", images, labels, [f"bird {c}" for c in range(CLASSES)]
    )
    out = tmp_path / "paper"
    argv = ["--recipe", "norm_softmax_512", "--dataset", "cub", "--root", str(root),
            "--out", str(out), "--epochs", "3", "--samples-per-class", "4", *OVERRIDES]  # fmt: skip
    assert run(argv) == 0
    path = record_files.result_path(out, "norm_softmax_512", "cub", "norm_softmax", 0)
    record = record_files.read_record(path)  # the stored records' own checksum check
    assert (record["recipe"], record["dataset"], record["evaluation"]) == (
        "norm_softmax_512",
        "cub",
        "all",
    )
    assert record["batches"] == "4 classes x 4 images"
    # 1 frozen + 2 epochs where the paper has 1 + 30: the milestone moves to 15 x 2 / 30 = 1
    assert record["lr_schedule"] == {"name": "step", "milestones": [1], "gamma": 0.1}
    assert record["crop_pct"] == 224 / 256
    assert record["protocol"]["backbone"] == "small_cnn" and record["protocol"]["weights"] is None
    assert record["data"]["images"] == CLASSES * PER_CLASS
    assert record["metrics"]["num_queries"] == 16  # the 4 test classes' images
    assert record["bytes_per_image"] == 4 * 512 and "binary_metrics" in record
    assert path.with_suffix(".pt").exists()
    rows = json.loads((out / "comparison.json").read_text())
    assert len(rows) == 1 and rows[0]["paper_recall@1"] == 61.3
    assert math.isclose(rows[0]["difference"], rows[0]["ours_recall@1"] - 61.3, abs_tol=0.11)
    assert rows[0]["overrides"]["backbone"] == "small_cnn"
    assert "| norm_softmax_512 | cub | 0 | all |" in (out / "comparison.md").read_text()
    record["metrics"]["recall@1"] += 0.5  # an edit the checksum catches
    path.write_text(json.dumps(record))
    with pytest.raises(record_files.StoredResultError, match="checksum"):
        record_files.read_record(path)


def test_inshop_run_searches_the_queries_in_the_gallery(tmp_path):
    images, labels = images_and_labels()
    root = write_inshop_layout(tmp_path / "inshop", images, labels)
    out = tmp_path / "paper"
    argv = ["--recipe", "proxy_nca", "--dataset", "inshop", "--root", str(root),
            "--out", str(out), "--epochs", "1", *OVERRIDES]  # fmt: skip
    assert run(argv) == 0
    record = record_files.read_record(
        record_files.result_path(out, "proxy_nca", "inshop", "proxy_nca", 0)
    )
    assert record["evaluation"] == "query->gallery"
    # 4 test items of 4 images: 2 queries each, searched among the 2 gallery images each.
    assert record["metrics"]["num_queries"] == 8
    assert record["batches"] == "random 16"
    # 1 epoch where the paper has 20: the whole decay, 0.94^20, in one step (never reached)
    assert record["lr_schedule"] == {"name": "exponential", "gamma": pytest.approx(0.94**20)}
    assert json.loads((out / "comparison.json").read_text())[0]["paper_recall@1"] is None
