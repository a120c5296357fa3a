"""The distributed pieces: the per-rank samplers (simulated ranks); gathered losses, sharded
embeddings and whole train_run calls on two real CPU processes with the gloo backend, each
equal to the single-process result. tests/distributed launches the command line with torchrun."""

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.image_folders import write_stripes
from tests.ports import free_port
from utils_cv.similarity import training
from utils_cv.similarity.datasets import FileList
from utils_cv.similarity.distributed import (
    DistributedPKSampler,
    DistributedRandomBatches,
    GatheredLoss,
    distributed_loss,
    embed_sharded,
    gather_batch,
    rank0_first,
    sync_batchnorm,
)
from utils_cv.similarity.losses import (
    EmbeddingExpansion,
    MultiSimilarityLoss,
    NormSoftmaxLoss,
    ProxyNCALoss,
    RankingRegularizedLoss,
    TripletLoss,
)
from utils_cv.similarity.models import EmbeddingNet, embed
from utils_cv.similarity.runner import train_run
from utils_cv.similarity.samplers import ClassBalancedBatchSampler
from utils_cv.similarity.training import split_batch, torch_optimizer

from .test_training import NUM_CLASSES, SIZE, stripes

LOSSES = {
    "batch_all": lambda: TripletLoss(0.2, mining="batch_all"),
    "semi_hard": lambda: TripletLoss(0.2, mining="semi_hard"),
    "batch_hard": lambda: TripletLoss(0.2, mining="batch_hard"),
    "multi_similarity": MultiSimilarityLoss,
    "batch_hard+EE": lambda: EmbeddingExpansion(TripletLoss(0.2, mining="batch_hard")),
    # a two-head model's dict of outputs: cross-entropy and triplet on the global batch
    "ranking_regularizer": lambda: RankingRegularizedLoss(WORLD * P, TripletLoss(0.2)),
    # losses with parameters (seeded: the same on every rank), gathered like the others
    "norm_softmax": lambda: NormSoftmaxLoss(WORLD * P, D),
    "proxy_nca": lambda: ProxyNCALoss(WORLD * P, D),
}
WORLD, P, K, D = 2, 4, 4, 8


def labels_of(n=120, classes=20):
    return np.arange(n) % classes


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_of_a_step_get_distinct_classes_p_by_k_each(world_size):
    labels = labels_of()
    samplers = [
        DistributedPKSampler(labels, P, K, rank=r, world_size=world_size, seed=5)
        for r in range(world_size)
    ]
    assert len({len(s) for s in samplers}) == 1  # the epoch length is agreed
    assert len(samplers[0]) == len(labels) // (P * K * world_size)
    for step in zip(*samplers, strict=True):
        step_classes = []
        for batch in step:
            classes = labels[batch]
            assert len(batch) == P * K and len(set(classes)) == P
            assert all((classes[i * K : (i + 1) * K] == classes[i * K]).all() for i in range(P))
            step_classes += sorted(set(classes))
        assert len(step_classes) == len(set(step_classes))  # no class on two ranks

    # Seeded: a new sampler repeats the epochs; another seed draws other batches.
    def first_epoch(seed):
        return list(DistributedPKSampler(labels, P, K, rank=1, world_size=world_size, seed=seed))

    assert first_epoch(5) == first_epoch(5) != first_epoch(6)


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="rank=2 must lie in 0..1"):
        DistributedPKSampler(labels_of(), P, K, rank=2, world_size=2)


def test_without_a_process_group_gathering_is_the_identity():
    x, y = torch.randn(6, D), torch.tensor([0, 0, 1, 1, 2, 2])
    gathered, labels = gather_batch(x, y)
    assert gathered is x and labels is y
    loss = TripletLoss()
    assert torch.equal(GatheredLoss(loss)(x, y), loss(x, y))


def global_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(WORLD * P).repeat_interleave(K)  # P classes of K per rank
    return torch.randn(len(labels), D, generator=generator), labels


def make_loss(name):
    torch.manual_seed(7)  # a loss's parameters: the same on every rank and here
    return LOSSES[name]()


def parameter_grads(loss):
    return [p.grad.clone() for p in loss.parameters()]


def loss_input(name, embeddings):
    """What the loss takes: the embeddings, or a two-head model's outputs made from them."""
    if name == "ranking_regularizer":
        return {"logits": 3 * embeddings, "embeddings": embeddings}
    return embeddings


class LinearNet(torch.nn.Module):
    """A network without BatchNorm, whose training on two processes is the single-process
    training (without augmentation): each rank's BatchNorm would see its own half of the batch
    (no SyncBatchNorm on the CPU). ``backbone``: what ``frozen_epochs`` freezes."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.Linear(3 * 16 * 16, 32)
        self.head = torch.nn.Linear(32, 16)

    def forward(self, images):
        features = torch.relu(self.backbone(images.flatten(1)))
        return torch.nn.functional.normalize(self.head(features), dim=1)


# train_run's recipes, the same call on one process and on two (lr, batches, loss).
RECIPES = {
    "batch_hard P x K": dict(
        loss=lambda: TripletLoss(0.2, mining="batch_hard"), classes_per_batch=4,
        samples_per_class=3,
    ),
    # plain SGD: its step follows the gradient's scale (AdamW's hardly does), so a wrong
    # world-size factor in the gathered gradient or DDP's average would show here
    "multi_similarity P x K, SGD": dict(
        loss=MultiSimilarityLoss, classes_per_batch=4, samples_per_class=3, lr=0.5,
        opt_func=torch_optimizer(torch.optim.SGD, momentum=0.9),
    ),
    # random batches, a frozen first epoch (a second fit: DDP wraps again), class weights
    "norm_softmax random batches, frozen epoch": dict(
        loss=lambda: NormSoftmaxLoss(NUM_CLASSES, 16), batch_size=12, frozen_epochs=1,
        epochs=3,
    ),
    "proxy_nca P x K, SGD": dict(
        loss=lambda: ProxyNCALoss(NUM_CLASSES, 16), classes_per_batch=4, samples_per_class=2,
        lr=(0.5, 5.0), opt_func=torch_optimizer(torch.optim.SGD),
    ),
}  # fmt: skip


def recipe_run(name, **kwargs):
    recipe = {"epochs": 2, "lr": 1e-2} | RECIPES[name]
    loss = recipe.pop("loss")
    return train_run(
        LinearNet, loss, stripes(0), val=stripes(1), test=stripes(2), seed=4, augment=False,
        **recipe, **kwargs,
    )  # fmt: skip


def sharded_cases():
    """A network with BatchNorm and its images: 26 images in batches of 4 (7 batches: 4 on
    rank 0, 3 on rank 1), and of 20 (2 batches) and 32 (rank 1 has none)."""
    torch.manual_seed(1)
    return EmbeddingNet("small_cnn", embedding_size=8), stripes(3).images[:26], (4, 20, 32)


def _rank_main(rank: int, port: int, out_dir: str, files: FileList) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        OMP_NUM_THREADS="1",
    )  # fmt: skip  (what torchrun sets)
    torch.set_num_threads(1)
    from utils_cv.similarity.distributed import init_distributed

    init_distributed(cpu=True)  # Accelerate joins the gloo group, as in a launched process
    try:
        embeddings, labels = global_batch()
        rows = slice(rank * P * K, (rank + 1) * P * K)
        results = {}
        for name in LOSSES:
            for scale in (False, True):
                local = embeddings[rows].clone().requires_grad_()
                loss = make_loss(name)
                value = GatheredLoss(loss, scale=scale)(loss_input(name, local), labels[rows])
                value.backward()
                results[name, scale] = (value.detach(), local.grad, parameter_grads(loss))
        order = os.path.join(out_dir, "order.txt")

        def load():
            with open(order, "a") as file:
                file.write(str(rank))
            with open(order) as file:
                return file.read()

        results["rank0_first"] = rank0_first(load)
        model, images, batch_sizes = sharded_cases()
        model.train()(images[rank::2].float() / 255)  # each rank its own BatchNorm statistics
        results["sharded"] = [embed_sharded(model, images, b) for b in batch_sizes]
        results["sharded files"] = [
            embed_sharded(model, files, b, image_size=SIZE, num_workers=0) for b in batch_sizes
        ]
        results["rank0 model"] = {k: v.clone() for k, v in model.state_dict().items()}
        for name in RECIPES:
            run = recipe_run(name)
            results[name] = (
                run.model.state_dict(), run.metrics, run.history, run.best_epoch, run.embeddings
            )  # fmt: skip
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Everything of this module on two gloo processes (one spawn: each imports fastai)."""
    out = tmp_path_factory.mktemp("ranks")
    # sharded_cases' images as files (lossless PNGs at their size: the same pixels)
    files = write_stripes(out / "files", stripes(3).subset(range(26)))
    mp.spawn(_rank_main, args=(free_port(), str(out), files), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gathered_loss_and_gradients_equal_the_single_process_ones(two_ranks, name):
    embeddings, labels = global_batch()
    whole = embeddings.clone().requires_grad_()
    loss = make_loss(name)
    expected = loss(loss_input(name, whole), labels)
    expected.backward()
    expected_parameter_grads = parameter_grads(loss)
    assert bool(expected_parameter_grads) == (name in ("norm_softmax", "proxy_nca"))
    for rank, results in enumerate(two_ranks):
        rows = slice(rank * P * K, (rank + 1) * P * K)
        for scale in (False, True):
            value, grad, grads = results[name, scale]
            torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-7)
            # scale=True (training's default): the gradient of the rank's rows times the
            # world size, which DDP's average over the ranks brings back to the single-process
            # one; the loss's own parameters get theirs whole on every rank, unscaled.
            factor = WORLD if scale else 1
            torch.testing.assert_close(grad, factor * whole.grad[rows], rtol=1e-5, atol=1e-7)
            for got, want in zip(grads, expected_parameter_grads, strict=True):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # ... and a rank's own half alone gives another loss: the gathering matters.
    alone = make_loss(name)(loss_input(name, embeddings[: P * K]), labels[: P * K])
    assert not torch.isclose(alone, expected)


def test_the_first_process_loads_first(two_ranks):
    assert [results["rank0_first"] for results in two_ranks] == ["0", "01"]


def test_sharded_embeddings_are_the_single_process_ones_on_every_rank(two_ranks):
    model, images, batch_sizes = sharded_cases()
    model.load_state_dict(two_ranks[0]["rank0 model"])  # rank 0's BatchNorm statistics
    for i, batch_size in enumerate(batch_sizes):
        expected = embed(model, images, batch_size)
        for results in two_ranks:
            assert torch.equal(results["sharded"][i], expected), batch_size
            # a FileList: each rank decodes its own batches only
            assert torch.equal(results["sharded files"][i], expected), batch_size


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_train_run_on_two_processes_trains_the_single_process_model(two_ranks, name):
    """The same call: each rank gets half of every batch (P / 2 classes, or batch_size / 2
    images), the loss sees the global batch, DDP averages; 4 steps per epoch."""
    run = recipe_run(name, device="cpu")
    start = LinearNet().state_dict()  # moved: the comparison is not of two untrained models
    assert any(not torch.equal(start[k], v) for k, v in run.model.state_dict().items())
    for results in two_ranks:
        weights, metrics, history, best_epoch, embeddings = results[name]
        for key, tensor in run.model.state_dict().items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(embeddings, run.embeddings, rtol=1e-4, atol=1e-5)
        assert best_epoch == run.best_epoch
        # The metrics of embeddings this close: equal unless two neighbours of a query lie
        # within 1e-5 of each other (one query of 48 is 0.02).
        assert metrics.keys() == run.metrics.keys()
        for key, value in run.metrics.items():
            assert metrics[key] == pytest.approx(value, abs=0.05), key
        assert len(history) == len(run.history)
        for got, want in zip(history, run.history, strict=True):
            assert got["val_recall@1"] == pytest.approx(want["val_recall@1"], abs=1e-6)
            assert got["train_loss"] == pytest.approx(want["train_loss"], rel=1e-4)
    # Every rank holds the same model, history and metrics.
    first, second = (results[name] for results in two_ranks)
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])
    assert first[1:4] == second[1:4] and torch.equal(first[4], second[4])


def test_every_loss_is_gathered_once():
    for loss in (TripletLoss(), NormSoftmaxLoss(4, 8), RankingRegularizedLoss(4, TripletLoss())):
        gathered = distributed_loss(loss)
        assert isinstance(gathered, GatheredLoss) and gathered.loss is loss
        assert distributed_loss(gathered) is gathered
    triplet = TripletLoss()
    assert GatheredLoss(triplet).stats is triplet.stats


def test_a_batch_that_does_not_split_names_sizes_that_do():
    assert split_batch(64, 2, "batch_size") == 32
    with pytest.raises(ValueError, match=r"classes_per_batch=10 does not split among 4 .* 8 or 12"):
        split_batch(10, 4, "classes_per_batch")
    with pytest.raises(ValueError, match="such as 3$"):
        split_batch(2, 3, "batch_size")


def test_a_sampler_made_for_one_process_is_refused_on_two():
    sampler = ClassBalancedBatchSampler(labels_of(), P, K)
    with pytest.raises(ValueError, match="made for one process: pass a per-rank sampler"):
        training._per_rank_sampler(sampler, 120, 64, 2, seed=0)
    other = DistributedPKSampler(labels_of(), P, K, rank=0, world_size=3)
    with pytest.raises(ValueError, match="made for 3 process"):
        training._per_rank_sampler(other, 120, 64, 2, seed=0)


def test_sync_batchnorm_keeps_timm_activations_and_frozen_stages():
    torch.manual_seed(0)
    net = EmbeddingNet("efficientnet_lite0", 16, weights="imagenet", frozen_stages=3).eval()
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        before = net(images)
    converted = sync_batchnorm(net)
    assert converted is net  # in place: the caller's model
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, torch.nn.SyncBatchNorm) or "Sync" in type(m).__name__
                         for m in norms)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(net(images), before)  # the activations are still there
    net.train()
    frozen = [m for module in net._frozen for m in module.modules()]
    assert any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in frozen)
    assert not any(m.training for m in frozen)
    assert all(m.training for m in net.linear.modules())


@pytest.mark.parametrize("world_size", [2, 3])
def test_random_batches_split_one_shuffle_among_the_ranks(world_size):
    samplers = [
        DistributedRandomBatches(50, 4, rank=r, world_size=world_size, seed=2)
        for r in range(world_size)
    ]
    assert {len(s) for s in samplers} == {50 // (4 * world_size)}
    for _ in range(2):  # two epochs: a new order each, the same on every rank
        steps = list(zip(*samplers, strict=True))
        seen = [i for step in steps for batch in step for i in batch]
        assert all(len(batch) == 4 for step in steps for batch in step)
        assert len(seen) == len(set(seen)) == len(steps) * 4 * world_size
    # One process with the global batch takes the same images in the same order.
    whole = DistributedRandomBatches(50, 4 * world_size, rank=0, world_size=1, seed=2)
    fresh = [
        DistributedRandomBatches(50, 4, rank=r, world_size=world_size, seed=2)
        for r in range(world_size)
    ]
    assert [sum(step, []) for step in zip(*fresh, strict=True)] == list(whole)
    with pytest.raises(ValueError, match="lower the batch size"):
        DistributedRandomBatches(10, 4, rank=0, world_size=3)
