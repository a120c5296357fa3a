"""Choose notebook 03's main NormSoftmax setting on the validation classes, never the test ones.

Trains the notebook's CPU preset (small_cnn, 32 px, 128-d, 12 epochs of which the first
trains only the new parameters, AdamW one-cycle at lr 1e-2, LayerNorm, batches of 64, seed
0) with NormSoftmax at several temperatures T and samples per class S (S classes of 64 // S
images; "none": random batches), and prints each run's best validation Recall@1 and the
curve per epoch. The test classes are not loaded. Each run takes about 30 s on 2 idle CPU
cores.

    python docs/experiments/norm_softmax_pilot.py                    # the grid in the README
    python docs/experiments/norm_softmax_pilot.py --grid 0.05:4 0.1:none
"""

from __future__ import annotations

import argparse
import json
import warnings
from functools import partial

from utils_cv.similarity.datasets import load_dataset
from utils_cv.similarity.losses import NormSoftmaxLoss
from utils_cv.similarity.models import EmbeddingNet
from utils_cv.similarity.runner import train_run

GRID = ["0.05:4", "0.05:2", "0.05:1", "0.05:none", "0.05:8", "0.02:4", "0.1:4", "0.2:4"]
BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", nargs="+", default=GRID, help="temperature:S pairs")
    args = parser.parse_args()
    # The four font designs these pilots were run on (before the eight-design build).
    data = load_dataset("emoji:openmoji,noto,symbola,unifont", image_size=32)
    train, val = data.split("train").relabel(), data.split("val")
    for pair in args.grid:
        temperature, s = pair.split(":")
        s = None if s == "none" else int(s)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = train_run(
                lambda: EmbeddingNet("small_cnn", 128, layer_norm=True),
                partial(NormSoftmaxLoss, train.num_classes, 128, temperature=float(temperature)),
                train,
                val=val,
                epochs=12,
                frozen_epochs=1,
                lr=1e-2,
                seed=0,
                batch_size=BATCH,
                classes_per_batch=None if s is None else BATCH // s,
                samples_per_class=s,
            )
        curve = [round(entry["val_recall@1"], 3) for entry in run.history]
        print(json.dumps({"temperature": float(temperature), "samples_per_class": s,
                          "best_val_recall@1": round(run.best_score, 4), "by_epoch": curve}))  # fmt: skip


if __name__ == "__main__":
    main()
