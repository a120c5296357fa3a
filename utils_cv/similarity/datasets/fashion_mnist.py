"""Fashion-MNIST (Zalando, MIT): 10 clothing classes, for closed-set classification."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch

from utils_cv.similarity.datasets.base import DATA_DIR, ImageData

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def resize_uint8(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """(N, C, H, W) uint8 images resized to (N, C, image_size, image_size), antialiased."""
    if image_size == images.shape[-1] and image_size == images.shape[-2]:
        return images
    resized = torch.nn.functional.interpolate(
        images.float(), size=(image_size, image_size), mode="bilinear", antialias=True
    )
    return resized.round().clamp(0, 255).to(torch.uint8)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzipped or not, as a numpy uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as file:
        data = file.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {array.size} values, its header says shape {shape}")
    return array.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem, f"raw/{stem}.gz", f"raw/{stem}"):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(
    root: str | os.PathLike | None = None, image_size: int = 28, download: bool = False
) -> ImageData:
    """Fashion-MNIST (Zalando, MIT licence): 70,000 28x28 grey images of 10 clothing classes.

    The IDX files (``train-images-idx3-ubyte[.gz]`` etc.) are looked for in ``root`` when
    given, else in /usr/share/datasets/fashion-mnist (Debian package dataset-fashion-mnist)
    and then in the repository's data/fashion_mnist; also under ``FashionMNIST/raw/`` as
    torchvision stores them. With ``download=True`` a missing copy is downloaded by
    torchvision (which checks its MD5) into ``root`` (default data/fashion_mnist).
    Closed set: the official training images are split "train", the official test images
    "test", both over the same 10 classes (no "val"; not a zero-shot benchmark). Grey is
    replicated to 3 channels and resized to ``image_size`` (antialiased) when not 28.
    """
    target = Path(root) if root is not None else DATA_DIR / "fashion_mnist"
    # torchvision keeps its download in <root>/FashionMNIST/raw.
    candidates = [target, target / "FashionMNIST"]
    if root is None:
        candidates.insert(0, FASHION_MNIST_DEBIAN)
    folder = next((c for c in candidates if _find_idx(c, "t10k-labels-idx1-ubyte")), None)
    if folder is None and download:
        from torchvision.datasets import FashionMNIST

        for train in (True, False):
            FashionMNIST(str(target), train=train, download=True)
        folder = target / "FashionMNIST"
    if folder is None:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {[str(c) for c in candidates]}; install it with "
            f"`sudo apt-get install dataset-fashion-mnist`, or call "
            f"load_fashion_mnist(download=True) to download it with torchvision"
        )
    parts = []
    for prefix, split in (("train", "train"), ("t10k", "test")):
        found = {
            kind: _find_idx(folder, f"{prefix}-{kind}-idx{dim}-ubyte")
            for kind, dim in (("images", 3), ("labels", 1))
        }
        missing = [kind for kind, path in found.items() if path is None]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST in {folder} lacks the {prefix} {missing} file(s) "
                f"({prefix}-images-idx3-ubyte.gz, {prefix}-labels-idx1-ubyte.gz)"
            )
        images, labels = _read_idx(found["images"]), _read_idx(found["labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"Fashion-MNIST {prefix} files in {folder} disagree: images {images.shape}, "
                f"labels {labels.shape}"
            )
        parts.append((images, labels, split))
    images = torch.from_numpy(np.concatenate([p[0] for p in parts])).unsqueeze(1)
    images = resize_uint8(images, image_size)
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64))
    if labels.numel() and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"Fashion-MNIST labels in {folder} go up to {int(labels.max())}, not 9")
    return ImageData(
        images=images.expand(-1, 3, -1, -1).contiguous(),
        labels=labels,
        class_names=list(FASHION_MNIST_CLASSES),
        splits=[split for p in parts for split in [p[2]] * len(p[1])],
        domains=[""] * len(labels),
        paths=[""] * len(labels),
    )
