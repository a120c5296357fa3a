"""Memory of a dataset that does not fit in memory: a SOP-sized FileList, decoded batch by batch.

Stanford Online Products has 120,053 images; held in memory at 224 px as ImageData does, they
would take 120,053 x 3 x 224 x 224 bytes = 18.1 GB (72.3 GB as float32). This script writes a
few real JPEG photos in SOP's layout (``layouts.write_sop_layout``) into a temporary folder,
lists them over and over in one FileList of 120,053 entries (about five per class, as SOP
has), then

1. iterates ``--train-batches`` training batches of ``FileDataLoader`` (random resized crop and
   flip, P x K batches of ``ClassBalancedBatchSampler``, ``--workers`` decoding processes);
2. embeds the first ``--embed-images`` entries with a tiny CNN (two strided convolutions, so
   that decoding, not the network, sets the pace and the memory; ``embed`` of a FileList, the
   evaluation geometry);

and measures the memory all along: the peak resident memory of this process and of its
largest child (``ru_maxrss``, Linux: of the workers that ended), and, sampled every 0.2 s
with psutil, the peak of the sum over this process and its workers of their resident memory
(which counts pages the forked workers share with this process once per process) and of
their proportional set size (PSS: each shared page split among its sharers; the honest total).
Images per second of both phases are recorded beside (decoding included; the CPU's cores are
shared by the workers and the model).

    python benchmarks/file_dataset_memory.py --json results/benchmarks/file_dataset_memory_cpu.json
    python benchmarks/file_dataset_memory.py --train-batches 5 --embed-images 256   # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image
from torch import nn

from utils_cv.common.device import cpu_model, set_seed
from utils_cv.similarity.datasets import FileList, load_sop, write_sop_layout
from utils_cv.similarity.file_loader import FileDataLoader
from utils_cv.similarity.models import embed
from utils_cv.similarity.samplers import ClassBalancedBatchSampler

SOP_IMAGES = 120_053
MIB = 2**20


class MemoryMonitor:
    """Peak summed RSS and PSS of this process and its descendants, sampled in a thread."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.peak_rss = self.peak_pss = 0
        self.peak_processes = 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> MemoryMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> None:
        me = psutil.Process()
        rss = pss = 0
        processes = [me, *me.children(recursive=True)]
        for process in processes:
            try:
                info = process.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue  # a worker that ended between the listing and the reading
            rss, pss = rss + info.rss, pss + info.pss
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_pss = max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, len(processes))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def max_rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss * 1024 / MIB  # Linux reports KiB


def current_rss_mib() -> float:
    return psutil.Process().memory_info().rss / MIB


def photos(count: int, seed: int = 0) -> list[Image.Image]:
    """``count`` photo-like RGB images of SOP's usual sizes: smooth colour fields with
    texture (JPEG compresses them as it does photos, unlike random noise)."""
    rng = np.random.default_rng(seed)
    sizes = [(500, 375), (375, 500), (400, 400), (640, 480)]
    images = []
    for i in range(count):
        width, height = sizes[i % len(sizes)]
        ys, xs = np.mgrid[0:height, 0:width] / max(width, height)
        base = rng.uniform(40, 215, 3)
        slope = rng.uniform(-80, 80, (2, 3))
        noise = rng.normal(0, 12, (height, width, 3))
        array = base + xs[..., None] * slope[0] + ys[..., None] * slope[1] + noise
        images.append(Image.fromarray(array.clip(0, 255).astype(np.uint8)))
    return images


def tiny_model(embedding_size: int = 64) -> nn.Module:
    """Two strided convolutions and a linear layer: cheap at 224 px, so the data dominates."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 7, stride=4, padding=3),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, embedding_size),
    )


def sop_sized(folder: Path, sources: int, images: int, per_class: int) -> FileList:
    """A FileList of ``images`` entries that repeat the ``sources`` JPEGs of a small SOP
    layout, ``per_class`` entries per class."""
    write_sop_layout(folder, photos(sources), list(range(sources)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lists 6 products; the official dataset has 22,634"
        small = load_sop(folder)
    repeat = [small.paths[i % len(small)] for i in range(images)]
    # the last few entries join the class before them: no class smaller than per_class
    labels = (torch.arange(images) // per_class).clamp(max=max(images // per_class - 1, 0))
    return FileList(
        root=folder,
        paths=repeat,
        labels=labels,
        class_names=[f"product {c}" for c in range(int(labels[-1]) + 1)],
        splits=["train"] * images,
        domains=[""] * images,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=SOP_IMAGES, help="FileList entries")
    parser.add_argument("--sources", type=int, default=8, help="distinct JPEG files")
    parser.add_argument("--per-class", type=int, default=5, help="entries per class")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes-per-batch", type=int, default=16)
    parser.add_argument("--samples-per-class", type=int, default=4)
    parser.add_argument("--train-batches", type=int, default=40)
    parser.add_argument("--embed-images", type=int, default=2048)
    parser.add_argument("--embed-batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decoding processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the result to this file")
    args = parser.parse_args()

    start = time.perf_counter()
    load_before = [round(load, 2) for load in os.getloadavg()]
    rss_start = current_rss_mib()
    with tempfile.TemporaryDirectory() as tmp, MemoryMonitor() as monitor:
        files = sop_sized(Path(tmp) / "sop", args.sources, args.images, args.per_class)
        rss_with_list = current_rss_mib()
        sampler = ClassBalancedBatchSampler(
            files.labels,
            args.classes_per_batch,
            args.samples_per_class,
            num_batches=args.train_batches,
            seed=args.seed,
        )
        loader = FileDataLoader(
            files,
            args.image_size,
            batch_sampler=sampler,
            augment=True,
            num_workers=args.workers,
            seed=args.seed,
        )
        clock = time.perf_counter()
        seen = 0
        for images, labels in loader:
            assert images.shape[1:] == (3, args.image_size, args.image_size)
            seen += len(labels)
        train_seconds = time.perf_counter() - clock

        set_seed(args.seed)
        model = tiny_model()
        subset = files.subset(range(args.embed_images))
        clock = time.perf_counter()
        embeddings = embed(
            model,
            subset,
            batch_size=args.embed_batch_size,
            image_size=args.image_size,
            num_workers=args.workers,
        )
        embed_seconds = time.perf_counter() - clock
        assert embeddings.shape == (args.embed_images, 64) and embeddings.isfinite().all()
        monitor.sample()

    in_memory_bytes = args.images * 3 * args.image_size**2
    peak_pss = monitor.peak_pss / MIB
    result = {
        "benchmark": "file_dataset_memory",
        "images": args.images,
        "image_size": args.image_size,
        "in_memory_uint8_gib": round(in_memory_bytes / 2**30, 2),
        "in_memory_float32_gib": round(4 * in_memory_bytes / 2**30, 2),
        "rss_start_mib": round(rss_start, 1),
        "rss_after_file_list_mib": round(rss_with_list, 1),
        "peak_rss_self_mib": round(max_rss_mib(resource.RUSAGE_SELF), 1),
        "peak_rss_largest_child_mib": round(max_rss_mib(resource.RUSAGE_CHILDREN), 1),
        "peak_tree_rss_mib": round(monitor.peak_rss / MIB, 1),
        "peak_tree_pss_mib": round(peak_pss, 1),
        "peak_processes": monitor.peak_processes,
        "peak_over_in_memory_uint8": round(peak_pss * MIB / in_memory_bytes, 4),
        "train_batches": args.train_batches,
        "train_batch_size": args.classes_per_batch * args.samples_per_class,
        "train_images_per_second": round(seen / train_seconds, 1),
        "embed_images": args.embed_images,
        "embed_images_per_second": round(args.embed_images / embed_seconds, 1),
        "workers": args.workers,
        "sources": args.sources,
        "total_seconds": round(time.perf_counter() - start, 1),
        "machine": {
            "cpu": cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            # other processes on the same cores slow the images per second, not the memory
            "load_average_before": load_before,
        },
        "versions": {"torch": torch.__version__, "psutil": psutil.__version__},
    }
    line = json.dumps(result)
    print(line)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(line + "\n")


if __name__ == "__main__":
    main()
