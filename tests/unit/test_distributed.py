"""The distributed pieces: the per-rank samplers (simulated ranks); gathered losses, sharded
embeddings and whole train_run calls on two real CPU processes with the gloo backend, each
equal to the single-process result. tests/distributed launches the command line with torchrun."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils_cv.similarity.distributed import (
    DistributedPKSampler,
    DistributedRandomBatches,
    GatheredLoss,
    distributed_loss,
    embed_sharded,
    gather_batch,
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

from .test_training import NUM_CLASSES, stripes

LOSSES = {
    "batch_all": lambda: TripletLoss(0.2, mining="batch_all"),
    "semi_hard": lambda: TripletLoss(0.2, mining="semi_hard"),
    "batch_hard": lambda: TripletLoss(0.2, mining="batch_hard"),
    "multi_similarity": MultiSimilarityLoss,
    "batch_hard+EE": lambda: EmbeddingExpansion(TripletLoss(0.2, mining="batch_hard")),
    # a two-head model's dict of outputs: cross-entropy and triplet on the global batch
    "ranking_regularizer": lambda: RankingRegularizedLoss(WORLD * P, TripletLoss(0.2)),
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loss_input(name, embeddings):
    """What the loss takes: the embeddings, or a two-head model's outputs made from them."""
    if name == "ranking_regularizer":
        return {"logits": 3 * embeddings, "embeddings": embeddings}
    return embeddings


class LinearNet(torch.nn.Module):
    """A network without BatchNorm, whose training on two processes is the single-process
    training: each rank's BatchNorm would see its own half of the batch (no SyncBatchNorm on
    the CPU)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3 * 16 * 16, 16)

    def forward(self, images):
        return torch.nn.functional.normalize(self.linear(images.flatten(1)), dim=1)


# train_run's recipes, the same call on one process and on two (lr, batches, loss).
RECIPES = {
    "batch_hard P x K": dict(
        loss=lambda: TripletLoss(0.2, mining="batch_hard"), classes_per_batch=4,
        samples_per_class=3,
    ),
    "norm_softmax random batches": dict(
        loss=lambda: NormSoftmaxLoss(NUM_CLASSES, 16), batch_size=12
    ),
    "proxy_nca P x K": dict(
        loss=lambda: ProxyNCALoss(NUM_CLASSES, 16), classes_per_batch=4, samples_per_class=2
    ),
}  # fmt: skip


def recipe_run(name, **kwargs):
    recipe = dict(RECIPES[name])
    loss = recipe.pop("loss")
    return train_run(
        LinearNet, loss, stripes(0), val=stripes(1), test=stripes(2), epochs=2, lr=1e-2,
        seed=4, augment=False, **recipe, **kwargs,
    )  # fmt: skip


def sharded_cases():
    """A network with BatchNorm and its images: 26 images in batches of 4 (7 batches: 4 on
    rank 0, 3 on rank 1), and of 20 (2 batches) and 32 (rank 1 has none)."""
    torch.manual_seed(1)
    return EmbeddingNet("small_cnn", embedding_size=8), stripes(3).images[:26], (4, 20, 32)


def _rank_main(rank: int, port: int, out_dir: str) -> None:
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

    init_distributed()  # Accelerate joins the gloo group, as in a launched process
    try:
        embeddings, labels = global_batch()
        rows = slice(rank * P * K, (rank + 1) * P * K)
        results = {}
        for name, make in LOSSES.items():
            for scale in (False, True):
                local = embeddings[rows].clone().requires_grad_()
                value = GatheredLoss(make(), scale=scale)(loss_input(name, local), labels[rows])
                value.backward()
                results[name, scale] = (value.detach(), local.grad)
        model, images, batch_sizes = sharded_cases()
        model.train()(images[rank::2].float() / 255)  # each rank its own BatchNorm statistics
        results["sharded"] = [embed_sharded(model, images, b) for b in batch_sizes]
        results["rank0 model"] = {k: v.clone() for k, v in model.state_dict().items()}
        for name in RECIPES:
            run = recipe_run(name)
            results[name] = (run.model.state_dict(), run.metrics, run.history, run.best_epoch)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Everything of this module on two gloo processes (one spawn: each imports fastai)."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gathered_loss_and_gradients_equal_the_single_process_ones(two_ranks, name):
    embeddings, labels = global_batch()
    whole = embeddings.clone().requires_grad_()
    expected = LOSSES[name]()(loss_input(name, whole), labels)
    expected.backward()
    for rank, results in enumerate(two_ranks):
        rows = slice(rank * P * K, (rank + 1) * P * K)
        value, grad = results[name, False]
        torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, whole.grad[rows], rtol=1e-5, atol=1e-7)
        # scale=True (training's default): the same value, the gradient times the world size,
        # which DDP's average over the ranks brings back to the single-process one.
        value, grad = results[name, True]
        torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, WORLD * whole.grad[rows], rtol=1e-5, atol=1e-7)
    # ... and a rank's own half alone gives another loss: the gathering matters.
    alone = LOSSES[name]()(loss_input(name, embeddings[: P * K]), labels[: P * K])
    assert not torch.isclose(alone, expected)


def test_sharded_embeddings_are_the_single_process_ones_on_every_rank(two_ranks):
    model, images, batch_sizes = sharded_cases()
    model.load_state_dict(two_ranks[0]["rank0 model"])  # rank 0's BatchNorm statistics
    for i, batch_size in enumerate(batch_sizes):
        expected = embed(model, images, batch_size)
        for results in two_ranks:
            assert torch.equal(results["sharded"][i], expected), batch_size


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_train_run_on_two_processes_trains_the_single_process_model(two_ranks, name):
    """The same call: each rank gets half of every batch (P / 2 classes, or batch_size / 2
    images), the loss sees the global batch, DDP averages; 2 epochs of 4 steps each."""
    run = recipe_run(name, device="cpu")
    for results in two_ranks:
        weights, metrics, history, best_epoch = results[name]
        for key, tensor in run.model.state_dict().items():
            torch.testing.assert_close(weights[key], tensor, rtol=1e-4, atol=1e-5)
        assert best_epoch == run.best_epoch
        assert metrics.keys() == run.metrics.keys()
        for key, value in run.metrics.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), key
        assert [e["epoch"] for e in history] == [e["epoch"] for e in run.history]
    # Every rank holds the same model and the same metrics.
    assert two_ranks[0][name][1] == two_ranks[1][name][1]


def test_losses_with_parameters_are_not_gathered():
    triplet = TripletLoss()
    assert isinstance(distributed_loss(triplet), GatheredLoss)
    ranking = RankingRegularizedLoss(4, TripletLoss())
    assert distributed_loss(ranking).loss is ranking
    for loss in (NormSoftmaxLoss(4, 8), ProxyNCALoss(4, 8)):
        assert distributed_loss(loss) is loss
    assert GatheredLoss(triplet).stats is triplet.stats


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
