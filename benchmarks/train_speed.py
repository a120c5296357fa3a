"""Training throughput: utils_cv's fastai Learner against a bare PyTorch loop.

DESIGN.md's target: training through `make_learner` reaches at least 90 % of the images per
second of a bare PyTorch loop with the same model, batch and precision. Both loops here train
`EmbeddingNet(backbone)` + `SoftmaxLoss` on the same seeded synthetic uint8 images, held on the
device as the notebooks hold theirs, with the same fused AdamW, the same precision and, with
`--augment`, the same on-device `augment_batch`. The first `--warmup` steps of each run are not
timed (cuDNN autotuning, the caching allocator); the clock is read after a device
synchronisation. The two loops alternate for `--repeats` rounds and the median of each counts.

Two GPU settings the notebooks do not use yet can be measured here, in both loops alike:
`--channels-last` (the model in channels_last layout, which tensor-core convolutions prefer)
and `--cudnn-benchmark` (cuDNN times its convolution algorithms for each input shape once and
keeps the fastest; the shapes here never change). On the CPU neither is expected to help much.

    python benchmarks/train_speed.py --device cuda --backbone resnet18 --image-size 64 --batch-size 256
    python benchmarks/train_speed.py --device cuda --backbone resnet50 --image-size 224 --batch-size 128
    python benchmarks/train_speed.py --device cuda --batch-size 128 --channels-last --cudnn-benchmark
    python benchmarks/train_speed.py          # CPU: small_cnn at 40 px, the CPU preset's model
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from fastai.callback.core import Callback

from utils_cv.common.device import describe_device, set_seed
from utils_cv.similarity.augment import augment_batch
from utils_cv.similarity.datasets import ImageData
from utils_cv.similarity.losses import SoftmaxLoss
from utils_cv.similarity.models import EmbeddingNet
from utils_cv.similarity.training import make_learner

TARGET = 0.90
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_data(args, device: torch.device) -> ImageData:
    """(warmup + steps) batches of seeded random images, on ``device``."""
    n = (args.warmup + args.steps) * args.batch_size
    if n < args.classes:
        raise SystemExit(f"{n} images cannot fill --classes {args.classes}; lower --classes")
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, args.image_size, args.image_size), generator=generator)
    # every class present, so make_learner's relabeling keeps all of them
    labels = (torch.arange(n) % args.classes)[torch.randperm(n, generator=generator)]
    return ImageData(
        images=images.to(torch.uint8),
        labels=labels,
        class_names=[str(c) for c in range(args.classes)],
        splits=["train"] * n,
        domains=[""] * n,
        paths=[""] * n,
    ).to(device)


def new_model_and_loss(args, device: torch.device):
    set_seed(0)
    model = EmbeddingNet(args.backbone, embedding_size=args.embedding_size).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, SoftmaxLoss(args.embedding_size, args.classes).to(device)


def bare_loop(args, data: ImageData, device: torch.device) -> float:
    """Images per second of a plain PyTorch training loop."""
    model, loss = new_model_and_loss(args, device)
    parameters = [*model.parameters(), *loss.parameters()]
    fused = {"fused": True} if device.type == "cuda" else {}
    # make_learner's default optimizer: torch's AdamW with fastai's Adam defaults.
    optimizer = torch.optim.AdamW(
        parameters, lr=1e-3, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01, **fused
    )
    dtype = AMP_DTYPES[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(data), generator=generator).to(device)
    model.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        index = order[step * args.batch_size : (step + 1) * args.batch_size]
        images = data.images[index].float() / 255
        if args.augment:
            images = augment_batch(images, generator)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            value = loss(model(images), data.labels[index])
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(value).backward()
        scaler.step(optimizer)
        scaler.update()
    synchronize(device)
    return args.steps * args.batch_size / (time.perf_counter() - start)


class StepTimer(Callback):
    """Starts the clock after ``warmup`` batches and stops it after the last one."""

    order = 100  # after the other callbacks' after_batch

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device = warmup, device
        self.start = self.seconds = None

    def after_batch(self):
        if not self.training:
            return
        if self.iter == self.warmup - 1:
            synchronize(self.device)
            self.start = time.perf_counter()
        if self.iter == self.n_iter - 1:
            synchronize(self.device)
            self.seconds = time.perf_counter() - self.start


def learner_loop(args, data: ImageData, device: torch.device) -> float:
    """Images per second of ``make_learner(...).fit_one_cycle``, as the notebooks train."""
    model, loss = new_model_and_loss(args, device)
    learn = make_learner(
        model,
        loss,
        data,
        batch_size=args.batch_size,
        augment=args.augment,
        mixed_precision=args.precision,
        device=device,
    )
    timer = StepTimer(args.warmup, device)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(1, 1e-3, cbs=[timer])
    return args.steps * args.batch_size / timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--backbone", default=None, help="default: resnet18 on cuda, small_cnn")
    parser.add_argument("--image-size", type=int, default=None, help="default: 64 cuda, 40 cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 cuda, 64 cpu")
    parser.add_argument("--embedding-size", type=int, default=512)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--precision", choices=sorted(AMP_DTYPES), default=None,
                        help="default: bf16 on cuda, fp32 on cpu")  # fmt: skip
    parser.add_argument("--augment", action="store_true", help="on-device augment_batch in both")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 100 / 20)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median counts")
    parser.add_argument("--channels-last", action="store_true",
                        help="the model in channels_last layout, in both loops")  # fmt: skip
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True for both loops")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU")
    gpu = device.type == "cuda"
    defaults = {
        "backbone": "resnet18" if gpu else "small_cnn",
        "image_size": 64 if gpu else 40,
        "batch_size": 256 if gpu else 64,
        "precision": "bf16" if gpu else "fp32",
        "steps": 100 if gpu else 20,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be at least 1")
    if args.precision != "fp32" and not gpu:
        parser.error(f"--precision {args.precision} needs --device cuda")

    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    data = synthetic_data(args, device)
    rounds = {"bare": [], "utils_cv": []}
    for round_ in range(args.repeats):
        rounds["bare"].append(bare_loop(args, data, device))
        rounds["utils_cv"].append(learner_loop(args, data, device))
        print(f"round {round_ + 1}: bare {rounds['bare'][-1]:,.0f} img/s, "
              f"utils_cv {rounds['utils_cv'][-1]:,.0f} img/s", flush=True)  # fmt: skip
    bare, ours = (statistics.median(rounds[k]) for k in ("bare", "utils_cv"))
    result = {
        "device": describe_device(device),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "images_per_second": {"bare": round(bare), "utils_cv": round(ours)},
        "rounds": {k: [round(v) for v in values] for k, values in rounds.items()},
        "ratio": round(ours / bare, 3),
        "target": TARGET,
        "meets_target": ours / bare >= TARGET,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
