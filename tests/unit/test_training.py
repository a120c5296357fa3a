"""fastai glue: loader, parameter groups, validation by retrieval, best model, repeatability."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.optimizer import SGD

from utils_cv.common.device import set_seed
from utils_cv.similarity import callbacks, training
from utils_cv.similarity.callbacks import RetrievalCallback, get_history, load_checkpoint
from utils_cv.similarity.datasets import ImageData
from utils_cv.similarity.losses import SoftmaxLoss, TripletLoss
from utils_cv.similarity.metrics import retrieval_metrics
from utils_cv.similarity.models import EmbeddingNet, embed
from utils_cv.similarity.samplers import ClassBalancedBatchSampler
from utils_cv.similarity.training import (
    DeviceDataLoader,
    ModelWithLoss,
    make_learner,
    torch_optimizer,
)

NUM_CLASSES, PER_CLASS, SIZE = 8, 6, 16


def stripes(seed: int, classes=range(NUM_CLASSES), per_class: int = PER_CLASS) -> ImageData:
    """Stripes whose orientation and period give the class; random phase and colour do not.

    The colour varies more than the stripes, so an untrained network finds few neighbours
    of the same class, and a trained one finds them all.
    """
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images, labels = [], []
    for label in classes:
        angle = math.pi * (label % 4) / 4
        period = 4 if label < 4 else 8
        for _ in range(per_class):
            phase = 2 * math.pi * torch.rand(1, generator=generator)
            along = xs * math.cos(angle) + ys * math.sin(angle)
            wave = torch.sin(2 * math.pi * along / period + phase)
            image = 0.2 + 0.6 * torch.rand(3, 1, 1, generator=generator) + 0.2 * wave
            images.append((255 * image.clamp(0, 1)).round().to(torch.uint8))
            labels.append(label)
    n = len(labels)
    return ImageData(
        images=torch.stack(images),
        labels=torch.tensor(labels),
        class_names=[f"class{i}" for i in range(NUM_CLASSES)],
        splits=["train"] * n,
        domains=[""] * n,
        paths=[""] * n,
    )


def new_model(seed: int = 0) -> EmbeddingNet:
    set_seed(seed)
    return EmbeddingNet("small_cnn", embedding_size=32)


def new_learner(model=None, train=None, **kwargs):
    model = new_model() if model is None else model
    train = stripes(0) if train is None else train
    loss = SoftmaxLoss(model.embedding_size, train.num_classes)
    kwargs.setdefault("batch_size", 16)
    kwargs.setdefault("device", "cpu")
    return make_learner(model, loss, train, **kwargs)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


# --- loader -------------------------------------------------------------------------------


def test_loader_batches_cover_the_data_once_per_pass():
    data = stripes(0)
    loader = DeviceDataLoader(data, batch_size=10, shuffle=True, seed=0)
    assert len(loader) == 5
    batches = list(loader)
    assert [len(labels) for _, labels in batches] == [10, 10, 10, 10, 8]
    images = torch.cat([images for images, _ in batches])
    assert images.dtype == torch.float32 and 0 <= images.min() and images.max() <= 1
    # Without augmentation every image comes out exactly once, as uint8 / 255.
    expected = sorted(tuple(row.tolist()) for row in (data.images.float() / 255).flatten(1))
    assert sorted(tuple(row.tolist()) for row in images.flatten(1)) == expected


def test_loader_drops_the_last_batch_and_reshuffles_each_pass():
    data = stripes(0)

    def passes(loader, count=2):
        return [torch.cat([labels for _, labels in loader]) for _ in range(count)]

    loader = DeviceDataLoader(data, batch_size=10, shuffle=True, drop_last=True, seed=0)
    assert len(loader) == 4 and len(list(loader)) == 4
    again = DeviceDataLoader(data, batch_size=10, shuffle=True, drop_last=True, seed=0)
    first, second = passes(again)
    assert len(first) == 40 and not torch.equal(first, second)
    repeat = DeviceDataLoader(data, batch_size=10, shuffle=True, drop_last=True, seed=0)
    assert all(map(torch.equal, passes(repeat), (first, second)))


def test_loader_augments_on_request():
    data = stripes(0)
    plain, _ = DeviceDataLoader(data, batch_size=8).one_batch()
    augmented, _ = DeviceDataLoader(data, batch_size=8, augment=True).one_batch()
    torch.testing.assert_close(plain, data.images[:8].float() / 255)
    assert augmented.shape == plain.shape and not torch.allclose(augmented, plain)


class TwoPerClassSampler:
    """Four classes per batch, two images each: a tiny stand-in for a P x K sampler."""

    def __init__(self, labels: torch.Tensor):
        by_class = [torch.nonzero(labels == c).flatten().tolist() for c in range(NUM_CLASSES)]
        self.batches = [
            [i for c in classes for i in by_class[c][start : start + 2]]
            for start in (0, 2, 4)
            for classes in ((0, 1, 2, 3), (4, 5, 6, 7))
        ]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


class RecordLabels(Callback):
    def before_fit(self):
        self.seen = []

    def before_batch(self):
        if self.training:
            self.seen.append(self.learn.yb[0].tolist())


def test_a_batch_sampler_decides_the_batches():
    train = stripes(0)
    sampler = TwoPerClassSampler(train.labels)
    learn = new_learner(train=train, batch_sampler=sampler, augment=False)
    assert len(learn.dls.train) == len(sampler) == 6
    recorder = RecordLabels()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, cbs=recorder)
    assert recorder.seen == [train.labels[batch].tolist() for batch in sampler.batches]


def test_a_batch_sampler_needs_a_length():
    with pytest.raises(TypeError, match="__len__"):
        DeviceDataLoader(stripes(0), batch_sampler=iter([[0, 1]]))


# --- learner ------------------------------------------------------------------------------


class RecordStep(Callback):
    """Parameters and gradients of the one optimizer step in a fit."""

    def before_step(self):
        self.before = [[p.detach().clone() for p in group] for group in self.opt.param_lists]
        self.grads = [[p.grad.detach().clone() for p in group] for group in self.opt.param_lists]


@pytest.mark.parametrize(
    "opt_func", [SGD, torch_optimizer(torch.optim.SGD)], ids=["fastai_sgd", "torch_sgd"]
)
def test_one_step_updates_model_and_loss_each_at_its_own_rate(opt_func):
    train = stripes(0)
    one_batch = [list(range(16))]
    learn = new_learner(train=train, batch_sampler=one_batch, opt_func=opt_func, augment=False)
    model, loss = learn.model.model, learn.model.loss
    groups = learn.splitter(learn.model)
    assert [len(g) for g in groups] == [len(list(model.parameters())), 2]
    assert all(p is q for p, q in zip(groups[1], loss.parameters(), strict=True))
    rates = np.array([1e-3, 1e-1])
    step = RecordStep()
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=rates, cbs=step)
    assert [h["lr"] for h in learn.opt.hypers] == list(rates)
    # Plain SGD without weight decay: every parameter moved by exactly -lr * grad.
    for rate, before, grads, after in zip(rates, step.before, step.grads, groups, strict=True):
        assert any(g.abs().sum() > 0 for g in grads)
        for p0, g, p1 in zip(before, grads, after, strict=True):
            torch.testing.assert_close(p1.detach(), p0 - rate * g)


def test_lr_groups_set_the_default_rates_and_slice_follows_fastai():
    learn = new_learner(lr_groups=(1e-3, 2e-2))
    learn.create_opt()
    assert [h["lr"] for h in learn.opt.hypers] == [1e-3, 2e-2]
    learn.opt.set_hyper("lr", slice(1e-2))
    assert [h["lr"] for h in learn.opt.hypers] == pytest.approx([1e-3, 1e-2])


def test_freeze_trains_the_loss_parameters_only():
    # A warm-up of the new parameters (NormSoftmax's recipe): fastai's freeze() keeps the
    # last parameter group, the loss, trainable.
    learn = new_learner(augment=False)
    learn.freeze()
    model_before, loss_before = state_of(learn.model.model), state_of(learn.model.loss)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, lr=1e-2)
    convs = [
        name for name in model_before if name.endswith("weight") and model_before[name].ndim == 4
    ]
    assert convs and all(
        torch.equal(model_before[n], learn.model.model.state_dict()[n]) for n in convs
    )
    assert not torch.equal(loss_before["classifier.weight"], learn.model.loss.classifier.weight)


def test_fastai_validation_loss_is_skipped_and_recall_is_shown():
    learn = new_learner(val=stripes(1), ks=(1, 2))
    with learn.no_bar():
        learn.fit(2, lr=1e-2)
    assert list(learn.recorder.metric_names) == [
        "epoch",
        "train_loss",
        "val_recall@1",
        "val_recall@2",
        "time",
    ]
    assert len(learn.recorder.values) == 2
    assert all(len(row) == 3 and np.isfinite(row).all() for row in learn.recorder.values)


def test_without_val_the_table_holds_the_train_loss_only():
    learn = new_learner()
    with learn.no_bar():
        learn.fit(2, lr=1e-2)
    assert list(learn.recorder.metric_names) == ["epoch", "train_loss", "time"]
    history = get_history(learn)
    assert [entry["epoch"] for entry in history] == [0, 1]
    assert all(np.isfinite(entry["train_loss"]) for entry in history)


def test_training_raises_validation_recall():
    # Validation here: new images of the training classes (fast and reliable on toy data);
    # the notebooks validate on unseen classes the same way.
    val = stripes(1)
    model = new_model()
    untrained = retrieval_metrics(embed(model, val.images), val.labels, ks=(1,))["recall@1"]
    learn = new_learner(model=model, val=val, augment=False)
    with learn.no_bar():
        learn.fit_one_cycle(5, lr_max=1e-2)
    history = get_history(learn)
    assert [entry["epoch"] for entry in history] == list(range(5))
    assert {"train_loss", "val_recall@1", "val_map@r", "val_r_precision"} <= history[-1].keys()
    assert untrained < 0.5
    assert learn.retrieval.best_score >= max(0.9, untrained + 0.4)
    # The restored model scores what the callback recorded for its best epoch.
    best = retrieval_metrics(embed(model, val.images), val.labels, ks=(1,))["recall@1"]
    assert best == pytest.approx(learn.retrieval.best_score)


class RecordStates(Callback):
    order = RetrievalCallback.order + 1

    def before_fit(self):
        self.states = []

    def after_validate(self):
        self.states.append(state_of(self.learn.model))


@pytest.mark.parametrize("to_file", [False, True])
def test_the_best_epoch_is_restored_after_fit(tmp_path, monkeypatch, to_file):
    scores = iter([0.5, 0.9, 0.2])

    def fake_metrics(embeddings, labels, ks):
        score = next(scores)
        return {"recall@1": score, "map@r": score / 2, "r_precision": score, "num_queries": 48}

    monkeypatch.setattr(callbacks, "retrieval_metrics", fake_metrics)
    path = tmp_path / "checkpoints" / "best.pth" if to_file else None
    learn = new_learner(val=stripes(1), checkpoint_path=path)
    states = RecordStates()
    with learn.no_bar():
        learn.fit(3, lr=1e-2, cbs=states)
    assert learn.retrieval.best_epoch == 1 and learn.retrieval.best_score == 0.9
    assert [entry["val_recall@1"] for entry in get_history(learn)] == [0.5, 0.9, 0.2]
    assert_same_state(state_of(learn.model), states.states[1])
    with pytest.raises(AssertionError):
        assert_same_state(state_of(learn.model), states.states[2])
    if to_file:
        assert [p.name for p in path.parent.iterdir()] == ["best.pth"]  # no temporary files
        model, loss = new_model(seed=1), SoftmaxLoss(32, NUM_CLASSES)
        info = load_checkpoint(path, model, loss)
        assert info["epoch"] == 1 and info["metrics"]["recall@1"] == 0.9
        assert_same_state(state_of(ModelWithLoss(model, loss)), states.states[1])


def test_history_and_best_model_carry_over_between_fits(monkeypatch):
    scores = iter([0.3, 0.8, 0.6, 0.7])

    def fake_metrics(embeddings, labels, ks):
        return {"recall@1": next(scores)}

    monkeypatch.setattr(callbacks, "retrieval_metrics", fake_metrics)
    learn = new_learner(val=stripes(1))
    with learn.no_bar():
        learn.fit(2, lr=1e-2)
        learn.fit(2, lr=1e-2)
    assert [entry["epoch"] for entry in get_history(learn)] == [0, 1, 2, 3]
    assert learn.retrieval.best_epoch == 1


def test_every_skips_epochs_but_evaluates_the_last():
    learn = new_learner(val=stripes(1))
    learn.retrieval.every = 2
    with learn.no_bar():
        learn.fit(3, lr=1e-2)
    evaluated = ["val_recall@1" in entry for entry in get_history(learn)]
    assert evaluated == [False, True, True]
    assert math.isnan(learn.recorder.values[0][1])


def test_seeded_cpu_runs_repeat_exactly():
    def run():
        learn = new_learner(model=new_model(seed=0), val=stripes(1), seed=0)
        with learn.no_bar():
            learn.fit(2, lr=1e-2)
        return state_of(learn.model), get_history(learn)

    (state_a, history_a), (state_b, history_b) = run(), run()
    assert_same_state(state_a, state_b)
    assert history_a == history_b


def test_lr_find_runs_and_leaves_the_history_alone():
    learn = new_learner(val=stripes(1))
    with learn.no_bar():
        suggestion = learn.lr_find(num_it=8, show_plot=False)
    assert suggestion.valley > 0
    assert learn.retrieval.history == []
    # its scratch folder in $TMPDIR must not be importable: named utils_cv, it shadowed the
    # package for scripts run from there (an empty namespace package, no __version__)
    assert learn.path.parent == Path(tempfile.gettempdir())
    assert not learn.path.name.isidentifier() and (learn.path / "models").is_dir()


def test_summary_runs_with_the_validation_loop_skipped():
    """fastai's summary passes one batch through get_preds, a validation pass that
    SkipValidationLoop lets run (it failed on a missing progress bar or predictions)."""
    import fastai.callback.hook  # noqa: F401  (Learner.summary)

    learn = new_learner(val=stripes(1))
    summary = learn.summary()  # progress bars on, as in a notebook
    assert "Total params" in summary and "(Input shape: 16 x 3 x 16 x 16)" in summary
    assert learn.retrieval.history == []


def test_make_learner_errors_name_the_fix():
    train = stripes(0)
    model = new_model()
    with pytest.raises(ValueError, match="num_classes=train.num_classes"):
        make_learner(model, SoftmaxLoss(32, 5), train, device="cpu")
    with pytest.raises(ValueError, match="lower batch_size"):
        new_learner(batch_size=64)
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        new_learner(mixed_precision="bf16")
    with pytest.raises(ValueError, match="'auto'"):
        new_learner(mixed_precision="half")
    with pytest.raises(ValueError, match="needs val"):
        new_learner(checkpoint_path="best.pth")


def test_training_labels_are_made_contiguous():
    # Classes 2, 5 and 7 only: the classifier has three outputs.
    train = stripes(0, classes=(2, 5, 7))
    model = new_model()
    learn = make_learner(model, SoftmaxLoss(32, 3), train, batch_size=6, device="cpu")
    _, labels = learn.dls.train.one_batch()
    assert set(labels.tolist()) <= {0, 1, 2}
    with learn.no_bar():
        learn.fit(1)
    assert np.isfinite(learn.recorder.values[0][0])


class CountingLoss(torch.nn.Module):
    """Cross-entropy on the first two embedding dims that reports the batch's label mean."""

    def forward(self, embeddings, labels):
        self.stats = {"label_mean": labels.float().mean().item(), "constant": 2.0}
        return torch.nn.functional.cross_entropy(embeddings[:, :NUM_CLASSES], labels)


def test_loss_stats_are_averaged_per_epoch_and_merged_into_the_history():
    set_seed(0)
    data = stripes(0)
    model = EmbeddingNet("small_cnn", embedding_size=16, normalize=False)
    batches = [list(range(0, 12)), list(range(12, 24)), list(range(36, 48))]
    learn = make_learner(
        model, CountingLoss(), data, val=stripes(1), batch_sampler=batches, device="cpu"
    )
    assert any(isinstance(cb, callbacks.LossStatsCallback) for cb in learn.cbs)
    learn.fit(2, 1e-3)
    history = get_history(learn)
    assert [entry["epoch"] for entry in history] == [0, 1]
    # Label means of the three batches: 0.5, 2.5, 6.5 -> 19/6 per epoch.
    for entry in history:
        assert entry["loss_label_mean"] == pytest.approx(19 / 6)
        assert entry["loss_constant"] == 2.0
        assert "val_recall@1" in entry


def test_replace_loss_swaps_the_loss_fastai_calls_and_the_one_saved():
    set_seed(0)
    data = stripes(0)
    model = EmbeddingNet("small_cnn", embedding_size=16, normalize=False)
    learn = make_learner(
        model, SoftmaxLoss(16, NUM_CLASSES), data, val=stripes(1), batch_size=16, device="cpu"
    )
    learn.fit(1, 1e-3)
    counting = CountingLoss()
    training.replace_loss(learn, counting)
    assert learn.loss_func is counting and learn.model.loss is counting
    learn.fit(1, 1e-3)
    history = get_history(learn)
    assert [entry["epoch"] for entry in history] == [0, 1]
    assert "loss_label_mean" not in history[0] and "loss_label_mean" in history[1]


# --- models with more than one output -----------------------------------------------------


class TwoHeadToy(torch.nn.Module):
    """Class logits from pooled features; the embedding from the flattened conv map."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.backbone = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4)
        )
        self.classifier = torch.nn.Linear(8, num_classes)
        self.head = torch.nn.Linear(8 * 4 * 4, 6)

    def forward(self, x):
        return torch.nn.functional.normalize(self.head(self.backbone(x).flatten(1)), dim=1)

    def training_outputs(self, x):
        feature_map = self.backbone(x)
        return {
            "logits": self.classifier(feature_map.mean(dim=(2, 3))),
            "embeddings": torch.nn.functional.normalize(self.head(feature_map.flatten(1)), dim=1),
        }


class SoftmaxPlusTriplet(torch.nn.Module):
    """Cross-entropy on the logits plus triplet on the embeddings, with nested stats."""

    def __init__(self):
        super().__init__()
        self.triplet = TripletLoss(0.2, mining="batch_all")
        self.seen: list[type] = []

    def forward(self, outputs, labels):
        self.seen.append(type(outputs))
        cross_entropy = torch.nn.functional.cross_entropy(outputs["logits"], labels)
        triplet = self.triplet(outputs["embeddings"], labels)
        self.stats = {"cross_entropy": cross_entropy.item(), "triplet": dict(self.triplet.stats)}
        return cross_entropy + triplet


def test_a_two_head_model_trains_through_training_outputs_and_evaluates_through_forward():
    set_seed(0)
    data = stripes(0)
    model, loss = TwoHeadToy(), SoftmaxPlusTriplet()
    before = state_of(model)
    sampler = ClassBalancedBatchSampler(data.labels, 4, 3, seed=0)
    learn = make_learner(model, loss, data, val=stripes(1), batch_sampler=sampler, device="cpu")
    learn.fit(2, 1e-2)
    # The loss saw the dict in every training step, and both heads learned.
    assert loss.seen and set(loss.seen) == {dict}
    after = state_of(model)
    for name in ("classifier.weight", "head.weight", "backbone.0.weight"):
        assert not torch.equal(before[name], after[name]), name
    # Evaluation went through forward: 6-d embeddings, validation Recall@1 recorded.
    assert embed(model, data.images[:5]).shape == (5, 6)
    history = get_history(learn)
    assert all(0 <= entry["val_recall@1"] <= 1 for entry in history)
    # Both losses' statistics are in the history, the nested ones under joined names.
    for entry in history:
        assert entry["loss_cross_entropy"] > 0
        assert 0 <= entry["loss_triplet_active_fraction"] <= 1
        assert entry["loss_triplet_mean_neg_distance"] > 0


def test_model_with_loss_calls_training_outputs_only_in_training_mode():
    wrapped = ModelWithLoss(TwoHeadToy(), SoftmaxPlusTriplet())
    images = torch.rand(4, 3, 8, 8)
    assert isinstance(wrapped.train()(images), dict)
    assert wrapped.eval()(images).shape == (4, 6)
    plain = ModelWithLoss(EmbeddingNet("small_cnn", embedding_size=8), SoftmaxLoss(8, 3))
    assert plain.train()(images).shape == (4, 8)


def test_loss_stats_flatten_nested_dicts_and_skip_what_is_not_a_number():
    stats = {"a": 1, "b": {"c": 2.5, "d": {"e": torch.tensor(3.0)}}, "f": "text", "g": True}
    assert dict(callbacks._flat_numbers(stats)) == {"a": 1.0, "b_c": 2.5, "b_d_e": 3.0}


def test_loss_stats_skip_the_lr_finder_and_average_only_where_reported():
    class Sometimes(CountingLoss):
        calls = 0

        def forward(self, embeddings, labels):
            value = super().forward(embeddings, labels)
            Sometimes.calls += 1
            # numpy scalars count; "rare" is reported by every other batch only
            self.stats = {"label_mean": np.float32(labels.float().mean().item())}
            if Sometimes.calls % 2:
                self.stats["rare"] = 1.0
            return value

    set_seed(0)
    model = EmbeddingNet("small_cnn", embedding_size=16, normalize=False)
    batches = [list(range(0, 12)), list(range(12, 24)), list(range(36, 48))]
    learn = make_learner(model, Sometimes(), stripes(0), batch_sampler=batches, device="cpu")
    with learn.no_bar(), learn.no_logging():
        learn.lr_find(num_it=5, show_plot=False)
        learn.fit(1, 1e-3)
    history = get_history(learn)
    assert [entry["epoch"] for entry in history] == [0]  # the lr finder's steps are not epochs
    assert history[0]["loss_label_mean"] == pytest.approx(19 / 6)
    assert history[0]["loss_rare"] == 1.0  # the mean over the batches that reported it


def test_step_cost_measures_time_and_the_memory_the_loss_saves():
    from utils_cv.similarity.budget import step_cost
    from utils_cv.similarity.losses import EmbeddingExpansion, TripletLoss
    from utils_cv.similarity.models import EmbeddingNet

    torch.manual_seed(0)
    model = EmbeddingNet("small_cnn", 16, normalize=True)
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    labels = torch.arange(4).repeat_interleave(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    base = step_cost(model, TripletLoss(), images, labels, repeats=2, warmup=0)
    more = step_cost(model, EmbeddingExpansion(TripletLoss(), n_points=8), images, labels, 2)
    assert base["ms_per_step"] > 0 and "peak_gpu_mib" not in base  # CUDA only
    # EE keeps the synthetic points and an (N, 1 + n, M) distance block for backward.
    assert more["loss_saved_kib"] > 2 * base["loss_saved_kib"] > 0
    # The whole step keeps the model's activations too: more than the loss alone, and the
    # same model's share in both (the difference is the loss's).
    assert base["step_saved_kib"] > base["loss_saved_kib"]
    model_only = base["step_saved_kib"] - base["loss_saved_kib"]
    assert more["step_saved_kib"] - more["loss_saved_kib"] == pytest.approx(model_only)
    for key, value in model.state_dict().items():  # no optimizer step: the weights stay
        if "running" not in key and "num_batches" not in key:  # (BatchNorm's statistics move)
            assert torch.equal(value, before[key]), key
    with pytest.raises(ValueError, match="repeats"):
        step_cost(model, TripletLoss(), images, labels, repeats=0)
