"""Presets: name resolution, overrides and per-notebook settings."""

import pytest
import torch

from tests.image_folders import write_image_folder
from utils_cv.similarity.backbones import efficientnet_lite0_state_dict
from utils_cv.similarity.presets import (
    IMAGENET,
    NOTEBOOK_PRESETS,
    PRESETS,
    SCRATCH,
    lesson_settings,
    preset_config,
    pretrained_net,
    resolve_preset,
)


def test_auto_resolves_by_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_preset("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_preset("auto") == "gpu"


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="PRESET='fast' is unknown.*'cpu'"):
        resolve_preset("fast")


def test_overrides_apply_unless_none_and_unknown_ones_are_refused():
    config = preset_config("cpu", epochs=3, lr=None)
    assert config["epochs"] == 3
    assert config["lr"] == PRESETS["cpu"]["lr"]
    assert config["preset"] == "cpu"
    with pytest.raises(ValueError, match="unknown preset setting"):
        preset_config("cpu", epoch=3)


def test_notebook_settings_layer_between_preset_and_overrides():
    own = NOTEBOOK_PRESETS["01_triplet_baseline"]
    config = preset_config("cpu", notebook="01_triplet_baseline")
    assert config["epochs"] == own["cpu"]["epochs"] != PRESETS["cpu"]["epochs"]
    assert preset_config("cpu", notebook="01_triplet_baseline", margin=0.5)["margin"] == 0.5
    # The shared presets are not modified by a notebook's settings.
    assert "margin" not in preset_config("cpu")


@pytest.mark.parametrize("notebook", sorted(NOTEBOOK_PRESETS))
def test_a_notebook_adds_the_same_settings_to_every_preset(notebook):
    # Otherwise a parameter that works with one preset would be refused with another.
    added = {
        name: set(values) - set(PRESETS[name])
        for name, values in NOTEBOOK_PRESETS[notebook].items()
    }
    assert set(added) == set(PRESETS)
    assert len({frozenset(keys) for keys in added.values()}) == 1


@pytest.mark.parametrize(
    "override, message",
    [
        (
            {"seeds": "[0, 1, 2]"},
            r"SEEDS='\[0, 1, 2\]' must be a non-empty list of integers.*-y 'SEEDS: \[0\]'",
        ),
        ({"seeds": []}, "SEEDS=\\[\\] must be a non-empty list of integers"),
        ({"seeds": [0.5]}, "must be a non-empty list of integers"),
        ({"epochs": 2.5}, "EPOCHS=2.5 must be an integer"),
        ({"epochs": True}, "EPOCHS=True must be an integer"),
        ({"lr": "1e-3"}, "LR='1e-3' must be a number.*-y 'LR: 0.01'"),
        ({"backbone": 18}, "BACKBONE=18 must be a string"),
    ],
)
def test_an_override_of_the_wrong_type_is_refused_with_the_fix(override, message):
    # papermill -p SEEDS "[0, 1, 2]" hands the notebook a string, which would otherwise be
    # iterated character by character deep inside the training loop.
    with pytest.raises(TypeError, match=message):
        preset_config("cpu", **override)


def test_overrides_of_the_right_type_are_accepted():
    config = preset_config("cpu", seeds=(3, 4), lr=1, epochs=5, max_classes=50)
    assert config["seeds"] == (3, 4) and config["lr"] == 1 and config["max_classes"] == 50


def test_cures_must_be_known():
    config = preset_config("cpu", notebook="01_triplet_baseline", cures=["batch_hard_soft"])
    assert config["cures"] == ["batch_hard_soft"]
    with pytest.raises(ValueError, match=r"CURES names unknown \['aspirin'\]; choose from"):
        preset_config("cpu", notebook="01_triplet_baseline", cures=["aspirin"])


def test_an_empty_sweep_is_allowed_but_empty_seeds_are_not():
    config = preset_config("gpu", notebook="01_triplet_baseline", sweep_margins=[])
    assert config["sweep_margins"] == []
    with pytest.raises(TypeError, match=r"SEEDS=\[\] must be a non-empty list"):
        preset_config("gpu", notebook="01_triplet_baseline", seeds=[])


def test_list_settings_are_typed_even_where_the_preset_list_is_empty():
    config = preset_config("cpu", notebook="01_triplet_baseline", sweep_margins=[0.1, 1])
    assert config["sweep_margins"] == [0.1, 1]
    with pytest.raises(TypeError, match=r"SWEEP_MARGINS=\['0.1'\] must be a list of numbers"):
        preset_config("cpu", notebook="01_triplet_baseline", sweep_margins=["0.1"])
    # A string from papermill's -p gets a YAML example that would work.
    with pytest.raises(TypeError, match=r"-y 'SWEEP_MARGINS: \[0.05, 0.2\]'"):
        preset_config("cpu", notebook="01_triplet_baseline", sweep_margins="[0.1]")


def test_parameters_of_a_notebook_namespace_override_like_keywords():
    namespace = {"PRESET": "smoke", "EPOCHS": 7, "LR": None, "BACKBONE": "resnet18"}
    config = preset_config("smoke", parameters=namespace, lr=0.5)
    assert config["epochs"] == 7 and config["backbone"] == "resnet18" and config["lr"] == 0.5
    with pytest.raises(TypeError, match="EPOCHS='7'"):
        preset_config("smoke", parameters={"EPOCHS": "7"})


def test_sweeps_name_only_settings_notebook_02_knows():
    config = preset_config("cpu", notebook="02_proxy_nca", sweeps={"proxies_per_class": [0.5]})
    assert config["sweeps"] == {"proxies_per_class": [0.5]}
    with pytest.raises(ValueError, match=r"SWEEPS names unknown \['temperature'\]; choose from"):
        preset_config("cpu", notebook="02_proxy_nca", sweeps={"temperature": [0.1]})
    with pytest.raises(TypeError, match="SWEEPS=.*-y 'SWEEPS: "):
        preset_config("cpu", notebook="02_proxy_nca", sweeps="{scale: [3]}")


# The pretrained setting's budget too: each lesson's second setting trains like 01's.
SHARED_WITH_01 = ("image_size", "epochs", "lr", "classes_per_batch", "samples_per_class", "margin",
                  "finetune_image_size", "finetune_epochs", "finetune_lr", "frozen_stages")  # fmt: skip


PRETRAINED_BUDGET = ("finetune_epochs", "frozen_stages")


def assert_trains_like_01(preset: str, config: dict, pretrained: bool = True) -> None:
    """A notebook's preset keeps notebook 01's budget and batches, so comparisons are fair.

    pretrained=False: only the scratch setting's; the pretrained one may be smaller (fewer
    epochs, more frozen stages), never larger.
    """
    triplet = preset_config(preset, notebook="01_triplet_baseline")
    for key in SHARED_WITH_01:
        if pretrained or key not in PRETRAINED_BUDGET:
            assert config[key] == triplet[key], key
    assert config["finetune_epochs"] <= triplet["finetune_epochs"]
    assert config["frozen_stages"] >= triplet["frozen_stages"]


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_notebook_02_trains_at_notebook_01s_budget_and_batches(preset):
    assert_trains_like_01(preset, preset_config(preset, notebook="02_proxy_nca"))


def test_sweeps_name_only_settings_notebook_03_knows():
    config = preset_config("cpu", notebook="03_norm_softmax", sweeps={"temperature": [0.1]})
    assert config["sweeps"] == {"temperature": [0.1]}
    with pytest.raises(ValueError, match=r"SWEEPS names unknown \['scale'\]; choose from"):
        preset_config("cpu", notebook="03_norm_softmax", sweeps={"scale": [3.0]})
    with pytest.raises(TypeError, match="SWEEP_SEEDS=.*a list of integers"):
        preset_config("cpu", notebook="03_norm_softmax", sweep_seeds=[0.5])


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_notebook_03_compares_at_the_budget_and_settings_of_01_and_02(preset):
    proxy = preset_config(preset, notebook="02_proxy_nca")
    norm = preset_config(preset, notebook="03_norm_softmax")
    assert_trains_like_01(preset, norm)
    assert (norm["scale"], norm["proxy_lr_multiplier"]) == (
        proxy["scale"],
        proxy["proxy_lr_multiplier"],
    )
    # Every S the sweep tries leaves at least two classes in a batch.
    batch = norm["classes_per_batch"] * norm["samples_per_class"]
    for s in norm["sweeps"].get("samples_per_class", []):
        assert s is None or 1 <= s <= batch // 2, s


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_notebook_04_binarizes_notebook_03s_main_norm_softmax(preset):
    norm = preset_config(preset, notebook="03_norm_softmax")
    binary = preset_config(preset, notebook="04_binarization")
    for key in (
        "image_size",
        "epochs",
        "lr",
        "classes_per_batch",
        "samples_per_class",
        "temperature",
        "norm_samples_per_class",
        "embedding_size",
        "seeds",
    ):
        assert binary[key] == norm[key], key  # fmt: skip
    # float_bytes in the benchmark searches bits / 32 float dimensions
    assert all(bits % 32 == 0 for bits in binary["search_bits"])
    with pytest.raises(TypeError, match="EMBEDDING_SIZES=.*a list of integers"):
        preset_config(preset, notebook="04_binarization", embedding_sizes=[0.5])


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_notebook_05_retrieves_at_notebook_01s_budget_and_batches(preset):
    ranking = preset_config(preset, notebook="05_ranking_regularizer")
    assert_trains_like_01(preset, ranking)
    # the paper's batches: 8 classes x 4 images, within Fashion-MNIST's 10 classes
    assert ranking["closed_classes_per_batch"] == 8
    # every long tail keeps at least one image of its rarest class
    assert all(1 <= r <= 2 * ranking["closed_per_class"] for r in ranking["imbalance_ratios"])
    with pytest.raises(TypeError, match="RANKING_WEIGHTS=.*a list of numbers"):
        preset_config(preset, notebook="05_ranking_regularizer", ranking_weights="0.5")


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_notebook_06_trains_at_notebook_01s_budget_with_pairs_in_every_class(preset):
    expansion = preset_config(preset, notebook="06_embedding_expansion")
    # Four pretrained trainings do not fit the CPU's 10 minutes at 01's pretrained budget.
    assert_trains_like_01(preset, expansion, pretrained=preset != "cpu")
    # Embedding Expansion pairs the images of each class: K must be even.
    assert expansion["samples_per_class"] % 2 == 0
    assert expansion["n_points"] not in expansion["points_sweep"]  # the main run gives it
    assert all(0 < size <= 1 for size in expansion["occlusion_sizes"])
    with pytest.raises(TypeError, match="POINTS_SWEEP=.*a list of integers"):
        preset_config(preset, notebook="06_embedding_expansion", points_sweep=[2.5])


def test_pretrained_net_follows_the_presets_pretrained_setting():
    config = preset_config("smoke")
    net = pretrained_net(config, 16, normalize=False)
    assert net.frozen_stages == config["frozen_stages"] and net.embedding_size == 16
    assert not net.normalize
    conv = net.backbone.conv_stem.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    imagenet = efficientnet_lite0_state_dict()["conv_stem.weight"]
    assert torch.equal(conv, imagenet)  # the ImageNet weights, not a random start


def test_lesson_settings_differ_in_start_size_and_budget_not_in_classes(tmp_path):
    folder = write_image_folder(tmp_path / "mine", classes=30)
    config = preset_config("smoke", image_size=24, finetune_image_size=32, finetune_epochs=3)
    settings = lesson_settings(config, folder, data_dir=tmp_path / "cache")
    scratch, imagenet = settings[SCRATCH], settings[IMAGENET]
    assert (scratch.name, imagenet.name) == (SCRATCH, IMAGENET)
    assert scratch.train.images.shape[-1] == 24 and imagenet.train.images.shape[-1] == 32
    for split in ("train", "val", "test"):  # the same images in the same order
        assert torch.equal(getattr(scratch, split).labels, getattr(imagenet, split).labels)
    assert scratch.train.labels.max() == scratch.train.num_classes - 1  # relabeled
    assert (scratch.epochs, scratch.lr) == (config["epochs"], config["lr"])
    assert (imagenet.epochs, imagenet.lr) == (3, config["finetune_lr"])
    assert imagenet.rate() == imagenet.lr and imagenet.rate(0.5) == imagenet.lr / 2
    assert imagenet.rate((1.0, 10.0)) == (imagenet.lr, 10 * imagenet.lr)
    assert imagenet.budget == {"train": imagenet.train, "val": imagenet.val,
                               "test": imagenet.test, "epochs": 3}  # fmt: skip
    assert scratch.net(8).embedding_size == 8 and scratch.net(8).frozen_stages == 0
    pretrained = imagenet.net(normalize=False)
    assert pretrained.frozen_stages == config["frozen_stages"] and not pretrained.normalize
    assert pretrained.embedding_size == config["embedding_size"]
