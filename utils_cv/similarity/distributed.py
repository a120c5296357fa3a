"""Training and evaluation on several processes: fastai's DDP (through Accelerate), per-rank
batches, gathered embeddings and sharded evaluation. docs/distributed.md tells how to launch.

Launch a script that calls ``train_run`` with ``torchrun --nproc_per_node N script.py`` (or
``accelerate launch``): each process ("rank") joins the process group through Accelerate
(``init_distributed``: NCCL and its own GPU where CUDA is available, gloo on the CPU), and
``make_learner`` adds ``DistributedTraining``, fastai's ``DistributedTrainer``, which wraps the
model and the loss in ``DistributedDataParallel`` for each fit. The same ``train_run`` call
trains the same recipe on 1 or N processes: its batch is the global batch, split among them.

What metric learning needs on top of plain data parallelism:

- **Per-rank P x K batches.** ``DistributedPKSampler`` gives every rank, at every step, P
  classes x K images, and the ranks of one step distinct classes: all ranks draw the same
  global batch from one seeded ``ClassBalancedBatchSampler`` and each keeps its own slice.
  ``DistributedRandomBatches`` does the same for random batches. The epoch length is the same
  on every rank by construction.
- **Gathered embeddings.** A triplet, multi-similarity or EE loss computed on a rank's batch
  alone would mine negatives among that rank's images only. ``gather_batch`` all-gathers the
  embeddings (or a model's dict of outputs) and labels of a step in rank order, keeping the
  autograd graph of the local rows, as pytorch-metric-learning's ``DistributedLossWrapper``
  does; ``GatheredLoss`` computes a loss on that global batch. Every rank then computes the
  single-process loss of the global batch, and the gradient of its own rows is the
  single-process gradient of those rows (tests/unit/test_distributed.py checks both). DDP
  averages the parameter gradients over the ranks, so the gradient of the local rows (not the
  loss value) is multiplied by the number of ranks, keeping the single-process learning rate.
- **Every loss is gathered** (``distributed_loss``), also the means over images (softmax,
  NormSoftmax, ProxyNCA), which would not need it: every rank then logs the same loss and
  statistics, and their class weights or proxies, parameters of the DDP module, get the
  single-process gradient (each rank computes it whole; DDP's average keeps it).
- **BatchNorm** is synchronized across GPUs (``sync_batchnorm``); PyTorch has no CPU version,
  so on the CPU each rank normalizes with its own share of the batch.
- **Sharded evaluation.** ``embed_sharded``: rank r embeds batches r, r + N, r + 2N, ... of the
  single-process batching, and every rank gets all the rows, in order: the metrics equal the
  single-process ones exactly (same batches, same model: the BatchNorm statistics of rank 0
  are copied to all ranks first).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from fastai.data.core import TfmdDL
from fastai.distributed import DistributedTrainer
from torch import nn

from utils_cv.common.device import get_device
from utils_cv.similarity.datasets.file_list import FileList
from utils_cv.similarity.models import embed
from utils_cv.similarity.samplers import ClassBalancedBatchSampler

T = TypeVar("T")


def world() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched() -> bool:
    """Whether a launcher (torchrun, accelerate launch) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


_JOINED: dict[str, torch.device] = {}  # this process's device, once it joined the group


def init_distributed(cpu: bool = False) -> torch.device:
    """This process's device. In a launched process, first join the launcher's process group
    through Accelerate (``PartialState``): NCCL and the GPU of the local rank where CUDA is
    available, gloo on the CPU (``cpu=True``: the CPU even where there are GPUs). Outside a
    launch: the CPU or ``get_device()``. Later calls return the device of the first."""
    if not launched():
        return torch.device("cpu") if cpu else get_device()
    if "device" in _JOINED:
        return _JOINED["device"]
    cpu = cpu or not torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
    if not cpu and torch.cuda.device_count() < local:
        raise RuntimeError(
            f"{local} processes on this machine but {torch.cuda.device_count()} GPU(s): start "
            f"one process per GPU (torchrun --nproc_per_node {torch.cuda.device_count()}), or "
            "train on the CPU (--cpu, init_distributed(cpu=True))"
        )
    from accelerate import PartialState

    _JOINED["device"] = PartialState(cpu=cpu).device
    return _JOINED["device"]


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm layer synchronized across the processes (for GPUs), in
    place: timm's converter, which keeps the activation of timm's BatchNormAct2d (torch's own
    drops it); a model's frozen stages (``_frozen``) are pointed at the new layers, so they
    stay in eval mode."""
    from timm.layers import convert_sync_batchnorm

    names = {id(module): name for name, module in model.named_modules()}
    frozen = [names[id(module)] for module in getattr(model, "_frozen", ())]
    converted = convert_sync_batchnorm(model)
    if frozen:
        converted._frozen = tuple(converted.get_submodule(name) for name in frozen)
    return converted.train(model.training)


def rank0_first(load: Callable[[], T]) -> T:
    """``load()`` on the first process, then on the others: what the first one builds or
    caches (the emoji data, a download) is there before the others look for it."""
    rank, world_size = world()
    if rank == 0:
        result = load()
    if world_size > 1:
        dist.barrier()
    if rank != 0:
        result = load()
    return result


class _RankSlices:
    """Rank r's slice of every batch of a global batch sampler (the same on every rank)."""

    def __init__(self, rank: int | None, world_size: int | None, batch_size: int):
        if (rank is None or world_size is None) and launched():
            init_distributed()  # made before make_learner: join the others first
        default_rank, default_world = world()
        rank = default_rank if rank is None else rank
        world_size = default_world if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in 0..{world_size - 1} (world_size)")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.global_sampler: Iterable[Sequence[int]] = []

    def __len__(self) -> int:
        return len(self.global_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        start = self.rank * self.batch_size
        for batch in self.global_sampler:
            yield list(batch[start : start + self.batch_size])


class DistributedPKSampler(_RankSlices):
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

    Yields lists of P * K dataset indices, K of each class, like `ClassBalancedBatchSampler`;
    the ranks' batches of one step, in rank order, are the global sampler's batch.
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
        super().__init__(rank, world_size, classes_per_batch * samples_per_class)
        # A global batch is K images of one class, then K of the next: rank r's P classes
        # are one contiguous slice of it.
        self.global_sampler = ClassBalancedBatchSampler(
            labels,
            classes_per_batch * self.world_size,
            samples_per_class,
            num_batches=num_batches,
            seed=seed,
        )


class DistributedRandomBatches(_RankSlices):
    """Random batches of ``batch_size`` images for one rank: every epoch one seeded shuffle of
    all ``num_items`` images, shared by the ranks, cut into global batches of ``batch_size *
    world_size`` (the last incomplete one dropped), each split among the ranks in rank order.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
    ):
        super().__init__(rank, world_size, batch_size)
        if batch_size < 1 or num_items < batch_size * self.world_size:
            raise ValueError(
                f"{num_items} images make no batch of {batch_size} per process x "
                f"{self.world_size} processes; lower the batch size"
            )
        self.global_sampler = _ShuffledBatches(num_items, batch_size * self.world_size, seed)


class _ShuffledBatches:
    """Every pass a new permutation of range(num_items) (torch.randperm from one seeded
    generator, as ``DeviceDataLoader``'s shuffle), cut into full batches."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        self.num_items, self.batch_size = num_items, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.num_items, generator=self.generator).tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def _gather_rows(rows: torch.Tensor, rank: int, world_size: int, scale: bool) -> torch.Tensor:
    parts = [torch.empty_like(rows) for _ in range(world_size)]
    dist.all_gather(parts, rows.detach().contiguous())
    # The local rows keep their graph (times world_size for DDP's average when scale).
    parts[rank] = _ScaleGradient.apply(rows, world_size) if scale else rows
    return torch.cat(parts)


def gather_batch(
    embeddings: torch.Tensor | dict[str, torch.Tensor], labels: torch.Tensor, scale: bool = False
) -> tuple[torch.Tensor | dict[str, torch.Tensor], torch.Tensor]:
    """The step's embeddings and labels of all ranks, in rank order; gradients reach only
    this rank's rows (the others are copies). Outside a process group: the inputs.

    embeddings: (B, D) float, or a dict of (B, ...) tensors (a model's ``training_outputs``,
    each gathered); labels: (B,) int; B must be the same on every rank.
    scale: multiply the gradient that reaches this rank's rows by world_size (not the
    values): under DDP, which averages the parameter gradients over the ranks, a loss of the
    gathered batch then gives the network the single-process gradient, and a loss's own
    parameters (which every rank sees whole) theirs.
    """
    rank, world_size = world()
    if world_size == 1:
        return embeddings, labels
    sizes = [torch.zeros(1, dtype=torch.int64, device=labels.device) for _ in range(world_size)]
    dist.all_gather(sizes, torch.tensor([len(labels)], device=labels.device))
    if len({int(s) for s in sizes}) != 1:
        raise ValueError(
            f"every rank needs the same batch size to gather, got {[int(s) for s in sizes]}; "
            "use DistributedPKSampler or DistributedRandomBatches"
        )
    if isinstance(embeddings, dict):
        gathered = {k: _gather_rows(v, rank, world_size, scale) for k, v in embeddings.items()}
    else:
        gathered = _gather_rows(embeddings, rank, world_size, scale)
    return gathered, _gather_rows(labels, rank, world_size, False)


class GatheredLoss(nn.Module):
    """``loss`` on the gathered batch of all ranks (`gather_batch`): every rank computes the
    single-process loss of the global batch, and its ``stats``.

    scale: multiply the gradient of this rank's rows (not the value) by world_size, so that
    DDP's average of the parameter gradients over the ranks equals the single-process
    gradient, for the network and for the loss's own parameters alike.
    """

    def __init__(self, loss: nn.Module, scale: bool = True):
        super().__init__()
        self.loss, self.scale = loss, scale

    @property
    def stats(self) -> dict:
        return getattr(self.loss, "stats", {})

    def forward(
        self, embeddings: torch.Tensor | dict[str, torch.Tensor], labels: torch.Tensor
    ) -> torch.Tensor:
        return self.loss(*gather_batch(embeddings, labels, scale=self.scale))


def distributed_loss(loss: nn.Module) -> nn.Module:
    """What a rank trains with: ``loss`` on the gathered batch (``GatheredLoss``), for every
    loss. The pair-based ones need it (their negatives come from the whole batch); for the
    means over images (softmax, NormSoftmax, ProxyNCA) it gives the same gradient as each
    rank's own batch with DDP's average, and every rank the same loss value and statistics."""
    return loss if isinstance(loss, GatheredLoss) else GatheredLoss(loss)


def _sync_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank. DDP copies them before each
    training forward pass, so after the last one each rank holds its own."""
    for buffer in model.buffers():
        dist.broadcast(buffer, 0)


def embed_sharded(
    model: nn.Module, images: torch.Tensor | FileList, batch_size: int = 256, **kwargs
) -> torch.Tensor:
    """``models.embed`` shared among the ranks; every rank returns all (N, D) rows, in order.

    Rank r embeds batches r, r + N, r + 2N, ... of ``embed``'s batching, so each row comes from
    the same forward pass as in one process, with rank 0's BatchNorm statistics (copied to
    every rank first). Outside a process group: ``embed``. ``images`` is a tensor or a
    ``FileList`` (each rank decodes only its own batches); ``kwargs`` go to ``embed``
    (``image_size`` and ``num_workers`` for a FileList).
    """
    rank, world_size = world()
    if world_size == 1 or len(images) == 0:
        return embed(model, images, batch_size, **kwargs)
    _sync_buffers(model)
    starts = range(0, len(images), batch_size)
    if isinstance(images, FileList):
        # This rank's batches in one FileList: only the last batch of all can be short, and
        # it comes last, so embed's batching of the subset is the same forward passes.
        index = [
            i for s in starts[rank::world_size] for i in range(s, min(s + batch_size, len(images)))
        ]
        rows = embed(model, images.subset(index), batch_size, **kwargs) if index else None
        mine = [] if rows is None else list(rows.split(batch_size))
    else:
        mine = [
            embed(model, images[s : s + batch_size], batch_size, **kwargs)
            for s in starts[rank::world_size]
        ]
    # The NCCL backend moves CUDA tensors only; gloo moves CPU ones.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    width = torch.tensor([mine[0].shape[1] if mine else 0], device=device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)  # a rank may have no batch
    slots = -(-len(starts) // world_size)
    block = torch.zeros(slots * batch_size, int(width), device=device)
    for slot, rows in enumerate(mine):
        block[slot * batch_size : slot * batch_size + len(rows)] = rows.to(device)
    blocks = [torch.empty_like(block) for _ in range(world_size)]
    dist.all_gather(blocks, block)
    rows = []
    for b, start in enumerate(starts):
        at = (b // world_size) * batch_size
        rows.append(blocks[b % world_size][at : at + min(batch_size, len(images) - start)])
    return torch.cat(rows).cpu()


class DistributedTraining(DistributedTrainer):
    """fastai's ``DistributedTrainer`` (DDP through Accelerate) for ``make_learner``'s learners.

    Each fit wraps the model (and the loss's parameters, which live in ``ModelWithLoss``) in
    DDP on ``device`` (gloo on the CPU, NCCL on a GPU). The loss becomes
    ``distributed_loss(loss)`` for the fit. The data loaders are left alone: their per-rank
    batch samplers already give each rank its share (fastai's ``DistributedDL`` only wraps
    fastai's own loaders, and broadcasts as CUDA tensors, which gloo cannot carry).
    """

    def __init__(self, device: torch.device):
        # BatchNorm is synchronized by make_learner (``sync_batchnorm``) where fastai's
        # conversion (torch's) would drop timm's activations. Mixed precision is fastai's
        # (MixedPrecision); "no" keeps an accelerate config or launcher flag from adding
        # Accelerate's autocast on top of it.
        super().__init__(sync_bn=False, cpu=device.type == "cpu", mixed_precision="no")

    def _wrap_dl(self, dl):
        return super()._wrap_dl(dl) if isinstance(dl, TfmdDL) else dl

    def before_fit(self):
        super().before_fit()
        self._loss = self.learn.loss_func
        self.learn.loss_func = distributed_loss(self._loss)

    def after_fit(self):
        self.learn.loss_func = self._loss
        super().after_fit()
