"""Train every method x setting x seed of notebook 07's comparison and store one JSON each.

Every method trains under one protocol (``utils_cv.similarity.compare``): notebook 01's
budget and P x K batches, the epoch chosen on the validation classes, the test classes used
once. Each training writes ``<results>/<preset>/<setting>/<method>/seed<k>.json`` as soon as
it ends, so an interrupted run loses at most the trainings under way: run the same command
again and it trains only what is missing (a record edited by hand, made on other data or
under another protocol counts as missing and is re-made). EE goes on the pair-based base with
the best mean validation Recall@1 of that setting, so it trains after the bases. The
ablations (one setting of a method changed, for the claims about that setting,
``compare.ABLATIONS``) train and are stored the same way.

    python benchmarks/compare.py                      # the CPU preset's stored results (no GPU)
    python benchmarks/compare.py --settings scratch --seeds 0 --methods softmax batch_hard
    python benchmarks/compare.py --preset gpu         # the GPU preset: several at once

The stored results in the repository come from a clean checkout (the records name the
commit); ``--allow-dirty`` writes from a checkout with uncommitted changes, for trying things.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from utils_cv.common.device import describe_device
from utils_cv.similarity import compare, record_files
from utils_cv.similarity.presets import SETTING_NAMES, lesson_settings, preset_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="auto", choices=["auto", "smoke", "cpu", "gpu"],
                        help="auto: gpu where CUDA is available, else cpu")  # fmt: skip
    parser.add_argument(
        "--settings", nargs="+", choices=list(SETTING_NAMES), default=list(SETTING_NAMES)
    )
    parser.add_argument("--methods", nargs="+", choices=[*compare.METHODS, *compare.ABLATIONS],
                        help="methods and ablations; default: every method and the preset's "
                        "ablations")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the preset's")
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--results", type=Path, default=record_files.RESULTS_DIR)
    parser.add_argument("--workers", type=int, help="trainings at once; default: the preset's")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write results from a checkout with uncommitted changes")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("once")  # a repeated warning (small classes, few val classes) once
    commit = record_files.git_commit()
    if commit["dirty"] and not args.allow_dirty:
        print("the checkout has uncommitted changes: stored results must name the commit that "
              "made them. Commit first, or pass --allow-dirty to try things.", file=sys.stderr)  # fmt: skip
        return 2
    overrides = {"seeds": args.seeds, "workers": args.workers}
    config = preset_config(args.preset, notebook="07_method_comparison", **overrides)
    print(describe_device(), f"| commit {commit['commit']} | results in {args.results}")
    loaded = lesson_settings(config, args.dataset, args.data_dir)
    settings = {SETTING_NAMES[key]: loaded[SETTING_NAMES[key]] for key in args.settings}
    start = time.perf_counter()
    trained = compare.train_missing(args.results, settings, config, args.methods)
    print(f"{trained} trained in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
