"""Properties of `ClassBalancedBatchSampler` (and `DistributedPKSampler`, given its rank).

What its docstring promises, per epoch (one ``iter()``): the list of all classes, shuffled,
is walked P at a time and reshuffled when used up; each class's images likewise, K at a time;
a class with fewer than K images gives all of them plus repeats. So, reading the classes of an
epoch's batches one after the other, the first C are all C classes, and so are the next C, and
so on (and likewise the images of a class with at least K of them).
"""

import math
import warnings
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from utils_cv.similarity.samplers import ClassBalancedBatchSampler


@st.composite
def sampler_settings(draw, min_classes: int = 2):
    """(labels (N,) in shuffled order with any integer values, P, K, num_batches, seed)."""
    num_classes = draw(st.integers(min_classes, 10))
    sizes = draw(st.lists(st.integers(1, 8), min_size=num_classes, max_size=num_classes))
    values = draw(
        st.lists(
            st.integers(-(2**40), 2**40), min_size=num_classes, max_size=num_classes, unique=True
        )
    )
    labels = np.repeat(values, sizes)
    labels = labels[draw(st.permutations(range(len(labels))))]
    classes_per_batch = draw(st.integers(2, num_classes))
    samples_per_class = draw(st.integers(1, 5))
    num_batches = draw(st.none() | st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    return labels, classes_per_batch, samples_per_class, num_batches, seed


def make_sampler(settings) -> ClassBalancedBatchSampler:
    labels, classes_per_batch, samples_per_class, num_batches, seed = settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes smaller than K: tested on its own below
        return ClassBalancedBatchSampler(
            labels, classes_per_batch, samples_per_class, num_batches=num_batches, seed=seed
        )


def classes_of(batch: list[int], labels: np.ndarray, samples_per_class: int) -> list:
    """The class of each block of K in a batch (checked to be one class per block)."""
    blocks = [batch[i : i + samples_per_class] for i in range(0, len(batch), samples_per_class)]
    assert all(len(set(labels[block].tolist())) == 1 for block in blocks)
    return [labels[block[0]].item() for block in blocks]


def assert_walked_in_passes(sequence: list, items: set) -> None:
    """Cut into runs of len(items) from the start, each run holds every item once (a shorter
    last run, distinct items)."""
    size = len(items)
    for start in range(0, len(sequence), size):
        window = sequence[start : start + size]
        assert len(set(window)) == len(window) and set(window) <= items
        if len(window) == size:
            assert set(window) == items


@given(sampler_settings())
def test_every_batch_holds_p_distinct_classes_of_k_images_each(settings):
    labels, p, k = settings[:3]
    sizes = Counter(labels.tolist())
    for batch in make_sampler(settings):
        assert len(batch) == p * k and all(type(index) is int for index in batch)
        assert all(0 <= index < len(labels) for index in batch)
        classes = classes_of(batch, labels, k)
        assert len(set(classes)) == p
        for position, label in enumerate(classes):
            block = batch[position * k : (position + 1) * k]
            if sizes[label] >= k:
                assert len(set(block)) == k  # distinct images
            else:  # all its images, then repeats
                assert set(block[: sizes[label]]) == set(np.flatnonzero(labels == label).tolist())


@given(sampler_settings())
def test_len_is_the_number_of_batches_of_every_epoch(settings):
    labels, p, k, num_batches, _ = settings
    sampler = make_sampler(settings)
    expected = num_batches if num_batches is not None else max(1, len(labels) // (p * k))
    assert len(sampler) == expected
    assert [len(list(sampler)) for _ in range(2)] == [expected, expected]


@given(sampler_settings())
def test_two_samplers_with_the_same_seed_give_the_same_epochs(settings):
    first, second = make_sampler(settings), make_sampler(settings)
    assert [list(first) for _ in range(3)] == [list(second) for _ in range(3)]


@given(sampler_settings())
def test_the_classes_of_the_first_batch_are_shuffled_by_the_seed(settings):
    """Over 40 seeds, the first batch's classes (or their order) differ at least once; each
    seed alike would happen by chance with probability below 2^-39."""
    labels, p, k, num_batches = settings[:4]
    first_batches = {
        tuple(classes_of(next(iter(make_sampler((labels, p, k, num_batches, seed)))), labels, k))
        for seed in range(40)
    }
    assert len(first_batches) > 1


@given(sampler_settings())
def test_each_epoch_walks_shuffled_passes_over_all_classes(settings):
    labels, _, k = settings[:3]
    sampler = make_sampler(settings)
    for _ in range(2):
        sequence = [c for batch in sampler for c in classes_of(batch, labels, k)]
        assert_walked_in_passes(sequence, set(labels.tolist()))


@given(sampler_settings())
def test_every_class_appears_in_the_first_ceil_c_over_p_batches_of_every_epoch(settings):
    labels, p, k, _, seed = settings
    num_classes = len(set(labels.tolist()))
    needed = math.ceil(num_classes / p)
    sampler = make_sampler((labels, p, k, needed, seed))
    for _ in range(2):
        seen = {c for batch in sampler for c in classes_of(batch, labels, k)}
        assert seen == set(labels.tolist())


@given(sampler_settings())
def test_images_of_a_class_with_at_least_k_images_are_walked_in_shuffled_passes(settings):
    labels, _, k = settings[:3]
    sampler = make_sampler(settings)
    for _ in range(2):
        drawn = {label: [] for label in set(labels.tolist())}
        for batch in sampler:
            for position, label in enumerate(classes_of(batch, labels, k)):
                drawn[label] += batch[position * k : (position + 1) * k]
        for label, sequence in drawn.items():
            images = set(np.flatnonzero(labels == label).tolist())
            if len(images) >= k:
                assert_walked_in_passes(sequence, images)


@given(sampler_settings())
def test_warns_naming_the_number_of_classes_smaller_than_k_and_only_then(settings):
    labels, p, k = settings[:3]
    sizes = Counter(labels.tolist())
    small = sum(size < k for size in sizes.values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ClassBalancedBatchSampler(labels, p, k)
    messages = [str(warning.message) for warning in caught]
    if small:
        assert len(messages) == 1
        assert f"{small} of {len(sizes)} classes" in messages[0]
        assert f"samples_per_class={k}" in messages[0]
    else:
        assert messages == []


@given(sampler_settings(), st.integers(1, 5))
def test_more_classes_per_batch_than_classes_is_an_error_naming_both_numbers(settings, extra):
    labels, _, k = settings[:3]
    num_classes = len(set(labels.tolist()))
    p = num_classes + extra
    message = f"classes_per_batch={p} but labels hold only {num_classes} classes"
    with pytest.raises(ValueError, match=message):
        ClassBalancedBatchSampler(labels, p, k)


@given(
    sampler_settings(),
    st.sampled_from(
        [
            ({"classes_per_batch": 1}, "classes_per_batch=1 must be at least 2"),
            ({"samples_per_class": 0}, "samples_per_class=0 must be at least 1"),
            ({"num_batches": 0}, "num_batches=0 must be at least 1"),
        ]
    ),
)
def test_impossible_settings_are_errors_naming_the_bad_value(settings, case):
    labels, p, k = settings[:3]
    arguments = {"classes_per_batch": p, "samples_per_class": k} | case[0]
    with pytest.raises(ValueError, match=case[1]):
        ClassBalancedBatchSampler(labels, **arguments)


@given(st.integers(-(2**40), 2**40), st.integers(1, 20))
def test_a_single_class_is_an_error(label, size):
    with pytest.raises(ValueError, match="labels hold 1 class"):
        ClassBalancedBatchSampler([label] * size, 2, 1)


@given(sampler_settings(min_classes=4), st.integers(2, 4), st.data())
def test_distributed_ranks_split_each_global_batch_into_distinct_classes(
    settings, world_size, data
):
    """DistributedPKSampler given its rank explicitly: no process group is started."""
    from utils_cv.similarity.distributed import DistributedPKSampler

    labels, _, k, num_batches, seed = settings
    num_classes = len(set(labels.tolist()))
    world_size = min(world_size, num_classes // 2)
    p = data.draw(st.integers(2, num_classes // world_size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranks = [
            DistributedPKSampler(
                labels, p, k, rank=rank, world_size=world_size, num_batches=num_batches, seed=seed
            )
            for rank in range(world_size)
        ]
    global_batches = list(make_sampler((labels, p * world_size, k, num_batches, seed)))
    per_rank = [list(sampler) for sampler in ranks]
    for step, global_batch in enumerate(global_batches):
        assert sum((batches[step] for batches in per_rank), []) == global_batch
        classes = [classes_of(batches[step], labels, k) for batches in per_rank]
        assert all(len(rank_classes) == p for rank_classes in classes)
        assert len({c for rank_classes in classes for c in rank_classes}) == p * world_size
    assert all(len(batches) == len(global_batches) for batches in per_rank)
