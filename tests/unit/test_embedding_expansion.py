"""EmbeddingExpansion: pairs, synthetic points, hard negative pair mining, by hand and by loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import MeanReducer

from utils_cv.similarity.losses import EmbeddingExpansion, MultiSimilarityLoss, TripletLoss

MARGIN = 0.3


def batch(seed: int, per_class=(4, 2, 4, 2), dim: int = 5, dtype=torch.float32, unit=True):
    """Classes of the given (even) sizes, shuffled, points around spread-out centres."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((k,), c) for c, k in enumerate(per_class)])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    centres = 1.5 * torch.randn(len(per_class), dim, generator=generator, dtype=dtype)
    x = centres[labels] + torch.randn(len(labels), dim, generator=generator, dtype=dtype)
    return (F.normalize(x, dim=1) if unit else x), labels


def naive_pairs(labels: list[int]) -> list[tuple[int, int]]:
    """Each class's indices in batch order, taken two at a time."""
    pairs = []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        pairs += [(members[k], members[k + 1]) for k in range(0, len(members), 2)]
    return pairs


def naive_ee_batch_hard(x, labels, n, normalize, margin, squared=False):
    """Batch-hard triplet + EE written from the rules (METHODS.md), with plain loops.

    Returns the loss (mean over anchors) and, per anchor, whether its hardest negative is
    a synthetic point.
    """
    x, y = x.tolist(), labels.tolist()

    def dist(a, b):
        total = sum((u - v) ** 2 for u, v in zip(a, b, strict=True))
        return total if squared else math.sqrt(total)

    def unit(v):
        norm = math.sqrt(sum(u * u for u in v))
        return [u / norm for u in v] if normalize else v

    points = [(p, c, None) for p, c in zip(x, y, strict=True)]  # (vector, label, pair)
    pair_of = {}
    for number, (i, j) in enumerate(naive_pairs(y)):
        pair_of[i] = pair_of[j] = number
        for k in range(1, n + 1):
            s = [(k * b + (n + 1 - k) * a) / (n + 1) for a, b in zip(x[i], x[j], strict=True)]
            points.append((unit(s), y[i], number))
    losses, synthetic_chosen = [], []
    for i in range(len(y)):
        positives = [dist(x[i], x[p]) for p in range(len(y)) if p != i and y[p] == y[i]]
        group = [x[i]] + [v for v, _, pair in points[len(y) :] if pair == pair_of.get(i)]
        if n == 0:
            group = [x[i]]
        best, best_is_synthetic = math.inf, False
        for m, (v, c, _) in enumerate(points):
            if c == y[i]:
                continue
            d = min(dist(g, v) for g in group)
            if d < best:
                best, best_is_synthetic = d, m >= len(y)
        losses.append(max(0.0, max(positives) - best + margin))
        synthetic_chosen.append(best_is_synthetic)
    return sum(losses) / len(losses), synthetic_chosen


def test_pairs_are_neighbours_in_order_of_appearance_within_each_class():
    labels = torch.tensor([3, 1, 3, 1, 1, 3, 3, 1])
    first, second = EmbeddingExpansion.pairs(labels)
    assert list(zip(first.tolist(), second.tolist(), strict=True)) == [
        (1, 3),
        (4, 7),
        (0, 2),
        (5, 6),
    ]
    assert naive_pairs(labels.tolist()) == [(1, 3), (4, 7), (0, 2), (5, 6)]


def test_an_odd_count_names_the_class_and_the_fix():
    loss = EmbeddingExpansion(TripletLoss())
    x, _ = batch(0)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3])
    with pytest.raises(ValueError, match=r"class 1 has 3 images.*samples_per_class"):
        loss(x, labels)
    # n_points=0 is the base loss: no pairs, so any count is fine.
    EmbeddingExpansion(TripletLoss(), n_points=0)(x, labels)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_bad_n_points_is_refused(bad):
    with pytest.raises(ValueError, match="n_points"):
        EmbeddingExpansion(TripletLoss(), n_points=bad)


def test_a_loss_without_a_matrix_entry_is_refused():
    with pytest.raises(TypeError, match="from_distances"):
        EmbeddingExpansion(torch.nn.CrossEntropyLoss())


@pytest.mark.parametrize("normalize", [True, False])
def test_synthetic_points_by_hand(normalize):
    # Pair (0, 1): x_0 = (1, 0), x_1 = (0, 1); n = 2 divides the segment in thirds.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    ee = EmbeddingExpansion(TripletLoss(), n_points=2, normalize=normalize)
    mined = ee.mine(x, labels)
    expected = torch.tensor([[2 / 3, 1 / 3], [1 / 3, 2 / 3], [-2 / 3, -1 / 3], [-1 / 3, -2 / 3]])
    if normalize:
        expected = expected / math.sqrt(5 / 9)  # |(2, 1) / 3| = sqrt(5) / 3
    torch.testing.assert_close(mined["points"][4:], expected)
    assert mined["labels"].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    assert mined["group"].tolist() == [[0, 4, 5], [1, 4, 5], [2, 6, 7], [3, 6, 7]]
    # Positives: the other original of the class only; negatives: every point of class 1.
    assert mined["pos_mask"][0].tolist() == [False, True] + [False] * 6
    assert mined["neg_mask"][0].tolist() == [False, False, True, True, False, False, True, True]


def test_hardest_negative_by_hand_on_the_circle():
    # On the unit circle: class 0 at 0 and 55 degrees, class 1 at 100 and 320 (= -40). The
    # class-1 segment cuts across class 0's arc: its synthetic points project to 72.48 and
    # -12.48 degrees (points 6 and 7), class 0's to 17.66 and 37.34 (points 4 and 5).
    angles = torch.tensor([0.0, 55.0, 100.0, 320.0]) * math.pi / 180
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    ee = EmbeddingExpansion(TripletLoss(MARGIN), n_points=2)
    mined = ee.mine(x, labels)
    degrees = torch.atan2(mined["points"][:, 1], mined["points"][:, 0]) * 180 / math.pi
    expected_degrees = torch.tensor([17.6559, 37.3441, 72.4843, -12.4842])
    torch.testing.assert_close(degrees[4:], expected_degrees, atol=1e-3, rtol=0)
    # Anchor 0's closest negative is synthetic point 7 (12.48 degrees away: chord 0.2175),
    # not the nearest original (-40 degrees: 0.6840); anchor 1's is point 6 (17.48 degrees
    # away: 0.3040, against 0.7654 to 100 degrees). For class 1's anchors, their group's
    # closest approach to an original of class 0 is to x_0 (12.48 degrees, from point 7),
    # ahead of x_1 (17.48 degrees, from point 6).
    assert mined["hardest_negative"].tolist() == [7, 6, 0, 0]
    chord = 2 * math.sin(math.radians(12.4842) / 2)
    assert mined["matrix"][0, 7].item() == pytest.approx(chord, abs=1e-4)
    assert mined["matrix"][2, 0].item() == pytest.approx(chord, abs=1e-4)
    expected, chosen = naive_ee_batch_hard(x, labels, 2, True, MARGIN)
    assert chosen == [True, True, False, False]
    torch.testing.assert_close(ee(x, labels).item(), expected)
    assert ee.stats["selection_ratio"] == 0.5
    assert ee.stats["hardest_negative_distance"] < ee.stats["hardest_original_negative_distance"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("squared", [False, True])
def test_batch_hard_ee_matches_a_naive_loop(seed, n, normalize, squared):
    x, labels = batch(seed, dtype=torch.float64, unit=seed % 2 == 0)
    ee = EmbeddingExpansion(TripletLoss(MARGIN, "batch_hard", squared=squared), n, normalize)
    value = ee(x, labels)
    expected, chosen = naive_ee_batch_hard(x, labels, n, normalize, MARGIN, squared)
    assert value.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert ee.stats["selection_ratio"] == pytest.approx(sum(chosen) / len(chosen))
    assert ee.stats["num_synthetic"] == len(labels) // 2 * n


def test_the_synthetic_points_make_the_mining_harder():
    """Over several batches synthetic points are picked, and the group's closest negative is
    never farther than the closest original negative (the group contains the anchor)."""
    picked = 0.0
    for seed in range(6):
        x, labels = batch(seed, per_class=(4, 4, 4, 4))
        ee = EmbeddingExpansion(TripletLoss(MARGIN), n_points=4)
        ee(x, labels)
        assert (
            ee.stats["hardest_negative_distance"]
            <= ee.stats["hardest_original_negative_distance"] + 1e-6
        )
        picked += ee.stats["selection_ratio"]
    assert picked > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("squared", [False, True])
def test_zero_points_is_exactly_batch_hard_triplet_and_pml(seed, squared):
    x, labels = batch(seed, per_class=(3, 2, 5, 1, 4), unit=False)  # odd counts allowed
    base = TripletLoss(MARGIN, "batch_hard", squared=squared)
    value = EmbeddingExpansion(TripletLoss(MARGIN, "batch_hard", squared=squared), 0)(x, labels)
    assert torch.equal(value, base(x, labels))
    distance = LpDistance(normalize_embeddings=False, power=2 if squared else 1)
    triplets = BatchHardMiner(distance=distance)(x, labels)
    reference = TripletMarginLoss(margin=MARGIN, distance=distance, reducer=MeanReducer())
    torch.testing.assert_close(value, reference(x, labels, triplets), atol=1e-5, rtol=1e-5)


def test_gradients_reach_both_endpoints_through_the_synthetic_points():
    x, labels = batch(0, dtype=torch.float64, unit=False)
    x.requires_grad_(True)
    ee = EmbeddingExpansion(TripletLoss(MARGIN), n_points=2)
    assert torch.autograd.gradcheck(lambda v: ee(v, labels), (x,))
    # A synthetic point as the hardest negative: its gradient reaches both of its endpoints.
    x0 = x.detach().clone().requires_grad_(True)
    mined = ee.mine(x0, labels)
    anchor = int((mined["hardest_negative"] >= len(labels)).nonzero()[0])
    synthetic = int(mined["hardest_negative"][anchor])
    first, second = EmbeddingExpansion.pairs(labels)
    pair = (synthetic - len(labels)) // 2
    mined["matrix"][anchor, synthetic].backward()
    assert x0.grad[first[pair]].abs().sum() > 0 and x0.grad[second[pair]].abs().sum() > 0


def test_semi_hard_and_batch_all_bases_run_on_the_expanded_matrix():
    x, labels = batch(1)
    for mining in ("semi_hard", "batch_all"):
        ee = EmbeddingExpansion(TripletLoss(MARGIN, mining), n_points=2)
        assert torch.isfinite(ee(x, labels))
        assert ee.stats["num_triplets"] > 0


@pytest.mark.parametrize("base", [TripletLoss, MultiSimilarityLoss])
def test_a_batch_without_positives_or_negatives_is_refused(base):
    x, _ = batch(0)
    with pytest.raises(ValueError, match="no positive pair"):
        EmbeddingExpansion(base(), 0)(x, torch.arange(len(x)))
    with pytest.raises(ValueError, match="no negative"):
        EmbeddingExpansion(base(), 2)(x, torch.zeros(len(x), dtype=torch.long))


@pytest.mark.parametrize("n", [0, 2])
def test_multi_similarity_ee_matches_its_rules(n):
    """n = 0: exactly MultiSimilarityLoss. n = 2: MS on the matrix whose negatives are the
    largest similarity over the anchor's group, built here from the rules with loops."""
    x, labels = batch(5, dtype=torch.float64)
    ee = EmbeddingExpansion(MultiSimilarityLoss(), n)
    value = ee(x, labels)
    if n == 0:
        assert torch.equal(value, MultiSimilarityLoss()(x, labels))
        return
    y = labels.tolist()
    points, point_labels, groups = list(x), list(y), {i: [x[i]] for i in range(len(y))}
    for i, j in naive_pairs(y):
        synthetic = [
            F.normalize((k * x[j] + (n + 1 - k) * x[i]) / (n + 1), dim=0) for k in range(1, n + 1)
        ]
        points += synthetic
        point_labels += [y[i]] * n
        groups[i], groups[j] = [x[i], *synthetic], [x[j], *synthetic]
    rows = []
    for i in range(len(y)):
        row = []
        for m, point in enumerate(points):
            if point_labels[m] == y[i]:
                row.append(float(x[i] @ point))
            else:
                row.append(max(float(g @ point) for g in groups[i]))
        rows.append(row)
    similarities = torch.tensor(rows, dtype=torch.float64)
    column = torch.arange(len(points))
    same = torch.tensor(y)[:, None] == torch.tensor(point_labels)[None, :]
    pos_mask = same & (column < len(y)) & (column != torch.arange(len(y))[:, None])
    reference = MultiSimilarityLoss().from_similarities(similarities, pos_mask, ~same)
    torch.testing.assert_close(value, reference)
