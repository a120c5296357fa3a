"""The distributed pieces: the per-rank P x K sampler (simulated ranks) and gathered losses
on two real CPU processes with the gloo backend."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from utils_cv.similarity.distributed import DistributedPKSampler, GatheredLoss, gather_batch
from utils_cv.similarity.losses import EmbeddingExpansion, MultiSimilarityLoss, TripletLoss

LOSSES = {
    "batch_all": lambda: TripletLoss(0.2, mining="batch_all"),
    "semi_hard": lambda: TripletLoss(0.2, mining="semi_hard"),
    "batch_hard": lambda: TripletLoss(0.2, mining="batch_hard"),
    "multi_similarity": MultiSimilarityLoss,
    "batch_hard+EE": lambda: EmbeddingExpansion(TripletLoss(0.2, mining="batch_hard")),
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


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        embeddings, labels = global_batch()
        rows = slice(rank * P * K, (rank + 1) * P * K)
        results = {}
        for name, make in LOSSES.items():
            local = embeddings[rows].clone().requires_grad_()
            value = GatheredLoss(make(), scale=False)(local, labels[rows])
            value.backward()
            results[name] = (value.detach(), local.grad)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each loss on two gloo processes, each holding half of one global batch."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gathered_loss_and_gradients_equal_the_single_process_ones(two_ranks, name):
    embeddings, labels = global_batch()
    whole = embeddings.clone().requires_grad_()
    expected = LOSSES[name]()(whole, labels)
    expected.backward()
    for rank, results in enumerate(two_ranks):
        value, grad = results[name]
        rows = slice(rank * P * K, (rank + 1) * P * K)
        torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad, whole.grad[rows], rtol=1e-5, atol=1e-7)
    # ... and a rank's own half alone gives another loss: the gathering matters.
    alone = LOSSES[name]()(embeddings[: P * K], labels[: P * K])
    assert not torch.isclose(alone, expected)
