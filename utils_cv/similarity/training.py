"""fastai glue: train an embedding model with a metric-learning loss and keep the best model.

fastai's ``Learner`` runs the training (schedules, lr finder, progress bars, mixed
precision). Metric learning needs four things it does not provide:

- data held in memory on the device and augmented per batch there (``DeviceDataLoader``),
  or, too large for memory, a ``FileList`` decoded batch by batch in worker processes
  (``file_loader.FileDataLoader``, picked by the data's type);
- one optimizer for the model *and* the loss, whose parameters (class weights, proxies)
  get their own parameter group and learning rate (``ModelWithLoss``, ``model_loss_splitter``);
- no classification loss on the validation set: validation classes are unseen classes,
  so a classifier's loss on them means nothing (``callbacks.SkipValidationLoop``);
- retrieval measured on the validation classes each epoch, keeping the best model
  (``callbacks.RetrievalCallback``; ``callbacks.get_history`` and
  ``callbacks.load_checkpoint`` read what it kept). Test classes are never used here.

>>> learn = make_learner(model, SoftmaxLoss(model.embedding_size, train.num_classes),  # doctest: +SKIP
...                      train, val=val)
>>> learn.fit_one_cycle(10, lr_max=slice(3e-3))  # doctest: +SKIP

Parameter groups are [model, loss]. ``slice(lr)`` gives the model lr / 10 and the loss lr
(fastai's convention: the last group gets the largest rate); an array such as
``np.array([1e-3, 1e-1])`` sets each group's rate explicitly.
"""

from __future__ import annotations

import inspect
import os
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

with warnings.catch_warnings():
    # fastai's layers call torch.jit.script at import, which torch 2.10+ deprecates; the
    # warning is fastai's to fix and would only confuse a learner reading the notebook.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from fastai.callback import progress, schedule  # noqa: F401  (bars, fit_one_cycle, lr_find)
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastai.torch_core import params
from torch import nn

from utils_cv.similarity.augment import augment_batch
from utils_cv.similarity.callbacks import LossStatsCallback, RetrievalCallback, SkipValidationLoop
from utils_cv.similarity.datasets.file_list import FileList
from utils_cv.similarity.distributed import (
    DistributedRandomBatches,
    DistributedTraining,
    init_distributed,
    sync_batchnorm,
    world,
)
from utils_cv.similarity.file_loader import FileDataLoader, IndexBatches

if TYPE_CHECKING:
    from utils_cv.similarity.datasets import ImageData

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class DeviceDataLoader(IndexBatches):
    """Batches of an in-memory ``ImageData``, made and augmented on its device.

    Each batch is ``(images, labels)``: images (B, 3, H, W) float in [0, 1], labels (B,)
    int64, both on ``device``. It serves as a fastai ``DataLoaders`` train or valid loader.

    Args:
        data: the images (uint8) and labels; copied to ``device`` once.
        batch_size: images per batch when ``batch_sampler`` is None.
        shuffle: a new random order every pass, drawn from a generator seeded with ``seed``.
        drop_last: leave out the last incomplete batch (for training: BatchNorm and
            class-balanced losses want full batches).
        augment: False, True (strength 1) or a strength for ``augment_batch``.
        batch_sampler: any iterable of index lists with a length, for example a
            class-balanced sampler; it replaces ``batch_size``, ``shuffle`` and ``drop_last``.
        device: None keeps the data where it is.
        seed: seeds the order and the augmentations.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int = 64,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: bool | float = False,
        batch_sampler: Iterable[Sequence[int]] | None = None,
        device: torch.device | str | None = None,
        seed: int = 0,
    ):
        self._set_batching(batch_size, shuffle, drop_last, batch_sampler, seed)
        self.data = data if device is None else data.to(device)
        self.device = self.data.images.device
        self.strength = float(augment)

    def _num_items(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for index in self._batch_indices():
            index = torch.as_tensor(index, dtype=torch.long).to(self.device)
            images = self.data.images[index].float() / 255
            if self.strength > 0:
                images = augment_batch(images, self.generator, self.strength)
            yield images, self.data.labels[index]

    def to(self, device: torch.device | str) -> DeviceDataLoader:
        """Move the data to ``device`` (fastai calls this when the ``DataLoaders`` move)."""
        self.data = self.data.to(device)
        self.device = self.data.images.device
        return self


class ModelWithLoss(nn.Module):
    """The embedding model and the loss in one module, so fastai optimizes both.

    ``forward(images)`` returns what the loss takes: in training mode
    ``model.training_outputs(images)`` when the model defines it (a dict, see the model
    contract in ``utils_cv.similarity.models``), else ``model(images)``, the embeddings.
    The Learner's ``loss_func`` is ``self.loss``. The model object is the caller's, trained
    in place.
    """

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.training and hasattr(self.model, "training_outputs"):
            return self.model.training_outputs(images)
        return self.model(images)


def model_loss_splitter(module: ModelWithLoss) -> list[list[nn.Parameter]]:
    """Two parameter groups, [model, loss], so the loss can have its own learning rate.

    The loss group is empty for losses without parameters.
    """
    return [params(module.model), params(module.loss)]


def torch_optimizer(
    optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW, **defaults
) -> Callable[..., OptimWrapper]:
    """A fastai ``opt_func`` that runs a torch optimizer, fused into a few kernels on the GPU.

    fastai's own optimizers update each parameter tensor in a Python loop. On an H200,
    ResNet-18 at 64 px (batch 256, bf16) trained at about 12,000 images/s with fastai's Adam
    and 20,000 to 24,000 with torch's fused AdamW, where a bare PyTorch loop with fused AdamW
    made 24,000. Learning rates per group, slices, one-cycle schedules and ``freeze`` work
    as with fastai's optimizers; unlike them, weight decay also applies to BatchNorm and
    bias parameters.

    >>> opt_func = torch_optimizer(torch.optim.SGD, momentum=0.9, weight_decay=1e-4)
    """

    def opt_func(param_groups: list[list[nn.Parameter]], lr) -> OptimWrapper:
        on_gpu = all(p.is_cuda for group in param_groups for p in group)
        fused = on_gpu and "fused" in inspect.signature(optimizer).parameters
        # torch wants one float at construction; set_hyper then spreads arrays and slices.
        wrapper = OptimWrapper(
            param_groups, opt=optimizer, lr=1e-3, **({"fused": True} if fused else {}), **defaults
        )
        wrapper.set_hyper("lr", lr)
        return wrapper

    return opt_func


# fastai's Adam defaults (betas 0.9 and 0.99, eps 1e-5, decoupled weight decay 0.01).
adamw = torch_optimizer(torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)


def make_learner(
    model: nn.Module,
    loss: nn.Module,
    train: ImageData | FileList,
    *,
    val: ImageData | FileList | None = None,
    batch_size: int = 64,
    batch_sampler: Iterable[Sequence[int]] | None = None,
    augment: bool | float = True,
    lr_groups: Sequence[float] | None = None,
    mixed_precision: str = "auto",
    checkpoint_path: str | os.PathLike | None = None,
    seed: int = 0,
    ks: Sequence[int] = (1,),
    opt_func: Callable = adamw,
    wd: float | None = None,
    device: torch.device | str | None = None,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> Learner:
    """A fastai Learner that trains ``model`` with ``loss`` on ``train``.

    Args:
        model: maps (N, 3, H, W) float in [0, 1] to embeddings (N, D); trained in place.
        loss: ``loss(embeddings, labels) -> scalar``; its parameters are trained too.
        train: training images; relabeled to 0..C-1 here, so a classifier loss needs
            ``num_classes=train.num_classes``. An ImageData is held on ``device`` and
            batched by ``DeviceDataLoader``; a FileList (data too large for memory) is
            decoded batch by batch in ``num_workers`` processes by ``FileDataLoader``.
        val: validation images of classes unseen in training (ImageData or FileList); adds
            a ``RetrievalCallback`` that reports "val_recall@K" each epoch and keeps the best
            model. None: no validation, the final weights are kept.
        batch_size: images per training batch (the last incomplete batch is dropped); on
            several processes the global batch, batch_size / world_size on each.
        batch_sampler: index lists per batch (e.g. class-balanced); replaces batch_size. On
            several processes, one that gives each its share (``DistributedPKSampler``).
        augment: for an ImageData, False, True or a strength for ``augment_batch`` (on the
            device, no horizontal flips). For a FileList, True or False: True is the papers'
            augmentation of photos (``file_loader.photo_augmentation``: a random resized
            crop and a horizontal flip), False the evaluation geometry (shorter side resized,
            centre crop). Flips suit photos; for images a mirror changes (arrows, text),
            pass False.
        lr_groups: default learning rates (model, loss), used when ``fit`` or
            ``fit_one_cycle`` get no learning rate; None uses fastai's 1e-3 for both.
        mixed_precision: "auto" (bf16 on GPUs that support it, else fp16; fp32 on the CPU),
            "bf16", "fp16" (both need CUDA) or "fp32".
        checkpoint_path: file for the best model (needs ``val``); None keeps it in memory.
        seed: seeds batch order and augmentation (seed the model's initialization yourself
            with ``set_seed`` before creating it).
        ks: Recall@K shown each epoch; the first selects the best model.
        opt_func, wd: optimizer and weight decay; the default is torch's AdamW (fused on the
            GPU, see ``torch_optimizer``); fastai's optimizers (``fastai.optimizer.SGD``) work too.
        device: where data and model live; None picks the GPU when there is one (in a
            launched process, its local rank's GPU).
        image_size: the side of the square images a FileList ``train`` or ``val`` is
            decoded at (required for one); an ImageData keeps its own size (when given, it
            must be that size).
        num_workers: decoding processes for a FileList (0: in this process; None: one per
            core, at most 8); an ImageData needs none.

    Launched on several processes (``torchrun``, ``accelerate launch``; docs/distributed.md),
    the Learner trains with DDP (``DistributedTraining``): each process joins the process
    group here, and each embeds its share of the validation images.

    The Learner's parameter groups are [model, loss]; pass ``slice(lr)`` (model lr / 10)
    or an array of two rates to ``fit_one_cycle`` to train them at different rates.
    ``learn.model`` is a ``ModelWithLoss``; the history is ``callbacks.get_history(learn)``.
    """
    own_device = init_distributed()  # joins the process group in a launched process
    rank, world_size = world()
    if world_size > 1 and device is not None and torch.device(device) != own_device:
        raise ValueError(
            f"device={device!r} but this process of {world_size} trains on {own_device}: "
            "leave device=None in a launched run (init_distributed(cpu=True) for the CPU)"
        )
    device = own_device if device is None else torch.device(device)
    precision = _resolve_precision(mixed_precision, device)
    if checkpoint_path is not None and val is None:
        raise ValueError(
            "checkpoint_path needs val: the best model is chosen on the validation classes"
        )
    for name, data in (("train", train), ("val", val)):
        check_image_size(name, data, image_size)
    train = train.relabel()
    num_classes = getattr(loss, "num_classes", None)
    if num_classes is not None and num_classes != train.num_classes:
        raise ValueError(
            f"the loss has num_classes={num_classes} but train has {train.num_classes} "
            f"classes; create the loss with num_classes=train.num_classes"
        )
    if batch_sampler is None and len(train) < batch_size:
        raise ValueError(
            f"train has {len(train)} images but batch_size={batch_size} and incomplete "
            "batches are dropped; lower batch_size"
        )
    if lr_groups is not None and len(lr_groups) != 2:
        raise ValueError(f"lr_groups={lr_groups} must hold two rates: (model, loss)")
    if world_size > 1:
        batch_sampler = _per_rank_sampler(batch_sampler, len(train), batch_size, world_size, seed)
        if device.type == "cuda":
            model = sync_batchnorm(model)  # in place: the caller's model object is trained
    batches = {
        "shuffle": True,
        "drop_last": True,
        "augment": augment,
        "batch_sampler": batch_sampler,
        "device": device,
        "seed": seed + rank,  # each process its own augmentations
    }
    # fastai wants a validation loader too; it is never iterated (SkipValidationLoop).
    if isinstance(train, FileList):
        train_loader = FileDataLoader(
            train, image_size, batch_size, num_workers=num_workers, **batches
        )
        valid_loader = FileDataLoader(train, image_size, batch_sampler=[], device=device)
    else:
        train_loader = DeviceDataLoader(train, batch_size, **batches)
        valid_loader = DeviceDataLoader(train, batch_sampler=[], device=device)
    learn = Learner(
        DataLoaders(train_loader, valid_loader, device=device),
        ModelWithLoss(model, loss).to(device),
        loss_func=loss,
        opt_func=opt_func,
        lr=1e-3 if lr_groups is None else np.array(lr_groups, dtype=float),
        splitter=model_loss_splitter,
        wd=wd,
        # fastai's scratch files (the lr finder's) go to a temporary folder, not the notebook's,
        # named so that it cannot be imported: a "utils_cv" folder there became a namespace
        # package that shadowed this one for any script run from that folder.
        path=Path(tempfile.gettempdir()) / "utils_cv-fastai",
        cbs=[SkipValidationLoop()],
    )
    if world_size > 1:
        learn.add_cb(DistributedTraining(device))
        if rank:  # one progress bar and one epoch table, the first process's
            learn.remove_cb(progress.ProgressCallback)
    if precision != "fp32":
        learn.add_cb(MixedPrecision(amp_mode=precision))
    # Does nothing for losses without a ``stats`` dict (SoftmaxLoss).
    learn.add_cb(LossStatsCallback())
    if val is not None:
        learn.add_cb(
            RetrievalCallback(
                val,
                ks=ks,
                checkpoint_path=checkpoint_path,
                image_size=image_size,
                num_workers=num_workers,
            )
        )
    return learn


def _per_rank_sampler(
    batch_sampler: Iterable[Sequence[int]] | None,
    num_items: int,
    batch_size: int,
    world_size: int,
    seed: int,
) -> Iterable[Sequence[int]]:
    """This process's batches on ``world_size`` processes: the sampler given when it is a
    per-rank one (with as many batches on every process), else random batches of
    ``batch_size / world_size``."""
    if batch_sampler is None:
        per_rank = split_batch(batch_size, world_size, "batch_size")
        return DistributedRandomBatches(num_items, per_rank, seed=seed)
    made_for = getattr(batch_sampler, "world_size", None)
    if made_for != world_size:
        raise ValueError(
            f"on {world_size} processes each needs its own share of every batch, but the "
            f"{type(batch_sampler).__name__} given was made for "
            f"{'one process' if made_for is None else f'{made_for} process(es)'}: pass a "
            "per-rank sampler such as DistributedPKSampler, made after the process group "
            "is joined (train_run makes one from classes_per_batch)"
        )
    lengths = [None] * world_size
    dist.all_gather_object(lengths, len(batch_sampler))
    if len(set(lengths)) != 1:  # a process that stops early would leave the others waiting
        raise ValueError(
            f"the processes' samplers give {lengths} batches per epoch; make them agree"
        )
    return batch_sampler


def split_batch(size: int, world_size: int, name: str) -> int:
    """``size`` / ``world_size``, the share of each process; an error names the sizes that split."""
    if size % world_size:
        lower = size - size % world_size
        near = " or ".join(str(n) for n in (lower, lower + world_size) if n > 0)
        raise ValueError(
            f"{name}={size} does not split among {world_size} processes; use a multiple of "
            f"{world_size}, such as {near}"
        )
    return size // world_size


def check_image_size(name: str, data: ImageData | FileList | None, image_size: int | None):
    """A FileList needs ``image_size``; an ImageData, when one is given, must have that size."""
    if isinstance(data, FileList) and image_size is None:
        raise ValueError(
            f"{name} is a FileList: pass image_size, the side its images are resized and "
            "cropped to (e.g. image_size=224 for the paper benchmarks)"
        )
    if isinstance(data, FileList) or data is None or image_size is None:
        return
    if tuple(data.images.shape[-2:]) != (image_size, image_size):
        raise ValueError(
            f"image_size={image_size} but {name}'s images are {tuple(data.images.shape[-2:])}; "
            f"load {name} at that size, or leave image_size out for in-memory data"
        )


def replace_loss(learn: Learner, loss: nn.Module) -> None:
    """Train on with another loss, e.g. batch-hard after a batch-all warm-up.

    Swaps both the Learner's ``loss_func`` and the loss inside its ``ModelWithLoss`` (whose
    state is what the checkpoints save). Call it between fits. A loss with parameters also
    needs ``learn.create_opt()`` so the optimizer sees them. The ``RetrievalCallback``'s
    history and best model carry on across the swap.
    """
    if not isinstance(learn.model, ModelWithLoss):
        raise TypeError("replace_loss needs a Learner made by make_learner")
    learn.model.loss = loss.to(next(learn.model.model.parameters()).device)
    learn.loss_func = loss


def _resolve_precision(mixed_precision: str, device: torch.device) -> str:
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"mixed_precision={mixed_precision!r} is unknown; use one of {PRECISIONS}")
    if mixed_precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mixed_precision != "fp32" and device.type != "cuda":
        raise ValueError(
            f"mixed_precision={mixed_precision!r} needs a CUDA GPU but the device is "
            f"{device}; use 'auto' or 'fp32'"
        )
    return mixed_precision
