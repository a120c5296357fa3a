"""TripletLoss against a naive loop, against pytorch-metric-learning, and by hand."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import MeanReducer

from utils_cv.similarity.losses import TripletLoss

MININGS = TripletLoss.MININGS
MARGIN = 0.5
# Four points on a line, two classes: x = 0, 1 (class 0) and 3, 7 (class 1).
LINE = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
LINE_LABELS = torch.tensor([0, 0, 1, 1])


def naive_triplet_loss(embeddings, labels, margin, mining, soft_margin, squared) -> float:
    """The definitions in TripletLoss's docstring, with plain loops over i, j, k."""
    x, y = embeddings.tolist(), labels.tolist()
    n = len(y)

    def dist(i, j):
        total = sum((a - b) ** 2 for a, b in zip(x[i], x[j], strict=True))
        return total if squared else math.sqrt(total)

    def hinge(value):
        return math.log1p(math.exp(value)) if soft_margin else max(0.0, value + margin)

    losses = []
    for i in range(n):
        positives = [j for j in range(n) if j != i and y[j] == y[i]]
        negatives = [k for k in range(n) if y[k] != y[i]]
        if mining == "batch_all":
            for j in positives:
                for k in negatives:
                    losses.append(hinge(dist(i, j) - dist(i, k)))
        elif mining == "semi_hard":
            for j in positives:
                farther = [dist(i, k) for k in negatives if dist(i, k) > dist(i, j)]
                negative = min(farther) if farther else max(dist(i, k) for k in negatives)
                losses.append(hinge(dist(i, j) - negative))
        elif positives:
            hardest_positive = max(dist(i, j) for j in positives)
            hardest_negative = min(dist(i, k) for k in negatives)
            losses.append(hinge(hardest_positive - hardest_negative))
    if mining == "batch_all":
        nonzero = [value for value in losses if value > 0]
        return sum(nonzero) / len(nonzero) if nonzero else 0.0
    return sum(losses) / len(losses)


def random_batch(
    seed: int, dtype=torch.float32, spread: float = 2.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """13 embeddings in 4-D; classes of 4, 3, 3, 2 images and one of a single image."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 4 + [1] * 3 + [2] * 3 + [3] * 2 + [4])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    # Class centres `spread` apart: some triplets are easy, some violate the margin.
    centres = spread * torch.randn(5, 4, generator=generator, dtype=dtype)
    embeddings = centres[labels] + torch.randn(len(labels), 4, generator=generator, dtype=dtype)
    return embeddings, labels


@pytest.mark.parametrize("seed", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("mining", "soft_margin", "squared"),
    list(itertools.product(MININGS, [False, True], [False, True])),
)
def test_triplet_loss_matches_a_naive_loop(mining, soft_margin, squared, dtype, seed):
    embeddings, labels = random_batch(seed, dtype)
    # Squared distances are about twice as large: a larger margin keeps some triplets active.
    margin = 4 * MARGIN if squared else MARGIN
    loss = TripletLoss(margin, mining, soft_margin=soft_margin, squared=squared)
    value = loss(embeddings, labels)
    expected = naive_triplet_loss(embeddings, labels, margin, mining, soft_margin, squared)
    assert value.dtype == dtype
    assert value.item() == pytest.approx(expected, abs=1e-5, rel=1e-5)
    if not soft_margin:
        # Easy and hard triplets both occur: the comparison covers both sides of the hinge.
        assert 0 < loss.stats["active_fraction"] < 1


@pytest.mark.parametrize(("soft_margin", "squared"), [(False, False), (True, False), (False, True)])
def test_semi_hard_falls_back_to_the_farthest_negative_like_a_naive_loop(soft_margin, squared):
    # Without class centres many positives are farther than every negative.
    embeddings, labels = random_batch(0, spread=0.0)
    dist = torch.cdist(embeddings, embeddings)
    same = labels[:, None] == labels[None, :]
    fallbacks = sum(
        1
        for i in range(len(labels))
        for j in range(len(labels))
        if i != j and same[i, j] and not (dist[i][~same[i]] > dist[i, j]).any()
    )
    assert 0 < fallbacks < same.sum() - len(labels)
    margin = 4 * MARGIN if squared else MARGIN
    loss = TripletLoss(margin, "semi_hard", soft_margin=soft_margin, squared=squared)
    expected = naive_triplet_loss(embeddings, labels, margin, "semi_hard", soft_margin, squared)
    assert loss(embeddings, labels).item() == pytest.approx(expected, abs=1e-5, rel=1e-5)
    if soft_margin:
        # The soft margin's active triplets (d_ap > d_an) are exactly the fallbacks here.
        assert loss.stats["active_fraction"] * loss.stats["num_triplets"] == pytest.approx(
            fallbacks
        )


def test_semi_hard_negatives_must_be_strictly_farther_than_the_positive():
    # x = 0, 2 | -2, 3. Anchor 0: positive 2 and negative -2 are both 2 away, so the
    # semi-hard negative is 3 (loss 2 - 3 + 0.5 < 0), not -2 (loss 0.5). Anchor 2: negative
    # -2 at 4, loss 0. Anchors -2 and 3 (positives 5 away) have no farther negative and fall
    # back to the farthest: 5 - 4 + 0.5 and 5 - 3 + 0.5. Mean over the 4 pairs: 1.0.
    embeddings = torch.tensor([[0.0], [2.0], [-2.0], [3.0]])
    value = TripletLoss(MARGIN, "semi_hard")(embeddings, LINE_LABELS)
    assert value.item() == pytest.approx(1.0)
    expected = naive_triplet_loss(embeddings, LINE_LABELS, MARGIN, "semi_hard", False, False)
    assert value.item() == pytest.approx(expected)


def pml_distance(squared: bool) -> LpDistance:
    # pytorch-metric-learning's LpDistance L2-normalizes by default; TripletLoss does not.
    return LpDistance(normalize_embeddings=False, power=2 if squared else 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("squared", [False, True])
def test_batch_all_matches_pytorch_metric_learning(squared, seed):
    embeddings, labels = random_batch(seed)
    margin = 4 * MARGIN if squared else MARGIN
    # TripletMarginLoss with its default AvgNonZeroReducer: the mean over non-zero triplets.
    reference = TripletMarginLoss(margin=margin, distance=pml_distance(squared))
    value = TripletLoss(margin, "batch_all", squared=squared)(embeddings, labels)
    torch.testing.assert_close(value, reference(embeddings, labels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_all_soft_margin_matches_pytorch_metric_learning_with_zero_margin(seed):
    # PML's smooth_loss is softplus(d_ap - d_an + margin); the soft margin of Hermans et al.
    # (ours) has no margin, so the two agree at margin 0.
    embeddings, labels = random_batch(seed)
    reference = TripletMarginLoss(margin=0.0, smooth_loss=True, distance=pml_distance(False))
    value = TripletLoss(mining="batch_all", soft_margin=True)(embeddings, labels)
    torch.testing.assert_close(value, reference(embeddings, labels), atol=1e-5, rtol=1e-5)


def test_batch_all_matches_pytorch_metric_learning_defaults_on_unit_vectors():
    embeddings, labels = random_batch(0)
    embeddings = F.normalize(embeddings, dim=1)
    reference = TripletMarginLoss(margin=0.2)  # its default distance normalizes
    value = TripletLoss(0.2, "batch_all")(embeddings, labels)
    torch.testing.assert_close(value, reference(embeddings, labels), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("squared", [False, True])
def test_batch_hard_matches_pytorch_metric_learning(squared, seed):
    embeddings, labels = random_batch(seed)
    margin = 4 * MARGIN if squared else MARGIN
    distance = pml_distance(squared)
    triplets = BatchHardMiner(distance=distance)(embeddings, labels)
    # PML's miner keeps the anchors that have a positive (and a negative), one triplet each,
    # as ours does. Its default reducer then averages over the non-zero triplets only; ours
    # (Hermans et al.) averages over all anchors, so compare with PML's MeanReducer.
    reference = TripletMarginLoss(margin=margin, distance=distance, reducer=MeanReducer())
    loss = TripletLoss(margin, "batch_hard", squared=squared)
    value = loss(embeddings, labels)
    torch.testing.assert_close(value, reference(embeddings, labels, triplets), atol=1e-5, rtol=1e-5)
    assert loss.stats["num_triplets"] == len(triplets[0])
    # With PML's default reducer the sum is the same, divided by the active triplets instead.
    nonzero = TripletMarginLoss(margin=margin, distance=distance)(embeddings, labels, triplets)
    active = loss.stats["active_fraction"] * loss.stats["num_triplets"]
    assert nonzero.item() == pytest.approx(value.item() * loss.stats["num_triplets"] / active)


@pytest.mark.parametrize(
    ("mining", "loss", "active", "count"),
    [("batch_all", 2.0, 2 / 8, 8), ("semi_hard", 0.375, 1 / 4, 4), ("batch_hard", 0.625, 1 / 4, 4)],
)
def test_stats_on_four_points_on_a_line(mining, loss, active, count):
    # Pairs: positives 0-1 (1) and 3-7 (4); negatives 0-3 (3), 0-7 (7), 1-3 (2), 1-7 (6).
    # batch_all, margin 0.5: of the 8 triplets only anchor 3 with positive 7 violates it,
    # against negatives 0 (4 - 3 + 0.5) and 1 (4 - 2 + 0.5): mean (1.5 + 2.5) / 2.
    # semi_hard: anchor 3 has no negative farther than 4, falls back to the farthest (0, at
    # 3): 1.5, over 4 pairs. batch_hard: anchor 3, hardest negative 1 at 2: 2.5, over 4.
    triplet = TripletLoss(MARGIN, mining)
    assert triplet(LINE, LINE_LABELS).item() == pytest.approx(loss)
    assert triplet.stats == pytest.approx(
        {
            "active_fraction": active,
            "mean_pos_distance": (1 + 4) / 2,
            "mean_neg_distance": (3 + 7 + 2 + 6) / 4,
            "num_triplets": count,
        }
    )
    assert all(type(value) is float for value in triplet.stats.values())


def test_stats_of_squared_distances_and_soft_margin():
    triplet = TripletLoss(mining="batch_hard", soft_margin=True, squared=True)
    value = triplet(LINE, LINE_LABELS)
    # Squared: anchors 0, 1, 3, 7 have hardest positive 1, 1, 16, 16, closest negative 9, 4, 4, 36.
    diffs = torch.tensor([1 - 9, 1 - 4, 16 - 4, 16 - 36.0])
    assert value.item() == pytest.approx(F.softplus(diffs).mean().item())
    assert triplet.stats == pytest.approx(
        {
            "active_fraction": 1 / 4,  # soft margin: the share with d_ap > d_an
            "mean_pos_distance": (1 + 16) / 2,
            "mean_neg_distance": (9 + 49 + 4 + 36) / 4,
            "num_triplets": 4,
        }
    )


@pytest.mark.parametrize("mining", MININGS)
def test_a_satisfied_batch_gives_a_true_zero_with_gradients(mining):
    # Two tight clusters far apart: every triplet meets the margin.
    embeddings = torch.tensor(
        [[0.0, 0], [0.1, 0], [10, 0], [10, 0.1], [0, 0.1]], requires_grad=True
    )
    labels = torch.tensor([0, 0, 1, 1, 0])
    triplet = TripletLoss(0.2, mining)
    value = triplet(embeddings, labels)
    assert value.item() == 0 and value.requires_grad
    assert triplet.stats["active_fraction"] == 0
    value.backward()
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


@pytest.mark.parametrize(
    ("mining", "soft_margin", "squared"),
    list(itertools.product(MININGS, [False, True], [False, True])),
)
def test_gradients_are_finite_when_all_embeddings_coincide(mining, soft_margin, squared):
    # 0.5 is exact in binary, so every squared distance comes out exactly 0, where a plain
    # sqrt has an infinite slope.
    embeddings = torch.full((8, 3), 0.5, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    triplet = TripletLoss(0.2, mining, soft_margin=soft_margin, squared=squared)
    value = triplet(embeddings, labels)
    # Collapse: all distances 0, so the loss is the margin (or softplus(0) = log 2).
    assert value.item() == pytest.approx(math.log(2) if soft_margin else 0.2)
    assert triplet.stats["mean_pos_distance"] == pytest.approx(0, abs=1e-5)
    value.backward()
    assert torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("mining", MININGS)
def test_gradients_are_finite_and_right_near_coincidence(mining):
    # Two points 1e-4 apart: the sqrt's slope is 1 / (2 * 1e-4), still exact here.
    embeddings = torch.tensor(
        [[0.0, 0.0], [1e-4, 0.0], [0.0, 1.0], [0.0, 1.0 + 1e-4]], dtype=torch.float64
    ).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1])
    # A margin of 2 makes every triplet active, so the gradient goes through the sqrt.
    TripletLoss(2.0, mining)(embeddings, labels).backward()
    expected = embeddings.detach().clone().requires_grad_()
    naive = naive_gradient_loss(expected, labels, 2.0, mining)
    naive.backward()
    torch.testing.assert_close(embeddings.grad, expected.grad)


def naive_gradient_loss(embeddings, labels, margin, mining):
    """The loss on this 2 x 2 batch with torch's own per-pair norms, for autograd."""
    dist = torch.stack(
        [torch.stack([(embeddings[i] - embeddings[j]).norm() for j in range(4)]) for i in range(4)]
    )
    same = labels[:, None] == labels[None, :]
    positives = [(i, j) for i in range(4) for j in range(4) if i != j and same[i, j]]
    if mining == "batch_all":
        losses = [
            F.relu(dist[i, j] - dist[i, k] + margin)
            for i, j in positives
            for k in range(4)
            if not same[i, k]
        ]
        losses = torch.stack(losses)
        return losses.sum() / (losses > 0).sum().clamp(min=1)
    # One positive per anchor here, so semi_hard and batch_hard pick the same positive.
    losses = []
    for i, j in positives:
        negatives = dist[i][~same[i]]
        farther = negatives[negatives > dist[i, j]]
        if mining == "semi_hard" and len(farther):
            negative = farther.min()
        elif mining == "semi_hard":
            negative = negatives.max()
        else:
            negative = negatives.min()
        losses.append(F.relu(dist[i, j] - negative + margin))
    return torch.stack(losses).mean()


def test_mixed_precision_does_not_round_the_distances():
    embeddings, labels = random_batch(0)
    embeddings = 100 + 0.01 * embeddings  # crowded far from the origin: cancellation-prone
    expected = naive_triplet_loss(embeddings.double(), labels, 0.01, "batch_hard", False, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = TripletLoss(0.01, "batch_hard")(embeddings, labels)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected, rel=1e-3)


def test_a_batch_without_positive_pairs_is_an_error():
    with pytest.raises(
        ValueError, match="no positive pair.*ClassBalancedBatchSampler.*samples_per_class >= 2"
    ):
        TripletLoss()(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))


def test_a_batch_of_one_class_is_an_error():
    with pytest.raises(ValueError, match="same label.*no negative"):
        TripletLoss()(torch.randn(4, 3), torch.tensor([2, 2, 2, 2]))


def test_unknown_mining_is_an_error():
    with pytest.raises(ValueError, match="mining='hard'.*batch_hard"):
        TripletLoss(mining="hard")


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard", "batch_hard"])
@pytest.mark.parametrize("norm", [1e-20, 1e-6, 1e6, 1e20])
def test_loss_and_gradients_stay_finite_for_tiny_and_huge_embeddings(mining, norm):
    """The squared norms of embeddings of norm 1e20 overflow float32 (they once gave NaN); the
    distances are computed at a power-of-two scale instead, which changes no value."""
    generator = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize(torch.randn(16, 8, generator=generator), dim=1)
    labels = torch.arange(4).repeat_interleave(4)
    for squared in (False, True):
        if squared and norm == 1e20:  # squared distances of 1e40 do not exist in float32
            with pytest.raises(ValueError, match="overflows float32: squared distances reach inf"):
                TripletLoss(0.2, mining=mining, squared=True)(unit * norm, labels)
            continue
        embeddings = (unit * norm).requires_grad_()
        loss = TripletLoss(0.2, mining=mining, squared=squared)(embeddings, labels)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(embeddings.grad).all()
        # The distances scale with the embeddings (off the diagonal: a point's distance to
        # itself is the clamp's floor, which scales by a power of two, and no mining uses it).
        off = ~torch.eye(16, dtype=torch.bool)
        reference = TripletLoss(squared=squared).distances(unit)[off]
        scaled = TripletLoss(squared=squared).distances(unit * norm)[off]
        power = 2 if squared else 1
        torch.testing.assert_close(scaled / norm**power, reference, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mining", MININGS)
def test_squared_distances_past_the_float32_limit_are_an_error_not_an_inf_gradient(mining):
    """Only negatives are 4e38 apart (inf): every triplet with them is satisfied and the loss
    (1e31 for batch-all) stayed finite, but its gradient passes through the square of the
    distances' power-of-two scale and was inf. Past 2.7e36 the loss refuses the batch."""
    x = torch.tensor([[0.0], [-1e19], [1e19], [1e19]])
    loss = TripletLoss(0.2, mining=mining, squared=True)
    with pytest.raises(ValueError, match=r"overflows float32.*past 2.66e\+36.*squared=False"):
        loss(x, LINE_LABELS)
    # Unsquared, the same batch is fine.
    embeddings = x.clone().requires_grad_()
    TripletLoss(0.2, mining=mining)(embeddings, LINE_LABELS).backward()
    assert torch.isfinite(embeddings.grad).all()


@pytest.mark.parametrize("mining", MININGS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_embedding_gives_a_nan_loss(mining, bad):
    embeddings, labels = random_batch(0)
    embeddings[3, 0] = bad
    assert math.isnan(TripletLoss(mining=mining)(embeddings, labels).item())


@pytest.mark.parametrize("mining", ["batch_all", "semi_hard"])
def test_exact_ties_break_the_same_way_in_any_batch_order(mining):
    """d(0, 1) = d(0, -1) = 1 exactly. Distances computed around column means summed in
    batch order once changed their rounding when two rows swapped, broke such ties the other
    way, and changed these losses by 5 and 10 %."""
    x = torch.tensor([0.0, 1, -1, 0.1, -1, -1, -1, -1, -1, -0.1, -1, -0.1])[:, None]
    labels = torch.arange(3).repeat_interleave(4)
    order = [*range(10), 11, 10]
    loss = TripletLoss(0.2, mining=mining)
    assert loss(x[order], labels[order]).item() == loss(x, labels).item()
    assert torch.equal(loss.distances(x[order]), loss.distances(x)[order][:, order])


@pytest.mark.parametrize("squared", [False, True])
def test_distances_follow_the_batch_order_to_the_last_bit_and_equal_points_are_0_apart(squared):
    """From |x|^2 + |y|^2 - 2 x.y, a pair's rounding depended on its place in the matrix
    product (MKL on an AMD EPYC), and equal embeddings lay about 1e-4 apart."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(40, 64, generator=generator)
    x[10:20] = x[5]
    order = torch.randperm(40, generator=generator)
    loss = TripletLoss(squared=squared)
    dist = loss.distances(x)
    assert torch.equal(loss.distances(x[order]), dist[order][:, order])
    assert torch.equal(dist, dist.T)
    centred = x - x.sort(dim=0).values.mean(dim=0)  # as distances() centres, then scales
    floor = 0.0 if squared else 1e-6 * 2.0 ** math.floor(math.log2(centred.abs().max()))
    assert (dist[5, 10:20] == floor).all() and (dist[10:20, 10:20] == floor).all()
    naive = torch.cdist(x.double(), x.double()) ** (2 if squared else 1)
    apart = naive > 1e-3  # every pair of distinct points
    torch.testing.assert_close(dist.double()[apart], naive[apart], rtol=1e-5, atol=0)


@pytest.mark.parametrize("mining", ["batch_all", "batch_hard"])
def test_gradients_stay_accurate_when_embeddings_crowd_together(mining):
    """Unit vectors within 1e-6 of one point (a collapse): the gradient flows through
    |x|^2 + |y|^2 - 2 x.y, which without centring lost two digits to cancellation here."""
    generator = torch.Generator().manual_seed(0)
    centre = F.normalize(torch.randn(1, 128, generator=generator), dim=1)
    x = F.normalize(centre + 1e-6 * torch.randn(32, 128, generator=generator), dim=1)
    labels = torch.arange(8).repeat_interleave(4)
    ours = x.clone().requires_grad_()
    TripletLoss(2.0, mining)(ours, labels).backward()  # margin 2: every triplet active
    reference = x.double().requires_grad_()
    dist = torch.cdist(reference, reference).clamp(min=1e-6)
    TripletLoss(2.0, mining).from_distances(
        dist,
        (labels[:, None] == labels) & ~torch.eye(32, dtype=torch.bool),
        labels[:, None] != labels,
    ).backward()
    error = (ours.grad.double() - reference.grad).norm() / reference.grad.norm()
    assert error < 1e-4, error
