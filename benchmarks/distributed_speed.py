"""Time per training step on 1 process and on N (torchrun, gloo on the CPU, NCCL on GPUs).

Runs ``utils_cv.similarity.launch`` (one recipe of notebook 07, the preset's data and batch)
for --epochs epochs, once per process count in --processes, one after another, and reads
each run's ``run.json``:

    seconds           train_run's training time: the epochs, the per-epoch validation
                      (sharded among the processes) included, the test evaluation excluded
    steps             optimizer steps (the same on 1 and N processes: the batch is global)
    ms_per_step       seconds / steps
    recall@1          the test Recall@1 (the processes' BatchNorm sees its own share of each
                      batch on the CPU, so it differs a little from one process's)

The global batch, the recipe and the learning rate are the same for every process count, so
the steps are the same work split N ways. On a machine with C cores, N processes share them:
on 2 CPU cores, 2 processes of 1 thread each do the work of 1 process of 2 threads plus the
gathers and gradient all-reduces, so they cannot be faster; the script measures that overhead,
not a speed-up. On N GPUs each process has its own GPU.

    python benchmarks/distributed_speed.py --preset cpu --cpu --epochs 2 --json results/benchmarks/distributed_cpu_scratch.json
    python benchmarks/distributed_speed.py --preset gpu --processes 1 2 4 8 --setting imagenet
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from utils_cv.common.results import write_atomic
from utils_cv.similarity.record_files import environment


def launch_command(processes: int, args: argparse.Namespace, out: Path) -> list[str]:
    """The command that trains on ``processes`` processes (torchrun for more than one)."""
    module = ["-m", "utils_cv.similarity.launch", "--method", args.method,
              "--preset", args.preset, "--setting", args.setting, "--epochs", str(args.epochs),
              "--seed", str(args.seed), "--out", str(out)] + (["--cpu"] if args.cpu else [])  # fmt: skip
    if processes == 1:
        return [sys.executable, *module]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", str(processes)]  # fmt: skip
    return [*torchrun, *module]


def measure(processes: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "run"
        done = subprocess.run(
            launch_command(processes, args, out), capture_output=True, text=True, env=os.environ
        )
        if done.returncode != 0:
            raise SystemExit(
                f"the launch on {processes} process(es) failed:\n{done.stderr[-3000:]}"
            )
        run = json.loads((out / "run.json").read_text())
    return {
        "processes": processes,
        "seconds": round(run["seconds"], 2),
        "steps": run["steps"],
        "ms_per_step": round(1000 * run["seconds_per_step"], 1),
        "recall@1": round(run["metrics"]["recall@1"], 4),
        "device": run["device"],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--method", default="batch_hard")
    parser.add_argument("--preset", default="cpu", choices=["smoke", "cpu", "gpu"])
    parser.add_argument("--setting", default="scratch", choices=["scratch", "imagenet"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="on the CPU even where there are GPUs")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = []
    for processes in args.processes:
        rows.append(measure(processes, args))
        row = rows[-1]
        print(f"{processes} process(es): {row['ms_per_step']:7.1f} ms per step, "
              f"{row['steps']} steps in {row['seconds']:.1f} s, Recall@1 {row['recall@1']:.4f}")  # fmt: skip
    result = {
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "environment": environment(),
        "runs": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
