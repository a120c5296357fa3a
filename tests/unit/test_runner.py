"""train_run: the same numbers as the steps it replaces, its phases, its record, its errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from fastai.callback.core import Callback
from fastai.learner import Learner
from fastcore.foundation import L

from utils_cv.common.device import set_seed
from utils_cv.similarity import callbacks, training
from utils_cv.similarity.callbacks import get_history
from utils_cv.similarity.losses import SoftmaxLoss, TripletLoss
from utils_cv.similarity.metrics import retrieval_metrics
from utils_cv.similarity.models import EmbeddingNet, embed
from utils_cv.similarity.runner import (
    TRAINING_LOG,
    lr_schedule,
    sweep_table,
    train_run,
    train_runs,
)
from utils_cv.similarity.samplers import ClassBalancedBatchSampler
from utils_cv.similarity.training import make_learner, replace_loss

from .test_training import NUM_CLASSES, stripes


def small_model():
    return EmbeddingNet("small_cnn", embedding_size=16)


def triplet():
    return TripletLoss(0.2, mining="batch_hard")


def parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_train_run_gives_exactly_what_the_steps_it_replaces_give():
    train, val, test = stripes(0), stripes(1), stripes(2)
    run = train_run(
        small_model, triplet, train, val=val, test=test, epochs=3, lr=1e-2, seed=3,
        classes_per_batch=4, samples_per_class=3, device="cpu",
    )  # fmt: skip
    # The same steps by hand, as notebook 01 wrote them before the runner existed.
    set_seed(3)
    model = small_model()
    sampler = ClassBalancedBatchSampler(train.labels, 4, 3, seed=3)
    learn = make_learner(
        model, triplet(), train, val=val, batch_sampler=sampler, seed=3, device="cpu"
    )
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(3, 1e-2)
    embeddings = embed(model, test.images)
    assert torch.equal(run.embeddings, embeddings)
    assert run.metrics == retrieval_metrics(embeddings, test.labels, ks=(1, 2, 4, 8))
    assert run.history == get_history(learn)
    for name, tensor in model.state_dict().items():
        assert torch.equal(run.model.state_dict()[name], tensor), name


def test_the_record_holds_the_best_validation_epoch_and_the_test_metrics():
    run = train_run(
        small_model,
        lambda: SoftmaxLoss(16, NUM_CLASSES),
        stripes(0),
        val=stripes(1),
        test=stripes(2),
        epochs=4,
        lr=1e-2,
        batch_size=16,
        ks=(1, 4),
        device="cpu",
    )
    assert [entry["epoch"] for entry in run.history] == [0, 1, 2, 3]
    scores = [entry["val_recall@1"] for entry in run.history]
    assert run.best_score == max(scores) and scores[run.best_epoch] == max(scores)
    assert set(run.metrics) >= {"recall@1", "recall@4", "map@r", "r_precision"}
    assert run.embeddings.shape == (len(stripes(2)), 16) and run.seconds > 0
    assert isinstance(run.learn, Learner) and isinstance(run.loss, SoftmaxLoss)


def test_without_val_and_test_the_final_weights_are_kept_and_nothing_is_evaluated():
    run = train_run(small_model, triplet, stripes(0), epochs=1, lr=1e-2, classes_per_batch=4,
                    samples_per_class=2, device="cpu")  # fmt: skip
    assert run.best_epoch is None and run.best_score is None
    assert run.metrics == {} and run.embeddings is None


def test_modules_are_used_as_given_and_builders_are_called_after_seeding():
    model = small_model()
    run = train_run(model, triplet, stripes(0), epochs=1, lr=1e-2, classes_per_batch=4,
                    samples_per_class=2, device="cpu")  # fmt: skip
    assert run.model is model
    # A classifier loss built by the runner starts from the same weights for the same seed.
    firsts = []
    for _ in range(2):
        run = train_run(small_model, lambda: SoftmaxLoss(16, NUM_CLASSES), stripes(0),
                        epochs=1, lr=0.0, batch_size=16, seed=5, device="cpu")  # fmt: skip
        firsts.append(run.loss.classifier.weight.detach().clone())
    assert torch.equal(*firsts)


def test_the_warmup_loss_trains_first_and_the_main_loss_after(monkeypatch):
    calls = []
    original = replace_loss

    def spy(learn, loss):
        calls.append((len(get_history(learn)), loss.mining))
        original(learn, loss)

    monkeypatch.setattr("utils_cv.similarity.runner.replace_loss", spy)
    run = train_run(
        small_model, triplet, stripes(0), val=stripes(1), epochs=5, lr=1e-2,
        warmup_loss=lambda: TripletLoss(0.2, mining="batch_all"), warmup_epochs=2,
        classes_per_batch=4, samples_per_class=3, device="cpu",
    )  # fmt: skip
    assert calls == [(2, "batch_hard")]  # switched after the two warm-up epochs
    assert len(run.history) == 5 and run.learn.loss_func is run.loss


def test_a_warmup_before_a_loss_with_parameters_lets_the_optimizer_see_them():
    run = train_run(
        small_model, lambda: SoftmaxLoss(16, NUM_CLASSES), stripes(0), epochs=2, lr=1e-2,
        warmup_loss=triplet, warmup_epochs=1, classes_per_batch=4, samples_per_class=3,
        device="cpu",
    )  # fmt: skip
    optimized = {id(p) for group in run.learn.opt.param_lists for p in group}
    assert all(id(p) in optimized for p in run.loss.parameters())


def test_frozen_epochs_train_only_what_lies_outside_the_backbone(monkeypatch):
    # Skip the one-cycle phase: what changes is what the frozen phase trained.
    monkeypatch.setattr(Learner, "fit_one_cycle", lambda self, *args, **kwargs: None)
    model = small_model()
    loss = SoftmaxLoss(16, NUM_CLASSES)
    before = parameters(model) | {f"loss.{k}": v for k, v in parameters(loss).items()}
    train_run(model, loss, stripes(0), epochs=2, lr=1e-2, frozen_epochs=1, batch_size=16,
              device="cpu")  # fmt: skip
    after = parameters(model) | {f"loss.{k}": v for k, v in parameters(loss).items()}
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (not name.startswith("backbone.")), name
    assert all(p.requires_grad for p in model.parameters())


def test_per_group_learning_rates_reach_model_and_loss():
    model, loss = small_model(), SoftmaxLoss(16, NUM_CLASSES)
    model_before, loss_before = parameters(model), parameters(loss)
    train_run(model, loss, stripes(0), epochs=1, lr=(0.0, 1e-2), batch_size=16, device="cpu")
    assert all(torch.equal(model_before[k], v) for k, v in parameters(model).items())
    assert not any(torch.equal(loss_before[k], v) for k, v in parameters(loss).items())


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"epochs": 0}, "leave none of the epochs=0"),
        ({"epochs": 2, "frozen_epochs": 1, "warmup_epochs": 1, "warmup_loss": triplet},
         "leave none"),
        ({"epochs": 2, "warmup_epochs": 1}, "warmup_loss and warmup_epochs go together"),
        ({"epochs": 2, "warmup_loss": triplet}, "go together"),
        ({"epochs": 2, "classes_per_batch": 4}, "both classes_per_batch and samples_per_class"),
        ({"epochs": -1}, "epochs=-1 must be a non-negative integer"),
        ({"epochs": 2.5}, "must be a non-negative integer"),
    ],
)  # fmt: skip
def test_errors_name_the_fix(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        train_run(small_model, triplet, stripes(0), lr=1e-2, device="cpu", **kwargs)


def test_frozen_epochs_need_a_backbone():
    class Plain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 4)

        def forward(self, x):
            return self.linear(x.mean(dim=(2, 3)))

    with pytest.raises(ValueError, match="needs a model with a .backbone.*Plain"):
        train_run(Plain, triplet, stripes(0), epochs=2, frozen_epochs=1, lr=1e-2, device="cpu")


def test_a_builder_must_build_a_module():
    with pytest.raises(TypeError, match="returned int"):
        train_run(lambda: 3, triplet, stripes(0), epochs=1, lr=1e-2, device="cpu")


def test_the_warmups_can_have_their_own_learning_rate(monkeypatch):
    rates = []
    monkeypatch.setattr(Learner, "fit", lambda self, n, lr, **kw: rates.append(("fit", n, lr)))
    monkeypatch.setattr(
        Learner, "fit_one_cycle", lambda self, n, lr, **kw: rates.append(("cycle", n, lr))
    )
    train_run(  # with val, so that the history comes from the (empty) retrieval callback
        small_model, triplet, stripes(0), val=stripes(1), epochs=6, lr=1e-3, warmup_lr=1e-2,
        frozen_epochs=1,
        warmup_loss=lambda: TripletLoss(0.2, mining="batch_all"), warmup_epochs=2,
        classes_per_batch=4, samples_per_class=3, device="cpu",
    )  # fmt: skip
    assert rates == [("fit", 1, 1e-2), ("cycle", 2, 1e-2), ("cycle", 3, 1e-3)]


def test_the_summary_names_the_kept_epoch_and_the_last_one():
    run = train_run(small_model, triplet, stripes(0), val=stripes(1), epochs=2, lr=1e-2,
                    classes_per_batch=4, samples_per_class=3, ks=(2,), device="cpu")  # fmt: skip
    summary = run.summary()
    assert summary["best_epoch"] == run.best_epoch
    assert summary["best_val_recall@2"] == run.best_score
    assert summary["final_train_loss"] == run.history[-1]["train_loss"]
    assert summary["final_active_fraction"] == run.history[-1]["loss_active_fraction"]
    assert summary["seconds"] == round(run.seconds, 1)


def test_a_best_epoch_in_the_warmup_of_another_loss_restores_the_model_only(monkeypatch):
    # Best validation epoch = the warm-up's (triplet); the main loss (a classifier) has
    # parameters the warm-up loss lacks: only the model's weights can be restored.
    scores = iter([0.9, 0.1, 0.2])
    monkeypatch.setattr(
        callbacks, "retrieval_metrics", lambda embeddings, labels, ks: {"recall@1": next(scores)}
    )
    run = train_run(
        small_model, lambda: SoftmaxLoss(16, NUM_CLASSES), stripes(0), val=stripes(1),
        epochs=3, lr=1e-2, warmup_loss=triplet, warmup_epochs=1, classes_per_batch=4,
        samples_per_class=3, device="cpu",
    )  # fmt: skip
    assert run.best_epoch == 0 and run.best_score == 0.9
    assert isinstance(run.loss, SoftmaxLoss) and run.learn.loss_func is run.loss


def test_without_val_the_history_covers_every_phase_in_order():
    run = train_run(
        small_model, triplet, stripes(0), epochs=3, lr=1e-2,
        warmup_loss=lambda: TripletLoss(0.2, mining="batch_all"), warmup_epochs=2,
        classes_per_batch=4, samples_per_class=3, device="cpu",
    )  # fmt: skip
    assert [entry["epoch"] for entry in run.history] == [0, 1, 2]
    # batch-all counts every triplet of a 12-image batch; batch-hard one per anchor (12).
    triplets = [entry["loss_num_triplets"] for entry in run.history]
    assert triplets[0] == triplets[1] > 12 and triplets[2] == 12
    assert all(np.isfinite(entry["train_loss"]) for entry in run.history)


def test_the_frozen_phase_trains_the_main_losss_parameters(monkeypatch):
    monkeypatch.setattr(Learner, "fit_one_cycle", lambda self, *args, **kwargs: None)
    loss = SoftmaxLoss(16, NUM_CLASSES)
    before = parameters(loss)
    train_run(small_model, loss, stripes(0), epochs=4, lr=1e-2, frozen_epochs=1,
              warmup_loss=triplet, warmup_epochs=1, batch_size=12, classes_per_batch=4,
              samples_per_class=3, device="cpu")  # fmt: skip
    assert not any(torch.equal(before[k], v) for k, v in parameters(loss).items())


def test_few_validation_classes_warn_that_the_choice_is_noisy():
    with pytest.warns(UserWarning, match="only 8 classes.*noisy.*val=None"):
        train_run(small_model, triplet, stripes(0), val=stripes(1), epochs=1, lr=1e-2,
                  classes_per_batch=4, samples_per_class=3, device="cpu")  # fmt: skip


def test_sweep_table_has_a_row_per_value():
    runs = {
        value: train_run(
            small_model,
            triplet,
            stripes(0),
            val=stripes(1),
            test=stripes(2),
            epochs=1,
            lr=value,
            classes_per_batch=4,
            samples_per_class=3,
            device="cpu",
        )  # fmt: skip
        for value in (1e-3, 1e-2)
    }
    table = sweep_table(runs, "lr")
    assert list(table.index) == [1e-3, 1e-2] and table.index.name == "lr"
    assert table.loc[1e-2, "recall@1"] == round(runs[1e-2].metrics["recall@1"], 4)
    assert table.loc[1e-3, "best val_recall@1"] == round(runs[1e-3].best_score, 4)
    assert "final active_fraction" in table.columns and "final proxy_accuracy" not in table


def test_train_runs_in_worker_processes_gives_the_runs_of_one_after_another(tmp_path, monkeypatch):
    train, val, test = stripes(0), stripes(1), stripes(2)
    log = tmp_path / "trainings.jsonl"  # the workers inherit the variable
    monkeypatch.setenv(TRAINING_LOG, str(log))

    # Defined here, as a notebook defines it: joblib sends it by value, with the data.
    def train_one(seed, margin):
        return train_run(
            small_model, lambda: TripletLoss(margin, mining="batch_hard"), train, val=val,
            test=test, epochs=2, lr=1e-2, seed=seed, classes_per_batch=4, samples_per_class=3,
            device="cpu",
        )  # fmt: skip

    jobs = [(0, 0.2), (1, 0.2), (0, 0.5)]
    here = train_runs(train_one, jobs)
    there = train_runs(train_one, jobs, workers=2)
    assert [run.learn is None for run in here] == [False] * 3
    for one, other in zip(here, there, strict=True):
        assert other.learn is None and other.best_epoch == one.best_epoch
        # Worker processes may use fewer threads; float sums then differ in the last bits.
        assert other.metrics == pytest.approx(one.metrics, abs=1e-6)
        torch.testing.assert_close(other.embeddings, one.embeddings, rtol=1e-4, atol=1e-5)
    # Different jobs gave different runs, each in its own place.
    assert not torch.equal(there[0].embeddings, there[1].embeddings)
    # Every training, here and in the workers, left one line in the training log.
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(lines) == 6
    assert {(e["epochs"], e["images"], e["image_passes"]) for e in lines} == {(2, len(train), 2 * len(train))}  # fmt: skip
    assert {e["image_size"] for e in lines} == {train.images.shape[-1]}
    assert [e["pid"] == os.getpid() for e in lines] == [True] * 3 + [False] * 3
    assert all(e["backbone"] == type(small_model().backbone).__name__ and e["seconds"] > 0 for e in lines)  # fmt: skip


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_train_runs_refuses_a_bad_number_of_workers(workers):
    with pytest.raises(ValueError, match="workers"):
        train_runs(lambda: None, [()], workers=workers)


def test_frozen_epochs_leave_a_models_own_frozen_stages_frozen(monkeypatch):
    monkeypatch.setattr(Learner, "fit_one_cycle", lambda self, *args, **kwargs: None)
    model = EmbeddingNet("small_cnn", embedding_size=16, frozen_stages=2)
    train_run(model, SoftmaxLoss(16, NUM_CLASSES), stripes(0), epochs=2, lr=1e-2,
              frozen_epochs=1, batch_size=16, device="cpu")  # fmt: skip
    trainable = [p.requires_grad for p in model.backbone.parameters()]
    assert trainable == [False] * 6 + [True] * 6  # conv weight, BN weight and bias per block


@pytest.mark.parametrize(
    "schedule, per_epoch",
    [
        ({"name": "step", "milestones": [2], "gamma": 0.1}, [1, 1, 0.1, 0.1]),
        ({"name": "step", "milestones": [3, 1], "gamma": 0.5}, [1, 0.5, 0.5, 0.25]),
        ({"name": "exponential", "gamma": 0.94}, [1, 0.94, 0.94**2, 0.94**3]),
        ("constant", [1, 1, 1, 1]),
    ],
)  # fmt: skip
def test_paper_schedules_set_the_rate_of_every_batch_of_each_epoch(
    schedule, per_epoch, monkeypatch
):
    """Every batch of epoch e of the loss's phase trains at lr x factor(e), in both parameter
    groups, the first batch of a milestone epoch included; the frozen epoch before it keeps
    its constant rate; SGD's momentum stays 0.9 throughout (no one-cycle)."""
    seen = []

    class Rates(Callback):
        def after_batch(self):
            if self.training:
                seen.append([(h["lr"], h["mom"]) for h in self.opt.hypers])

    fit = Learner.fit
    monkeypatch.setattr(
        Learner, "fit", lambda self, *a, cbs=None, **k: fit(self, *a, cbs=L(cbs) + [Rates()], **k)
    )
    lr = np.array([1e-2, 3e-2])
    run = train_run(
        small_model, lambda: SoftmaxLoss(16, NUM_CLASSES), stripes(0), epochs=5,
        frozen_epochs=1, lr=lr, warmup_lr=(5e-3, 5e-3), batch_size=16, schedule=schedule,
        opt_func=training.torch_optimizer(torch.optim.SGD, momentum=0.9), device="cpu",
    )  # fmt: skip
    batches = len(run.learn.dls.train)
    rates = np.array([[rate for rate, _ in groups] for groups in seen])
    expected = np.concatenate(
        [np.full((batches, 2), 5e-3), np.repeat(np.array(per_epoch)[:, None] * lr, batches, 0)]
    )
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    assert {mom for groups in seen for _, mom in groups} == {0.9}


def test_the_linear_schedule_falls_to_zero_over_the_phase():
    factor = lr_schedule("linear", 4)
    positions = np.arange(12) / 12  # 4 epochs of 3 batches, as fastai's pct_train
    values = [factor(pos) for pos in positions]
    assert values[0] == 1 and all(a > b for a, b in zip(values, values[1:], strict=False))
    assert values[-1] == pytest.approx(1 / 12)


def test_step_milestones_switch_exactly_at_the_epoch_for_any_number_of_batches():
    """pct_train = iteration / (epochs x batches) is a float, and int(pct x epochs) falls one
    epoch short for many (e.g. 15 of 22): the last batch before each milestone and the first
    at it must still get their epoch's rate."""
    for epochs in (7, 22, 31):
        for milestone in range(1, epochs):
            factor = lr_schedule({"name": "step", "milestones": [milestone]}, epochs)
            for batches in (1, 3, 49, 1000):
                first = milestone * batches  # the first iteration of the milestone epoch
                assert factor((first - 1) / (epochs * batches)) == 1.0
                assert factor(first / (epochs * batches)) == 0.1, (epochs, milestone, batches)


def test_one_cycle_stays_the_default_and_runs_fit_one_cycle(monkeypatch):
    calls = []
    monkeypatch.setattr(Learner, "fit", lambda self, n, lr, **kw: calls.append(("fit", n)))
    monkeypatch.setattr(
        Learner, "fit_one_cycle", lambda self, n, lr, **kw: calls.append(("cycle", n))
    )
    train_run(small_model, triplet, stripes(0), val=stripes(1), epochs=2, lr=1e-2,
              classes_per_batch=4, samples_per_class=3, device="cpu")  # fmt: skip
    assert calls == [("cycle", 2)]
    assert lr_schedule("one_cycle", 3) is None


@pytest.mark.parametrize(
    "schedule, pattern",
    [
        ("cosine", "schedule 'cosine' is unknown; choose from"),
        ({"gamma": 0.1}, "schedule None is unknown"),
        ({"name": "step", "milestones": [4]}, r"milestones between 1 and 3 .* got \[4\]"),
        ({"name": "step"}, "needs milestones"),
        ({"name": "step", "milestones": [0]}, "needs milestones"),
        ({"name": "exponential", "gamma": 0}, "gamma=0.0 must be positive"),
        ({"name": "exponential"}, "needs gamma, the factor per epoch"),
        ({"name": "linear", "gamma": 0.5}, r"takes no settings, not \['gamma'\]"),
        ({"name": "step", "milestones": [2], "step_size": 2}, "not \\['step_size'\\]"),
    ],
)  # fmt: skip
def test_a_wrong_schedule_fails_before_the_training(schedule, pattern, monkeypatch):
    monkeypatch.setattr(Learner, "fit", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ValueError, match=pattern):
        train_run(small_model, triplet, stripes(0), epochs=4, lr=1e-2, schedule=schedule,
                  classes_per_batch=4, samples_per_class=3, device="cpu")  # fmt: skip


def test_after_a_one_cycle_warmup_a_paper_schedule_trains_at_the_optimizers_momentum(monkeypatch):
    """fit_one_cycle leaves momentum near 0.95; the step schedule after it is back at SGD's 0.9,
    and a plain list of rates works as an array does."""
    seen = []

    class Moms(Callback):
        def after_batch(self):
            if self.training:
                seen.append([h["mom"] for h in self.opt.hypers])

    fit = Learner.fit
    monkeypatch.setattr(
        Learner, "fit", lambda self, *a, cbs=None, **k: fit(self, *a, cbs=L(cbs) + [Moms()], **k)
    )
    run = train_run(
        small_model, triplet, stripes(0), epochs=3, lr=[1e-2, 1e-2], warmup_epochs=1,
        warmup_loss=lambda: TripletLoss(0.2, mining="batch_all"), classes_per_batch=4,
        samples_per_class=3, schedule={"name": "step", "milestones": [1]}, device="cpu",
        opt_func=training.torch_optimizer(torch.optim.SGD, momentum=0.9),
    )  # fmt: skip
    batches = len(run.learn.dls.train)
    warmup, main = seen[:batches], seen[batches:]
    assert len(main) == 2 * batches and warmup[-1][0] > 0.92  # one-cycle rising back
    assert {m for moms in main for m in moms} == {0.9}
