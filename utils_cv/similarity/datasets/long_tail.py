"""Long-tailed subsets: an exponential profile of class sizes (Cui et al.; Cao et al., 2019).

Class-Balanced Loss (Cui et al., CVPR 2019) and LDAM (Cao et al., NeurIPS 2019) make a
balanced training set long-tailed by keeping, for the class of rank i among C,

    n_i = n_max * imbalance_ratio ** (-i / (C - 1))

images: the first class keeps n_max, the last n_max / imbalance_ratio, and the sizes in
between fall geometrically. Only the training images are subsampled; the test set stays
balanced, where top-1 and mean per-class accuracy tell how the rare classes fare.
"""

from __future__ import annotations

import math

import torch

from utils_cv.similarity.datasets.base import ImageData


def long_tail_counts(num_classes: int, n_max: int, imbalance_ratio: float) -> list[int]:
    """The class sizes n_0 >= ... >= n_{C-1} of the exponential profile.

    Each n_i is n_max * imbalance_ratio ** (-i / (C - 1)) rounded to the nearest integer,
    halves up (truncating instead can lose an image to floating-point error: 50.0 computed
    as 49.999...). A single class keeps n_max. Raises ValueError when the last class would
    get no image.
    """
    if num_classes < 1 or n_max < 1:
        raise ValueError(f"num_classes={num_classes} and n_max={n_max} must be at least 1")
    if not math.isfinite(imbalance_ratio) or imbalance_ratio < 1:
        raise ValueError(
            f"imbalance_ratio={imbalance_ratio} must be a finite number >= 1: the size of the "
            "largest class over the smallest (1 keeps the classes balanced)"
        )
    steps = max(num_classes - 1, 1)
    # n_max / r ** (i / steps) rather than n_max * r ** (-i / steps): the last class's
    # n_max / r is then exact, so a half (r = 2 n_max) rounds up as documented.
    counts = [math.floor(n_max / imbalance_ratio ** (i / steps) + 0.5) for i in range(num_classes)]
    if counts[-1] < 1:
        raise ValueError(
            f"imbalance_ratio={imbalance_ratio} leaves the smallest class with "
            f"{n_max} / {imbalance_ratio} < 0.5 images, which rounds to none; use "
            f"imbalance_ratio <= {2 * n_max} or more images per class"
        )
    return counts


def long_tailed(
    data: ImageData, imbalance_ratio: float, seed: int = 0, n_max: int | None = None
) -> ImageData:
    """A long-tailed subset of ``data``: class i of C keeps ``long_tail_counts(...)[i]`` images.

    Classes are ranked by label: the smallest label keeps the most images, the largest
    label the fewest (as in the long-tailed CIFAR of Cui et al. and Cao et al.). For
    another order, permute the labels first. n_max is the size of the *smallest* class in
    ``data`` unless ``n_max`` is given (at most that size), so every class has the images its
    rank asks for and the profile is exact; ``imbalance_ratio=1`` keeps n_max images of every
    class: a balanced subset. Which images a class keeps is a random choice seeded by ``seed``; they
    keep their order in ``data``.

    Args:
        data: the images to subsample, all of them whatever their split: pass the training
            images only, so the test set stays as it is.
        imbalance_ratio: n_0 / n_{C-1}, the largest class size over the smallest (100 and
            10 are common); >= 1.
        seed: the random choice within each class.
        n_max: the size of the largest class of the result; None: the smallest class size in
            ``data``.

    Raises ValueError for empty data, imbalance_ratio < 1, or a ratio that would leave the
    last class with no image (every class keeps at least one).
    """
    if len(data) == 0:
        raise ValueError("data holds no images; pass the training images to subsample")
    labels = data.labels.cpu()
    classes, sizes = torch.unique(labels, return_counts=True)
    if n_max is not None and not 1 <= n_max <= int(sizes.min()):
        raise ValueError(
            f"n_max={n_max} must be between 1 and {int(sizes.min())}, the size of the smallest "
            "class, so that every class has the images the profile asks for"
        )
    counts = long_tail_counts(len(classes), n_max or int(sizes.min()), imbalance_ratio)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label, count in zip(classes.tolist(), counts, strict=True):
        members = (labels == label).nonzero().flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return data.subset(torch.cat(keep).sort().values)
