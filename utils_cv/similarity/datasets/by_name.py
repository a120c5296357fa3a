"""One entry point for the notebooks' ``DATASET`` parameter: a built-in name or your folder.

    load_dataset("emoji", image_size=40)            # built once into the cache, then read
    load_dataset("emoji:openmoji,noto", image_size=40)  # only these designs of it
    load_dataset("fashion_mnist", image_size=40)    # a class-balanced subset, closed set
    load_dataset("/path/to/my/images", image_size=40)  # an ImageFolder tree, read in place

Built and downloaded data goes to the **cache** (``data_dir``; default the repository's
``data/``), never into a folder passed as a dataset: a user's image folder is only read.
A ``data_dir`` that already holds files not made by this project is refused, so a folder
of your images cannot become a cache by mistake.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from utils_cv.similarity.datasets.base import DATA_DIR, WHITE, ImageData
from utils_cv.similarity.datasets.emoji import DESIGNS, build_emoji, load_emoji
from utils_cv.similarity.datasets.emoji_fonts import FONT_DESIGNS
from utils_cv.similarity.datasets.emoji_packages import PackageFetchError
from utils_cv.similarity.datasets.fashion_mnist import (
    FASHION_MNIST_DEBIAN,
    load_fashion_mnist,
    resize_uint8,
)
from utils_cv.similarity.datasets.image_folder import load_image_folder

BUILT_IN = ("emoji", "fashion_mnist")
# Written into a cache folder this project creates, so that it can recognize it later.
CACHE_MARKER = ".utils_cv_cache"
# Images per class of the built-in Fashion-MNIST view: (train, val) from the official
# training images, test from the official test images. About the size of the emoji data.
FASHION_MNIST_PER_CLASS = (300, 60, 300)


def cache_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder for built and downloaded data: ``data_dir``, or the repository's data/.

    A folder other than the default is used only when it does not exist yet, is empty, or
    was made a cache by this function before (it holds the file ``.utils_cv_cache``);
    otherwise ValueError, since it is probably someone's data.
    """
    if data_dir is None:
        return DATA_DIR
    folder = Path(data_dir).expanduser()
    if folder.resolve() == DATA_DIR.resolve():
        return DATA_DIR
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"DATA_DIR={str(folder)!r} is a file; it must be a folder for the cache")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / CACHE_MARKER).exists():
        count = sum(1 for _ in folder.iterdir())
        raise ValueError(
            f"DATA_DIR={str(folder)!r} already holds {count} entries that this project did not "
            "make. DATA_DIR is only where built data is cached (the emoji images, "
            "Fashion-MNIST); to train on your own images pass their folder as DATASET and "
            "leave DATA_DIR unset (or name an empty or new folder)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / CACHE_MARKER
    if not marker.exists():
        marker.write_text("utils_cv cache: built and downloaded datasets; safe to delete.\n")
    return folder


def load_dataset(
    dataset: str | os.PathLike,
    image_size: int,
    *,
    data_dir: str | os.PathLike | None = None,
    max_classes: int | None = None,
    max_per_class: int | None = None,
    background: tuple[int, int, int] = WHITE,
) -> ImageData:
    """The data a notebook's ``DATASET`` names, with "train", "val" and "test" splits.

    Args:
        dataset: "emoji" (cross-design emoji in all eight designs, split by class; e.g.
            "emoji:openmoji,noto,symbola,unifont" keeps only the designs named after the
            colon, here the four drawn from fonts), "fashion_mnist" (a seeded,
            class-balanced subset of Fashion-MNIST: 300 training, 60 validation and 300 test
            images per class, closed set: the same 10 classes in every split), or the path
            of an ImageFolder tree (``load_image_folder``: split by class like the emoji
            data, domains from ``<class>/<domain>/`` subfolders).
        image_size: side of the square images.
        data_dir: the cache for built and downloaded data (see ``cache_dir``).
        max_classes: keep only the first this many classes (labels below it), for quick runs.
        max_per_class: keep only the first this many images of each class in each split.
        background: the colour transparent pixels of your images are composited onto.

    Raises ValueError naming the choices when ``dataset`` is neither a built-in name nor
    an existing folder.
    """
    name = str(dataset)
    if name == "emoji" or name.startswith("emoji:"):
        designs, cache = _emoji_designs(name), cache_dir(data_dir)
        root = cache / "emoji"
        if not (root / "manifest.csv").exists():
            _build_every_design(root, cache / "npm", designs)
        data = load_emoji(root, image_size=image_size, designs=designs)
    elif name == "fashion_mnist":
        data = _fashion_mnist_view(cache_dir(data_dir), image_size)
    elif Path(name).expanduser().is_dir():
        data = load_image_folder(Path(name).expanduser(), image_size, background=background)
    else:
        raise ValueError(
            f"DATASET={name!r} is neither a built-in dataset {list(BUILT_IN)} nor an existing "
            "folder; pass one of those names or the path of your ImageFolder tree "
            "(root/<class>/<image>)"
        )
    if max_classes:
        data = data.subset(data.labels < max_classes)
    if max_per_class:
        seen: dict[tuple[int, str], int] = {}
        keep = []
        for label, split in zip(data.labels.tolist(), data.splits, strict=True):
            seen[label, split] = seen.get((label, split), 0) + 1
            keep.append(seen[label, split] <= max_per_class)
        data = data.subset(keep)
    return data


def _build_every_design(root: Path, packages: Path, designs: list[str] | None) -> None:
    """Build all eight designs, whichever are asked now; offline, the fonts alone will do
    when only font designs are asked (a later "emoji" then asks for a rebuild). A build
    that another process finished meanwhile is kept."""
    try:
        build_emoji(root, packages=packages, if_missing=True)
    except PackageFetchError as error:
        if designs is None or not set(designs) <= set(FONT_DESIGNS):
            raise
        warnings.warn(f"building the font designs only: {error}", stacklevel=3)
        build_emoji(root, designs=FONT_DESIGNS, if_missing=True)


def _emoji_designs(name: str) -> list[str] | None:
    """The designs "emoji:a,b" names (None, all, for "emoji"); ValueError naming the choices."""
    if name == "emoji":
        return None
    designs = [d.strip() for d in name.removeprefix("emoji:").split(",") if d.strip()]
    unknown = [d for d in designs if d not in DESIGNS]
    if unknown or not designs:
        raise ValueError(
            f"DATASET={name!r} names unknown designs {unknown}; after 'emoji:' list some of "
            f"{list(DESIGNS)} separated by commas, e.g. 'emoji:openmoji,noto'"
        )
    return designs


def _fashion_mnist_view(cache: Path, image_size: int) -> ImageData:
    debian = FASHION_MNIST_DEBIAN.is_dir()
    # Read at 28 px and resize only the chosen tenth, not all 70,000 images.
    full = load_fashion_mnist(None if debian else cache / "fashion_mnist")
    chosen, splits = fashion_mnist_picks(full)
    view = full.subset(torch.tensor(chosen))
    return dataclasses.replace(view, images=resize_uint8(view.images, image_size), splits=splits)


def fashion_mnist_picks(full: ImageData) -> tuple[list[int], list[str]]:
    """The seeded, class-balanced images of the built-in Fashion-MNIST view: their indices
    in ``full`` (all 70,000) and the split each gets (``FASHION_MNIST_PER_CLASS``)."""
    rng = np.random.default_rng(0)
    train_count, val_count, test_count = FASHION_MNIST_PER_CLASS
    labels = full.labels.numpy()
    official = np.array(full.splits)
    chosen, splits = [], []
    for label in range(len(full.class_names)):
        train_pool = rng.permutation(np.flatnonzero((labels == label) & (official == "train")))
        test_pool = rng.permutation(np.flatnonzero((labels == label) & (official == "test")))
        picks = {
            "train": train_pool[:train_count],
            "val": train_pool[train_count : train_count + val_count],
            "test": test_pool[:test_count],
        }
        for split, indices in picks.items():
            chosen.extend(indices.tolist())
            splits.extend([split] * len(indices))
    return chosen, splits
