"""Image data for retrieval: one in-memory container and the loaders that fill it.

Every loader returns an :class:`ImageData`: uint8 images, integer labels into a global
list of class names, and per image its split ("train" | "val" | "test"), domain and
source path. Retrieval benchmarks split by *class*: the test classes are never seen in
training, and model selection uses a validation share of the training classes.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import struct
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Built and downloaded data is cached in the repository's data/ folder (git-ignored).
DATA_DIR = Path(__file__).resolve().parents[2] / "data"
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


@dataclass
class ImageData:
    """Images with labels, class names, splits, domains and source paths.

    images: (N, 3, H, W) uint8 RGB, on any device (CPU by default).
    labels: (N,) int64, index into ``class_names``.
    class_names: global list of class names; labels index into it.
    splits: (N,) "train" | "val" | "test" per image.
    domains: (N,) per image, e.g. the emoji design; "" where not meaningful.
    paths: (N,) source file per image; "" for images without a file.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    splits: list[str]
    domains: list[str]
    paths: list[str]

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be (N, 3, H, W) uint8, got {tuple(self.images.shape)} "
                f"{self.images.dtype}"
            )
        lengths = {
            "labels": len(self.labels),
            "splits": len(self.splits),
            "domains": len(self.domains),
            "paths": len(self.paths),
        }
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"{n} images but lengths {bad}; every per-image field needs N={n}")
        if self.labels.dtype != torch.int64:
            raise ValueError(f"labels must be int64, got {self.labels.dtype}")
        # Checked on the CPU only: elsewhere it would cost a device sync at every subset.
        on_cpu = self.labels.device.type == "cpu"
        if n and on_cpu and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(
                f"labels must index class_names (0..{len(self.class_names) - 1}), got range "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split names {unknown}; expected {list(SPLITS)}")

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        counts = {s: self.splits.count(s) for s in SPLITS if s in self.splits}
        return (
            f"ImageData({len(self)} images {tuple(self.images.shape[1:])}, "
            f"{self.num_classes} classes, splits {counts}, device {self.images.device})"
        )

    @property
    def num_classes(self) -> int:
        """Number of distinct labels present (not ``len(class_names)``)."""
        return int(torch.unique(self.labels).numel())

    def subset(self, index: torch.Tensor | Sequence[int] | Sequence[bool]) -> ImageData:
        """Images selected by a bool mask (N,) or integer indices; keeps ``class_names``."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"bool mask has shape {tuple(index.shape)}, needs ({len(self)},)")
            index = index.nonzero().flatten()
        index = index.long().cpu()
        keep = index.tolist()
        return ImageData(
            images=self.images[index.to(self.images.device)],
            labels=self.labels[index.to(self.labels.device)],
            class_names=list(self.class_names),
            splits=[self.splits[i] for i in keep],
            domains=[self.domains[i] for i in keep],
            paths=[self.paths[i] for i in keep],
        )

    def split(self, name: str) -> ImageData:
        """The images whose split is ``name`` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} unknown; use one of {list(SPLITS)}")
        return self.subset([s == name for s in self.splits])

    def relabel(self) -> ImageData:
        """Labels made contiguous 0..C-1 in order of the old labels; class_names reduced."""
        present, labels = torch.unique(self.labels, return_inverse=True)
        return ImageData(
            images=self.images,
            labels=labels.to(torch.int64),
            class_names=[self.class_names[i] for i in present.tolist()],
            splits=list(self.splits),
            domains=list(self.domains),
            paths=list(self.paths),
        )

    def to(self, device: torch.device | str) -> ImageData:
        """Images and labels moved to ``device``."""
        return ImageData(
            images=self.images.to(device),
            labels=self.labels.to(device),
            class_names=list(self.class_names),
            splits=list(self.splits),
            domains=list(self.domains),
            paths=list(self.paths),
        )


def _unit_hash(text: str, salt: str) -> float:
    """A number in [0, 1) from sha256: stable across runs, machines and Python versions."""
    digest = hashlib.sha256(f"{salt}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def class_split(name: str, test_fraction: float = 0.5, val_fraction: float = 0.2) -> str:
    """Split of a class by a stable hash of its name: "train", "val" or "test".

    About ``test_fraction`` of all classes go to "test"; of the rest, about ``val_fraction``
    go to "val" (for model selection), the others to "train". The hash is sha256, so the
    answer never changes (Python's ``hash()`` is salted per process). The "val" draw uses
    a second, independent hash, so changing ``test_fraction`` never moves a class between
    "val" and "train" except by sending it to or from "test".
    """
    for label, fraction in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{label}={fraction} must be between 0 and 1")
    if _unit_hash(name, "test") < test_fraction:
        return "test"
    if _unit_hash(name, "val") < val_fraction:
        return "val"
    return "train"


def example_queries(data: ImageData, count: int = 4, domain: str | None = "openmoji") -> list[int]:
    """Indices of ``count`` fixed example queries, the same in every notebook.

    Candidates are the images of ``domain`` (None: any) whose class has at least one other
    image, so each has a right answer; they are ordered by a stable hash of the class
    name, so the choice depends neither on a model nor on the run. Rank plots of these
    queries can be compared from one notebook to the next.
    """
    labels = data.labels.tolist()
    class_sizes = Counter(labels)
    candidates = [
        i
        for i, label in enumerate(labels)
        if class_sizes[label] > 1 and (domain is None or data.domains[i] == domain)
    ]
    if len(candidates) < count:
        raise ValueError(
            f"only {len(candidates)} images of domain={domain!r} have a same-class partner "
            f"but count={count}; lower count or pass domain=None"
        )
    candidates.sort(key=lambda i: (_unit_hash(data.class_names[labels[i]], "example"), i))
    return candidates[:count]


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) uint8 from equally sized RGB PIL images."""
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _resize_square(image: Image.Image, image_size: int) -> Image.Image:
    """RGB, shorter side resized to image_size (antialiased), centre crop to a square."""
    image = image.convert("RGB")
    scale = image_size / min(image.size)
    size = (
        max(image_size, round(image.width * scale)),
        max(image_size, round(image.height * scale)),
    )
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def load_emoji(
    root: str | os.PathLike | None = None,
    image_size: int = 64,
    designs: Sequence[str] | None = None,
    build: bool = True,
    *,
    rebuild: bool = False,
    max_classes: int | None = None,
    include_skin_tones: bool = False,
    fonts: dict[str, str | os.PathLike] | None = None,
) -> ImageData:
    """The cross-design emoji benchmark (see ``utils_cv.similarity.emoji``), built if missing.

    root: folder of the build (default: the repository's data/emoji); image_size: side of
    the returned images (resized with antialiasing from the stored 96 px); designs: subset
    of ("openmoji", "noto", "symbola", "unifont"), default all; build: build when ``root``
    has no manifest; rebuild: build again even if present. max_classes, include_skin_tones
    and fonts are passed to ``build_emoji``; a folder built with other values is refused.
    Labels index the sorted class names; ``domains`` holds the design of each image and
    ``splits`` the stable class split recorded in the manifest.
    """
    # Imported here: the emoji module itself imports this one (for class_split).
    from utils_cv.similarity import emoji

    root = Path(emoji.DEFAULT_ROOT if root is None else root)
    params = emoji.build_parameters(
        designs=designs, include_skin_tones=include_skin_tones, max_classes=max_classes
    )
    if rebuild or not (root / "manifest.csv").exists():
        if not build and not rebuild:
            raise FileNotFoundError(
                f"no emoji data in {root} (manifest.csv missing); call load_emoji(..., "
                f"build=True) or utils_cv.similarity.emoji.build_emoji({str(root)!r})"
            )
        emoji.build_emoji(
            root,
            designs=params["designs"],
            include_skin_tones=include_skin_tones,
            max_classes=max_classes,
            fonts=fonts,
        )
    emoji.check_emoji(root, {k: v for k, v in params.items() if k != "image_size"}, fonts)
    with open(root / "manifest.csv", newline="", encoding="utf-8") as file:
        rows = [row for row in csv.DictReader(file) if row["design"] in params["designs"]]
    class_names = sorted({row["class_name"] for row in rows})
    index = {name: i for i, name in enumerate(class_names)}
    images = []
    for row in rows:
        with Image.open(root / row["path"]) as image:
            images.append(_resize_square(image, image_size))
    return ImageData(
        images=_to_tensor(images),
        labels=torch.tensor([index[row["class_name"]] for row in rows], dtype=torch.int64),
        class_names=class_names,
        splits=[row["split"] for row in rows],
        domains=[row["design"] for row in rows],
        paths=[str(root / row["path"]) for row in rows],
    )


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Problem lists in warnings are cut after this many paths (the count is always complete).
_MAX_LISTED = 20


def _is_stray(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".")


def _listing(items: list[str]) -> str:
    """Items one per line, cut after _MAX_LISTED with the number left out."""
    shown = items[:_MAX_LISTED]
    if len(items) > _MAX_LISTED:
        shown.append(f"... and {len(items) - _MAX_LISTED} more")
    return "\n  " + "\n  ".join(shown)


def load_image_folder(
    root: str | os.PathLike,
    image_size: int = 64,
    test_fraction: float = 0.5,
    val_fraction: float = 0.2,
) -> ImageData:
    """Images in an ImageFolder tree: ``root/<class name>/<image file>``.

    Each class goes to one split by :func:`class_split` on its folder name. Every file is
    accounted for: files that are not images or cannot be decoded, and empty class
    folders, are listed in one warning (nothing is silently dropped); a class with a
    single image is kept with a warning (it cannot be a retrieval query). Images are
    converted to RGB, their shorter side resized to ``image_size`` and centre-cropped.
    Raises FileNotFoundError when ``root`` is missing and ValueError when it has no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected root/<class>/<image>"
        )
    entries = sorted(root.iterdir())
    # Nothing is dropped silently: hidden entries (.DS_Store, .ipynb_checkpoints) and files
    # outside class folders are reported with the unreadable ones.
    skipped = [f"{p} (hidden, ignored)" for p in entries if p.name.startswith(".")]
    skipped += [f"{p} (file outside a class folder)" for p in entries if _is_stray(p)]
    class_dirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    images, labels, paths, class_names = [], [], [], []
    empty, single = [], []
    for class_dir in class_dirs:
        count = 0
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(f"{path} (not an image file extension)")
                continue
            try:
                with Image.open(path) as image:
                    images.append(_resize_square(image, image_size))
            except (
                UnidentifiedImageError,
                OSError,
                ValueError,
                Image.DecompressionBombError,
            ) as error:
                skipped.append(f"{path} (unreadable: {error})")
                continue
            labels.append(len(class_names))
            paths.append(str(path))
            count += 1
        if count == 0:
            empty.append(class_dir.name)
            continue
        if count == 1:
            single.append(class_dir.name)
        class_names.append(class_dir.name)
    problems = []
    if skipped:
        problems.append(f"skipped {len(skipped)} files: {_listing(skipped)}")
    if empty:
        problems.append(f"{len(empty)} class folders without readable images: {_listing(empty)}")
    if single:
        problems.append(
            f"{len(single)} classes have one image and cannot be retrieval queries: "
            + _listing(single)
        )
    if not images:
        raise ValueError(
            f"no readable images in {root}; expected root/<class>/<image>"
            + ("; " + "; ".join(problems) if problems else "")
        )
    if problems:
        warnings.warn(f"load_image_folder({str(root)!r}): " + "; ".join(problems), stacklevel=2)
    splits_by_class = [class_split(name, test_fraction, val_fraction) for name in class_names]
    return ImageData(
        images=_to_tensor(images),
        labels=torch.tensor(labels, dtype=torch.int64),
        class_names=class_names,
        splits=[splits_by_class[label] for label in labels],
        domains=[""] * len(images),
        paths=paths,
    )


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
    if image_size != images.shape[-1]:
        images = torch.nn.functional.interpolate(
            images.float(), size=(image_size, image_size), mode="bilinear", antialias=True
        )
        images = images.round().clamp(0, 255).to(torch.uint8)
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
