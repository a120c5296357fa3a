"""What each notebook's preset trains, counted before it runs, and what that costs on a GPU;
what one training step costs (``step_cost``: time, and the memory a loss keeps for backward).

A GPU preset must fit one device call (about 6 minutes on an H200) by construction, not by
luck. ``planned_trainings`` lists the trainings a notebook runs under a preset: one entry
per ``train_run`` call, with the data it trains on (``KINDS``) and its epochs. The notebook
smoke tests check the list against what the notebooks really trained (``train_run``'s
training log, ``runner.TRAINING_LOG``), so the count cannot drift from the code.
``gpu_seconds`` turns it into an estimate from the measured throughput below.

>>> from utils_cv.similarity.presets import preset_config
>>> len(planned_trainings("04_binarization", preset_config("gpu", "04_binarization")))
24
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from utils_cv.similarity.presets import IMAGENET, SCRATCH

# The data a training runs on: the lessons' data (DATASET) in their two settings (from
# scratch at the preset's image size, from ImageNet weights at finetune_image_size), and
# notebook 05's closed-set Fashion-MNIST subsets in the same two.
CLOSED, CLOSED_IMAGENET = "closed set " + SCRATCH, "closed set " + IMAGENET
KINDS = (SCRATCH, IMAGENET, CLOSED, CLOSED_IMAGENET)

# Images per second through training (forward, backward, update, the per-epoch validation)
# of several trainings at once on one H200, bf16: ResNet-18 at 64 px, measured on
# 2026-12-04 (seven processes at once, about 2.3 times one training's 9,300 images/s with
# the GPU presets' validation: 50 epochs of the 5,189 training images in 65-100 s each).
# EfficientNet-Lite0 has not run on a GPU here: ASSUMED half that (more, smaller layers,
# so more kernel launches per image); .ci/gpu-check prints what each notebook really took.
IMAGES_PER_SECOND = {"resnet18": 20_000, "efficientnet_lite0": 10_000}
# Per notebook: starting the kernel, loading data, evaluating, plotting (a guess; the first
# GPU run's 00 took about a minute beside its one 28-s training).
OVERHEAD_SECONDS = 60
# A device call is 10 minutes; the installs and data take about one, the GPU check's CUDA
# benchmarks one more: a notebook may take about 6 (DESIGN.md).
NOTEBOOK_BUDGET_SECONDS = 6 * 60


# The built-in emoji data's training split (eight designs): 5,189 images of 763 classes.
EMOJI_TRAIN_IMAGES = 5_189


@dataclass(frozen=True)
class Training:
    """One training: its data (``KINDS``), epochs, and the share of that data it trains on
    (notebook 05's long-tailed subsets keep a part of the balanced closed set)."""

    kind: str
    epochs: int
    share: float = 1.0


def _count(entries: list[tuple]) -> list[Training]:
    return [Training(*entry[:2], *entry[3:]) for entry in entries for _ in range(entry[2])]


def closed_shares(config: Mapping[str, Any]) -> list[float]:
    """Notebook 05's closed training sets (balanced, then each imbalance ratio) as shares of
    the balanced one: ``long_tail_counts`` over ten classes."""
    from utils_cv.similarity.datasets.long_tail import long_tail_counts

    n_max = config["closed_per_class"]
    ratios = [1.0, *config["imbalance_ratios"]]
    return [sum(long_tail_counts(10, n_max, r)) / (10 * n_max) for r in ratios]


def default_images(config: Mapping[str, Any]) -> dict[str, int]:
    """Training images of each kind with the built-in data: the emoji training split, and
    Fashion-MNIST's balanced closed set of notebook 05 (``closed_per_class`` x 10)."""
    closed = 10 * config.get("closed_per_class", 0)
    return {SCRATCH: EMOJI_TRAIN_IMAGES, IMAGENET: EMOJI_TRAIN_IMAGES,
            CLOSED: closed, CLOSED_IMAGENET: closed}  # fmt: skip


def planned_trainings(
    notebook: str, config: Mapping[str, Any], train_classes: int = 763
) -> list[Training]:
    """Every training ``notebook`` runs under ``config`` (``preset_config``'s), in no order.

    train_classes: the training classes of the data (763 for the emoji data), which decides
    which samples per class fit notebook 03's batches. Notebook 07 counts what it trains
    with nothing stored (``TRAIN_MISSING``), its re-checks included.
    """
    from utils_cv.similarity import compare  # here: compare imports torch-heavy modules

    c = config
    seeds, epochs, tuned = len(c["seeds"]), c["epochs"], c["finetune_epochs"]
    if notebook == "00_quickstart":
        return _count([(SCRATCH, epochs, 1), (IMAGENET, tuned, 1)])
    if notebook == "01_triplet_baseline":
        margins = [m for m in c["sweep_margins"] if m != c["margin"]]
        extra = len(c["cures"]) + len(margins)
        return _count([(SCRATCH, epochs, 4 * seeds + extra), (IMAGENET, tuned, 2 * seeds)])
    if notebook == "02_proxy_nca":
        swept = sum(len(values) for values in c["sweeps"].values())
        return _count([(SCRATCH, epochs, 3 * seeds + swept), (IMAGENET, tuned, 2 * seeds)])
    if notebook == "03_norm_softmax":
        batch = c["classes_per_batch"] * c["samples_per_class"]
        main = {"temperature": c["temperature"], "layer_norm": True, "frozen_epochs": 1,
                "embedding_size": c["embedding_size"], "samples_per_class": c["norm_samples_per_class"]}  # fmt: skip

        def fits(setting, v):  # the notebook's own rule: B // S classes must fit a batch
            return setting != "samples_per_class" or not v or 2 <= batch // v <= train_classes

        sweep_seeds = len(c["sweep_seeds"])
        reused = len(set(c["sweep_seeds"]) & set(c["seeds"]))  # the main run's seeds
        swept = 0
        for setting, values in c["sweeps"].items():
            grid = [v for v in dict.fromkeys([main[setting], *values]) if fits(setting, v)]
            swept += len(grid) * sweep_seeds - (reused if main[setting] in grid else 0)
        changes = 1 + sum(v != main[s] and fits(s, v)
                          for s, values in c["pretrained_sweeps"].items() for v in values)  # fmt: skip
        return _count([(SCRATCH, epochs, 4 * seeds + swept), (IMAGENET, tuned, changes * sweep_seeds)])  # fmt: skip
    if notebook == "04_binarization":
        sizes = len({c["embedding_size"], *c["embedding_sizes"]})
        return _count([(SCRATCH, epochs, sizes * seeds),
                       (IMAGENET, tuned, len(c["pretrained_sizes"]) * seeds)])  # fmt: skip
    if notebook == "05_ranking_regularizer":  # per closed set: 4 methods, the pair from ImageNet
        closed = c["closed_epochs"]
        entries = [(kind, closed, n * seeds, share) for share in closed_shares(c)
                   for kind, n in ((CLOSED, 4), (CLOSED_IMAGENET, 2))]  # fmt: skip
        entries += [(CLOSED, closed, len(c["ranking_weights"]) * seeds)]  # the λ sweep, balanced
        return _count([*entries, (SCRATCH, epochs, 2 * seeds)])  # retrieval: two models
    if notebook == "06_embedding_expansion":
        ablations = len(c["points_sweep"]) + bool(c["projection_ablation"])
        return _count([(SCRATCH, epochs, 4 * seeds + ablations), (IMAGENET, tuned, 4 * seeds)])
    if notebook == "08_fast_retrieval":  # one model; the lesson is the search
        return _count([(SCRATCH, epochs, 1)])
    if notebook == "09_your_own_data":  # one fine-tuning of the pretrained network
        return _count([(IMAGENET, tuned, 1)])
    if notebook == "07_method_comparison":
        methods = compare.to_train(c)
        budget = {SCRATCH: epochs, IMAGENET: tuned}
        entries = [(name, budget[name], len(methods) * seeds) for name in c["train_settings"]]
        entries += [(name, budget[name], 1) for _, name in c["recheck"]]
        return _count(entries)
    raise ValueError(f"no plan for notebook {notebook!r}")


def image_passes(trainings: list[Training], images: Mapping[str, int]) -> Counter:
    """Images through the network per kind: epochs x training images (``images[kind]``)."""
    passes: Counter = Counter()
    for training in trainings:
        passes[training.kind] += round(training.epochs * images[training.kind] * training.share)
    return passes


def gpu_seconds(
    trainings: list[Training], images: Mapping[str, int], config: Mapping[str, Any]
) -> float:
    """The estimated seconds of a notebook on one H200: its image passes at
    ``IMAGES_PER_SECOND`` of its backbones, plus ``OVERHEAD_SECONDS``."""
    rates = {SCRATCH: config["backbone"], CLOSED: config["backbone"],
             IMAGENET: config["finetune_backbone"], CLOSED_IMAGENET: config["finetune_backbone"]}  # fmt: skip
    passes = image_passes(trainings, images)
    return OVERHEAD_SECONDS + sum(n / IMAGES_PER_SECOND[rates[kind]] for kind, n in passes.items())


def step_cost(
    model: nn.Module,
    loss: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """What one training step costs: time, and the memory the loss keeps for backward.

    Runs ``warmup`` + ``repeats`` steps of forward, loss and backward on one batch, on the
    model's device, in training mode. There is no optimizer step, so the weights do not
    change (BatchNorm's running statistics do, as in any training step). The time includes
    whatever the loss computes besides its value (its ``stats``).

    Args:
        model, loss: as for training; ``loss(model(images), labels)``.
        images: (B, 3, H, W) uint8 (scaled to [0, 1] as the data loaders do) or float.
        labels: (B,) int.

    Returns:
        A dict:

        - "ms_per_step": mean wall time of the timed steps (CUDA synchronized);
        - "loss_saved_kib": the bytes of every tensor autograd saves while computing the
          loss from the embeddings (the activation memory the loss adds to a step; a tensor
          saved twice counts twice), measured with ``saved_tensors_hooks``;
        - "step_saved_kib": the same for the whole step (model and loss), for scale;
        - "peak_gpu_mib" (CUDA only): the steps' peak allocated CUDA memory.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = next(model.parameters()).device
    images = images.to(device)
    images = images.float() / 255 if images.dtype == torch.uint8 else images
    labels = labels.to(device)
    # The loss's own saved tensors only: detached embeddings, so the backbone's graph is
    # neither counted nor kept alive during the timed steps.
    with torch.no_grad():
        embeddings = model(images)
    embeddings.requires_grad_(True)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.nbytes)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss(embeddings, labels)
        loss_bytes = sum(saved)
        loss(model(images), labels)  # the whole step: backbone, head and loss
    del embeddings
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + repeats):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss(model(images), labels).backward()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cost = {
        "ms_per_step": 1000 * seconds / repeats,
        "loss_saved_kib": loss_bytes / 2**10,
        "step_saved_kib": (sum(saved) - loss_bytes) / 2**10,
    }
    if cuda:
        cost["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return cost
