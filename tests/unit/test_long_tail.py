"""long_tailed: an exponential profile of class sizes, exactly, with a seeded choice."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from utils_cv.similarity.datasets import ImageData, long_tail_counts, long_tailed


def synthetic(sizes: dict[int, int], shuffle_seed: int = 0) -> ImageData:
    """``sizes[label]`` images per label, interleaved; image i is filled with the value i."""
    labels = torch.tensor([label for label, size in sizes.items() for _ in range(size)])
    labels = labels[
        torch.randperm(len(labels), generator=torch.Generator().manual_seed(shuffle_seed))
    ]
    n = len(labels)
    return ImageData(
        images=torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone(),
        labels=labels,
        class_names=[f"c{i}" for i in range(max(sizes) + 1)],
        splits=["train"] * n,
        domains=[""] * n,
        paths=[f"p{i}" for i in range(n)],
    )


# Five classes, the smallest with 10 images: n_max = 10. With imbalance_ratio 10,
# n_i = 10 * 10 ** (-i / 4) = 10, 5.62, 3.16, 1.78, 1.00 -> 10, 6, 3, 2, 1.
# The labels are not 0..4 and the largest class is not the first: rank goes by label.
SIZES = {1: 12, 2: 10, 4: 15, 6: 10, 7: 11}


def test_class_sizes_follow_the_profile_exactly():
    data = synthetic(SIZES)
    tail = long_tailed(data, imbalance_ratio=10, seed=0)
    assert Counter(tail.labels.tolist()) == {1: 10, 2: 6, 4: 3, 6: 2, 7: 1}
    assert long_tail_counts(5, 10, 10) == [10, 6, 3, 2, 1]


@pytest.mark.parametrize(("num_classes", "n_max", "ratio"), [(10, 500, 100), (7, 40, 3.5)])
def test_counts_are_the_formula_rounded(num_classes, n_max, ratio):
    counts = long_tail_counts(num_classes, n_max, ratio)
    expected = [round(n_max * ratio ** (-i / (num_classes - 1))) for i in range(num_classes)]
    assert counts == expected
    assert counts[0] == n_max and counts[-1] == round(n_max / ratio)
    assert counts == sorted(counts, reverse=True)


def test_kept_images_are_distinct_images_of_their_class_in_their_order():
    data = synthetic(SIZES)
    tail = long_tailed(data, imbalance_ratio=10, seed=3)
    index = tail.images[:, 0, 0, 0].long()  # each image's position in data
    assert index.tolist() == sorted(set(index.tolist()))
    assert torch.equal(data.labels[index], tail.labels)
    assert tail.paths == [f"p{i}" for i in index.tolist()]
    assert tail.class_names == data.class_names


def test_ratio_one_keeps_the_smallest_class_size_of_every_class():
    assert Counter(long_tailed(synthetic(SIZES), 1).labels.tolist()) == dict.fromkeys(SIZES, 10)
    balanced = synthetic(dict.fromkeys(range(4), 6))
    assert torch.equal(long_tailed(balanced, 1).images, balanced.images)


def test_the_choice_is_seeded():
    data = synthetic(SIZES)
    first, again = long_tailed(data, 10, seed=1), long_tailed(data, 10, seed=1)
    assert first.paths == again.paths
    assert long_tailed(data, 10, seed=2).paths != first.paths


def test_a_ratio_of_twice_n_max_still_keeps_one_image_and_more_is_refused():
    data = synthetic(SIZES)
    assert Counter(long_tailed(data, 20).labels.tolist())[7] == 1  # 10 / 20 = 0.5 rounds up
    with pytest.raises(ValueError, match=r"imbalance_ratio=21 leaves.*imbalance_ratio <= 20"):
        long_tailed(data, 21)


def test_long_tailed_errors():
    data = synthetic(SIZES)
    for ratio in (0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a finite number >= 1"):
            long_tailed(data, ratio)
    with pytest.raises(ValueError, match="no images"):
        long_tailed(data.subset([]), 10)


def test_n_max_caps_the_largest_class_and_must_fit_the_smallest():
    data = synthetic({0: 30, 1: 20, 2: 25})
    balanced = long_tailed(data, 1, n_max=12)
    assert torch.bincount(balanced.labels).tolist() == [12, 12, 12]
    assert torch.bincount(long_tailed(data, 4, n_max=12).labels).tolist() == [12, 6, 3]
    with pytest.raises(ValueError, match="n_max=21 must be between 1 and 20"):
        long_tailed(data, 1, n_max=21)
