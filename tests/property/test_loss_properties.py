"""Properties every loss keeps, on batches hypothesis draws and on pinned edge cases.

Each loss is one ``Case``: how to build it (a fixed torch seed for its proxies or class
weights), and what it promises. The properties, one test each:

- the loss does not depend on the order of the batch (rows and labels permuted together;
  for Embedding Expansion, which pairs images by batch order, orders that keep its pairs);
- it is exactly zero, with zero gradients, once the classes are separated by more than its
  margin (losses without such a margin are skipped, with the reason in ``no_zero``), and
  above zero as soon as some pair is within it (``not_only_then`` says where not);
- finite embeddings, float32 or bfloat16, of any norm from 1e-20 to 1e20, zero or
  identical rows included, give a finite loss and finite gradients, or, beyond the norm
  a loss declares (``max_norm``), a ValueError that says the loss overflows;
- losses that L2-normalize the embeddings do not depend on their norms;
- a NaN or infinite embedding gives a non-finite loss (which stops a training run),
  never a finite loss whose gradients are NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from utils_cv.similarity.losses import (
    EmbeddingExpansion,
    MultiSimilarityLoss,
    NormSoftmaxLoss,
    ProxyNCALoss,
    RankingRegularizedLoss,
    SoftmaxLoss,
    TripletLoss,
)

NUM_CLASSES = 4
MAX_DIM = 8
MARGIN = 0.2
EPSILON = 0.1


@dataclass(frozen=True)
class Case:
    """A loss under test and what it promises."""

    name: str
    build: Callable[[int], torch.nn.Module]  # embedding size D -> the loss
    # The separation beyond which the loss is exactly 0, measured as "distance",
    # "squared" distance or "similarity" (dot products of unit vectors); None: no zero.
    margin: float | None = None
    separation: str = "distance"
    no_zero: str = ""  # why the loss has no such zero
    not_only_then: str = ""  # why, with a margin, the loss can be 0 short of it too
    # Above this norm the loss may refuse a batch with a ValueError saying it overflows.
    max_norm: float = math.inf
    pairs: bool = False  # Embedding Expansion: pairs each class's images by batch order
    two_heads: bool = False  # takes {"logits", "embeddings"}
    normalizes: bool = False  # L2-normalizes the embeddings, so their norms do not count


def seeded(build: Callable[[int], torch.nn.Module]) -> Callable[[int], torch.nn.Module]:
    """``build`` under a fixed torch seed: the same proxies or class weights every time."""

    def seeded_build(dim: int) -> torch.nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build(dim)

    return seeded_build


CROSS_ENTROPY = "cross-entropy is log(1 + ...) > 0: no margin makes it zero"
# Past these norms a loss may refuse a batch (ValueError "overflows"): squared distances
# beyond 2.7e36 (norms of 1e18 and more), similarities beyond 2.7e36 (|x|^2 with x of norm
# 1.6e18), where the loss or its gradient would no longer fit in float32.
SQUARED_MAX_NORM = 1e17
MS_MAX_NORM = 1e18

CASES = [
    Case("softmax", seeded(lambda d: SoftmaxLoss(d, NUM_CLASSES)), no_zero=CROSS_ENTROPY),
    *[
        Case(
            f"triplet_{mining}",
            lambda d, m=mining: TripletLoss(MARGIN, m),
            MARGIN,
            not_only_then="for an anchor-positive pair, semi-hard takes the closest negative "
            "farther than the positive: a nearer negative, inside the margin, may go unused"
            if mining == "semi_hard"
            else "",
        )
        for mining in TripletLoss.MININGS
    ],
    Case(
        "triplet_batch_all_squared",
        lambda d: TripletLoss(MARGIN, "batch_all", squared=True),
        MARGIN,
        separation="squared",
        max_norm=SQUARED_MAX_NORM,
    ),
    Case(
        "triplet_batch_hard_soft_margin",
        lambda d: TripletLoss(mining="batch_hard", soft_margin=True),
        no_zero="softplus(d_ap - d_an) > 0 for every triplet: the soft margin never reaches 0",
    ),
    Case(
        "multi_similarity",
        lambda d: MultiSimilarityLoss(epsilon=EPSILON),
        EPSILON,
        separation="similarity",
        max_norm=MS_MAX_NORM,
    ),
    Case(
        "multi_similarity_no_mining",
        lambda d: MultiSimilarityLoss(epsilon=None),
        no_zero="without mining every pair counts, and log(1 + sum exp(...)) > 0",
        max_norm=MS_MAX_NORM,
    ),
    Case(
        "proxy_nca",
        seeded(lambda d: ProxyNCALoss(NUM_CLASSES, d)),
        no_zero=CROSS_ENTROPY,
        normalizes=True,
    ),
    Case(
        "proxy_nca_paper_form_two_proxies",
        seeded(lambda d: ProxyNCALoss(NUM_CLASSES, d, include_positive=False, proxies_per_class=2)),
        no_zero="no margin: the paper's form keeps falling (below zero) as classes separate",
        normalizes=True,
    ),
    Case(
        "proxy_nca_shared_smoothed",
        seeded(lambda d: ProxyNCALoss(NUM_CLASSES, d, proxies_per_class=0.5, label_smoothing=0.1)),
        no_zero=CROSS_ENTROPY,
        normalizes=True,
    ),
    Case(
        "norm_softmax",
        seeded(lambda d: NormSoftmaxLoss(NUM_CLASSES, d)),
        no_zero=CROSS_ENTROPY,
        normalizes=True,
    ),
    Case(
        "embedding_expansion_triplet",
        lambda d: EmbeddingExpansion(TripletLoss(MARGIN, "batch_hard")),
        MARGIN,
        pairs=True,
    ),
    Case(
        "embedding_expansion_multi_similarity",
        lambda d: EmbeddingExpansion(MultiSimilarityLoss(epsilon=EPSILON)),
        EPSILON,
        separation="similarity",
        max_norm=MS_MAX_NORM,
        pairs=True,
    ),
    Case(
        "ranking_regularized",
        lambda d: RankingRegularizedLoss(NUM_CLASSES, TripletLoss(MARGIN, squared=True)),
        no_zero="its cross-entropy term is > 0",
        max_norm=SQUARED_MAX_NORM,
        two_heads=True,
    ),
]
CASE_PARAMS = [pytest.param(case, id=case.name) for case in CASES]
ZERO_PARAMS = [
    pytest.param(case, id=case.name, marks=pytest.mark.skip(reason=case.no_zero))
    if case.margin is None
    else pytest.param(case, id=case.name)
    for case in CASES
]
POSITIVE_PARAMS = [
    pytest.param(case, id=case.name, marks=pytest.mark.skip(reason=case.not_only_then))
    if case.not_only_then
    else param
    for param, case in zip(ZERO_PARAMS, CASES, strict=True)
]


@dataclass(frozen=True)
class Batch:
    """Unit (or zero) directions, their labels, and each row's norm as a power of ten."""

    directions: np.ndarray  # (N, D) float64, rows of norm 1 or 0
    labels: tuple[int, ...]
    exponents: tuple[float, ...]  # row i has norm 10 ** exponents[i] (0 for zero rows)

    def embeddings(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scales = torch.tensor([10.0**e for e in self.exponents], dtype=torch.float64)
        x = torch.from_numpy(self.directions) * scales[:, None]
        return x.to(dtype)

    @property
    def label_tensor(self) -> torch.Tensor:
        return torch.tensor(self.labels)

    @property
    def max_norm(self) -> float:
        norms = np.linalg.norm(self.directions, axis=1) * 10.0 ** np.array(self.exponents)
        return float(norms.max())


def unit_rows(array: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return np.divide(array, norms, out=np.zeros_like(array), where=norms > 0)


ALL_EXPONENTS = st.integers(-40, 40).map(lambda k: k / 2)  # 10**-20 to 10**20


@st.composite
def batches(draw, exponents=ALL_EXPONENTS) -> Batch:
    """P classes (2 to 4) of 2 to 4 images each, shuffled, in D = 1 to 8 dimensions.

    Each row is a unit direction (or zero) times 10**e: one e for the whole batch, or one
    per row, from ``exponents``.
    """
    counts = draw(st.lists(st.integers(2, 4), min_size=2, max_size=NUM_CLASSES))
    labels = draw(st.permutations([c for c, k in enumerate(counts) for _ in range(k)]))
    n, dim = len(labels), draw(st.integers(1, MAX_DIM))
    raw = draw(hnp.arrays(np.float64, (n, dim), elements=st.floats(-1, 1, width=32)))
    per_row = st.lists(exponents, min_size=n, max_size=n)
    powers = draw(st.one_of(exponents.map(lambda e: [e] * n), per_row))
    return Batch(unit_rows(raw), tuple(labels), tuple(powers))


# Norms of 1e-3 to 1e3, far from any overflow: for the properties that are not about norms
# (the batch order, a non-finite entry).
ORDINARY_BATCHES = batches(exponents=st.integers(-3, 3))


def pinned(directions, labels, exponent) -> Batch:
    directions = np.asarray(directions, dtype=np.float64)
    exponents = [exponent] * len(labels) if isinstance(exponent, int) else exponent
    return Batch(directions, tuple(labels), tuple(exponents))


_rng = np.random.default_rng(0)
LABELS = [0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3]
RANDOM = unit_rows(_rng.standard_normal((len(LABELS), MAX_DIM)))
ZEROS = pinned(np.zeros((len(LABELS), MAX_DIM)), LABELS, 0)
IDENTICAL = pinned(np.repeat(RANDOM[:1], len(LABELS), axis=0), LABELS, 0)
RANDOM_BATCH = pinned(RANDOM, LABELS, 0)
TINY = pinned(RANDOM, LABELS, -20)
HUGE = pinned(RANDOM, LABELS, 20)
MIXED = pinned(RANDOM, LABELS, [-20, 20] * (len(LABELS) // 2))
ZERO_AND_HUGE = pinned(RANDOM * (np.arange(len(LABELS)) % 3 > 0)[:, None], LABELS, 20)
# Found by hypothesis or by hand; each once gave a non-finite loss or gradient, or NaN.
# Products of 1e20 coordinates overflow float32 and +inf + -inf is NaN, though x0 . x1 = 0
# (three rows: CPU matrix products of four rows or more happen to give inf here, not NaN).
CANCELLING = pinned(unit_rows(np.array([[1.0, 1.0] * 4, [1.0, -1.0] * 4] * 2))[:3], [0, 0, 1], 20)
# Only |x3|^2 (unused) overflows: the loss was finite, its gradient inf through the scale.
ONE_HUGE_ROW = pinned([[1.0], [1.0], [1.0], [1.0]], [0, 0, 1, 1], [0, 0, 0, 20])
# Squared distances of 4e38 overflow, only between negatives: a finite loss of 1e31 and
# an inf gradient through the scale, squared.
LINE_1E19 = pinned([[0.0], [-1.0], [1.0], [1.0]], [0, 0, 1, 1], 19)


def with_even_classes(batch: Batch) -> Batch:
    """Embedding Expansion pairs each class's images: drop each odd class's last image."""
    labels = np.array(batch.labels)
    keep = np.ones(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        if len(members) % 2:
            keep[members[-1]] = False
    exponents = tuple(np.array(batch.exponents)[keep].tolist())
    return Batch(batch.directions[keep], tuple(labels[keep].tolist()), exponents)


def call(case: Case, loss: torch.nn.Module, embeddings: torch.Tensor, labels: torch.Tensor):
    """The loss of ``embeddings``; a two-head loss also gets logits, a fixed linear map of them
    (so they scale with the embeddings and follow them through permutations)."""
    if not case.two_heads:
        return loss(embeddings, labels)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(NUM_CLASSES, embeddings.shape[1], generator=generator)
    logits = embeddings @ weight.to(embeddings.dtype).T
    return loss({"logits": logits, "embeddings": embeddings}, labels)


def loss_and_gradients(case: Case, batch: Batch, dtype: torch.dtype = torch.float32):
    """The loss (a detached scalar) and every gradient: the embeddings' and the loss's
    parameters'."""
    if case.pairs:
        batch = with_even_classes(batch)
    loss = case.build(batch.directions.shape[1])
    embeddings = batch.embeddings(dtype).requires_grad_()
    value = call(case, loss, embeddings, batch.label_tensor)
    value.backward()
    gradients = [embeddings.grad] + [p.grad for p in loss.parameters() if p.grad is not None]
    return value.detach(), gradients


def pairs_kept(order: list[int], labels: list[int]) -> list[int]:
    """``order`` rearranged within each class so that Embedding Expansion, which pairs each
    class's images in batch order, forms the same pairs as on the original batch.

    Classes still interleave as in ``order``, and pairs come in the order ``order`` first
    reaches them, each pair's two images in the order ``order`` reaches them.
    """
    partner = {}
    for c in set(labels):
        members = [i for i, y in enumerate(labels) if y == c]
        for a, b in zip(members[0::2], members[1::2], strict=True):
            partner[a], partner[b] = b, a
    sequence, placed = {c: [] for c in set(labels)}, set()
    for i in order:
        if i not in placed:
            sequence[labels[i]] += [i, partner[i]]
            placed |= {i, partner[i]}
    slots = {c: iter(rows) for c, rows in sequence.items()}
    return [next(slots[labels[i]]) for i in order]


# Points on a line where distances tie exactly (d(0, 1) = d(0, -1)): with the column means
# summed in batch order, rounding broke the ties one way or the other depending on the order,
# and semi-hard and batch-all triplet losses changed by 5 and 10 % when two rows swapped.
TIES = pinned(
    [[0.0], [1.0], [-1.0], [1.0], [-1.0], [-1.0], [-1.0], [-1.0], [-1.0], [-1.0], [-1.0], [-1.0]],
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2],
    [0, 0, 0, -1, 0, 0, 0, 0, 0, -1, 0, -1],
)
SWAP_LAST_TWO = [*range(10), 11, 10, *range(12, 16)]
# Six equal rows and another (found by hypothesis on an AMD EPYC with MKL): computed from
# |x|^2 + |y|^2 - 2 x.y, the equal rows lay about 1e-4 apart, by an amount that depended on
# their place in the matrix product, so the batch-hard loss changed with the order by 6e-5.
CROWD = pinned(
    unit_rows(np.array([[1.0, 1.0, -4.342, 1.0]] + [[1.0] * 4] * 6)), [0, 0, 0, 1, 1, 1, 1], 0
)
CROWD_ORDER = [0, 1, 3, 4, 2, *range(5, 16)]


@pytest.mark.parametrize("case", CASE_PARAMS)
@given(batch=ORDINARY_BATCHES, shuffle=st.permutations(range(16)))
@example(batch=IDENTICAL, shuffle=list(range(16))[::-1])
@example(batch=TIES, shuffle=SWAP_LAST_TWO)
@example(batch=CROWD, shuffle=CROWD_ORDER)
def test_loss_does_not_depend_on_the_order_of_the_batch(case, batch, shuffle):
    if case.pairs:
        batch = with_even_classes(batch)
    n = len(batch.labels)
    order = [i for i in shuffle if i < n]
    if case.pairs:
        # Embedding Expansion pairs by batch order (the released code's fixed slots), so only
        # orders that keep its pairs may keep its value: any interleaving of the classes, any
        # order of the pairs, either order within a pair.
        order = pairs_kept(order, list(batch.labels))
    permuted = Batch(
        batch.directions[order],
        tuple(batch.labels[i] for i in order),
        tuple(batch.exponents[i] for i in order),
    )
    value, _ = loss_and_gradients(case, batch)
    permuted_value, _ = loss_and_gradients(case, permuted)
    torch.testing.assert_close(permuted_value, value, rtol=1e-5, atol=1e-6)


@st.composite
def clustered_batches(draw, radii, pulls) -> Batch:
    """Classes around centres, each point within a radius (from ``radii``) of its centre
    before normalizing. The centres are orthogonal axes plus a shared component (of a length
    from ``pulls``) that draws them together: from far apart to overlapping, through the
    margins here (0.1 to 0.2)."""
    batch = draw(batches(exponents=st.just(0)))
    num_classes, dim = max(batch.labels) + 1, max(batch.directions.shape[1], NUM_CLASSES)
    centres = np.eye(dim)[:num_classes] + draw(pulls) / math.sqrt(dim)
    noise = np.zeros((len(batch.labels), dim))
    noise[:, : batch.directions.shape[1]] = batch.directions
    points = unit_rows(centres[list(batch.labels)] + draw(radii) * noise)
    return Batch(points, batch.labels, (0,) * len(batch.labels))


def separation(batch: Batch, kind: str, n_points: int = 0) -> float:
    """By how much the classes are apart, as the margin counts it, from the definitions.

    The least, over anchors a, of min_n d(a, n) - max_p d(a, p) (distances, or squared
    distances), or min_p S(a, p) - max_n S(a, n) (dot products): every triplet, or every
    pair that multi-similarity's mining could keep, is then beyond the margin. With
    ``n_points`` (Embedding Expansion), negatives include the synthetic points, normalized
    interpolations of each class's images paired in batch order, and are measured from the
    anchor's group: the anchor and its own pair's synthetic points.
    """
    x, labels = batch.directions, np.array(batch.labels)
    points, point_labels, groups = list(x), list(labels), [[i] for i in range(len(x))]
    for c in np.unique(labels) if n_points else []:
        members = np.flatnonzero(labels == c)
        for i, j in zip(members[0::2], members[1::2], strict=True):
            own = list(range(len(points), len(points) + n_points))
            groups[i] += own
            groups[j] += own
            for k in range(1, n_points + 1):
                points.append(unit_rows((k * x[j] + (n_points + 1 - k) * x[i])[None])[0])
                point_labels.append(c)
    points, point_labels = np.array(points), np.array(point_labels)
    if kind == "similarity":
        closeness = points @ points.T
    else:
        squared = ((points[:, None] - points[None]) ** 2).sum(-1)
        closeness = -(squared if kind == "squared" else np.sqrt(squared))
    gaps = []
    for a in range(len(x)):
        positives = [p for p in range(len(x)) if p != a and labels[p] == labels[a]]
        negatives = point_labels != labels[a]
        nearest_negative = closeness[groups[a]][:, negatives].max()
        gaps.append(closeness[a, positives].min() - nearest_negative)
    return min(gaps)


def gap_to_margin(case: Case, batch: Batch) -> tuple[Batch, float]:
    """The batch as the loss sees it, and its separation minus the loss's margin."""
    n_points = 0
    if case.pairs:
        batch, n_points = with_even_classes(batch), case.build(1).n_points
    return batch, separation(batch, case.separation, n_points) - case.margin


@pytest.mark.parametrize("case", ZERO_PARAMS)
@given(batch=clustered_batches(st.floats(0, 0.45), st.floats(0, 3)))
@example(batch=pinned(np.eye(MAX_DIM)[[0, 0, 1, 1, 2, 2, 3, 3]], [0, 0, 1, 1, 2, 2, 3, 3], 0))
def test_loss_is_zero_when_classes_are_separated_by_more_than_the_margin(case, batch):
    batch, gap = gap_to_margin(case, batch)
    assume(gap > 1e-4)  # a hair above, so that float32 rounding cannot bring a pair back in
    value, gradients = loss_and_gradients(case, batch)
    assert value.item() == 0
    assert all(torch.all(g == 0) for g in gradients)


@pytest.mark.parametrize("case", POSITIVE_PARAMS)
@given(batch=clustered_batches(st.floats(0, 1), st.floats(1, 8)))
@example(batch=IDENTICAL)
def test_loss_is_positive_when_some_pair_is_within_the_margin(case, batch):
    batch, gap = gap_to_margin(case, batch)
    assume(gap < -1e-4)
    value, _ = loss_and_gradients(case, batch)
    assert value.item() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", CASE_PARAMS)
@given(batch=batches())
@example(batch=ZEROS)
@example(batch=IDENTICAL)
@example(batch=TINY)
@example(batch=HUGE)
@example(batch=MIXED)
@example(batch=ZERO_AND_HUGE)
@example(batch=CANCELLING)
@example(batch=ONE_HUGE_ROW)
@example(batch=LINE_1E19)
def test_finite_embeddings_give_a_finite_loss_and_finite_gradients(case, dtype, batch):
    assume(not case.pairs or len(set(with_even_classes(batch).labels)) > 1)
    try:
        value, gradients = loss_and_gradients(case, batch, dtype)
    except ValueError as error:
        assert batch.max_norm > case.max_norm, f"refused norms <= {case.max_norm}: {error}"
        assert "overflows" in str(error)
        return
    assert torch.isfinite(value), value
    for gradient in gradients:
        assert torch.isfinite(gradient).all(), gradient


@pytest.mark.parametrize("case", [p for p in CASE_PARAMS if p.values[0].normalizes])
@given(batch=batches(exponents=st.integers(-10, 20)))
@example(batch=HUGE)
@example(batch=pinned(RANDOM, LABELS, [-10, 20] * (len(LABELS) // 2)))
def test_normalizing_losses_do_not_depend_on_the_norms_of_the_embeddings(case, batch):
    # Down to 1e-10: F.normalize leaves rows shorter than 1e-12 as they are (nearly zero).
    unit = Batch(batch.directions, batch.labels, (0,) * len(batch.labels))
    value, _ = loss_and_gradients(case, batch)
    torch.testing.assert_close(value, loss_and_gradients(case, unit)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASE_PARAMS)
@given(
    batch=ORDINARY_BATCHES,
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    whole_row=st.booleans(),
    position=st.tuples(st.integers(0, 15), st.integers(0, MAX_DIM - 1)),
)
@example(batch=IDENTICAL, bad=math.nan, whole_row=True, position=(0, 0))
@example(batch=IDENTICAL, bad=math.inf, whole_row=False, position=(5, 3))
@example(batch=RANDOM_BATCH, bad=math.nan, whole_row=True, position=(3, 0))
def test_non_finite_embeddings_give_a_non_finite_loss(case, batch, bad, whole_row, position):
    if case.pairs:
        batch = with_even_classes(batch)
    n, dim = batch.directions.shape
    row, column = position[0] % n, position[1] % dim
    directions = batch.directions.copy()
    directions[row, slice(None) if whole_row else column] = bad
    value, _ = loss_and_gradients(case, Batch(directions, batch.labels, batch.exponents))
    # Non-finite: the training loop stops the run; a finite loss would hide NaN gradients.
    assert not torch.isfinite(value), value
