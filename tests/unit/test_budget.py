"""The GPU presets' budget: every notebook's GPU preset fits about 6 minutes on one H200 by
the count of its trainings (which the notebook smoke tests check against the real runs)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from utils_cv.similarity import budget
from utils_cv.similarity.datasets.emoji import DEFAULT_ROOT
from utils_cv.similarity.presets import IMAGENET, SCRATCH, preset_config

NOTEBOOK_DIR = Path(__file__).resolve().parents[2] / "notebooks"
NOTEBOOKS = sorted(path.stem for path in NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_every_gpu_preset_fits_its_budget(notebook):
    config = preset_config("gpu", notebook)
    trainings = budget.planned_trainings(notebook, config)
    seconds = budget.gpu_seconds(trainings, budget.default_images(config), config)
    assert seconds <= budget.NOTEBOOK_BUDGET_SECONDS, (
        f"{notebook}'s GPU preset: about {seconds / 60:.1f} min for {len(trainings)} trainings"
    )
    # ... and it still compares on three seeds.
    assert len(config["seeds"]) >= 3


def test_the_budget_counts_each_training_with_its_data_and_epochs():
    config = preset_config("gpu", "04_binarization")
    trainings = budget.planned_trainings("04_binarization", config)
    # Four sizes (512 is also the main one) on three seeds, in each setting.
    assert trainings.count(budget.Training(SCRATCH, config["epochs"])) == 12
    assert trainings.count(budget.Training(IMAGENET, config["finetune_epochs"])) == 12
    passes = budget.image_passes(trainings, budget.default_images(config))
    assert passes[SCRATCH] == 12 * config["epochs"] * budget.EMOJI_TRAIN_IMAGES
    one = budget.gpu_seconds(trainings[:1], budget.default_images(config), config)
    rate = budget.IMAGES_PER_SECOND[config["backbone"]]
    assert one == pytest.approx(budget.OVERHEAD_SECONDS + passes[SCRATCH] / 12 / rate)


def test_notebook_05s_long_tailed_sets_train_on_part_of_the_closed_set():
    config = preset_config("gpu", "05_ranking_regularizer")
    shares = budget.closed_shares(config)
    assert shares[0] == 1.0 and len(shares) == 1 + len(config["imbalance_ratios"])
    assert all(0 < later < earlier for earlier, later in zip(shares, shares[1:], strict=False))


def test_notebook_07_counts_only_what_it_trains():
    config = preset_config("gpu", "07_method_comparison")
    trainings = budget.planned_trainings("07_method_comparison", config)
    assert {t.kind for t in trainings} == {SCRATCH}  # the GPU preset: no ImageNet setting
    assert len(trainings) == 27  # nine methods, three seeds, no ablation
    every = preset_config("cpu", "07_method_comparison", recheck=[])
    assert len(budget.planned_trainings("07_method_comparison", every)) == 114


def test_an_unknown_notebook_has_no_plan():
    with pytest.raises(ValueError, match="no plan"):
        budget.planned_trainings("99_mine", preset_config("gpu"))


@pytest.mark.skipif(not (DEFAULT_ROOT / "manifest.csv").exists(), reason="run `make data`")
def test_the_emoji_training_split_has_the_images_the_budget_counts():
    with open(DEFAULT_ROOT / "manifest.csv", newline="", encoding="utf-8") as file:
        splits = [row["split"] for row in csv.DictReader(file)]
    assert splits.count("train") == budget.EMOJI_TRAIN_IMAGES
