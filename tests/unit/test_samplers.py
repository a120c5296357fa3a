"""ClassBalancedBatchSampler: batch composition, epochs, coverage, warnings and errors."""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from utils_cv.common.device import set_seed
from utils_cv.similarity.datasets import ImageData
from utils_cv.similarity.losses import TripletLoss
from utils_cv.similarity.models import EmbeddingNet
from utils_cv.similarity.samplers import ClassBalancedBatchSampler
from utils_cv.similarity.training import make_learner

# Six classes of 5 to 8 images (36 in all), with labels that are not 0..C-1.
SIZES = {10: 5, 11: 6, 12: 7, 13: 8, 20: 4, 30: 6}
LABELS = [label for label, size in SIZES.items() for _ in range(size)]


def sampler(labels=LABELS, classes_per_batch=3, samples_per_class=3, **kwargs):
    return ClassBalancedBatchSampler(labels, classes_per_batch, samples_per_class, **kwargs)


def epochs(batch_sampler, count: int) -> list[list[list[int]]]:
    return [list(batch_sampler) for _ in range(count)]


def test_batches_hold_p_classes_of_k_distinct_images():
    batches = list(sampler())
    assert len(batches) == 4  # 36 images // (3 * 3)
    for batch in batches:
        assert len(batch) == 9 and all(type(index) is int for index in batch)
        assert len(set(batch)) == 9  # every class has >= K images: no repeats
        groups = [[LABELS[i] for i in batch[start : start + 3]] for start in (0, 3, 6)]
        assert all(len(set(group)) == 1 for group in groups)  # K of one class, in a row
        assert len({group[0] for group in groups}) == 3  # P distinct classes


def test_len_defaults_to_one_pass_over_the_images_and_can_be_set():
    assert len(sampler()) == 36 // 9
    assert len(sampler(classes_per_batch=2, samples_per_class=2)) == 36 // 4
    custom = sampler(num_batches=7)
    assert len(custom) == 7 and len(list(custom)) == 7
    # A dataset smaller than one batch still gives one batch per epoch.
    with pytest.warns(UserWarning, match="fewer than samples_per_class=4"):
        assert len(sampler([0, 0, 1, 1], 2, 4)) == 1


def test_the_same_seed_gives_the_same_epochs_and_each_epoch_differs():
    first = epochs(sampler(seed=3), 3)
    assert epochs(sampler(seed=3), 3) == first
    assert first[0] != first[1] != first[2]
    assert epochs(sampler(seed=4), 1)[0] != first[0]


@pytest.mark.parametrize(
    ("num_classes", "classes_per_batch", "num_batches"), [(6, 3, 4), (7, 3, 5), (5, 2, 10)]
)
def test_every_class_is_used_about_equally_in_an_epoch(num_classes, classes_per_batch, num_batches):
    labels = [label for label in range(num_classes) for _ in range(4)]
    batch_sampler = sampler(labels, classes_per_batch, 2, num_batches=num_batches, seed=1)
    for batches in epochs(batch_sampler, 3):
        uses = Counter(labels[i] for batch in batches for i in batch[::2])
        assert sum(uses.values()) == classes_per_batch * num_batches
        assert len(uses) == num_classes and max(uses.values()) - min(uses.values()) <= 1


def test_images_of_a_class_are_drawn_without_replacement_until_all_are_used():
    # Two classes of 6 images, K = 3: each class appears in every batch and shows its
    # 6 images once in two batches, then all again.
    labels = [0] * 6 + [1] * 6
    batches = list(sampler(labels, 2, 3, num_batches=4, seed=2))
    for label in (0, 1):
        shown = [[i for i in batch if labels[i] == label] for batch in batches]
        assert sorted(shown[0] + shown[1]) == sorted(shown[2] + shown[3])
        assert sorted(shown[0] + shown[1]) == [i for i in range(12) if labels[i] == label]


def test_small_classes_are_drawn_with_replacement_after_one_warning():
    labels = [0] * 5 + [1] * 2 + [2] * 1 + [3] * 4
    with pytest.warns(UserWarning, match="2 of 4 classes have fewer than samples_per_class=3"):
        batch_sampler = sampler(labels, 4, 3, num_batches=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batches = list(batch_sampler)
    for batch in batches:
        assert Counter(labels[i] for i in batch) == {0: 3, 1: 3, 2: 3, 3: 3}
        # Every image of a small class is in the batch, topped up with repeats.
        assert {i for i in batch if labels[i] == 1} == {5, 6}
        assert [i for i in batch if labels[i] == 2] == [7, 7, 7]


def test_no_warning_when_every_class_has_k_images():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler(samples_per_class=4)


def test_one_sample_per_class_is_allowed():
    for batch in sampler(classes_per_batch=6, samples_per_class=1):
        assert sorted(LABELS[i] for i in batch) == sorted(SIZES)


@pytest.mark.parametrize(
    ("labels", "classes_per_batch", "samples_per_class", "kwargs", "message"),
    [
        (LABELS, 7, 2, {}, "classes_per_batch=7 but labels hold only 6 classes"),
        (LABELS, 1, 2, {}, "classes_per_batch=1 must be at least 2"),
        ([4, 4, 4], 2, 2, {}, "labels hold 1 class"),
        (LABELS, 2, 0, {}, "samples_per_class=0 must be at least 1"),
        (LABELS, 2, 2, {"num_batches": 0}, "num_batches=0 must be at least 1"),
        ([[0, 1], [1, 0]], 2, 2, {}, r"labels must be \(N,\) integers"),
        ([0.5, 1.5], 2, 2, {}, r"labels must be \(N,\) integers"),
    ],
)
def test_impossible_settings_are_errors_naming_the_numbers(
    labels, classes_per_batch, samples_per_class, kwargs, message
):
    with pytest.raises(ValueError, match=message):
        sampler(labels, classes_per_batch, samples_per_class, **kwargs)


def test_labels_as_list_array_or_tensor_give_the_same_batches():
    expected = list(sampler(LABELS))
    assert list(sampler(np.array(LABELS))) == expected
    assert list(sampler(torch.tensor(LABELS))) == expected


def test_works_as_batch_sampler_of_a_torch_data_loader():
    labels = torch.tensor(LABELS)
    dataset = TensorDataset(torch.arange(len(labels)), labels)
    loader = DataLoader(dataset, batch_sampler=sampler(num_batches=5))
    assert len(loader) == 5
    batches = list(loader)
    assert len(batches) == 5
    for indices, batch_labels in batches:
        assert torch.equal(labels[indices], batch_labels)
        assert sorted(Counter(batch_labels.tolist()).values()) == [3, 3, 3]


def test_make_learner_fits_an_epoch_of_p_by_k_batches_with_a_triplet_loss():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(6)
    # Each class a different mean colour, plus noise: a learnable 16-pixel toy.
    images = 60 * labels.view(-1, 1, 1, 1) + 40 * torch.rand(
        len(labels), 3, 16, 16, generator=generator
    )
    n = len(labels)
    train = ImageData(
        images=images.to(torch.uint8),
        labels=labels,
        class_names=[f"class{i}" for i in range(4)],
        splits=["train"] * n,
        domains=[""] * n,
        paths=[""] * n,
    )
    set_seed(0)
    model = EmbeddingNet("small_cnn", embedding_size=8)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    loss = TripletLoss(mining="batch_hard")
    batch_sampler = ClassBalancedBatchSampler(train.labels, 2, 3)
    learn = make_learner(
        model, loss, train, batch_sampler=batch_sampler, augment=False, device="cpu"
    )
    seen = []

    def record(embeddings, labels):
        seen.append(labels.tolist())
        return loss(embeddings, labels)

    learn.loss_func = record
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=1e-2)
    assert len(seen) == len(batch_sampler) == 4
    assert all(sorted(Counter(batch).values()) == [3, 3] for batch in seen)
    assert loss.stats["num_triplets"] == 6
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())
