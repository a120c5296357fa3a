"""The in-memory container every dataset loader returns, and the class split they share.

An :class:`ImageData` holds uint8 images, integer labels into a global list of class
names, and per image its split ("train" | "val" | "test"), domain and source path.
Retrieval benchmarks split by *class*: the test classes are never seen in training, and
model selection uses a validation share of the training classes (:func:`class_split`).
The loaders live beside this file, one per dataset.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Self

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Built and downloaded data is cached in the repository's data/ folder (git-ignored).
DATA_DIR = Path(__file__).resolve().parents[3] / "data"


class PerImageFields:
    """What ``ImageData`` and ``FileList`` (datasets/file_list.py) share: per-image fields
    of one length, labels indexing ``class_names``, the split names, and selecting images.

    A subclass is a dataclass with ``labels``, ``class_names`` and ``splits`` fields and
    names its per-image fields in ``_per_image``, the one that defines the length first;
    each is a tensor, a list, or None (an optional field).
    """

    _per_image: ClassVar[tuple[str, ...]]

    def __len__(self) -> int:
        return len(getattr(self, self._per_image[0]))

    def _check_per_image(self) -> None:
        n, first = len(self), self._per_image[0]
        lengths = {
            name: len(getattr(self, name))
            for name in self._per_image[1:]
            if getattr(self, name) is not None
        }
        bad = {k: v for k, v in lengths.items() if v != n}
        if bad:
            raise ValueError(f"{n} {first} but lengths {bad}; every per-image field needs N={n}")
        labels = self.labels
        if labels.dtype != torch.int64 or labels.dim() != 1:
            raise ValueError(f"labels must be (N,) int64, got {tuple(labels.shape)} {labels.dtype}")
        # Checked on the CPU only: elsewhere it would cost a device sync at every subset.
        on_cpu = labels.device.type == "cpu"
        if n and on_cpu and (labels.min() < 0 or labels.max() >= len(self.class_names)):
            raise ValueError(
                f"labels must index class_names (0..{len(self.class_names) - 1}), got range "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split names {unknown}; expected {list(SPLITS)}")

    def _split_counts(self) -> dict[str, int]:
        return {s: self.splits.count(s) for s in SPLITS if s in self.splits}

    @property
    def num_classes(self) -> int:
        """Number of distinct labels present (not ``len(class_names)``)."""
        return int(torch.unique(self.labels).numel())

    def subset(self, index: torch.Tensor | Sequence[int] | Sequence[bool]) -> Self:
        """Images selected by a bool mask (N,) or integer indices; keeps ``class_names``."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(f"bool mask has shape {tuple(index.shape)}, needs ({len(self)},)")
            index = index.nonzero().flatten()
        index = index.long().cpu()
        keep = index.tolist()
        selected = {}
        for name in self._per_image:
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                selected[name] = value[index.to(value.device)]
            elif value is not None:
                selected[name] = [value[i] for i in keep]
        return replace(self, class_names=list(self.class_names), **selected)

    def split(self, name: str) -> Self:
        """The images whose split is ``name`` ("train", "val" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"split {name!r} unknown; use one of {list(SPLITS)}")
        return self.subset([s == name for s in self.splits])

    def relabel(self) -> Self:
        """Labels made contiguous 0..C-1 in order of the old labels; class_names reduced.
        Other tensors (the images) are shared with ``self``, lists copied."""
        present, labels = torch.unique(self.labels, return_inverse=True)
        lists = {
            name: list(getattr(self, name))
            for name in self._per_image
            if isinstance(getattr(self, name), list)
        }
        return replace(
            self,
            labels=labels.to(torch.int64),
            class_names=[self.class_names[i] for i in present.tolist()],
            **lists,
        )


@dataclass
class ImageData(PerImageFields):
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

    _per_image: ClassVar[tuple[str, ...]] = ("images", "labels", "splits", "domains", "paths")

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be (N, 3, H, W) uint8, got {tuple(self.images.shape)} "
                f"{self.images.dtype}"
            )
        self._check_per_image()

    def __repr__(self) -> str:
        return (
            f"ImageData({len(self)} images {tuple(self.images.shape[1:])}, "
            f"{self.num_classes} classes, splits {self._split_counts()}, "
            f"device {self.images.device})"
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


def split_summary(data: ImageData) -> str:
    """One line on the splits: images and classes of each, and whether they share classes.

    >>> split_summary(data)  # doctest: +SKIP
    'train 2532 images / 763 classes, val 583 / 169, test 3216 / 975; no class in two splits'
    """
    # From the label and split lists alone: data.split() would copy every image.
    labels = data.labels.tolist()
    parts, classes = [], {}
    for name in SPLITS:
        in_split = [
            label for label, split in zip(labels, data.splits, strict=True) if split == name
        ]
        classes[name] = set(in_split)
        unit = " images / " if not parts else " / "
        parts.append(
            f"{name} {len(in_split)}{unit}{len(classes[name])}" + (" classes" if not parts else "")
        )
    shared = classes["test"] & (classes["train"] | classes["val"])
    if not shared:
        note = "no class in two splits: the test classes are new to the model"
    else:
        note = (
            f"closed set: {len(shared)} test classes are also training or validation classes, "
            "so the test numbers measure retrieval among known classes, not new ones"
        )
    return ", ".join(parts) + "; " + note


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


# Domains that name their roles, as In-Shop's test images do: the pair is always these, in
# this order, whichever has more images.
QUERY_GALLERY: tuple[str, str] = ("query", "gallery")


def cross_domain_pair(data: ImageData) -> tuple[str, str] | None:
    """The (query, reference) domains of the cross-domain view, or None without domains.

    Domains named "query" and "gallery" (In-Shop's protocol) give ("query", "gallery"),
    whichever has more images. Otherwise the two domains with the most images (ties: the one
    seen first), e.g. ("openmoji", "noto") on the emoji data. None when fewer than two
    non-empty domains exist.
    """
    counts = Counter(domain for domain in data.domains if domain)
    if len(counts) < 2:
        return None
    if set(QUERY_GALLERY) <= set(counts):
        return QUERY_GALLERY
    first_seen = {domain: i for i, domain in reversed(list(enumerate(data.domains)))}
    ranked = sorted(counts, key=lambda domain: (-counts[domain], first_seen[domain]))
    return ranked[0], ranked[1]


# Cross-design views of the emoji benchmark beside the two largest designs: a pair of
# designs that are both new in the eight-design build and drawn by different designers.
EMOJI_VIEWS: tuple[tuple[str, str], ...] = (("fluent_flat", "twemoji"),)


def cross_domain_views(data: ImageData) -> list[tuple[str, str]]:
    """The (query, reference) domain pairs to evaluate across domains, main one first.

    ``cross_domain_pair`` (OpenMoji → Noto on the emoji data), then each of
    ``EMOJI_VIEWS`` whose two domains both have images (Fluent flat → Twemoji). Empty
    without domains.
    """
    main = cross_domain_pair(data)
    present = set(data.domains)
    extra = [v for v in EMOJI_VIEWS if v != main and set(v) <= present]
    return ([main] if main else []) + extra


def example_queries(data: ImageData, count: int = 4, domain: str | None = "auto") -> list[int]:
    """Indices of ``count`` fixed example queries of distinct classes, the same in every notebook.

    Candidates are the images of ``domain`` whose class has at least one other image, so
    each has a right answer. ``domain="auto"`` takes the query domain of
    ``cross_domain_pair`` (OpenMoji on the emoji data), or any image when the data has no
    domains; None takes any image. Classes are ordered by a stable hash of their name and
    the first candidate of each is taken, so the choice depends neither on a model nor on
    the run, and no class is shown twice. Rank plots of these queries can be compared from
    one notebook to the next.
    """
    if domain == "auto":
        pair = cross_domain_pair(data)
        domain = pair[0] if pair else None
    labels = data.labels.tolist()
    class_sizes = Counter(labels)
    candidates = [
        i
        for i, label in enumerate(labels)
        if class_sizes[label] > 1 and (domain is None or data.domains[i] == domain)
    ]
    candidates.sort(key=lambda i: (_unit_hash(data.class_names[labels[i]], "example"), i))
    chosen, seen = [], set()
    for i in candidates:
        if labels[i] not in seen:
            chosen.append(i)
            seen.add(labels[i])
    if len(chosen) < count:
        raise ValueError(
            f"only {len(chosen)} classes have an image of domain={domain!r} with a same-class "
            f"partner but count={count}; lower count or pass domain=None"
        )
    return chosen[:count]


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) uint8 from equally sized RGB PIL images."""
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8)
    array = np.stack([np.asarray(image, dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


WHITE = (255, 255, 255)
# What Pillow raises for a file it cannot decode: not an image, cut short or unreadable,
# a bad header, or too many pixels.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """An image as 8-bit RGB, the way a person looking at it would expect.

    - EXIF orientation is applied (a photo taken upright shows upright);
    - transparency is composited onto ``background`` (white by default): RGBA, LA, and
      palette or grey images with a transparent colour (Pillow's plain ``convert("RGB")``
      would drop the alpha, showing hidden pixels, often black);
    - 16- and 32-bit grey images ("I;16", "I", "F") are scaled from their full range to
      8 bits (a plain conversion clips everything above 255 to white);
    - CMYK and any other mode go through Pillow's conversion to RGB.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        peak = float(array.max()) if array.size else 0.0
        # The full range of the file's format: 16 bits for I;16; for 32-bit ints and floats,
        # the smallest usual range that holds the values (1, 255 or 65535), else their maximum.
        top = (
            65535.0
            if image.mode.startswith("I;16")
            else next((limit for limit in (1.0, 255.0, 65535.0) if peak <= limit), peak)
        )
        if image.mode == "I" and top == 1.0:
            top = 255.0  # integer images with values 0 and 1 are 8-bit, not a 0..1 range
        array = np.clip(array / top * 255.0, 0, 255).round().astype(np.uint8)
        image = Image.fromarray(array)
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def check_crop_pct(crop_pct: float) -> None:
    """ValueError unless 0 < crop_pct <= 1 (``_resize_square``'s share of the shorter side)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(
            f"crop_pct={crop_pct} must be in (0, 1]: the share of the resized shorter side "
            "kept by the centre crop (0.875 for 256 -> 224)"
        )


def _resize_square(
    image: Image.Image,
    image_size: int,
    background: tuple[int, int, int] = WHITE,
    crop_pct: float = 1.0,
) -> Image.Image:
    """RGB (see ``to_rgb``), shorter side resized to image_size / crop_pct (antialiased),
    centre crop of image_size (crop_pct 0.875: the papers' 256 -> 224)."""
    image = to_rgb(image, background)
    resize = round(image_size / crop_pct)
    scale = resize / min(image.size)
    size = (
        max(resize, round(image.width * scale)),
        max(resize, round(image.height * scale)),
    )
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))
