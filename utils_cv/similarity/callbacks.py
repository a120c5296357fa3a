"""fastai callbacks for metric learning: no validation loss, loss statistics, retrieval on the
validation classes each epoch with the best model kept, and the history they record.

``make_learner`` (``training``) adds them; use them directly with a Learner of your own:

- ``SkipValidationLoop``: validation classes are unseen classes, so fastai's validation
  loop, which applies the training loss to them, is skipped;
- ``LossStatsCallback``: the epoch means of a loss's ``stats`` (the share of active
  triplets, ...), and a clear error when the training loss becomes NaN;
- ``RetrievalCallback``: Recall@K, MAP@R and R-Precision on the validation classes after
  each epoch; the best epoch's weights are saved (``load_checkpoint``) and loaded back
  after each fit. Test classes are never used here;
- ``get_history``: what they recorded, one dict per epoch, for plots and tables.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

with warnings.catch_warnings():
    # fastai's layers call torch.jit.script at import, which torch 2.10+ deprecates; the
    # warning is fastai's to fix (training.py imports fastai the same way).
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from fastai.callback.core import Callback, CancelValidException
    from fastai.learner import Learner
from fastcore.foundation import L
from torch import nn

from utils_cv.similarity.datasets.file_list import FileList
from utils_cv.similarity.distributed import embed_sharded, world
from utils_cv.similarity.metrics import retrieval_metrics

if TYPE_CHECKING:
    from utils_cv.similarity.datasets import ImageData


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


_NONE = 2**62  # LossStatsCallback's first non-finite batch before there is one


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
    FloatingPointError that names the first such batch and the learning rates it had.

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
        # The first batch whose loss was not finite (_NONE: none yet), kept on the loss's
        # device so that no batch waits for a sync; and each batch's learning rates.
        self._first_bad: torch.Tensor | None = None
        self._rates: list[list[float]] = []

    def after_loss(self):
        if not self.training:
            return
        loss, batch = self.learn.loss.detach(), len(self._rates)
        bad = torch.where(torch.isfinite(loss).all(), _NONE, batch)
        self._first_bad = bad if self._first_bad is None else torch.minimum(self._first_bad, bad)
        self._rates.append([group["lr"] for group in self.opt.hypers])
        stats = getattr(self.learn.loss_func, "stats", None)
        if not stats:
            return
        for name, value in _flat_numbers(stats):
            self._sums[name] = self._sums.get(name, 0.0) + value
            self._counts[name] = self._counts.get(name, 0) + 1

    def after_train(self):
        # fastai's smoothed loss stays NaN or inf once one batch's loss was, so one look per
        # epoch (before validation embeds with the broken weights) sees every batch.
        loss = float(self.recorder.smooth_loss.value)
        if not math.isfinite(loss):
            first = _NONE if self._first_bad is None else int(self._first_bad)
            batch = first if first < _NONE else len(self._rates) - 1
            rates = " and ".join(f"{rate:.3g}" for rate in self._rates[batch])
            raise FloatingPointError(
                f"the training loss became {loss} in epoch {self._epochs_done} (first in batch "
                f"{batch + 1} of {len(self._rates)}): the training diverged at learning rate "
                f"{rates} (model and loss groups); lower the learning rate, e.g. ten times, or "
                "pick one with learn.lr_find()"
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
    from utils_cv.similarity.training import ModelWithLoss  # training imports this module

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
