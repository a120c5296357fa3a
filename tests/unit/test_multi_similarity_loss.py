"""MultiSimilarityLoss against pytorch-metric-learning, against a naive loop, and by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning.distances import DotProductSimilarity

from utils_cv.similarity.losses import MultiSimilarityLoss

ALPHA, BETA, BASE, EPSILON = 2.0, 50.0, 0.5, 0.1
# Three points on a line (1-D embeddings, so S_ij = x_i * x_j): 1 and 0.6 of class 0, 0.7
# of class 1. See test_a_hand_computed_example.
LINE = torch.tensor([[1.0], [0.6], [0.7]], dtype=torch.float64)
LINE_LABELS = torch.tensor([0, 0, 1])


def naive_loss(similarities, pos_mask, neg_mask, alpha, beta, base, epsilon) -> float:
    """The definitions in MultiSimilarityLoss's docstring, with plain loops over i, p, n."""
    s, pos, neg = similarities.tolist(), pos_mask.tolist(), neg_mask.tolist()
    total = 0.0
    for i, row in enumerate(s):
        positives = [j for j in range(len(row)) if pos[i][j]]
        negatives = [j for j in range(len(row)) if neg[i][j]]
        if epsilon is not None:
            least_similar_pos = min((row[p] for p in positives), default=math.inf)
            most_similar_neg = max((row[n] for n in negatives), default=-math.inf)
            positives = [p for p in positives if row[p] - epsilon < most_similar_neg]
            negatives = [n for n in negatives if row[n] + epsilon > least_similar_pos]
        pos_sum = sum(math.exp(-alpha * (row[p] - base)) for p in positives)
        neg_sum = sum(math.exp(beta * (row[n] - base)) for n in negatives)
        total += math.log(1 + pos_sum) / alpha + math.log(1 + neg_sum) / beta
    return total / len(s)


def label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    return same & ~torch.eye(len(labels), dtype=torch.bool), ~same


def random_batch(seed: int, dtype=torch.float32, scale: float = 1.0):
    """13 raw embeddings in 8-D; classes of 4, 3, 3, 2 images and one of a single image."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0] * 4 + [1] * 3 + [2] * 3 + [3] * 2 + [4])
    labels = labels[torch.randperm(len(labels), generator=generator)]
    # Loose class centres: mining keeps some pairs and drops others.
    centres = 0.6 * torch.randn(5, 8, generator=generator, dtype=dtype)
    noise = 0.5 * torch.randn(len(labels), 8, generator=generator, dtype=dtype)
    return scale * (centres[labels] + noise), labels


def grads(loss_fn, embeddings):
    """The loss and the gradient w.r.t. a fresh leaf copy of ``embeddings``."""
    leaf = embeddings.detach().clone().requires_grad_()
    value = loss_fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


def assert_mining_is_partial(loss: MultiSimilarityLoss):
    # Some pairs kept, some dropped: the comparison covers both sides of the mining.
    assert 0 < loss.stats["positive_kept"] < 1
    assert 0 < loss.stats["negative_kept"] < 1


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_pytorch_metric_learning_on_unit_vectors(dtype, seed):
    # A model with normalize=True: our loss gets F.normalize(z); PML's CosineSimilarity
    # normalizes z itself. Gradients w.r.t. z both go through the normalization.
    z, labels = random_batch(seed, dtype)
    ms = MultiSimilarityLoss(ALPHA, BETA, BASE, EPSILON)
    value, grad = grads(lambda x: ms(F.normalize(x, dim=1), labels), z)
    assert_mining_is_partial(ms)

    miner = pml_miners.MultiSimilarityMiner(epsilon=EPSILON)
    reference = pml_losses.MultiSimilarityLoss(alpha=ALPHA, beta=BETA, base=BASE)
    expected, expected_grad = grads(lambda x: reference(x, labels, miner(x, labels)), z)
    assert value.dtype == dtype
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)
    # The same pairs survive mining.
    a1, _, a2, _ = miner(F.normalize(z, dim=1), labels)
    pos_mask, neg_mask = label_masks(labels)
    assert ms.stats["positive_kept"] * pos_mask.sum() == pytest.approx(len(a1))
    assert ms.stats["negative_kept"] * neg_mask.sum() == pytest.approx(len(a2))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_pytorch_metric_learning_with_dot_products(dtype, seed):
    x, labels = random_batch(seed, dtype)
    ms = MultiSimilarityLoss(ALPHA, BETA, BASE, EPSILON)
    value, grad = grads(lambda e: ms(e, labels), x)
    assert_mining_is_partial(ms)
    assert ms.stats["mean_pos_similarity"] > 1  # really not unit vectors
    # PML's DotProductSimilarity() L2-normalizes by default (then it is the cosine).
    distance = DotProductSimilarity(normalize_embeddings=False)
    miner = pml_miners.MultiSimilarityMiner(epsilon=EPSILON, distance=distance)
    reference = pml_losses.MultiSimilarityLoss(ALPHA, BETA, BASE, distance=distance)
    expected, expected_grad = grads(lambda e: reference(e, labels, miner(e, labels)), x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("normalize", [False, True])
def test_no_mining_matches_pytorch_metric_learning_without_a_miner(normalize, seed):
    x, labels = random_batch(seed, torch.float64)
    if normalize:
        x = F.normalize(x, dim=1)
    ms = MultiSimilarityLoss(ALPHA, BETA, BASE, epsilon=None)
    value, grad = grads(lambda e: ms(e, labels), x)
    assert ms.stats["positive_kept"] == ms.stats["negative_kept"] == 1
    distance = DotProductSimilarity(normalize_embeddings=False)
    reference = pml_losses.MultiSimilarityLoss(ALPHA, BETA, BASE, distance=distance)
    expected, expected_grad = grads(lambda e: reference(e, labels), x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("epsilon", [EPSILON, None])
def test_from_similarities_with_extra_columns_matches_pytorch_metric_learning(epsilon, seed):
    # Embedding Expansion's use: N anchors against M != N candidates, no diagonal. PML does
    # the same with ref_emb (it drops no diagonal when ref_emb is not the batch itself).
    x, labels = random_batch(seed, torch.float64)
    ref, ref_labels = random_batch(seed + 10, torch.float64)
    ref, ref_labels = ref[:9], ref_labels[:9]
    ms = MultiSimilarityLoss(ALPHA, BETA, BASE, epsilon)
    same = labels[:, None] == ref_labels[None, :]
    value, grad = grads(lambda e: ms.from_similarities(e @ ref.T, same, ~same), x)

    distance = DotProductSimilarity(normalize_embeddings=False)
    reference = pml_losses.MultiSimilarityLoss(ALPHA, BETA, BASE, distance=distance)
    miner = pml_miners.MultiSimilarityMiner(epsilon=epsilon or 0.0, distance=distance)

    def pml_loss(e):
        pairs = miner(e, labels, ref, ref_labels) if epsilon is not None else None
        return reference(e, labels, pairs, ref, ref_labels)

    expected, expected_grad = grads(pml_loss, x)
    torch.testing.assert_close(value, expected)
    torch.testing.assert_close(grad, expected_grad)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [EPSILON, 0.0, None])
@pytest.mark.parametrize("normalize", [False, True])
def test_forward_matches_a_naive_loop(normalize, epsilon, dtype, seed):
    x, labels = random_batch(seed, dtype)
    if normalize:
        x = F.normalize(x, dim=1)
    ms = MultiSimilarityLoss(ALPHA, BETA, BASE, epsilon)
    value = ms(x, labels)
    pos_mask, neg_mask = label_masks(labels)
    expected = naive_loss(x.double() @ x.double().T, pos_mask, neg_mask, ALPHA, BETA, BASE, epsilon)
    assert value.dtype == dtype
    assert value.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def odd_masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A (6, 9) similarity matrix with arbitrary disjoint masks and some odd rows."""
    generator = torch.Generator().manual_seed(0)
    s = 2 * torch.rand(6, 9, generator=generator, dtype=torch.float64) - 1
    # Per row and column: "p" positive, "n" negative, "." neither.
    rows = [
        "pnnnnpnn.",  # rows 0 and 5: mining keeps some pairs, drops others
        "ppnn.....",  # pairs, but none kept (see below)
        "...n..n.n",  # negatives only: nothing kept with mining
        "p.pp.....",  # positives only: nothing kept with mining
        ".........",  # no pair at all
        "nnppnpnpn",
    ]
    pos_mask = torch.tensor([[c == "p" for c in row] for row in rows])
    neg_mask = torch.tensor([[c == "n" for c in row] for row in rows])
    # Row 1: positives 0.9, 0.8 and negatives 0.1, 0.2 are more than epsilon (0.1 or 0.3)
    # apart: a negative needs S + epsilon > 0.8, a positive S - epsilon < 0.2.
    s[1, :4] = torch.tensor([0.9, 0.8, 0.1, 0.2], dtype=torch.float64)
    return s, pos_mask, neg_mask


@pytest.mark.parametrize("epsilon", [EPSILON, 0.3, None])
def test_from_similarities_matches_a_naive_loop_on_a_non_square_matrix(epsilon):
    s, pos_mask, neg_mask = odd_masks()
    ms = MultiSimilarityLoss(ALPHA, BETA, BASE, epsilon)
    value = ms.from_similarities(s, pos_mask, neg_mask)
    expected = naive_loss(s, pos_mask, neg_mask, ALPHA, BETA, BASE, epsilon)
    assert value.item() == pytest.approx(expected, rel=1e-12)
    if epsilon is not None:
        assert 0 < ms.stats["positive_kept"] < 1 and 0 < ms.stats["negative_kept"] < 1
        # Rows 0 and 5 are active; rows 1-4 keep nothing and add 0, but count in the mean.
        assert ms.stats["active_fraction"] == pytest.approx(2 / 6)
        active = [0, 5]
        on_active = naive_loss(
            s[active], pos_mask[active], neg_mask[active], ALPHA, BETA, BASE, epsilon
        )
        assert value.item() == pytest.approx(on_active * 2 / 6, rel=1e-12)


def test_a_hand_computed_example():
    # S = x x^T: S01 = 0.6 (positive pair), S02 = 0.7, S12 = 0.42 (negative pairs).
    # Anchor 0: its negative 2 is kept (0.7 + 0.1 > 0.6), its positive 1 too (0.6 - 0.1 < 0.7):
    #   (1/2) log(1 + exp(-2 (0.6 - 0.5))) + (1/50) log(1 + exp(50 (0.7 - 0.5)))
    #   = 0.5 log(1 + e^-0.2) + 0.02 log(1 + e^10) = 0.2990694 + 0.2000009 = 0.4990703.
    # Anchor 1: negative 2 dropped (0.42 + 0.1 <= 0.6), positive 0 dropped (0.5 >= 0.42): 0.
    # Anchor 2: no positive, so no negative is kept: 0. Mean over the 3 anchors: 0.1663568.
    ms = MultiSimilarityLoss(ALPHA, BETA, BASE, EPSILON)
    value = ms(LINE, LINE_LABELS)
    assert value.item() == pytest.approx(0.4990703427 / 3)
    assert ms.stats == pytest.approx(
        {
            "positive_kept": 1 / 2,  # (0, 1) of (0, 1), (1, 0)
            "negative_kept": 1 / 4,  # (0, 2) of (0, 2), (1, 2), (2, 0), (2, 1)
            "mean_pos_similarity": 0.6,
            "mean_neg_similarity": (0.7 + 0.42 + 0.7 + 0.42) / 4,
            "active_fraction": 1 / 3,
        }
    )
    assert all(type(v) is float for v in ms.stats.values())


def test_pytorch_metric_learning_drops_a_batch_that_keeps_one_pair_of_each_kind():
    # The documented difference: in the example above mining keeps one positive and one
    # negative pair, and PML's GenericPairLoss returns 0 when no kind has more than one.
    distance = DotProductSimilarity(normalize_embeddings=False)
    miner = pml_miners.MultiSimilarityMiner(epsilon=EPSILON, distance=distance)
    pairs = miner(LINE, LINE_LABELS)
    assert [len(t) for t in pairs] == [1, 1, 1, 1]
    reference = pml_losses.MultiSimilarityLoss(ALPHA, BETA, BASE, distance=distance)
    assert reference(LINE, LINE_LABELS, pairs).item() == 0
    assert MultiSimilarityLoss()(LINE, LINE_LABELS).item() == pytest.approx(0.4990703427 / 3)


def test_ties_are_dropped_like_pytorch_metric_learning():
    # Exact binary fractions: S01 = 0.5, S02 = 0.25, S12 = 0.125 and epsilon 0.25, so for
    # anchor 0 both conditions are ties (0.25 + 0.25 vs 0.5; 0.5 - 0.25 vs 0.25): dropped.
    x = torch.tensor([[1.0], [0.5], [0.25]], requires_grad=True)
    ms = MultiSimilarityLoss(epsilon=0.25)
    value = ms(x, LINE_LABELS)
    assert value.item() == 0 and ms.stats["positive_kept"] == ms.stats["negative_kept"] == 0
    distance = DotProductSimilarity(normalize_embeddings=False)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.25, distance=distance)
    assert all(len(t) == 0 for t in miner(x, LINE_LABELS))
    # A hair more margin keeps both pairs of anchor 0.
    ms = MultiSimilarityLoss(epsilon=0.25 + 1e-6)
    assert ms(x, LINE_LABELS).item() > 0 and ms.stats["positive_kept"] == 1 / 2


def test_a_batch_with_nothing_kept_gives_a_true_zero_with_gradients():
    # Two tight clusters on opposite sides: every positive is far more similar than every
    # negative, so mining keeps nothing.
    x = torch.tensor([[1.0, 0.0], [0.99, 0.1], [-1.0, 0.0], [-0.99, 0.1]], requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    ms = MultiSimilarityLoss()
    value = ms(x, labels)
    assert value.item() == 0 and value.requires_grad
    assert ms.stats["active_fraction"] == 0
    value.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_gradcheck_in_float64():
    x, labels = random_batch(0, torch.float64)
    x = F.normalize(x[:8], dim=1).requires_grad_()
    ms = MultiSimilarityLoss(ALPHA, BETA, BASE, EPSILON)
    ms(x, labels[:8])
    assert ms.stats["active_fraction"] > 0
    assert torch.autograd.gradcheck(lambda e: ms(e, labels[:8]), (x,))
    s, pos_mask, neg_mask = odd_masks()
    s.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: ms.from_similarities(t, pos_mask, neg_mask), (s,))


def test_mixed_precision_computes_similarities_in_float32():
    x, labels = random_batch(0)
    x = F.normalize(x, dim=1)
    expected = MultiSimilarityLoss()(x, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = MultiSimilarityLoss()(x, labels)
        similarities = MultiSimilarityLoss().similarities(x)
    assert value.dtype == similarities.dtype == torch.float32
    torch.testing.assert_close(similarities, x @ x.T)
    torch.testing.assert_close(value, expected)


def test_half_precision_inputs_are_computed_in_float32():
    x, labels = random_batch(0)
    x = F.normalize(x, dim=1).bfloat16()
    ms = MultiSimilarityLoss()
    value = ms(x, labels)
    assert ms.similarities(x).dtype == value.dtype == torch.float32
    torch.testing.assert_close(value, ms(x.float(), labels))
    pos_mask, neg_mask = label_masks(labels)
    s = x.float() @ x.float().T
    value = ms.from_similarities(s.bfloat16(), pos_mask, neg_mask)
    assert value.dtype == torch.float32
    expected = naive_loss(s.bfloat16().double(), pos_mask, neg_mask, ALPHA, BETA, BASE, EPSILON)
    assert value.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("epsilon", [EPSILON, None])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_embedding_gives_a_nan_loss_not_a_finite_one(bad, epsilon):
    """Mining compared similarities with NaN, which is False, and so dropped every pair of a
    NaN row: the loss stayed finite (about 0.1 to 3) while the gradients were NaN, hiding the
    failure from the loss curve. Such pairs are kept now, and the loss turns NaN."""
    x, labels = random_batch(0)
    x = F.normalize(x, dim=1)
    x[3, 0 if bad == math.inf else slice(None)] = bad
    value, _ = grads(lambda e: MultiSimilarityLoss(epsilon=epsilon)(e, labels), x)
    assert math.isnan(value.item())


def test_similarities_of_ordinary_embeddings_are_the_plain_dot_products_to_the_bit():
    x, _ = random_batch(0)
    for embeddings in (x, F.normalize(x, dim=1), x.double()):
        assert torch.equal(
            MultiSimilarityLoss().similarities(embeddings), embeddings @ embeddings.T
        )


def test_dot_products_that_overflow_float32_are_inf_not_nan():
    # Coordinates of 3.5e19: their products overflow to +inf and -inf, and a plain matrix
    # product of these three rows gives inf - inf = NaN for x0 . x1, which is exactly 0.
    x = torch.tensor([[1.0, 1.0] * 4, [1.0, -1.0] * 4, [1.0, 1.0] * 4]) * (1e20 / 8**0.5)
    s = MultiSimilarityLoss().similarities(x)
    assert s[0, 1] == 0 and s[0, 2] == math.inf and not s.isnan().any()


@pytest.mark.parametrize("epsilon", [EPSILON, None])
def test_embeddings_too_large_for_float32_are_an_error_not_an_inf_loss(epsilon):
    """Embeddings of norm 1e20 once gave an inf loss and non-finite gradients; their
    similarities (1e40) do not exist in float32, so the loss says so."""
    x, labels = random_batch(0)
    x = F.normalize(x, dim=1)
    ms = MultiSimilarityLoss(epsilon=epsilon)
    with pytest.raises(ValueError, match="overflows float32: similarities.*reach inf.*normalize"):
        ms(x * 1e20, labels)
    # Up to the limit (2.7e36, here norms of 1e17), loss and gradients are finite and right.
    value, grad = grads(lambda e: ms(e, labels), x * 1e17)
    expected, expected_grad = grads(lambda e: ms(e, labels), (x * 1e17).double())
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(value, expected.float())
    torch.testing.assert_close(grad, expected_grad.float())
    # Past it, the gradient could overflow through the scale though the loss is finite.
    with pytest.raises(ValueError, match="overflows float32"):
        ms(torch.tensor([[1.0], [1.0], [1.0], [1e20]]), torch.tensor([0, 0, 1, 1]))


def test_stats_are_over_all_pairs_by_hand():
    # 4 points in 1-D: classes {1, 0.5} and {-1, 0.25}; no mining.
    x = torch.tensor([[1.0], [0.5], [-1.0], [0.25]])
    ms = MultiSimilarityLoss(epsilon=None)
    ms(x, torch.tensor([0, 0, 1, 1]))
    # Positive pairs (both ways): 0.5 and -0.25. Negative pairs: 1*-1, 1*0.25, 0.5*-1, 0.5*0.25.
    assert ms.stats == pytest.approx(
        {
            "positive_kept": 1.0,
            "negative_kept": 1.0,
            "mean_pos_similarity": (0.5 - 0.25) / 2,
            "mean_neg_similarity": (-1 + 0.25 - 0.5 + 0.125) / 4,
            "active_fraction": 1.0,
        }
    )


def test_a_batch_without_positive_pairs_is_an_error():
    with pytest.raises(
        ValueError, match="no positive pair.*ClassBalancedBatchSampler.*samples_per_class >= 2"
    ):
        MultiSimilarityLoss()(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]))


def test_a_batch_of_one_class_is_an_error():
    with pytest.raises(
        ValueError, match="same label.*no negative.*ClassBalancedBatchSampler.*classes_per_batch"
    ):
        MultiSimilarityLoss()(torch.randn(4, 3), torch.tensor([2, 2, 2, 2]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha=0.0 must be > 0"),
        ({"alpha": -1.0}, "alpha=-1.0 must be > 0"),
        ({"alpha": math.nan}, "alpha=nan"),
        ({"beta": 0.0}, "beta=0.0 must be > 0"),
        ({"beta": math.nan}, "beta=nan"),
        ({"epsilon": -0.1}, r"epsilon=-0.1 must be >= 0.*None"),
        ({"epsilon": math.nan}, "epsilon=nan"),
    ],
)
def test_bad_parameters_are_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiSimilarityLoss(**kwargs)


def test_bad_shapes_and_masks_are_errors():
    ms = MultiSimilarityLoss()
    with pytest.raises(ValueError, match=r"must\s+be \(N, D\) and \(N,\)"):
        ms(torch.randn(4, 3), torch.tensor([0, 0, 1]))
    s = torch.randn(3, 5)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"same \(N, M\)"):
        ms.from_similarities(s, mask[:, :4], mask)
    with pytest.raises(ValueError, match=r"torch.bool.*\.bool\(\)"):
        ms.from_similarities(s, mask.float(), mask)
    overlap = mask.clone()
    overlap[0, 0] = True
    with pytest.raises(ValueError, match="overlap"):
        ms.from_similarities(s, overlap, overlap)
