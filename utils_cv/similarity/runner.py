"""One training run, done the same way in every notebook: seed, build, train, choose, evaluate.

``train_run`` is the only place where a notebook's model is trained. It seeds first and
then builds the model and the loss (pass functions that build them, so the initialization
repeats with the seed), makes class-balanced batches when asked, trains with fastai's
one-cycle schedule (or a paper's step, exponential or linear schedule: ``schedule``), keeps
the epoch with the best Recall@1 on the *validation* classes,
and evaluates once on the test classes. The result is a small record, ``Run``.

>>> run = train_run(  # doctest: +SKIP
...     lambda: EmbeddingNet("small_cnn", embedding_size=128),
...     lambda: TripletLoss(0.2, mining="semi_hard"),
...     train, val=val, test=test, epochs=25, lr=1e-2, seed=0,
...     classes_per_batch=16, samples_per_class=4,
... )
>>> run.metrics["recall@1"], run.best_epoch, run.seconds  # doctest: +SKIP

The phases of one run, in order, ``epochs`` in all:

1. ``frozen_epochs`` (NormSoftmax's warm-up) with ``loss``: only the new parameters train
   (the loss's class weights or proxies, and everything in the model outside
   ``model.backbone``), at a constant learning rate; the backbone's BatchNorm layers still
   update their running statistics, as in the reference code;
2. ``warmup_epochs`` with ``warmup_loss`` (for example batch-all before batch-hard), one
   one-cycle schedule (both warm-ups at ``warmup_lr``, by default ``lr``);
3. the remaining epochs with ``loss``, one ``schedule`` (one-cycle by default).

With ``val``, each phase ends by restoring the best epoch so far (``RetrievalCallback``),
so the next phase starts from it, and the run ends with the best epoch of all phases.

The same call trains on several processes when a launcher starts it (``torchrun
--nproc_per_node N script.py``; docs/distributed.md): the batch (``batch_size``, or
``classes_per_batch`` x ``samples_per_class``) is the global batch, split among the
processes, so the recipe and its learning rate stay those of one process; each process
returns the same ``Run``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from fastai.callback.schedule import ParamScheduler
from fastai.learner import Learner
from torch import nn

from utils_cv.common.device import set_seed
from utils_cv.similarity.callbacks import RetrievalCallback, embed_data, get_history
from utils_cv.similarity.datasets import FileList, ImageData
from utils_cv.similarity.distributed import (
    DistributedPKSampler,
    init_distributed,
    world,
)
from utils_cv.similarity.metrics import retrieval_metrics
from utils_cv.similarity.samplers import ClassBalancedBatchSampler
from utils_cv.similarity.training import check_image_size, make_learner, replace_loss, split_batch

ModuleOrBuilder = nn.Module | Callable[[], nn.Module]
# With this environment variable set to a file path, every ``train_run`` (in this process or
# in ``train_runs``' workers, which inherit it) appends one JSON line to the file: what it
# trained and how long it took. ``.ci/gpu-check`` sums them per notebook.
TRAINING_LOG = "UTILS_CV_TRAINING_LOG"
# Below both, the best-epoch choice on the validation split is noisy: train_run warns.
FEW_VAL_CLASSES, FEW_VAL_IMAGES = 50, 1000
# The learning-rate schedules of a phase (``lr_schedule``) and the settings each takes.
SCHEDULES: dict[str, tuple[str, ...]] = {
    "one_cycle": (),
    "constant": (),
    "step": ("milestones", "gamma"),
    "exponential": ("gamma",),
    "linear": (),
}


@dataclass
class Run:
    """What one training run leaves behind.

    Attributes:
        model, loss: trained in place; the model holds the weights of the best validation
            epoch (the final weights when there was no ``val``).
        history: one dict per epoch ("epoch", "train_loss", "val_recall@K", "loss_<stat>").
        best_epoch, best_score: the kept epoch and its validation Recall@K (first K of
            ``ks``); None without ``val``.
        seconds: wall time of the training, the per-epoch validation included, the final
            test evaluation excluded.
        metrics: ``retrieval_metrics`` on the test data ({} without ``test``).
        embeddings: (N, D) test embeddings on the CPU (None without ``test``).
        learn: the fastai Learner, to train on or inspect.
    """

    model: nn.Module
    loss: nn.Module
    history: list[dict[str, float]]
    best_epoch: int | None
    best_score: float | None
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)
    embeddings: torch.Tensor | None = None
    learn: Learner | None = None
    score_name: str = "val_recall@1"

    def summary(self) -> dict[str, float | int | None]:
        """The run in a few numbers for metrics.json: the kept epoch and its validation
        score, the last epoch's training loss and share of active triplets (None for a loss
        without one) and the training seconds."""
        last = self.history[-1] if self.history else {}
        return {
            "best_epoch": self.best_epoch,
            f"best_{self.score_name}": self.best_score,
            "final_train_loss": last.get("train_loss"),
            "final_active_fraction": last.get("loss_active_fraction"),
            "seconds": round(self.seconds, 1),
        }


def train_run(
    model: ModuleOrBuilder,
    loss: ModuleOrBuilder,
    train: ImageData | FileList,
    *,
    epochs: int,
    lr: float | Sequence[float],
    val: ImageData | FileList | None = None,
    test: ImageData | FileList | None = None,
    seed: int = 0,
    batch_size: int = 64,
    classes_per_batch: int | None = None,
    samples_per_class: int | None = None,
    frozen_epochs: int = 0,
    warmup_loss: ModuleOrBuilder | None = None,
    warmup_epochs: int = 0,
    warmup_lr: float | Sequence[float] | None = None,
    schedule: str | Mapping[str, Any] = "one_cycle",
    ks: Sequence[int] = (1, 2, 4, 8),
    nmi: bool = False,
    progress: bool = False,
    image_size: int | None = None,
    num_workers: int | None = None,
    **learner_kwargs,
) -> Run:
    """Train one configuration and evaluate it; see the module docstring for the phases.

    Args:
        model: the embedding model, or a function that builds it (called after seeding).
            Trained in place.
        loss: the loss, or a function that builds it (called after the model).
        train: training images, an ImageData (in memory) or a FileList (decoded batch by
            batch, for data too large for memory; ``make_learner``); relabeled to 0..C-1
            inside, so a classifier loss needs ``num_classes=train.num_classes``.
        epochs: all epochs of the run, every phase included.
        lr: the peak learning rate, or (model, loss) rates for the two parameter groups.
        val: validation classes; the best epoch by Recall@``ks[0]`` on them is kept. With
            fewer than 50 classes and 1,000 images that choice is noisy, and a warning says so.
        test: test classes, embedded and evaluated once at the end (ImageData or FileList).
        seed: seeds the initialization, the batches and the augmentation.
        batch_size: images per batch for random batches (ignored with P x K batches).
        classes_per_batch, samples_per_class: both given: class-balanced P x K batches
            (``ClassBalancedBatchSampler``); both None: random batches of ``batch_size``.
            On N processes each gets P / N of the classes (``DistributedPKSampler``).
        frozen_epochs: epochs that train only what lies outside ``model.backbone``.
        warmup_loss, warmup_epochs: another loss for the first epochs after the frozen ones.
        warmup_lr: the learning rate of both warm-ups; None: ``lr``.
        schedule: the learning rate over phase 3, the loss's own epochs (``lr_schedule``):
            "one_cycle" (fastai's ``fit_one_cycle``, the default), "constant", "linear"
            (to 0 at the phase's end), {"name": "step", "milestones": [15], "gamma": 0.1}
            (x gamma at each milestone epoch of the phase, as torch's MultiStepLR) or
            {"name": "exponential", "gamma": 0.94} (x gamma every epoch, as ExponentialLR).
        ks: the K of Recall@K for the test metrics; ``ks[0]`` also picks the best epoch.
        nmi: also compute NMI and the clustering F1 on the test data (k-means; slower).
        progress: show fastai's progress bars and epoch table.
        image_size, num_workers: for FileList data: the side its images are decoded at
            (required) and the decoding processes (None: one per core, at most 8).
        **learner_kwargs: passed to ``make_learner`` (``augment``, ``opt_func``, ``wd``,
            ``mixed_precision``, ``checkpoint_path``, ``device``, ...).
    """
    phases = {"epochs": epochs, "frozen_epochs": frozen_epochs, "warmup_epochs": warmup_epochs}
    for name, value in phases.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}={value!r} must be a non-negative integer")
    if frozen_epochs + warmup_epochs >= epochs:
        raise ValueError(
            f"frozen_epochs={frozen_epochs} + warmup_epochs={warmup_epochs} leave none of the "
            f"epochs={epochs} for the loss itself; raise epochs or shorten the warm-ups"
        )
    main_epochs = epochs - frozen_epochs - warmup_epochs
    # checked here, so that a wrong schedule fails before the training
    one_cycle = lr_schedule(schedule, main_epochs) is None
    if (warmup_loss is None) != (warmup_epochs == 0):
        raise ValueError("warmup_loss and warmup_epochs go together: give both or neither")
    if (classes_per_batch is None) != (samples_per_class is None):
        raise ValueError(
            "give both classes_per_batch and samples_per_class for P x K batches, or neither "
            "for random batches"
        )
    if val is not None and val.num_classes < FEW_VAL_CLASSES and len(val) < FEW_VAL_IMAGES:
        warnings.warn(
            f"the validation split has only {val.num_classes} classes ({len(val)} images), so "
            "the epoch chosen on it is a noisy choice; with more classes per validation split "
            "(load_image_folder(..., val_fraction=0.3)) it steadies, or pass val=None to keep the "
            "weights of the last epoch of a fixed budget",
            stacklevel=2,
        )
    check_image_size("test", test, image_size)  # before the training, not after it
    init_distributed()  # in a launched process: join the others before the sampler
    rank, world_size = world()
    if classes_per_batch is not None:
        per_rank = split_batch(classes_per_batch, world_size, "classes_per_batch")
    set_seed(seed)
    model = _build(model)
    loss = _build(loss)
    warmup_loss = None if warmup_loss is None else _build(warmup_loss)
    first_loss = warmup_loss if warmup_loss is not None and not frozen_epochs else loss
    if frozen_epochs and not isinstance(getattr(model, "backbone", None), nn.Module):
        raise ValueError(
            f"frozen_epochs={frozen_epochs} needs a model with a .backbone to freeze; "
            f"{type(model).__name__} has none"
        )
    sampler = None
    if classes_per_batch is not None and world_size > 1:
        sampler = DistributedPKSampler(train.labels, per_rank, samples_per_class, seed=seed)
    elif classes_per_batch is not None:
        sampler = ClassBalancedBatchSampler(
            train.labels, classes_per_batch, samples_per_class, seed=seed
        )
    learn = make_learner(
        model,
        first_loss,
        train,
        val=val,
        batch_size=batch_size,
        batch_sampler=sampler,
        seed=seed,
        ks=(ks[0],),
        image_size=image_size,
        num_workers=num_workers,
        **learner_kwargs,
    )
    lr = _rates(lr)
    warmup_lr = lr if warmup_lr is None else _rates(warmup_lr)
    quiet = contextlib.ExitStack()
    if not progress:
        quiet.enter_context(learn.no_bar())
        quiet.enter_context(learn.no_logging())
    start = time.perf_counter()
    with quiet:
        if frozen_epochs:
            # Only what trained before trains after: a model's own frozen stages stay frozen.
            trainable = [p for p in model.backbone.parameters() if p.requires_grad]
            _set_trainable(model.backbone, False)
            try:
                learn.fit(frozen_epochs, warmup_lr)
            finally:
                for parameter in trainable:
                    parameter.requires_grad_(True)
        if warmup_epochs:
            _switch_loss(learn, warmup_loss)
            if learn.opt is None:
                learn.create_opt()
            moms = [hypers.get("mom") for hypers in learn.opt.hypers]
            learn.fit_one_cycle(warmup_epochs, warmup_lr)
            _switch_loss(learn, loss)
            if not one_cycle and None not in moms:
                # one-cycle ends at momentum 0.95; a paper's schedule keeps the optimizer's own
                learn.opt.set_hyper("mom", moms)
        fit_scheduled(learn, main_epochs, lr, schedule)
    seconds = time.perf_counter() - start

    retrieval = next((cb for cb in learn.cbs if isinstance(cb, RetrievalCallback)), None)
    run = Run(
        model=model,
        loss=loss,
        history=get_history(learn),
        best_epoch=None if retrieval is None else retrieval.best_epoch,
        best_score=None
        if retrieval is None or retrieval.best_epoch is None
        else retrieval.best_score,
        seconds=seconds,
        learn=learn,
        score_name=f"val_recall@{ks[0]}",
    )
    if test is not None:
        run.embeddings = embed_data(model, test, image_size=image_size, num_workers=num_workers)
        run.metrics = retrieval_metrics(run.embeddings, test.labels, ks=tuple(ks), nmi=nmi)
    if rank == 0:
        log_training(model, train, epochs, seconds, image_size)
    return run


def log_training(
    model: nn.Module,
    train: ImageData | FileList,
    epochs: int,
    seconds: float,
    image_size: int | None = None,
) -> None:
    """Append one line about a finished training to the file named by ``$UTILS_CV_TRAINING_LOG``
    (nothing without it): the backbone, image size (``image_size``, else the size of an
    ImageData's images), training images, epochs, their product (images passed through the
    network), the training seconds and the device."""
    path = os.environ.get(TRAINING_LOG)
    if not path:
        return
    parameter = next(model.parameters(), None)
    entry = {
        "backbone": type(getattr(model, "backbone", model)).__name__,
        "image_size": int(train.images.shape[-1]) if image_size is None else image_size,
        "images": len(train),
        "epochs": epochs,
        "image_passes": len(train) * epochs,
        "seconds": round(seconds, 2),
        "device": "cpu" if parameter is None else str(parameter.device),
        "pid": os.getpid(),
    }
    with open(path, "a", encoding="utf-8") as file:  # one short line: appends do not interleave
        file.write(json.dumps(entry) + "\n")


def read_training_log(path: str | os.PathLike) -> list[dict]:
    """The entries ``log_training`` appended to ``path``, in the order the trainings ended;
    none without the file."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def train_runs(
    train_one: Callable[..., Run | tuple], jobs: Sequence[object], workers: int = 1
) -> list[Run | tuple]:
    """``[train_one(*job) for job in jobs]``, with up to ``workers`` trainings at once.

    One small model at 64 px keeps a GPU busy with short kernels but fills a fraction of
    it: on an H200, seven ResNet-18 trainings at once ran at about 2.3 times the images
    per second of one. With ``workers`` > 1 the jobs run in that many processes (joblib's
    loky backend, which sends a function defined in a notebook by value, with the data it
    uses), each training as it would here. On a CPU that only shares the same cores, so
    the presets keep ``workers`` at 1 there, and the jobs run here one after another.

    Args:
        train_one: trains one configuration and returns its ``Run`` (``train_run``'s), or a
            tuple that holds it with other results.
        jobs: the arguments of each call, a tuple each (a single value is one argument).
        workers: trainings at once; 1 runs them here, in order.

    Returns:
        The runs in the order of ``jobs``. From worker processes each comes back with
        ``learn`` None (a Learner does not travel) and its model and loss on the CPU.
    """
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} must be a positive integer")
    jobs = [job if isinstance(job, tuple) else (job,) for job in jobs]
    if workers == 1 or len(jobs) <= 1:
        return [train_one(*job) for job in jobs]
    from joblib import Parallel, delayed

    parallel = Parallel(n_jobs=min(workers, len(jobs)), backend="loky")
    log = os.environ.get(TRAINING_LOG)  # loky reuses workers started before it was set
    return parallel(delayed(_portable_run)(train_one, job, log) for job in jobs)


def _portable_run(train_one: Callable[..., Run], job: tuple, log: str | None) -> Run | tuple:
    """One job in a worker process, its Run (or each Run of a tuple) made fit to travel;
    ``log``: the parent's training log, or None."""
    if log:
        os.environ[TRAINING_LOG] = log
    else:
        os.environ.pop(TRAINING_LOG, None)
    result = train_one(*job)
    for run in result if isinstance(result, tuple) else (result,):
        if isinstance(run, Run):
            run.learn = None
            run.model.cpu()
            run.loss.cpu()
    return result


def _switch_loss(learn: Learner, loss: nn.Module) -> None:
    """Train on with ``loss``; a new optimizer only when it misses the loss's parameters."""
    if learn.loss_func is loss:
        return
    replace_loss(learn, loss)
    if learn.opt is None:  # not trained yet: the first fit builds it with every parameter
        return
    optimized = {id(p) for group in learn.opt.param_lists for p in group}
    if any(id(p) not in optimized for p in loss.parameters()):
        learn.create_opt()


def lr_schedule(schedule: str | Mapping[str, Any], epochs: int) -> Callable[[float], float] | None:
    """The factor of the peak learning rate at each point of a phase of ``epochs`` epochs,
    as a function of the phase's progress ``pos`` in [0, 1) (fastai's ``ParamScheduler``
    calls it before every batch); None for "one_cycle", which ``fit_one_cycle`` runs.

    ``schedule`` is a name of ``SCHEDULES`` or a dict with "name" and that schedule's
    settings: "constant" (1), "linear" (1 - pos: to 0 at the end, per batch), "step"
    (``gamma`` to the number of ``milestones``, epochs of the phase counted from 0, reached
    so far; gamma 0.1 unless given) and "exponential" (``gamma`` to the epoch). ValueError
    for an unknown name or setting, a missing one, or a milestone outside the phase.
    """
    spec = {"name": schedule} if isinstance(schedule, str) else dict(schedule)
    name = spec.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r} is unknown; choose from {list(SCHEDULES)}")
    extra = sorted(set(spec) - set(SCHEDULES[name]))
    if extra:
        raise ValueError(
            f"schedule {name!r} takes {list(SCHEDULES[name]) or 'no settings'}, not {extra}"
        )
    if name == "exponential" and "gamma" not in spec:
        raise ValueError("schedule 'exponential' needs gamma, the factor per epoch (e.g. 0.94)")
    gamma = float(spec.get("gamma", 0.1))
    if not gamma > 0:
        raise ValueError(f"schedule {name!r}: gamma={gamma} must be positive")

    def epoch(pos: float) -> int:  # the epoch of the phase a batch belongs to
        return min(int(pos * epochs + 1e-6), epochs - 1)

    if name == "one_cycle":
        return None
    if name == "constant":
        return lambda pos: 1.0
    if name == "linear":
        return lambda pos: 1.0 - pos
    if name == "exponential":
        return lambda pos: gamma ** epoch(pos)
    milestones = sorted(int(m) for m in spec.get("milestones", ()))
    if not milestones or not all(0 < m < epochs for m in milestones):
        raise ValueError(
            f"schedule 'step' needs milestones between 1 and {epochs - 1} (epochs of the "
            f"phase of {epochs}), got {milestones}"
        )
    return lambda pos: gamma ** sum(epoch(pos) >= m for m in milestones)


def fit_scheduled(
    learn: Learner,
    epochs: int,
    lr: float | np.ndarray,
    schedule: str | Mapping[str, Any] = "one_cycle",
) -> None:
    """Train ``epochs`` epochs with peak ``lr`` (one rate or one per parameter group) on
    ``schedule`` (``lr_schedule``): ``fit_one_cycle`` for "one_cycle", else ``fit`` with a
    ``ParamScheduler`` that sets ``lr`` times the schedule's factor before every batch
    (the optimizer's momentum stays as it is)."""
    factor = lr_schedule(schedule, epochs)
    if factor is None:
        learn.fit_one_cycle(epochs, lr)
        return
    peak = lr if isinstance(lr, int | float) else np.asarray(lr, dtype=float)
    learn.fit(epochs, peak, cbs=ParamScheduler({"lr": lambda pos: peak * factor(pos)}))


def _rates(lr: float | Sequence[float]) -> float | np.ndarray:
    """One rate for every parameter group, or an array of one per group (model, loss)."""
    return lr if isinstance(lr, int | float) else np.array(lr, dtype=float)


def _build(module: ModuleOrBuilder) -> nn.Module:
    if isinstance(module, nn.Module):
        return module
    if not callable(module):
        raise TypeError(f"expected an nn.Module or a function that builds one, got {module!r}")
    built = module()
    if not isinstance(built, nn.Module):
        raise TypeError(f"the builder returned {type(built).__name__}, not an nn.Module")
    return built


def _set_trainable(module: nn.Module, trainable: bool) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(trainable)


def sweep_table(runs: Mapping[object, Run], setting: str) -> pd.DataFrame:
    """One sweep as a table: a row per value of ``setting`` with its run's numbers.

    ``runs`` maps each value to the ``Run`` trained with it: test Recall@1 and MAP@R (from
    ``test``), the best validation score, and the last epoch's training loss and, where the
    loss reports them, its share of active triplets or proxy accuracy.
    """
    rows = {}
    for value, run in runs.items():
        last = run.history[-1] if run.history else {}
        rows[value] = {
            "recall@1": run.metrics.get("recall@1"),
            "map@r": run.metrics.get("map@r"),
            f"best {run.score_name}": run.best_score,
            "final train_loss": last.get("train_loss"),
        } | {
            f"final {key[5:]}": last[key]
            for key in ("loss_active_fraction", "loss_proxy_accuracy")
            if key in last
        }
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(setting).round(4)
