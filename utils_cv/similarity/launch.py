"""Train one method's recipe from the command line, on one process or on several::

    python -m utils_cv.similarity.launch --method batch_hard --preset smoke --out runs/bh
    torchrun --nproc_per_node 2 -m utils_cv.similarity.launch --method batch_hard --out runs/bh2
    torchrun --nproc_per_node 2 -m utils_cv.similarity.launch --method batch_hard --cpu --out runs/bh_cpu
    torchrun --nproc_per_node 8 -m utils_cv.similarity.launch --method norm_softmax \\
        --setting imagenet --dataset path/to/class_folders --out runs/ns

The recipe is notebook 07's (``compare.method_recipe``: the loss, the learning rate, the
batches and the budget of the preset), in its scratch or ImageNet setting, on the built-in
emoji data or a folder of class folders. On several processes ``train_run`` splits each batch
among them (docs/distributed.md); every process computes the same test metrics. The first
process writes into ``--out``:

- ``model.pt``: the best validation epoch's weights (``callbacks.load_checkpoint``), written
  while training;
- ``run.json``: the recipe (what ``load_model`` rebuilds the network from), the test metrics
  at full precision, the training seconds, steps and seconds per step, the number of
  processes, and the per-epoch history.

>>> model, run = load_model("runs/bh")  # doctest: +SKIP  (in one process)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from utils_cv.common.device import describe_device
from utils_cv.common.results import write_atomic
from utils_cv.similarity import compare
from utils_cv.similarity.callbacks import load_checkpoint
from utils_cv.similarity.distributed import init_distributed, rank0_first, world
from utils_cv.similarity.presets import SETTING_NAMES, lesson_settings, preset_config

MODEL_FILE, RUN_FILE = "model.pt", "run.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", required=True, choices=list(compare.METHODS))
    parser.add_argument("--ee-base", default="batch_hard", choices=compare.PAIR_BASED,
                        help="the pair-based loss under Embedding Expansion (--method ee)")  # fmt: skip
    parser.add_argument("--preset", default="auto", choices=["auto", "smoke", "cpu", "gpu"],
                        help="auto: gpu where CUDA is available (and no --cpu), else cpu")  # fmt: skip
    parser.add_argument("--setting", default="scratch", choices=list(SETTING_NAMES))
    parser.add_argument("--dataset", default="emoji", help="emoji, or a folder of class folders")
    parser.add_argument("--data-dir", type=Path, help="where the built-in data lives")
    parser.add_argument("--epochs", type=int, help="default: the preset's budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true",
                        help="train on the CPU (gloo between processes) even where there are GPUs")  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, help="folder for model.pt and run.json")
    return parser.parse_args(argv)


def recipe_config(recipe: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The preset configuration and the setting's name of a recipe (``run.json``'s)."""
    epochs_key = "epochs" if recipe["setting"] == "scratch" else "finetune_epochs"
    config = preset_config(
        recipe["preset"], notebook="07_method_comparison", **{epochs_key: recipe["epochs"]}
    )
    return config, SETTING_NAMES[recipe["setting"]]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.simplefilter("once")
    device = init_distributed(cpu=args.cpu)  # a launched process joins the others here
    rank, world_size = world()
    out = args.out.resolve()
    if rank == 0:
        if out.exists() and not out.is_dir():
            raise SystemExit(f"--out {out} is a file; name a folder")
        out.mkdir(parents=True, exist_ok=True)
    if args.cpu and args.preset == "auto":
        args.preset = "cpu"
    recipe = {
        "method": args.method,
        "ee_base": args.ee_base if args.method == "ee" else None,
        "preset": args.preset,
        "setting": args.setting,
        "dataset": str(args.dataset),
        "data_dir": None if args.data_dir is None else str(args.data_dir),
        "epochs": args.epochs,
        "seed": args.seed,
    }
    config, setting_name = recipe_config(recipe)
    recipe["preset"] = config["preset"]  # "auto" resolved
    # The first process builds the emoji data when it is missing; the others then read it.
    settings = rank0_first(lambda: lesson_settings(config, args.dataset, args.data_dir))
    setting = settings[setting_name]
    recipe["epochs"] = setting.epochs
    if rank == 0:
        print(f"{describe_device()} | {world_size} process(es) | {args.method}, {setting_name}")
    run = compare.run_method(
        args.method,
        setting,
        config,
        args.seed,
        recipe["ee_base"],
        checkpoint_path=out / MODEL_FILE,
        device=device,
    )
    steps = len(run.learn.dls.train) * setting.epochs
    summary = {
        "recipe": recipe,
        "processes": world_size,
        "metrics": {name: float(value) for name, value in run.metrics.items()},
        "best_epoch": run.best_epoch,
        "seconds": run.seconds,
        "steps": steps,
        "seconds_per_step": run.seconds / steps,
        "history": run.history,
        "device": describe_device(next(run.model.parameters()).device),
    }
    if rank == 0:
        write_atomic(out / RUN_FILE, summary)
        print(f"test recall@1 {run.metrics['recall@1']:.4f} | {run.seconds:.1f} s, "
              f"{1000 * summary['seconds_per_step']:.0f} ms per step | {out}")  # fmt: skip
    return 0


def load_model(folder: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network a launch trained (in eval mode, on the CPU) and its ``run.json``.

    Rebuilds the network from the recipe (the preset's configuration and the data's number
    of classes, for a model with a classifier head) and loads ``model.pt`` into it.
    """
    folder = Path(folder)
    missing = [name for name in (MODEL_FILE, RUN_FILE) if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(
            f"{folder} has no {' or '.join(missing)}: name the --out folder of a finished launch"
        )

    run = json.loads((folder / RUN_FILE).read_text(encoding="utf-8"))
    recipe = run["recipe"]
    config, setting_name = recipe_config(recipe)
    setting = lesson_settings(config, recipe["dataset"], recipe["data_dir"])[setting_name]
    model = compare.method_recipe(recipe["method"], setting, config, recipe["ee_base"])["model"]()
    load_checkpoint(folder / MODEL_FILE, model)
    return model.eval(), run


if __name__ == "__main__":
    start = time.perf_counter()
    code = main()
    if world()[0] == 0:
        print(f"done in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    sys.exit(code)
