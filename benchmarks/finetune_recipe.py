"""Choosing a CPU fine-tuning recipe for the pretrained backbone, on validation classes only.

Each configuration trains ``EmbeddingNet(efficientnet_lite0, ImageNet weights)`` with a loss
on the training classes of ``--dataset`` (``runner.train_run``: one-cycle, on-device
augmentation, the best epoch kept by validation Recall@1) and reports the best validation
Recall@1, its epoch and the training seconds. Test classes are never loaded: the recipe
(image size, frozen stages, epochs, learning rate) is chosen here and only then run on the
test classes by the notebooks.

A configuration is ``size:frozen:epochs:lr`` (lr for the model; the loss's parameters get
``--loss-lr-multiplier`` times it), e.g. ``64:3:4:1e-3``.

    python benchmarks/finetune_recipe.py 48:3:4:1e-3 64:3:3:1e-3 64:0:3:1e-3 \\
        --json outputs/benchmarks/finetune_recipe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from utils_cv.common.device import describe_device
from utils_cv.similarity.datasets import load_dataset
from utils_cv.similarity.losses import NormSoftmaxLoss, SoftmaxLoss
from utils_cv.similarity.models import EmbeddingNet
from utils_cv.similarity.runner import train_run

LOSSES = ("softmax", "norm_softmax")


def parse(text: str) -> dict:
    try:
        size, frozen, epochs, lr = text.split(":")
        return {"image_size": int(size), "frozen_stages": int(frozen), "epochs": int(epochs),
                "lr": float(lr)}  # fmt: skip
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not size:frozen:epochs:lr") from error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("configs", nargs="+", type=parse, help="size:frozen:epochs:lr")
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--loss", choices=LOSSES, default="softmax")
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loss-lr-multiplier", type=float, default=1.0)
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-classes", type=int, default=None, help="for a quick check")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    loaded, rows = {}, []
    for config in args.configs:
        size = config["image_size"]
        if size not in loaded:
            data = load_dataset(args.dataset, size, max_classes=args.max_classes)
            loaded[size] = (data.split("train"), data.split("val"))  # never the test split
        train, val = loaded[size]

        def model(config=config):
            net = EmbeddingNet(
                "efficientnet_lite0",
                args.embedding_size,
                layer_norm=args.loss == "norm_softmax",
                normalize=args.loss != "softmax",  # a softmax classifier, as in the notebooks
                weights="imagenet",
                frozen_stages=config["frozen_stages"],
            )
            return net if args.no_channels_last else net.to(memory_format=torch.channels_last)

        def loss(train=train):
            if args.loss == "softmax":
                return SoftmaxLoss(args.embedding_size, train.num_classes)
            return NormSoftmaxLoss(train.num_classes, args.embedding_size)

        start = time.perf_counter()
        run = train_run(
            model, loss, train, val=val, epochs=config["epochs"],
            lr=(config["lr"], config["lr"] * args.loss_lr_multiplier),
            batch_size=args.batch_size, seed=args.seed, device="cpu",
        )  # fmt: skip
        row = config | {
            "best_val_recall@1": round(run.best_score, 4),
            "best_epoch": run.best_epoch,
            "val_recall@1_by_epoch": [round(h["val_recall@1"], 4) for h in run.history],
            "training_seconds": round(run.seconds, 1),
            "seconds_with_setup": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "device": describe_device(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "configs")},
        "runs": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
