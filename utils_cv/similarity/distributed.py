"""Pair-based losses on several processes: a per-rank P x K sampler and gathered embeddings.

With data parallelism (DDP) each process ("rank") embeds its own batch. A triplet, multi-
similarity or Embedding Expansion loss computed on that batch alone only mines negatives
among the rank's own images; the global batch is what the single-process recipe sees. So:

- `DistributedPKSampler` gives every rank, at every step, P classes x K images, and the ranks
  of one step distinct classes: all ranks draw the same global P x world_size batch from one
  seeded `ClassBalancedBatchSampler` and each keeps its own P classes. The epoch length is
  the same on every rank by construction.
- `gather_batch` all-gathers the embeddings and labels of one step, in rank order, keeping
  the autograd graph of the local rows only: the loss of the gathered batch is the loss of
  the global batch, and its gradient reaches each rank's own embeddings, as in
  pytorch-metric-learning's `DistributedLossWrapper`. `GatheredLoss` wraps any loss with it.

Every rank then computes the same loss on the same global batch, and the gradient of its own
rows is the single-process gradient of those rows (tests/unit/test_distributed.py checks
both with two processes). DDP averages the parameter gradients over ranks, so they come out
1 / world_size of the single-process ones: scale the loss by world_size (`GatheredLoss`
does, `scale=True`) to keep the single-process learning rate. Losses with their own
parameters (ProxyNCA's proxies, NormSoftmax's class weights) need no gathering: they are
parameters that DDP keeps in sync when the loss is part of the DDP module.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from utils_cv.similarity.samplers import ClassBalancedBatchSampler


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DistributedPKSampler:
    """P x K batches for one rank; the ranks of a step hold distinct classes.

    Args:
        labels: (N,) int class of each image, the whole training set (the same on every rank).
        classes_per_batch: P, per rank; the global batch has P * world_size classes.
        samples_per_class: K.
        rank, world_size: this process's place; None reads them from torch.distributed.
        num_batches: steps per epoch; default N // (P * K * world_size), at least 1 (the
            global sampler's default), so that an epoch over all ranks shows about as many
            images as the dataset holds.
        seed: the same on every rank (it is what makes the ranks agree).

    Yields lists of P * K dataset indices, K of each class, like `ClassBalancedBatchSampler`.
    """

    def __init__(
        self,
        labels: torch.Tensor | np.ndarray | Sequence[int],
        classes_per_batch: int,
        samples_per_class: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        num_batches: int | None = None,
        seed: int = 0,
    ):
        default_rank, default_world = world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in 0..{world_size - 1} (world_size)")
        self.rank, self.world_size = rank, world_size
        self.batch_size = classes_per_batch * samples_per_class
        self.global_sampler = ClassBalancedBatchSampler(
            labels,
            classes_per_batch * world_size,
            samples_per_class,
            num_batches=num_batches,
            seed=seed,
        )

    def __len__(self) -> int:
        return len(self.global_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        # A global batch is K images of one class, then K of the next: rank r's P classes
        # are one contiguous slice of it.
        start = self.rank * self.batch_size
        for batch in self.global_sampler:
            yield batch[start : start + self.batch_size]


def gather_batch(
    embeddings: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's embeddings and labels of all ranks, in rank order; gradients reach only
    this rank's rows (the others are copies). Outside a process group: the inputs.

    embeddings: (B, D) float, labels: (B,) int; B must be the same on every rank.
    """
    rank, world_size = world()
    if world_size == 1:
        return embeddings, labels
    sizes = [torch.zeros(1, dtype=torch.int64, device=labels.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(labels)], device=labels.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            f"every rank needs the same batch size to gather, got {[int(s) for s in sizes]}; "
            "use DistributedPKSampler (or drop_last=True)"
        )
    parts = [torch.empty_like(embeddings) for _ in range(world_size)]
    dist.all_gather(parts, embeddings.detach().contiguous())
    parts[rank] = embeddings  # the local rows keep their graph
    label_parts = [torch.empty_like(labels) for _ in range(world_size)]
    dist.all_gather(label_parts, labels.contiguous())
    return torch.cat(parts), torch.cat(label_parts)


class GatheredLoss(nn.Module):
    """``loss`` on the gathered batch of all ranks (`gather_batch`).

    scale: multiply by world_size, so that DDP's average of the parameter gradients over
    ranks equals the single-process gradient (each rank's loss reaches only its own rows).
    """

    def __init__(self, loss: nn.Module, scale: bool = True):
        super().__init__()
        self.loss, self.scale = loss, scale

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gathered, gathered_labels = gather_batch(embeddings, labels)
        value = self.loss(gathered, gathered_labels)
        return value * world()[1] if self.scale else value
