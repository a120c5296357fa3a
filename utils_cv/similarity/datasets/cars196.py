"""Cars196 (Stanford Cars, Krause et al., 2013): 16,185 photos of 196 car models, in the
layout metric learning uses (``car_ims/`` with ``cars_annos.mat``).

The metric-learning split: classes 1-98 train, 99-196 test. The annotations' ``test`` flag
is the *classification* split (about half the images of every class on each side) and is
not used here; classification results such as the ranking regularizer's top-1 are measured
on it, so they are not comparable with retrieval numbers.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from utils_cv.similarity.datasets.file_list import (
    FileList,
    check_class_count,
    check_images_exist,
    dataset_root,
    file_list_from,
    official_split,
)

CARS196_CLASSES = 196
# Stanford's downloads (ai.stanford.edu/~jkrause/car196/) are offline and no sha256 of the
# original files is published: no download here. Their md5, as libraries list them:
# car_ims.tgz d5c8f0aa497503f355e17dc7886c3f14, cars_annos.mat b407c6086d669747186bd1d764ff9dbc.
CARS196_FIX = (
    "root must be the folder holding cars_annos.mat and car_ims/ (car_ims.tgz extracted "
    "there), the metric-learning release of Stanford Cars "
    "(https://ai.stanford.edu/~jkrause/cars/car_dataset.html). Stanford's download links are "
    "offline; a copy elsewhere is the same data when car_ims.tgz has md5 "
    "d5c8f0aa497503f355e17dc7886c3f14 and cars_annos.mat md5 b407c6086d669747186bd1d764ff9dbc"
)
_FIELDS = ("relative_im_path", "class", "test")


def load_cars196(root: str | os.PathLike, val_fraction: float = 0.2) -> FileList:
    """Cars196's images as a :class:`FileList`, split by class as the papers split it.

    Layout::

        root/cars_annos.mat        MATLAB file: "annotations", one record per image with
                                   relative_im_path ("car_ims/000001.jpg"), bbox_x1, bbox_y1,
                                   bbox_x2, bbox_y2, class (1-196) and test (0 or 1); and
                                   "class_names" ("AM General Hummer SUV 2000", ...)
        root/car_ims/000001.jpg ... 016185.jpg

    The first half of the classes of ``class_names`` (1-98) are the training classes, the
    second half (99-196) the test classes: the split by class that retrieval papers use,
    *not* the file's ``test`` flag, which is the classification split (test images of
    every class). About ``val_fraction`` of the training classes (by ``class_split``'s
    stable hash of the class name) become "val". Class names are the file's
    ``class_names``. Read with ``scipy.io.loadmat``; nothing is ever written.

    Raises FileNotFoundError for a missing folder, file or image, ValueError for a file
    that is not this MATLAB file; warns when it does not have 196 classes.
    """
    root = dataset_root(root, "Cars196", CARS196_FIX)
    annos = root / "cars_annos.mat"
    if not annos.is_file():
        classification = [n for n in ("cars_train", "cars_test", "devkit") if (root / n).exists()]
        hint = (
            f" ({root} holds {', '.join(classification)}: that is the classification release, "
            "whose split and file names differ)"
            if classification
            else ""
        )
        raise FileNotFoundError(f"{annos} does not exist{hint}; {CARS196_FIX}")
    records, class_names = _read_annotations(annos)
    check_class_count(len(class_names), CARS196_CLASSES, "classes", annos)
    bad = [c for _, c in records if not 1 <= c <= len(class_names)]
    if bad:
        raise ValueError(
            f"{annos}: class {bad[0]} of an annotation is outside 1..{len(class_names)} "
            f"(the class_names field); {CARS196_FIX}"
        )
    class_splits = [
        official_split(class_id > len(class_names) // 2, name, val_fraction)
        for class_id, name in enumerate(class_names, 1)
    ]
    paths = [str(root / path) for path, _ in records]
    check_images_exist(paths, annos, CARS196_FIX)
    labels = [class_id - 1 for _, class_id in records]
    return file_list_from(root, paths, labels, class_names, class_splits)


def _read_annotations(path: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """[(relative_im_path, class)] and the class names of a cars_annos.mat."""
    import scipy.io  # comes with scikit-learn; imported here, only Cars196 needs it

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as error:  # scipy raises many kinds (IndexError, MatReadError, ...)
        raise ValueError(f"{path} is not a readable MATLAB file ({error}); {CARS196_FIX}") from None
    annotations = mat.get("annotations")
    names = mat.get("class_names")
    fields = getattr(getattr(annotations, "dtype", None), "names", None) or ()
    if names is None or not set(_FIELDS) <= set(fields):
        raise ValueError(
            f"{path} lacks the fields of cars_annos.mat: 'annotations' with "
            f"{', '.join(_FIELDS)} (found {', '.join(fields) or 'none'}) and 'class_names'; "
            f"{CARS196_FIX}"
        )
    annotations = np.atleast_1d(annotations)
    records = [
        (str(path_), int(class_))
        for path_, class_ in zip(annotations["relative_im_path"], annotations["class"], strict=True)
    ]
    return records, [str(name) for name in np.atleast_1d(names)]
