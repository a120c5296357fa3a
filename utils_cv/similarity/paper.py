"""The papers' recipes as parameter sets, and one command that trains one on a benchmark::

    python -m utils_cv.similarity.paper --recipe norm_softmax_512 --dataset cub \\
        --root /data/CUB_200_2011 --out results/paper

``PAPER_RECIPES`` holds each paper's setup as METHODS.md gives it: backbone,
weights, image size, embedding size, batches, optimizer, schedule, epochs, and the paper's
Recall@1 per dataset (in percent, only the numbers METHODS.md states, with their table). The
learning rate follows the paper's schedule (``lr_schedule``, run by ``train_run(schedule=)``),
and evaluation images are resized to ``eval_resize`` and centre cropped to ``train_crop``
(``FileList.crop_pct``). Where this package cannot do what the paper did (a backbone
torchvision lacks) the recipe says so in ``differs``; ``unstated`` names the values METHODS.md
does not give, which are this package's choices.

The model and the loss come from notebook 07's ``compare.method_recipe``; the data from the
benchmark's loader, as a ``FileList`` decoded batch by batch (``train_run`` with
``image_size`` and ``num_workers``). The whole training set trains for the recipe's fixed
budget and the last epoch is kept (``--val-fraction`` holds out training classes to pick the
epoch instead); the official test split is used once at the end: In-Shop's queries searched
in its gallery (``cross_domain_views``), the other benchmarks' test images among themselves.
``DIR`` receives notebook 07's record (``compare.make_record``, checksummed, at
``record_files.result_path(DIR, <recipe>, <dataset>, <method>, <seed>)``), the weights beside it
(``.pt``), and ``comparison.json`` / ``comparison.md``: the paper's Recall@1 beside ours.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from utils_cv.common.results import markdown_table, rounded, write_atomic
from utils_cv.similarity import compare, record_files
from utils_cv.similarity.backbones import BACKBONES
from utils_cv.similarity.binary import binarize
from utils_cv.similarity.datasets import (
    FileList,
    cross_domain_views,
    load_cars196,
    load_cub,
    load_inshop,
    load_sop,
)
from utils_cv.similarity.metrics import retrieval_metrics
from utils_cv.similarity.presets import Setting

LOADERS = {"cub": load_cub, "cars196": load_cars196, "sop": load_sop, "inshop": load_inshop}
DATASETS = tuple(LOADERS)
# The K each benchmark reports (In-Shop: 1, 10, 20, 30 and more in its papers).
KS = {"cub": (1, 2, 4, 8), "cars196": (1, 2, 4, 8), "sop": (1, 10, 100, 1000),
      "inshop": (1, 10, 20, 30)}  # fmt: skip
# The weights each backbone can start from (small_cnn has none).
WEIGHTS = {"small_cnn": None, "resnet18": "IMAGENET1K_V1", "resnet50": "IMAGENET1K_V1",
           "googlenet": "IMAGENET1K_V1", "efficientnet_lite0": "imagenet"}  # fmt: skip
SGD = {"name": "SGD", "momentum": 0.9, "weight_decay": 1e-4}
_NORM_SOFTMAX = {
    "method": "norm_softmax",
    "paper_backbone": "ResNet-50",
    "backbone": "resnet50",
    "weights": "IMAGENET1K_V1",
    "train_crop": 224,
    "eval_resize": 256,
    "layer_norm": True,
    "temperature": 0.05,
    "batch_size": 75,
    "samples_per_class": {"cub": 25, "cars196": 25, "sop": 5, "inshop": 5},
    "optimizer": SGD,
    "lr": {"cub": 0.001, "cars196": 0.01, "sop": 0.01, "inshop": 0.01},
    "schedule": "1 warm-up epoch on the new parameters only, then 30 epochs, lr x 0.1 at 15",
    "lr_schedule": {"name": "step", "milestones": [15], "gamma": 0.1},
    "frozen_epochs": 1,
    "epochs": 31,
    "unstated": ["train_crop", "eval_resize", "samples_per_class (inshop)"],
}
PAPER_RECIPES: dict[str, dict[str, Any]] = {
    "norm_softmax_512": _NORM_SOFTMAX
    | {
        "title": "NormSoftmax (Zhai & Wu, 2019), 512-d",
        "embedding_size": 512,
        "paper": {"cub": 61.3, "cars196": 84.2},
        "source": "the paper's table at 512-d (ResNet-50)",
        "differs": [],
    },
    "norm_softmax_2048": _NORM_SOFTMAX
    | {
        "title": "NormSoftmax (Zhai & Wu, 2019), 2048-d",
        "embedding_size": 2048,
        "paper": {"cub": 65.4, "cars196": 89.5, "sop": 79.6, "inshop": 89.4},
        "paper_binary": {"cub": 63.7, "cars196": 89.3, "sop": 78.0, "inshop": 88.8},
        "source": "the reference repository's reproductions (ResNet-50, 2048-d, float / binary)",
        "differs": [],
    },
    "proxy_nca": {
        "title": "ProxyNCA (Movshovitz-Attias et al., 2017), 64-d",
        "method": "proxy_nca",
        "paper_backbone": "BN-Inception",
        "backbone": "googlenet",
        "weights": "IMAGENET1K_V1",
        "train_crop": 227,
        "eval_resize": 256,
        "embedding_size": 64,
        "scale": {"cub": 9.0, "cars196": 9.0, "sop": 8.0, "inshop": 8.0},
        "label_smoothing": 0.1,
        "batch_size": 32,
        "samples_per_class": None,
        "optimizer": {"name": "Adam", "eps": 1.0, "weight_decay": 0.0},
        "lr": {"cub": 0.045, "cars196": 0.045, "sop": 0.045, "inshop": 0.045},
        "proxy_lr_multiplier": {"cub": 1.0, "cars196": 1.0, "sop": 10.0, "inshop": 10.0},
        "schedule": "lr x 0.94 every epoch (dichotomies/proxy-nca's ExponentialLR)",
        "lr_schedule": {"name": "exponential", "gamma": 0.94},
        "epochs": 20,
        "paper": {"cub": 49.2, "cars196": 73.2, "sop": 73.7},
        "source": "the ProxyNCA paper's table (BN-Inception, 64-d)",
        "differs": [
            "backbone: torchvision has no BN-Inception; its GoogLeNet is the closest (Inception "
            "v1 with BatchNorm after every convolution, 6.6M parameters), where BN-Inception "
            "also splits the 5x5 convolutions into two 3x3 and is more accurate on ImageNet "
            "(top-1 74.8 % against 69.8 %)",
            "loss: the softmax form (positive proxy in the denominator), as "
            "dichotomies/proxy-nca and ProxyNCA++; the paper's excludes it",
        ],
        "unstated": [
            "train_crop",
            "eval_resize",
            "epochs",
            "scale (inshop)",
            "proxy_lr_multiplier (inshop)",
        ],  # fmt: skip
    },
    "ee_batch_hard": {
        "title": "Embedding Expansion (Ko & Gu, 2020) on batch-hard triplet, 512-d",
        "method": "ee",
        "ee_base": "batch_hard",
        "paper_backbone": "GoogLeNet",
        "backbone": "googlenet",
        "weights": "IMAGENET1K_V1",
        "train_crop": 227,
        "eval_resize": 256,
        "embedding_size": 512,
        "n_points": 2,
        "margin": 0.2,
        "batch_size": 128,
        "samples_per_class": {"cub": 4, "cars196": 4, "sop": 2, "inshop": 2},
        "optimizer": SGD,
        "lr": {"cub": 0.001, "cars196": 0.001, "sop": 0.001, "inshop": 0.001},
        "schedule": "not in METHODS.md",
        "lr_schedule": "one_cycle",
        "epochs": 40,
        "paper": {"cub": 51.7, "cars196": 71.6},
        "source": "the EE paper's table (GoogLeNet, 512-d, batch-hard 'HPHN' + EE)",
        "differs": [
            "backbone: torchvision's GoogLeNet has BatchNorm after every convolution, the "
            "paper's (Caffe's) has none; its auxiliary classifiers are left out",
        ],
        "unstated": [
            "train_crop",
            "eval_resize",
            "margin",
            "batch_size",
            "samples_per_class",
            "optimizer",
            "lr",
            "schedule",
            "epochs",
        ],  # fmt: skip
    },
    "ranking_regularizer": {
        "title": "Ranking regularizer (Taha et al., 2020): softmax + batch-hard triplet",
        "method": "ranking_head",
        "paper_backbone": "ResNet-50 (v2)",
        "backbone": "resnet50",
        "weights": "IMAGENET1K_V1",
        "train_crop": 224,
        "eval_resize": 256,
        "embedding_size": 256,
        "margin": 0.2,
        "batch_size": 32,
        "samples_per_class": {"cub": 4, "cars196": 4, "sop": 4, "inshop": 4},
        "optimizer": {"name": "SGD", "momentum": 0.9, "weight_decay": 1e-4},
        "lr": {"cub": 0.01, "cars196": 0.01, "sop": 0.01, "inshop": 0.01},
        "schedule": "lr decays linearly to 0 over 40k iterations",
        "lr_schedule": "linear",
        "epochs": 40,
        "paper": {},
        "source": "the paper reports classification top-1 (Cars 85.9 -> 89.4), not Recall@1",
        "differs": [
            "backbone: torchvision's ResNet-50 is v1; the second head reads the map after the "
            "last ReLU, not before the final BatchNorm + ReLU (models.TwoHeadNet)",
            "schedule: linear to 0 over this recipe's 40 epochs, the paper's over 40k "
            "iterations (about 160 epochs of Cars196's 8,054 training images at batch 32)",
            "evaluation: retrieval on unseen classes, where the paper classifies seen ones",
        ],
        "unstated": ["train_crop", "eval_resize", "optimizer (weight_decay)", "epochs"],
    },
}
# The fields every recipe has (tests/unit/test_paper.py checks them).
FIELDS = ("title", "method", "paper_backbone", "backbone", "weights", "train_crop",
          "eval_resize", "embedding_size", "batch_size", "samples_per_class", "optimizer", "lr",
          "schedule", "lr_schedule", "epochs", "paper", "source", "differs",
          "unstated")  # fmt: skip


def recipe(name: str) -> dict[str, Any]:
    """``PAPER_RECIPES[name]``; ValueError naming the choices for another name."""
    if name not in PAPER_RECIPES:
        raise ValueError(f"recipe {name!r} is unknown; choose from {list(PAPER_RECIPES)}")
    return PAPER_RECIPES[name]


def per_dataset(value: Any, dataset: str) -> Any:
    """A recipe value for ``dataset``: its entry when the value is a dict per dataset."""
    return value[dataset] if isinstance(value, dict) and dataset in value else value


def scaled_schedule(
    schedule: str | Mapping[str, Any], paper_epochs: int, epochs: int
) -> str | dict[str, Any]:
    """A recipe's ``lr_schedule`` for a loss phase of ``epochs`` epochs where the paper's has
    ``paper_epochs`` (a quick run with other epochs), so that the rate at the same share of
    the phase is the paper's: step milestones moved to the same share (rounded half up; two
    may fall on one epoch, which then multiplies by gamma twice), those on its first epoch or
    beyond its end left out, and a step schedule left with none "constant"; an exponential
    gamma raised to ``paper_epochs / epochs``. One-cycle, linear and constant scale by
    themselves."""
    if isinstance(schedule, str) or epochs == paper_epochs:
        return schedule
    if schedule.get("name") == "exponential":
        return dict(schedule, gamma=schedule["gamma"] ** (paper_epochs / epochs))
    if schedule.get("name") != "step":
        return schedule
    moved = sorted(math.floor(m * epochs / paper_epochs + 0.5) for m in schedule["milestones"])
    milestones = [m for m in moved if 0 < m < epochs]
    return dict(schedule, milestones=milestones) if milestones else "constant"


def file_fingerprint(files: FileList) -> str:
    """sha256 of a FileList as trained on: each file's path under the root and size, its
    label, split and domain, and the class names (no pixels are read)."""
    digest = hashlib.sha256()
    for path, label, split, domain in zip(files.paths, files.labels.tolist(), files.splits,
                                          files.domains, strict=True):  # fmt: skip
        line = f"{os.path.relpath(path, files.root)}\t{os.path.getsize(path)}\t{label}\t{split}\t{domain}\n"
        digest.update(line.encode())
    digest.update("\n".join(files.class_names).encode())
    return digest.hexdigest()


def evaluate(
    embeddings: torch.Tensor, test: FileList, ks: Sequence[int], metric: str = "euclidean"
) -> tuple[dict[str, float], str]:
    """The benchmark's test metrics and how they were computed: In-Shop's queries searched
    in its gallery (the first of ``cross_domain_views``), else every test image among the
    others. embeddings: (N, D) float, or (N, B) packed bits for metric="hamming". A K larger
    than the references a query has (a small fixture) is left out."""
    views = cross_domain_views(test)
    if not views:
        ks = [k for k in ks if k < len(test)]
        return retrieval_metrics(embeddings, test.labels, ks, metric=metric, nmi=True), "all"
    query, reference = views[0]
    q, r = (torch.tensor([d == name for d in test.domains]) for name in (query, reference))
    ks = [k for k in ks if k <= int(r.sum())]
    metrics = retrieval_metrics(embeddings[q], test.labels[q], ks, reference=embeddings[r],
                                reference_labels=test.labels[r], metric=metric, nmi=True)  # fmt: skip
    return metrics, f"{query}->{reference}"


def train_recipe(
    name: str,
    dataset: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    epochs: int | None = None,
    image_size: int | None = None,
    backbone: str | None = None,
    batch_size: int | None = None,
    samples_per_class: int | None = None,
    val_fraction: float = 0.0,
    num_workers: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Train recipe ``name`` on ``dataset`` at ``root`` and write its record, its weights and
    the comparison with the paper into ``out``; returns the comparison's row. The keyword
    arguments other than ``seed``, ``val_fraction``, ``num_workers`` and ``device`` override
    the recipe (for quick runs); the row lists them, since the paper's number then compares
    with another setup."""
    spec = recipe(name)
    if dataset not in LOADERS:
        raise ValueError(f"dataset {dataset!r} is unknown; choose from {list(DATASETS)}")
    overrides = {"epochs": epochs, "image_size": image_size, "backbone": backbone,
                 "batch_size": batch_size, "samples_per_class": samples_per_class}  # fmt: skip
    overrides = {key: value for key, value in overrides.items() if value is not None}
    backbone = overrides.get("backbone", spec["backbone"])
    weights = spec["weights"] if backbone == spec["backbone"] else WEIGHTS[backbone]
    size = overrides.get("image_size", spec["train_crop"])
    epochs = overrides.get("epochs", spec["epochs"])
    batch = overrides.get("batch_size", spec["batch_size"])
    S = overrides.get("samples_per_class", per_dataset(spec["samples_per_class"], dataset))
    P = None if S is None else batch // S
    if P is not None and P < 1:
        raise ValueError(f"batch_size={batch} holds no class of samples_per_class={S}; raise it")

    files = LOADERS[dataset](root, val_fraction=val_fraction)
    files = replace(files, crop_pct=spec["train_crop"] / spec["eval_resize"])
    train, val, test = (files.split(s) for s in ("train", "val", "test"))
    D = spec["embedding_size"]
    config = {
        "preset": name, "backbone": backbone, "weights": weights, "image_size": size,
        "epochs": epochs, "lr": per_dataset(spec["lr"], dataset), "embedding_size": D,
        "classes_per_batch": P if P is not None else batch, "samples_per_class": S or 1,
        "margin": spec.get("margin"), "scale": per_dataset(spec.get("scale"), dataset),
        "proxy_lr_multiplier": per_dataset(spec.get("proxy_lr_multiplier", 1.0), dataset),
        "temperature": spec.get("temperature"), "n_points": spec.get("n_points"),
        "label_smoothing": spec.get("label_smoothing", 0.0), "layer_norm": spec.get("layer_norm"),
        "finetune_backbone": None, "finetune_image_size": None, "finetune_epochs": None,
        "finetune_lr": None, "frozen_stages": 0, "max_classes": None, "max_per_class": None,
    }  # fmt: skip
    from utils_cv.similarity.models import EmbeddingNet

    def make_net(embedding_size=None, **kwargs):
        return EmbeddingNet(backbone, embedding_size or D, weights=weights, **kwargs)

    setting = Setting(dataset, files, train.relabel(), val if len(val) else None, test,
                      epochs=epochs, lr=config["lr"], make_net=make_net)  # fmt: skip
    built = compare.method_recipe(spec["method"], setting, config, spec.get("ee_base"))
    optimizer = dict(spec["optimizer"])
    opt_class = getattr(torch.optim, optimizer.pop("name"))
    from utils_cv.similarity.callbacks import embed_data
    from utils_cv.similarity.runner import train_run  # the runner imports fastai: only here
    from utils_cv.similarity.training import torch_optimizer

    frozen = built.get("frozen_epochs", 0)
    schedule = scaled_schedule(spec["lr_schedule"], spec["epochs"] - frozen, epochs - frozen)
    run = train_run(
        built["model"],
        built["loss"],
        **setting.budget | {"test": None},
        lr=built["lr"],
        seed=seed,
        batch_size=batch,
        classes_per_batch=P,
        samples_per_class=S,
        frozen_epochs=frozen,
        schedule=schedule,
        opt_func=torch_optimizer(opt_class, **optimizer),
        image_size=size,
        num_workers=num_workers,
        device=device,
    )
    ks = KS[dataset]
    run.embeddings = embed_data(run.model, test, image_size=size, num_workers=num_workers)
    run.metrics, searched = evaluate(run.embeddings, test, ks)
    record = compare.make_record(spec["method"], setting, config, seed, run,
                                 spec.get("ee_base"), file_fingerprint(files))  # fmt: skip
    balanced = f"{P} classes x {S} images" if S is not None else f"random {batch}"
    record |= {"recipe": name, "dataset": dataset, "overrides": overrides,
               "batches": balanced, "evaluation": searched, "lr_schedule": schedule,
               "crop_pct": files.crop_pct}  # fmt: skip
    if "binary_metrics" in record:  # make_record searches all test images; In-Shop: query->gallery
        binary, _ = evaluate(binarize(run.embeddings), test, ks, metric="hamming")
        record["binary_metrics"] = rounded(binary, 5)
    record["checksum"] = record_files.checksum(record)
    path = record_files.save_record(out, record)
    torch.save(run.model.state_dict(), path.with_suffix(".pt"))
    return write_comparison(out, record, spec)


def write_comparison(out: str | os.PathLike, record: dict[str, Any], spec: dict[str, Any]):
    """Add ``record``'s row (ours beside the paper's Recall@1, in percent) to
    ``out/comparison.json`` and rewrite ``out/comparison.md`` from it; returns the row."""
    out = Path(out)
    dataset = record["dataset"]
    ours = 100 * record["metrics"]["recall@1"]
    paper = spec["paper"].get(dataset)
    row = {
        "recipe": record["recipe"], "dataset": dataset, "seed": record["seed"],
        "evaluation": record["evaluation"], "ours_recall@1": round(ours, 1),
        "paper_recall@1": paper, "difference": None if paper is None else round(ours - paper, 1),
        "source": spec["source"], "overrides": record["overrides"],
        "record": str(record_files.result_path(out, record["preset"], dataset, record["method"],
                                          record["seed"]).relative_to(out)),
    }  # fmt: skip
    if "binary_metrics" in record:
        row["ours_binary_recall@1"] = round(100 * record["binary_metrics"]["recall@1"], 1)
        row["paper_binary_recall@1"] = spec.get("paper_binary", {}).get(dataset)
    table = out / "comparison.json"
    rows = compare_rows(table)
    key = (row["recipe"], row["dataset"], row["seed"])
    rows = [r for r in rows if (r["recipe"], r["dataset"], r["seed"]) != key] + [row]
    write_atomic(table, rows)
    header = ["recipe", "dataset", "seed", "evaluation", "ours R@1", "paper R@1", "difference",
              "overrides"]  # fmt: skip
    cells = []
    for r in rows:
        changed = ", ".join(f"{k} {v}" for k, v in r["overrides"].items()) or "none"
        cells.append([r["recipe"], r["dataset"], r["seed"], r["evaluation"], r["ours_recall@1"],
                      "-" if r["paper_recall@1"] is None else r["paper_recall@1"],
                      "-" if r["difference"] is None else f"{r['difference']:+.1f}", changed])  # fmt: skip
    note = ("\nRecall@1 in percent. A row with overrides ran another setup than the paper's: "
            "its difference compares nothing.\n")  # fmt: skip
    (out / "comparison.md").write_text(
        markdown_table(header, cells) + "\n" + note, encoding="utf-8"
    )
    return row


def compare_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a comparison.json (none without the file)."""
    import json

    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", required=True, choices=list(PAPER_RECIPES))
    parser.add_argument("--dataset", required=True, choices=list(DATASETS))
    parser.add_argument("--root", required=True, type=Path, help="the dataset's folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for the results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="training classes held out to pick the epoch (0: last epoch)")  # fmt: skip
    parser.add_argument("--workers", type=int, help="decoding processes (default: per core)")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    group = parser.add_argument_group("overrides of the recipe, for quick runs")
    group.add_argument("--epochs", type=int)
    group.add_argument("--image-size", type=int)
    group.add_argument("--backbone", choices=list(BACKBONES))
    group.add_argument("--batch-size", type=int)
    group.add_argument("--samples-per-class", type=int,
                       help="P x K batches of batch-size // S classes, also for random-batch recipes")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    row = train_recipe(
        args.recipe, args.dataset, args.root, args.out, seed=args.seed, epochs=args.epochs,
        image_size=args.image_size, backbone=args.backbone, batch_size=args.batch_size,
        samples_per_class=args.samples_per_class, val_fraction=args.val_fraction,
        num_workers=args.workers, device="cpu" if args.cpu else None,
    )  # fmt: skip
    paper = "-" if row["paper_recall@1"] is None else row["paper_recall@1"]
    print(f"{args.recipe} on {args.dataset}: Recall@1 {row['ours_recall@1']} (paper {paper}) | "
          f"{args.out / 'comparison.md'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
