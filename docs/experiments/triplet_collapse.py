"""Does any standard cure stop batch-hard triplet training from shrinking the embedding?

A study behind notebook 01's collapse section and docs/triplet_collapse.md, not a test:
every variant trains the CPU preset's model (small_cnn, 40 px, 128-d unit vectors,
16 classes x 4 images, margin 0.2, 25 epochs of AdamW one-cycle, seed 0) on the emoji
training classes, keeps the best epoch on the validation classes, and reports on the test
classes Recall@1, the mean distance between test embeddings, and Recall@1 after rounding
the embeddings to bfloat16 (what mixed-precision training and half-precision indexes do).

    python docs/experiments/triplet_collapse.py                 # all variants, ~25 min on 2 cores
    python docs/experiments/triplet_collapse.py --only lr_1e-3  # one of them

Seeded CPU runs repeat exactly; the numbers in docs/triplet_collapse.md come from this file.
"""

from __future__ import annotations

import argparse
import json
import warnings
from functools import partial
from pathlib import Path

from utils_cv.similarity.datasets import load_emoji
from utils_cv.similarity.datasets.emoji_fonts import FONT_DESIGNS
from utils_cv.similarity.losses import TripletLoss
from utils_cv.similarity.metrics import mean_distance, retrieval_metrics
from utils_cv.similarity.models import EmbeddingNet
from utils_cv.similarity.runner import train_run

EPOCHS, LR, MARGIN = 25, 1e-2, 0.2

# name -> settings; anything left out is the notebook's batch-hard run.
VARIANTS: dict[str, dict] = {
    "batch_hard": {},
    "soft_margin": {"soft_margin": True},
    "batch_all_warmup": {"warmup_epochs": 8},
    "lr_1e-3": {"lr": 1e-3},
    "lr_3e-4": {"lr": 3e-4},
    "lr_1e-4": {"lr": 1e-4},
    "soft_margin_lr_1e-3": {"soft_margin": True, "lr": 1e-3},
    "batch_all_warmup_then_lr_1e-3": {"warmup_epochs": 8, "lr": 1e-3},
    "no_weight_decay": {"wd": 0.0},
    "layer_norm": {"layer_norm": True},
    "reference_batch_all": {"mining": "batch_all"},
    "reference_semi_hard": {"mining": "semi_hard"},
}


def run(name: str, data_dir: str) -> dict:
    settings = VARIANTS[name]
    # The four font designs this study was run on (before the eight-design build).
    data = load_emoji(data_dir, image_size=40, designs=FONT_DESIGNS)
    train, val, test = data.split("train").relabel(), data.split("val"), data.split("test")
    loss = partial(
        TripletLoss,
        MARGIN,
        mining=settings.get("mining", "batch_hard"),
        soft_margin=settings.get("soft_margin", False),
    )
    warmup_epochs = settings.get("warmup_epochs", 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the sampler's note on classes with < 4 images
        result = train_run(
            lambda: EmbeddingNet(
                "small_cnn", embedding_size=128, layer_norm=settings.get("layer_norm", False)
            ),
            loss,
            train,
            val=val,
            test=test,
            epochs=EPOCHS,
            lr=settings.get("lr", LR),
            warmup_lr=LR,  # the warm-up keeps the notebook's rate; batch-hard then gets `lr`
            seed=0,
            classes_per_batch=16,
            samples_per_class=4,
            warmup_loss=partial(TripletLoss, MARGIN, mining="batch_all") if warmup_epochs else None,
            warmup_epochs=warmup_epochs,
            ks=(1,),
            **({"wd": settings["wd"]} if "wd" in settings else {}),
        )
    history, embeddings = result.history, result.embeddings
    rounded_embeddings = embeddings.bfloat16().float()
    return {
        "variant": name,
        **settings,
        "recall@1": round(result.metrics["recall@1"], 3),
        "recall@1_bf16": round(
            retrieval_metrics(rounded_embeddings, test.labels, ks=(1,))["recall@1"], 3
        ),
        "mean_test_distance": round(mean_distance(embeddings), 4),
        "best_val_recall@1": round(result.best_score, 3),
        "final_train_loss": round(history[-1]["train_loss"], 3),
        "train_loss_by_epoch": [round(h["train_loss"], 3) for h in history],
        "mean_pos_distance_by_epoch": [round(h["loss_mean_pos_distance"], 3) for h in history],
        "seconds": round(result.seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(VARIANTS), action="append")
    parser.add_argument("--data-dir", default=str(Path(__file__).parents[2] / "data" / "emoji"))
    parser.add_argument("--json", help="also write the results here (one JSON object per line)")
    args = parser.parse_args()
    rows = []
    for name in args.only or VARIANTS:
        rows.append(run(name, args.data_dir))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| variant | R@1 | R@1 (bf16) | mean test distance | final loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['recall@1']:.3f} | {r['recall@1_bf16']:.3f} | "
            f"{r['mean_test_distance']:.4f} | {r['final_train_loss']:.3f} |"
        )


if __name__ == "__main__":
    main()
