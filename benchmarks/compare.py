"""Train every method x setting x seed of notebook 07's comparison and store one JSON each.

Every method trains under one protocol (``utils_cv.similarity.compare``): notebook 01's
budget and P x K batches, the epoch chosen on the validation classes, the test classes used
once. Each training writes ``<results>/<preset>/<setting>/<method>/seed<k>.json`` as soon as
it ends, so an interrupted run loses at most the trainings under way: run the same command
again and it trains only what is missing (a record edited by hand, made on other data or
under another protocol counts as missing and is re-made). EE goes on the pair-based base with
the best mean validation Recall@1 of that setting, so it trains after the bases.

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
from utils_cv.similarity import compare
from utils_cv.similarity.presets import IMAGENET, SCRATCH, lesson_settings, preset_config
from utils_cv.similarity.runner import train_runs

SETTINGS = {"scratch": SCRATCH, "imagenet": IMAGENET}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="auto", choices=["auto", "smoke", "cpu", "gpu"],
                        help="auto: gpu where CUDA is available, else cpu")  # fmt: skip
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=list(compare.METHODS),
                        default=list(compare.METHODS))  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, help="default: the preset's")
    parser.add_argument("--dataset", default="emoji")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--results", type=Path, default=compare.RESULTS_DIR)
    parser.add_argument("--workers", type=int, help="trainings at once; default: the preset's")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write results from a checkout with uncommitted changes")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("once")  # a repeated warning (small classes, few val classes) once
    commit = compare.git_commit()
    if commit["dirty"] and not args.allow_dirty:
        print("the checkout has uncommitted changes: stored results must name the commit that "
              "made them. Commit first, or pass --allow-dirty to try things.", file=sys.stderr)  # fmt: skip
        return 2
    overrides = {"seeds": args.seeds, "workers": args.workers}
    config = preset_config(args.preset, notebook="07_method_comparison", **overrides)
    print(describe_device(), f"| commit {commit['commit']} | results in {args.results}")
    settings = lesson_settings(config, args.dataset, args.data_dir)
    start = time.perf_counter()
    for key in args.settings:
        setting = settings[SETTINGS[key]]
        fingerprint = compare.data_fingerprint(setting)
        bases = [m for m in args.methods if m != "ee"]
        _train(args, config, setting, fingerprint, bases)
        if "ee" in args.methods:
            base = compare.best_base(_val_scores(args, config, setting))
            print(f"{setting.name}: EE goes on {base} (best mean validation Recall@1)")
            _train(args, config, setting, fingerprint, ["ee"], ee_base=base)
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


def _train(args, config, setting, fingerprint, methods, ee_base=None) -> None:
    """Train the jobs of ``methods`` in ``setting`` that have no valid record yet."""
    jobs = [(setting.name, m, seed) for m in methods for seed in config["seeds"]]
    left = [job for job in jobs if not _valid(args, config, fingerprint, job, ee_base)]
    print(f"{setting.name}: {len(jobs) - len(left)} of {len(jobs)} stored, {len(left)} to train")

    def train_one(method: str, seed: int) -> dict:
        record = compare.train_method(method, setting, config, seed, ee_base=ee_base)
        compare.save_record(args.results, record)  # here, so a worker's result is kept at once
        print(f"  {method} seed {seed}: recall@1 {record['metrics']['recall@1']:.3f}, "
              f"{record['seconds']:.0f} s", flush=True)  # fmt: skip
        return record

    train_runs(train_one, [(m, seed) for _, m, seed in left], config["workers"])


def _valid(args, config, fingerprint, job, ee_base) -> bool:
    """Whether the job's stored record exists, is intact, and was made on this data under
    this protocol (and, for EE, on the chosen base)."""
    setting, method, seed = job
    path = compare.result_path(args.results, config["preset"], setting, method, seed)
    try:
        record = compare.read_record(path)
    except compare.StoredResultError:
        return False
    return (
        record["data"]["fingerprint"] == fingerprint
        and record["protocol"] == compare.protocol(config)
        and record["ee_base"] == ee_base
        and record.get("batches") == compare.batches(method, config)
    )


def _val_scores(args, config, setting) -> dict[str, list[float]]:
    """Each stored pair-based base's best validation Recall@1 per seed, in ``setting``."""
    scores: dict[str, list[float]] = {}
    fingerprint = compare.data_fingerprint(setting)
    for method in compare.PAIR_BASED:
        for seed in config["seeds"]:
            job = (setting.name, method, seed)
            if _valid(args, config, fingerprint, job, None):
                path = compare.result_path(args.results, config["preset"], *job)
                record = compare.read_record(path)
                scores.setdefault(method, []).append(record["best_val_recall@1"])
    return scores


if __name__ == "__main__":
    sys.exit(main())
