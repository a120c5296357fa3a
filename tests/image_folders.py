"""Tiny ImageFolder trees that tests write, as a user's own images would look."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils_cv.similarity.datasets import FileList, ImageData

# Kinds of files a user's folder holds: plain RGB, transparent RGBA, palette with a
# transparent colour, and JPEG. Each class gets them in turn.
KINDS = ("rgb.png", "rgba.png", "palette.png", "photo.jpg")


def pattern(label: int, variant: int, size: int) -> np.ndarray:
    """(size, size, 3) uint8 stripes whose angle and period give the class."""
    ys, xs = np.mgrid[0:size, 0:size]
    angle = math.pi * (label % 6) / 6
    period = 4 + 2 * (label // 6 % 3)
    wave = np.sin(2 * math.pi * (xs * math.cos(angle) + ys * math.sin(angle)) / period + variant)
    colour = np.array([(37 * label) % 200 + 40, (91 * label) % 200 + 40, (53 * variant) % 200 + 40])
    return (colour * (0.6 + 0.4 * wave[..., None])).clip(0, 255).astype(np.uint8)


def write_image_folder(
    root: Path,
    classes: int = 36,
    domains: tuple[str, ...] = ("light", "dark"),
    per_domain: int = 2,
    size: int = 24,
) -> Path:
    """Write ``root/<class>/[<domain>/]<image>`` and return ``root``.

    ``domains=()`` writes the images straight into the class folders (no domains).
    """
    count = 0
    for label in range(classes):
        class_dir = root / f"class_{label:02d}"
        for d, domain in enumerate(domains or ("",)):
            folder = class_dir / domain if domain else class_dir
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_domain):
                array = pattern(label, k + 3 * d, size)
                if domain == "dark":
                    array = 255 - array
                kind = KINDS[count % len(KINDS)]
                count += 1
                path = folder / f"{k}_{kind}"
                if kind == "rgba.png":
                    alpha = np.full((size, size, 1), 255, np.uint8)
                    alpha[: size // 4] = 0  # a transparent band at the top
                    Image.fromarray(np.concatenate([array, alpha], axis=2)).save(path)
                elif kind == "palette.png":
                    image = Image.fromarray(array).quantize(colors=16)
                    image.info["transparency"] = 0
                    image.save(path, transparency=0)
                elif kind == "photo.jpg":
                    Image.fromarray(array).save(path, quality=90)
                else:
                    Image.fromarray(array).save(path)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file and folder under ``root`` (hidden ones too) with size, hash and mtime."""
    state = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_dir():
            state[relative] = ("dir",)
        else:
            data = path.read_bytes()
            state[relative] = (len(data), hashlib.sha256(data).hexdigest(), path.stat().st_mtime_ns)
    return state


def file_list(paths: list[Path], labels: list[int] | None = None) -> FileList:
    """A FileList of ``paths`` (absolute), one class each unless ``labels`` are given, all
    split "train"."""
    labels = list(range(len(paths))) if labels is None else labels
    n = len(paths)
    return FileList(
        root=paths[0].parent,
        paths=[str(p.resolve()) for p in paths],
        labels=torch.tensor(labels),
        class_names=[f"class{i}" for i in range(max(labels) + 1)],
        splits=["train"] * n,
        domains=[""] * n,
    )


def write_stripes(folder: Path, data: ImageData) -> FileList:
    """``data``'s images as lossless PNGs, listed with its labels and splits."""
    folder.mkdir(parents=True)
    paths = []
    for i, image in enumerate(data.images):
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(paths[-1])
    files = file_list(paths, data.labels.tolist())
    files.class_names = list(data.class_names)
    files.splits = list(data.splits)
    return files
