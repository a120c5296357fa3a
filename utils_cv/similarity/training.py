"""fastai glue: train an embedding model with a metric-learning loss and keep the best model.

fastai's ``Learner`` runs the training (schedules, lr finder, progress bars, mixed
precision). Metric learning needs four things it does not provide:

- data held in memory on the device and augmented per batch there (``DeviceDataLoader``),
  or, too large for memory, a ``FileList`` decoded batch by batch in worker processes
  (``file_loader.FileDataLoader``, picked by the data's type);
- one optimizer for the model *and* the loss, whose parameters (class weights, proxies)
  get their own parameter group and learning rate (``ModelWithLoss``, ``model_loss_splitter``);
- no classification loss on the validation set: validation classes are unseen classes,
  so a classifier's loss on them means nothing (``SkipValidationLoop``);
- retrieval measured on the validation classes each epoch, keeping the best model
  (``RetrievalCallback``). Test classes are never used here.

>>> learn = make_learner(model, SoftmaxLoss(model.embedding_size, train.num_classes),  # doctest: +SKIP
...                      train, val=val)
>>> learn.fit_one_cycle(10, lr_max=slice(3e-3))  # doctest: +SKIP

Parameter groups are [model, loss]. ``slice(lr)`` gives the model lr / 10 and the loss lr
(fastai's convention: the last group gets the largest rate); an array such as
``np.array([1e-3, 1e-1])`` sets each group's rate explicitly.
"""

from __future__ import annotations

import inspect
import math
import os
import tempfile
import time
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
from fastai.callback.core import Callback, CancelValidException
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastai.torch_core import params
from fastcore.foundation import L
from torch import nn

from utils_cv.similarity.augment import augment_batch
from utils_cv.similarity.datasets.file_list import FileList
from utils_cv.similarity.distributed import (
    DistributedRandomBatches,
    DistributedTraining,
    embed_sharded,
    init_distributed,
    sync_batchnorm,
    world,
)
from utils_cv.similarity.file_loader import FileDataLoader, IndexBatches
from utils_cv.similarity.metrics import retrieval_metrics

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


class SkipValidationLoop(Callback):
    """Skip fastai's validation loop and its "valid_loss" column.

    That loop would apply the training loss to the validation set, whose classes are not
    among the training classes: a classifier's loss there is meaningless or an error.
    ``RetrievalCallback`` measures retrieval on those classes instead. A pass that gathers
    predictions (``learn.get_preds``, which ``learn.summary`` uses) is not a validation and
    runs.
    """

    order = -5  # after TrainEvalCallback (-10) sets eval mode, before the progress bars (60)

    def before_fit(self):
        self.learn.recorder.valid_metrics = False  # read by the Recorder (50) to name columns

    def before_validate(self):
        if not _gathering_preds(self.learn):
            raise CancelValidException()


def _training_fit(learn: Learner) -> bool:
    """False during the lr finder's and get_preds' own fits, which the callbacks stay out of."""
    return not hasattr(learn, "lr_finder") and not _gathering_preds(learn)


def _gathering_preds(learn: Learner) -> bool:
    """True inside ``learn.get_preds`` (its GatherPredsCallback is attached as gather_preds)."""
    return hasattr(learn, "gather_preds")


class LossStatsCallback(Callback):
    """Record the training loss and average a loss module's ``stats`` over each epoch.

    Losses such as ``TripletLoss`` keep statistics of their last batch in a ``stats`` dict
    (the share of active triplets, mean positive and negative distances). fastai sees only
    the loss value; this callback averages every numeric entry over the epoch's batches
    that reported it. A loss that combines others may nest their dicts: ``{"triplet":
    {"active_fraction": 0.4}, "softmax": 2.1}`` becomes "loss_triplet_active_fraction" and
    "loss_softmax". Entries that are not numbers are ignored. Epochs are counted across
    fits (a warm-up fit and the main fit form one history); the lr finder's are skipped.
    A training loss that became NaN or inf stops the fit at the end of that epoch with a
    FloatingPointError that names the learning rates.

    Attributes:
        history: one dict per epoch: "epoch", "train_loss" (fastai's smoothed loss at the
            end of the epoch) and "loss_<name>" for each statistic.
    """

    order = 54  # before RetrievalCallback (55), so both count epochs the same way

    def __init__(self):
        self.history: list[dict[str, float]] = []
        self._epochs_done = 0

    def before_fit(self):
        self.run = _training_fit(self.learn)

    def before_epoch(self):
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}

    def after_loss(self):
        stats = getattr(self.learn.loss_func, "stats", None)
        if not self.training or not stats:
            return
        for name, value in _flat_numbers(stats):
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def after_train(self):
        # fastai's smoothed loss stays NaN or inf once one batch's loss was, so one look per
        # epoch (before validation embeds with the broken weights) sees every batch.
        loss = float(self.recorder.smooth_loss.value)
        if not math.isfinite(loss):
            rates = " and ".join(f"{group['lr']:.3g}" for group in self.opt.hypers)
            raise FloatingPointError(
                f"the training loss became {loss} in epoch {self._epochs_done}: the training "
                f"diverged at learning rate {rates} (model and loss groups); lower the "
                "learning rate, e.g. ten times, or pick one with learn.lr_find()"
            )

    def after_epoch(self):
        means = {f"loss_{k}": v / self._counts[k] for k, v in self._sums.items()}
        train_loss = float(self.recorder.smooth_loss.value)
        self.history.append({"epoch": self._epochs_done, "train_loss": train_loss, **means})
        self._epochs_done += 1


def _flat_numbers(stats: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(name, value) for every number in a possibly nested dict; names joined with "_"."""
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flat_numbers(value, prefix=f"{name}_")
        elif isinstance(value, int | float | np.number) and not isinstance(value, bool):
            yield name, float(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            yield name, float(value)


class RetrievalCallback(Callback):
    """Measure retrieval on the validation classes after each epoch; keep the best model.

    After every ``every``-th epoch (and the last epoch of each fit) it embeds ``val`` with
    ``embed`` and computes ``retrieval_metrics``. "val_recall@K" for each K in ``ks`` joins
    fastai's progress table (NaN in epochs that are not evaluated). Recall@``ks[0]`` picks
    the best model; after each fit the best weights (model and loss) are loaded back, so a
    fit that follows another starts from the best epoch so far, not from the last one.
    History and the best model carry over from one fit to the next, so a warm-up fit and the
    main fit form one run; when the best epoch came from a fit with another loss, only the
    model's weights are restored.

    Args:
        val: validation images and labels (classes unseen in training): an ImageData, or a
            FileList decoded at ``image_size`` each time (``embed_data``).
        every: evaluate every this many epochs.
        ks: the K of Recall@K to show; the first one selects the best model.
        checkpoint_path: where to save the best model (written atomically); None keeps it
            in memory. Load it with ``load_checkpoint``.
        batch_size: images per forward pass when embedding ``val``.
        image_size, num_workers: for a FileList ``val``, as in ``embed``.

    Attributes:
        history: one dict per epoch: "epoch", "train_loss" (fastai's smoothed loss at the
            end of the epoch), and on evaluated epochs "val_recall@K", "val_map@r",
            "val_r_precision".
        best_epoch, best_score: the epoch and score of the kept model (None, -inf before).
    """

    order = 55  # after the Recorder (50) names its columns, before the progress bars print them

    def __init__(
        self,
        val: ImageData | FileList,
        every: int = 1,
        ks: Sequence[int] = (1,),
        checkpoint_path: str | os.PathLike | None = None,
        batch_size: int = 256,
        image_size: int | None = None,
        num_workers: int | None = None,
    ):
        if every < 1:
            raise ValueError(f"every={every} must be at least 1")
        if not ks:
            raise ValueError("ks is empty; pass at least one K, e.g. ks=(1,)")
        self.val = val
        self.every = every
        self.ks = tuple(ks)
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.batch_size = batch_size
        self.image_size = image_size
        self.num_workers = num_workers
        self.history: list[dict[str, float]] = []
        self.best_epoch: int | None = None
        self.best_score = -math.inf
        self._best_state: dict | None = None
        self._epochs_done = 0

    def before_fit(self):
        self.run = _training_fit(self.learn)
        if not self.run:
            return
        names = list(self.recorder.metric_names)
        at = names.index("time") if "time" in names else len(names)
        columns = [f"val_recall@{k}" for k in self.ks]
        self.recorder.metric_names = L(names[:at] + columns + names[at:])

    def after_validate(self):
        if _gathering_preds(self.learn):  # get_preds' pass (summary), not an epoch
            return
        epoch = self._epochs_done
        entry = {"epoch": epoch, "train_loss": float(self.recorder.smooth_loss.value)}
        due = (self.learn.epoch + 1) % self.every == 0 or self.learn.epoch == self.n_epoch - 1
        if due:
            scores = self._evaluate()
            entry.update({f"val_{name}": value for name, value in scores.items()})
            score = scores[f"recall@{self.ks[0]}"]
            if score > self.best_score:
                self.best_epoch, self.best_score = epoch, score
                self._save_best(epoch, scores)
        self.history.append(entry)
        self.recorder.log += [entry.get(f"val_recall@{k}", math.nan) for k in self.ks]

    def after_epoch(self):
        if not _gathering_preds(self.learn):
            self._epochs_done += 1

    def after_fit(self):
        if self.best_epoch is None:
            return
        model, loss = _model_and_loss(self.learn)
        if self._best_state is not None:
            state = self._best_state
        else:
            state = _read_checkpoint(self.checkpoint_path)
        model.load_state_dict(state["model"])
        # The best epoch may belong to an earlier fit with another loss (a warm-up): then the
        # saved loss state is that loss's, and the current loss keeps its own parameters.
        if loss is not None and state["loss"].keys() == loss.state_dict().keys():
            loss.load_state_dict(state["loss"])

    def _evaluate(self) -> dict[str, float]:
        model, _ = _model_and_loss(self.learn)
        # On several processes each embeds its share of the batches; all get every row.
        embeddings = embed_data(
            model,
            self.val,
            self.batch_size,
            image_size=self.image_size,
            num_workers=self.num_workers,
        )
        scores = retrieval_metrics(embeddings, self.val.labels.cpu(), ks=self.ks)
        # Counts ("num_queries", ...) are no scores: keep them out of the history and plots.
        return {name: float(value) for name, value in scores.items() if not name.startswith("num_")}

    def _save_best(self, epoch: int, scores: dict[str, float]):
        model, loss = _model_and_loss(self.learn)
        state = {
            "model": _cpu_copy(model.state_dict()),
            "loss": {} if loss is None else _cpu_copy(loss.state_dict()),
            "epoch": epoch,
            "metrics": scores,
        }
        if self.checkpoint_path is None or world()[0] != 0:  # one process writes the file
            self._best_state = state
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        # Write next to the target, then rename: a crash never leaves half a checkpoint.
        fd, tmp = tempfile.mkstemp(dir=self.checkpoint_path.parent, suffix=".tmp")
        os.close(fd)
        try:
            # Through a file object: torch names the zip's inner folder after a path it is
            # given (here a random temporary name), so equal states gave unequal bytes.
            with open(tmp, "wb") as file:
                torch.save(state, file)
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            os.unlink(tmp)
            raise


def embed_data(
    model: nn.Module,
    data: ImageData | FileList,
    batch_size: int = 256,
    *,
    image_size: int | None = None,
    num_workers: int | None = None,
) -> torch.Tensor:
    """(N, D) embeddings of a dataset's images, on the CPU, shared among the processes of a
    launched run (``embed_sharded``): an ImageData's images in memory, or a FileList's
    files decoded at ``image_size`` in ``num_workers`` processes (see ``models.embed``)."""
    if isinstance(data, FileList):
        return embed_sharded(
            model, data, batch_size, image_size=image_size, num_workers=num_workers
        )
    return embed_sharded(model, data.images, batch_size, image_size=image_size)


def _model_and_loss(learn: Learner) -> tuple[nn.Module, nn.Module | None]:
    """The embedding model and the loss module (None when the loss is a plain function)."""
    module = getattr(learn.model, "module", learn.model)  # inside DDP during a distributed fit
    if isinstance(module, ModelWithLoss):
        return module.model, module.loss
    loss = learn.loss_func if isinstance(learn.loss_func, nn.Module) else None
    return module, loss


def _cpu_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, loss: nn.Module | None = None
) -> dict:
    """Load a checkpoint written by ``RetrievalCallback`` into ``model`` (and ``loss``).

    Loads with ``weights_only=True``: tensors and plain values only, no code. A file that
    cannot be read whole (cut short, damaged) raises ValueError naming it.

    Returns:
        {"epoch": int, "metrics": dict of the validation scores at that epoch}.
    """
    state = _read_checkpoint(path)
    model.load_state_dict(state["model"])
    if loss is not None:
        loss.load_state_dict(state["loss"])
    return {"epoch": state["epoch"], "metrics": state["metrics"]}


def _read_checkpoint(path: str | os.PathLike) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError) as error:  # torch's errors for a cut or damaged zip file
        raise ValueError(
            f"{path} is not a whole checkpoint ({os.path.getsize(path)} bytes that torch.load "
            "cannot read): it was probably cut short, by a full disk or an interrupted copy; "
            "train again to write it"
        ) from error


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
    ``learn.model`` is a ``ModelWithLoss``; the history is ``get_history(learn)``.
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
        # fastai's scratch files (the lr finder's) go to a temporary folder, not the notebook's.
        path=Path(tempfile.gettempdir()) / "utils_cv",
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


def get_history(learn: Learner) -> list[dict[str, float]]:
    """Per-epoch training loss, loss statistics and validation scores, for plotting.

    All fits of the Learner count, numbered on from one fit to the next. From the
    ``RetrievalCallback`` when there is one, else from the ``LossStatsCallback`` (both added
    by ``make_learner``), else from fastai's Recorder (the last fit only). "train_loss" is
    fastai's smoothed loss at the end of the epoch. The ``LossStatsCallback``'s per-epoch
    averages ("loss_active_fraction", ...) are merged in by epoch.
    """
    history = None
    for callback in learn.cbs:
        if isinstance(callback, RetrievalCallback):
            history = [dict(entry) for entry in callback.history]
    if history is None:
        stats = [cb for cb in learn.cbs if isinstance(cb, LossStatsCallback)]
        if stats:
            return [dict(entry) for entry in stats[0].history]
        recorder = learn.recorder
        names = [name for name in recorder.metric_names[1:] if name != "time"]
        history = [
            {"epoch": epoch, **dict(zip(names, values, strict=True))}
            for epoch, values in enumerate(getattr(recorder, "values", []))
        ]
    for callback in learn.cbs:
        if isinstance(callback, LossStatsCallback):
            by_epoch = {entry["epoch"]: entry for entry in callback.history}
            for entry in history:
                stats = by_epoch.get(entry["epoch"], {})
                entry.update({key: value for key, value in stats.items() if key not in entry})
    return history


def step_cost(
    model: nn.Module,
    loss: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    repeats: int = 10,
    warmup: int = 2,
) -> dict[str, float]:
    """What one training step costs: time, and the memory the loss keeps for backward.

    Runs ``warmup`` + ``repeats`` steps of forward, loss and backward on one batch, on the
    model's device, in training mode. There is no optimizer step, so the weights do not
    change (BatchNorm's running statistics do, as in any training step). The time includes
    whatever the loss computes besides its value (its ``stats``).

    Args:
        model, loss: as for training; ``loss(model(images), labels)``.
        images: (B, 3, H, W) uint8 (scaled to [0, 1] as the data loaders do) or float.
        labels: (B,) int.

    Returns:
        A dict:

        - "ms_per_step": mean wall time of the timed steps (CUDA synchronized);
        - "loss_saved_kib": the bytes of every tensor autograd saves while computing the
          loss from the embeddings (the activation memory the loss adds to a step; a tensor
          saved twice counts twice), measured with ``saved_tensors_hooks``;
        - "step_saved_kib": the same for the whole step (model and loss), for scale;
        - "peak_gpu_mib" (CUDA only): the steps' peak allocated CUDA memory.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats={repeats} must be >= 1 and warmup={warmup} >= 0")
    device = next(model.parameters()).device
    images = images.to(device)
    images = images.float() / 255 if images.dtype == torch.uint8 else images
    labels = labels.to(device)
    # The loss's own saved tensors only: detached embeddings, so the backbone's graph is
    # neither counted nor kept alive during the timed steps.
    with torch.no_grad():
        embeddings = model(images)
    embeddings.requires_grad_(True)
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.nbytes)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss(embeddings, labels)
        loss_bytes = sum(saved)
        loss(model(images), labels)  # the whole step: backbone, head and loss
    del embeddings
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(warmup + repeats):
        if step == warmup:
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss(model(images), labels).backward()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    cost = {
        "ms_per_step": 1000 * seconds / repeats,
        "loss_saved_kib": loss_bytes / 2**10,
        "step_saved_kib": (sum(saved) - loss_bytes) / 2**10,
    }
    if cuda:
        cost["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return cost
