"""Your own images: an ImageFolder tree, one folder per class, split by class."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from PIL import Image

from utils_cv.similarity.datasets.base import (
    DECODE_ERRORS,
    WHITE,
    ImageData,
    _resize_square,
    _to_tensor,
    class_split,
    to_rgb,
)
from utils_cv.similarity.datasets.file_list import FileList

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
    background: tuple[int, int, int] = WHITE,
    in_memory: bool = True,
) -> ImageData | FileList:
    """Images in an ImageFolder tree, one folder per class, optionally one subfolder per domain.

    Layout::

        root/<class>/<image>            domain ""
        root/<class>/<domain>/<image>   domain "<domain>", e.g. an icon theme, a camera,
                                        "catalogue" against "user photo"

    Images deeper than that belong to the domain of their first subfolder. Domains give
    the cross-domain view (one domain's images as queries, another's as the reference set).

    Each class goes to one split by :func:`class_split` on its folder name, the same rule
    as the emoji data. Every file is accounted for: files that are not images or cannot be
    decoded, and empty class folders, are listed in one warning (nothing is silently
    dropped); a class with a single image is kept with a warning (it cannot be a retrieval
    query). Images become RGB as ``to_rgb`` says (EXIF orientation applied, transparency
    composited onto ``background``, 16-bit and CMYK converted), then their shorter side is
    resized to ``image_size`` and the centre cropped to a square. Nothing is ever written.
    Raises FileNotFoundError when ``root`` is missing and ValueError when it has no images.

    ``in_memory=False`` returns a ``FileList`` of the same images, labels, splits and domains
    instead, for folders too large for memory: ``make_learner``, ``train_run`` and ``embed``
    decode it batch by batch at the ``image_size`` they are given (``image_size`` here is
    then unused). The checks and warnings are the same: every image is decoded once here, so
    a file that cannot be read is listed now, not met in the middle of a training.
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
    images, labels, paths, domains, class_names = [], [], [], [], []
    empty, single = [], []
    for class_dir in class_dirs:
        count = 0
        for path in sorted(p for p in class_dir.rglob("*") if p.is_file()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append(f"{path} (not an image file extension)")
                continue
            try:
                with Image.open(path) as image:
                    if in_memory:
                        images.append(_resize_square(image, image_size, background))
                    else:
                        to_rgb(image, background)  # decoded, then let go
            except DECODE_ERRORS as error:
                skipped.append(f"{path} (unreadable: {error})")
                continue
            labels.append(len(class_names))
            paths.append(str(path) if in_memory else os.path.abspath(path))
            relative = path.relative_to(class_dir).parts
            domains.append(relative[0] if len(relative) > 1 else "")
            count += 1
        if count == 0:
            empty.append(class_dir.name)
            continue
        if count == 1:
            single.append(class_dir.name)
        class_names.append(class_dir.name)
    problems = []
    if skipped:
        problems.append(
            f"skipped {len(skipped)} files (re-save or remove them; nothing was changed): "
            + _listing(skipped)
        )
    if empty:
        problems.append(
            f"{len(empty)} class folders without readable images (add images or remove the "
            f"folders): {_listing(empty)}"
        )
    if single:
        problems.append(
            f"{len(single)} classes have one image and cannot be retrieval queries (add a "
            f"second image to make them queries): {_listing(single)}"
        )
    if not paths:
        raise ValueError(
            f"no readable images in {root}; expected root/<class>/<image>"
            + ("; " + "; ".join(problems) if problems else "")
        )
    if problems:
        warnings.warn(f"load_image_folder({str(root)!r}): " + "; ".join(problems), stacklevel=2)
    splits_by_class = [class_split(name, test_fraction, val_fraction) for name in class_names]
    splits = [splits_by_class[label] for label in labels]
    labels = torch.tensor(labels, dtype=torch.int64)
    if not in_memory:
        return FileList(root, paths, labels, class_names, splits, domains)
    return ImageData(
        images=_to_tensor(images),
        labels=labels,
        class_names=class_names,
        splits=splits,
        domains=domains,
        paths=paths,
    )
