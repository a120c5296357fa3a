"""Class-balanced (P x K) batches for losses that compare images within a batch.

Triplet and other pair-based losses need, in every batch, images of the same class
(positives) and of other classes (negatives). Random batches from many classes have few
or no positives; a P x K batch has P classes with K images each.

>>> sampler = ClassBalancedBatchSampler(train.labels, classes_per_batch=8,  # doctest: +SKIP
...                                     samples_per_class=4)
>>> learn = make_learner(model, TripletLoss(), train, batch_sampler=sampler)  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import torch


class ClassBalancedBatchSampler:
    """Batches of ``classes_per_batch`` classes (P) with ``samples_per_class`` images each (K).

    Each batch is a list of P * K dataset indices (Python ints): K images of one class, then K
    of the next, P distinct classes in all. Use it as ``batch_sampler`` of
    ``make_learner``, ``DeviceDataLoader`` or ``torch.utils.data.DataLoader``.

    How batches are drawn, per epoch (one ``iter()``):

    - classes: a shuffled list of all classes is walked P at a time and reshuffled when used
      up, so every class appears about equally often (a batch never repeats a class);
    - images: the same for the images of each class, K at a time, so a class's images are
      drawn without replacement until all have been used;
    - a class with fewer than K images gives all its images plus random repeats (with
      replacement); the constructor warns how many classes this affects.

    One random generator is seeded with ``seed`` at construction: every epoch draws new
    batches, and two samplers with the same seed give the same sequence of epochs.

    Args:
        labels: (N,) int class of each image (tensor, array or list); any integer values.
        classes_per_batch: P, at least 2 (the negatives of a batch come from other classes)
            and at most the number of classes.
        samples_per_class: K, at least 1. Triplet losses need K >= 2 (a positive for each
            anchor); NormSoftmax works with K = 1 (balanced classes, no pairs needed).
        num_batches: batches per epoch (``len(sampler)``). Default: N // (P * K), at least
            1, so that an epoch shows about as many images as the dataset holds; with unequal
            class sizes large classes are seen less than once, small ones more.
        seed: seeds the generator.
    """

    def __init__(
        self,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        *,
        num_batches: int | None = None,
        seed: int = 0,
    ):
        labels = torch.as_tensor(labels).cpu().numpy()
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be (N,) integers, got shape {labels.shape} {labels.dtype}"
            )
        classes, inverse = np.unique(labels, return_inverse=True)
        num_classes = len(classes)
        if num_classes < 2:
            raise ValueError(
                f"labels hold {num_classes} class(es); a batch needs at least 2 classes "
                "(the negatives come from other classes)"
            )
        if classes_per_batch < 2:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} must be at least 2: the negatives of "
                "a batch come from other classes"
            )
        if classes_per_batch > num_classes:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} but labels hold only {num_classes} "
                f"classes; use classes_per_batch <= {num_classes}"
            )
        if samples_per_class < 1:
            raise ValueError(f"samples_per_class={samples_per_class} must be at least 1")
        batch_size = classes_per_batch * samples_per_class
        if num_batches is None:
            num_batches = max(1, len(labels) // batch_size)
        if num_batches < 1:
            raise ValueError(f"num_batches={num_batches} must be at least 1")

        # Indices of each class's images, in dataset order (the draws shuffle them).
        order = np.argsort(inverse, kind="stable")
        counts = np.bincount(inverse, minlength=num_classes)
        self.class_indices = [part.tolist() for part in np.split(order, np.cumsum(counts)[:-1])]
        small = int((counts < samples_per_class).sum())
        if small:
            warnings.warn(
                f"{small} of {num_classes} classes have fewer than samples_per_class="
                f"{samples_per_class} images (the smallest has {counts.min()}); their batches "
                "repeat images (drawn with replacement); add images or lower samples_per_class "
                "for distinct ones",
                stacklevel=2,
            )
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.num_classes = num_classes
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        class_queue: list[int] = []
        image_queues: list[list[int]] = [[] for _ in range(self.num_classes)]
        k = self.samples_per_class
        for _ in range(self.num_batches):
            batch = []
            for c in self._take(class_queue, range(self.num_classes), self.classes_per_batch):
                pool = self.class_indices[c]
                if len(pool) >= k:
                    batch += self._take(image_queues[c], pool, k)
                else:
                    repeats = self.rng.choice(pool, size=k - len(pool), replace=True)
                    batch += self.rng.permutation(pool).tolist() + repeats.tolist()
            yield batch

    def _take(self, queue: list[int], pool: Sequence[int], count: int) -> list[int]:
        """``count`` distinct items from ``queue``, refilled by shuffling ``pool`` when short.

        Walking shuffled copies of ``pool`` uses every item once per pass. Items taken just
        before a refill are moved to the end of the new pass, so one call never repeats one.
        """
        taken = queue[:count]
        del queue[:count]
        if len(taken) < count:
            held = set(taken)
            fresh = self.rng.permutation(pool).tolist()
            rest = [item for item in fresh if item not in held]
            need = count - len(taken)
            taken += rest[:need]
            queue[:] = rest[need:] + [item for item in fresh if item in held]
        return taken
