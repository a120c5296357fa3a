"""Evaluation speed: `retrieval_metrics` on SOP-sized embeddings, against its floor and PML.

Stanford Online Products' test set has 60,502 images of 11,316 products, 2 to 12 images each,
and is evaluated with Recall@1, 10, 100, 1000. This script builds seeded synthetic embeddings of
that shape (unit vectors scattered around one random centre per class, so the metrics land in a
realistic range rather than near zero), times every metric, and measures peak memory. Beside
it, the "floor": the float32 distance products alone (`torch.addmm` of ||r||^2 - 2 q.r, as the
search scores, chunk by chunk of the search's default chunk size or --chunk-size), with no
selection and no metric (not a strict lower bound: ours computes its products in cache-sized
tiles, which alone can be a little faster than full blocks); it prints and records ours / floor. Unless --skip-pml, it also runs pytorch-metric-learning's
AccuracyCalculator (faiss flat search) on the same data and checks that Recall@1, R-Precision
and MAP@R agree.

Each measurement runs in a fresh Python process, so its peak memory is its own:
CPU: peak resident memory (ru_maxrss) minus the resident memory just before the call;
CUDA: torch.cuda.max_memory_allocated minus the memory allocated just before the call.
CPU time (all threads) is recorded beside wall time: where other processes share the cores,
it shows which wall times were inflated.

    python benchmarks/eval_speed.py                        # CPU, SOP size, floor and PML
    python benchmarks/eval_speed.py --n 20000 --classes 3741 --skip-pml   # quicker, no PML
    python benchmarks/eval_speed.py --device cuda --skip-pml --json outputs/eval_speed_cuda.json
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SOP_KS = (1, 10, 100, 1000)
PML_METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
# our key -> AccuracyCalculator's key for the same quantity
SAME_METRIC = {
    "recall@1": "precision_at_1",
    "r_precision": "r_precision",
    "map@r": "mean_average_precision_at_r",
}
AGREE_TOLERANCE = 1e-6


def class_sizes(n: int, classes: int, rng: np.random.Generator, low=2, high=12) -> np.ndarray:
    """Sizes between low and high (SOP: 2 to 12) that sum to exactly n."""
    if not low * classes <= n <= high * classes:
        raise ValueError(f"n={n} images cannot fill {classes} classes of {low} to {high} images")
    p = (n / classes - low) / (high - low)
    sizes = low + rng.binomial(high - low, p, size=classes)
    while (excess := int(sizes.sum()) - n) != 0:
        # Move the total towards n one image at a time, on random classes that have room.
        room = np.flatnonzero(sizes > low) if excess > 0 else np.flatnonzero(sizes < high)
        chosen = rng.choice(room, size=min(abs(excess), len(room)), replace=False)
        sizes[chosen] -= np.sign(excess)
    return sizes


def make_data(n: int, dim: int, classes: int, noise: float, seed: int = 0):
    """(n, dim) float32 unit vectors and (n,) int64 labels."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), class_sizes(n, classes, rng))
    centers = rng.standard_normal((classes, dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[labels] + np.float32(noise / np.sqrt(dim)) * rng.standard_normal(
        (n, dim), dtype=np.float32
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    assert x.dtype == np.float32
    return x, labels


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def measure(fn, device: torch.device, repeats: int, warmup: int) -> dict:
    """Run fn warmup + repeats times; seconds of each timed run and peak memory in MB."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = rss_mb()
    seconds, cpu_seconds = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        value = fn()
        if cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux
    return {
        "seconds": statistics.median(seconds),
        "seconds_all": seconds,
        # CPU time of all threads: unlike wall time, barely changed by other processes
        # competing for the cores, so it shows when a wall time was inflated.
        "cpu_seconds": statistics.median(cpu_seconds),
        "peak_mb": peak - before,
        "peak_mb_process": peak,
        "values": value,
    }


def products(x: torch.Tensor, chunk_size: int | None):
    """The floor: a function computing the search's float32 distance products of x against
    itself, ||r||^2 - 2 q.r (`search._rank_scores` for "euclidean"), one chunk of queries at a
    time into one reused block, as `search._score_blocks` does, and nothing else."""
    from utils_cv.similarity.search import BLOCK_BYTES

    if chunk_size is None:
        chunk_size = max(1, BLOCK_BYTES // (4 * len(x)))
    squared = (x * x).sum(dim=1)
    block = torch.empty(min(chunk_size, len(x)), len(x), device=x.device)

    def run() -> None:
        for start in range(0, len(x), chunk_size):
            rows = x[start : start + chunk_size]
            torch.addmm(squared, rows, x.T, alpha=-2, out=block[: len(rows)])

    return run


def worker(args) -> dict:
    """One measurement in this (fresh) process; prints its result as JSON."""
    device = torch.device(args.device)
    x = torch.from_numpy(np.load(Path(args.data) / "embeddings.npy"))
    labels = torch.from_numpy(np.load(Path(args.data) / "labels.npy"))
    if args.worker == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calculator = AccuracyCalculator(include=PML_METRICS, k="max_bin_count", device=device)
        return measure(lambda: calculator.get_accuracy(x, labels), device, 1, 0)

    warmup = args.warmup if args.warmup is not None else int(device.type == "cuda")
    if args.worker == "floor":
        return measure(products(x.to(device), args.chunk_size), device, args.repeats, warmup)

    from utils_cv.similarity.metrics import retrieval_metrics

    if args.worker == "nmi":
        return measure(
            lambda: retrieval_metrics(x, labels, ks=SOP_KS, nmi=True, device=device), device, 1, 0
        )
    # "ours" on CUDA: the embeddings start on the GPU, as after embedding there; "ours_host":
    # they start in CPU memory, as `embed` returns them, and the copy is timed too.
    if args.worker == "ours":
        x = x.to(device)

    def run():
        return retrieval_metrics(x, labels, ks=SOP_KS, chunk_size=args.chunk_size, device=device)

    return measure(run, device, args.repeats, warmup)


def spawn(job: str, data_dir: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", job, "--data", data_dir]
    command += ["--device", args.device, "--repeats", str(args.repeats)]
    for name in ("chunk_size", "warmup"):
        if getattr(args, name) is not None:
            command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:  # show the worker's own error, not only its exit status
        raise SystemExit(f"the {job!r} measurement failed:\n{done.stderr.strip()}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--n", type=int, default=60_502, help="number of embeddings")
    parser.add_argument("--dim", type=int, default=512, help="embedding size")
    parser.add_argument("--classes", type=int, default=11_316, help="number of classes")
    parser.add_argument("--noise", type=float, default=2.2, help="spread around class centres")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median counts")
    parser.add_argument("--warmup", type=int, help="untimed runs first (default: 1 on cuda)")
    parser.add_argument("--chunk-size", type=int, help="queries per chunk (default: automatic)")
    parser.add_argument("--skip-pml", action="store_true", help="skip pytorch-metric-learning")
    parser.add_argument("--nmi", action="store_true", help="also time NMI (k-means), separately")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    jobs = ["ours", "floor"] + (["ours_host"] if args.device.startswith("cuda") else [])
    jobs += ([] if args.skip_pml else ["pml"]) + (["nmi"] if args.nmi else [])
    x, labels = make_data(args.n, args.dim, args.classes, args.noise)
    print(
        f"{args.n} x {args.dim} unit vectors, {args.classes} classes of "
        f"{np.bincount(labels).min()} to {np.bincount(labels).max()} images; device {args.device}"
        f" ({torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}"
        f"{torch.get_num_threads()} CPU threads), torch {torch.__version__}"
    )
    results = {"n": args.n, "dim": args.dim, "classes": args.classes, "device": args.device}
    results["cpu_threads"] = torch.get_num_threads()
    # OpenMP threads spin while they wait for work unless this is PASSIVE: on shared cores
    # that changes the timings (benchmarks/README.md).
    results["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    with tempfile.TemporaryDirectory() as data_dir:
        np.save(Path(data_dir) / "embeddings.npy", x)
        np.save(Path(data_dir) / "labels.npy", labels)
        del x
        for job in jobs:
            results[job] = result = spawn(job, data_dir, args)
            print(
                f"{job:>9}: {result['seconds']:8.3f} s (runs: "
                f"{', '.join(f'{s:.3f}' for s in result['seconds_all'])}; "
                f"CPU time {result['cpu_seconds']:.1f} s), "
                f"peak {result['peak_mb']:7.0f} MB above the start "
                f"({result['peak_mb_process']:.0f} MB process)"
            )
            if result["values"] is not None:
                print(f"{'':>11}{json.dumps(result['values'])}")

    results["ours_over_floor"] = results["ours"]["seconds"] / results["floor"]["seconds"]
    results["ours_over_floor_cpu"] = (
        results["ours"]["cpu_seconds"] / results["floor"]["cpu_seconds"]
    )
    print(
        f"ours / floor (the distance products alone): {results['ours_over_floor']:.3f} in wall "
        f"time, {results['ours_over_floor_cpu']:.3f} in CPU time"
    )
    if "pml" in results:
        ours, pml = results["ours"]["values"], results["pml"]["values"]
        differences = {key: abs(ours[key] - pml[other]) for key, other in SAME_METRIC.items()}
        results["agree"] = max(differences.values()) <= AGREE_TOLERANCE
        results["differences"] = differences
        results["pml_over_ours"] = results["pml"]["seconds"] / results["ours"]["seconds"]
        print(
            f"PML / ours time: {results['pml_over_ours']:.1f}x; values "
            f"{'agree' if results['agree'] else 'DIFFER'} (|difference| "
            + ", ".join(f"{key} {d:.1e}" for key, d in differences.items())
            + f"; tolerance {AGREE_TOLERANCE:g})"
        )
    if "nmi" in results:
        results["nmi_seconds"] = results["nmi"]["seconds"] - results["ours"]["seconds"]
        print(f"NMI (k-means, {args.classes} clusters) adds {results['nmi_seconds']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()
