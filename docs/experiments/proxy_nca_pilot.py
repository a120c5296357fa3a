"""Choose notebook 02's main ProxyNCA setting on the validation classes, never the test ones.

Trains the notebook's CPU preset (small_cnn, 32 px, 128-d, 12 epochs, AdamW one-cycle at
lr 1e-2, random batches of 64, seed 0) with ProxyNCA at several scales and proxy learning-
rate multipliers, and prints each run's best validation Recall@1 and the curve per epoch.
The test classes are not loaded. Each run takes about 30 s on 2 idle CPU cores.

    python docs/experiments/proxy_nca_pilot.py                        # the grid in the README
    python docs/experiments/proxy_nca_pilot.py --grid 9:1 27:10       # scale:multiplier pairs
"""

from __future__ import annotations

import argparse
import json
import warnings
from functools import partial

from utils_cv.similarity.datasets import load_dataset
from utils_cv.similarity.losses import ProxyNCALoss
from utils_cv.similarity.models import EmbeddingNet
from utils_cv.similarity.runner import train_run

GRID = ["9:10", "3:10", "27:10", "9:1", "9:100", "27:1", "27:0.1", "9:0.1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", nargs="+", default=GRID, help="scale:multiplier pairs")
    args = parser.parse_args()
    # The four font designs these pilots were run on (before the eight-design build).
    data = load_dataset("emoji:openmoji,noto,symbola,unifont", image_size=32)
    train, val = data.split("train").relabel(), data.split("val")
    for pair in args.grid:
        scale, multiplier = (float(v) for v in pair.split(":"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = train_run(
                lambda: EmbeddingNet("small_cnn", 128),
                partial(ProxyNCALoss, train.num_classes, 128, scale=scale),
                train,
                val=val,
                epochs=12,
                lr=(1e-2, 1e-2 * multiplier),
                seed=0,
                batch_size=64,
            )
        curve = [round(entry["val_recall@1"], 3) for entry in run.history]
        print(json.dumps({"scale": scale, "proxy_lr_multiplier": multiplier,
                          "best_val_recall@1": round(run.best_score, 4), "by_epoch": curve}))  # fmt: skip


if __name__ == "__main__":
    main()
