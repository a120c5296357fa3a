"""Exact search on the CPU: faiss's heaps (float32) against torch (float64) and brute force.

The data are small integers (or unit vectors with entries +-1/2), so every distance is exact in
float32 as in float64: the two paths and a brute-force ranking must agree exactly, ties
included, and ties are everywhere (duplicate rows, equal integer distances).
"""

import numpy as np
import pytest
import torch

from utils_cv.similarity import faiss_flat
from utils_cv.similarity.binary import binarize, unpack_bits
from utils_cv.similarity.metrics import _first_relevant_ranks, retrieval_metrics
from utils_cv.similarity.search import TILE, nearest_neighbors

METRICS = ("euclidean", "squared_euclidean", "cosine")


def tied_rows(num_rows: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Rows of 4 entries +-1 (norm 2, so unit vectors of +-1/2 exactly), 40 distinct rows
    repeated, and one zero row (cosine distance 1 to everything)."""
    rng = np.random.default_rng(seed)
    distinct = np.zeros((40, dim), dtype=np.float32)
    for row in distinct:
        row[rng.choice(dim, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    x = distinct[rng.integers(0, len(distinct), num_rows)]
    x[num_rows // 2] = 0
    return x


def exact_distances(query: np.ndarray, reference: np.ndarray, metric: str) -> np.ndarray:
    q, r = query.astype(np.float64), reference.astype(np.float64)
    if metric == "cosine":

        def unit(a):
            norms = np.linalg.norm(a, axis=1, keepdims=True)
            return np.divide(a, norms, out=np.zeros_like(a), where=norms > 0)

        return 1 - unit(q) @ unit(r).T
    # exact: the rows are small integers
    squared = (q * q).sum(axis=1)[:, None] + (r * r).sum(axis=1) - 2 * q @ r.T
    return np.sqrt(squared) if metric == "euclidean" else squared


def brute_force_neighbors(query, reference, k, metric, self_search):
    distances = exact_distances(query, reference, metric)
    if self_search:
        np.fill_diagonal(distances, np.inf)
    order = np.argsort(distances, axis=1, kind="stable")[:, :k]  # stable: (distance, index)
    return np.take_along_axis(distances, order, axis=1), order


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("self_search", [True, False])
def test_faiss_heaps_equal_torch_and_brute_force_with_ties(metric, self_search):
    # More references than one TILE, so that ties straddle tiles too; k straddles ties.
    x = tied_rows(TILE + 200)
    query, reference = (x, None) if self_search else (x[:300], x[100:])
    for k in (1, 5, 37, 150, 1100):
        for chunk_size in (None, 97):
            # float32 on the CPU: faiss's heaps; float64: torch's topk (`search._smallest`)
            d32, i32 = nearest_neighbors(query, reference, k=k, metric=metric,
                                         chunk_size=chunk_size, device="cpu")  # fmt: skip
            d64, i64 = nearest_neighbors(
                query.astype(np.float64), None if self_search else reference.astype(np.float64),
                k=k, metric=metric, chunk_size=chunk_size, device="cpu",
            )  # fmt: skip
            assert d32.dtype == torch.float32 and d64.dtype == torch.float64
            assert torch.equal(i32, i64), (k, chunk_size)
            assert torch.equal(d32, d64.float())
        expected_d, expected_i = brute_force_neighbors(
            query, x if self_search else reference, k, metric, self_search
        )
        assert i32.tolist() == expected_i.tolist()
        np.testing.assert_allclose(d32.numpy(), expected_d, rtol=1e-6)


def test_a_query_with_more_than_k_duplicates_drops_its_own_row_by_index():
    # Six copies of one row, then six of another: query 4's first neighbours are the copies
    # before it; query 0's are 1, 2, 3 (itself skipped), as in the Hamming search.
    x = np.repeat(np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32), 6, axis=0)
    d, i = nearest_neighbors(x, k=3, device="cpu")
    assert i[4].tolist() == [0, 1, 2] and i[0].tolist() == [1, 2, 3]
    assert i[11].tolist() == [6, 7, 8] and d.unique().tolist() == [0]
    d, i = nearest_neighbors(x, k=8, device="cpu")
    assert i[7].tolist() == [6, 8, 9, 10, 11, 0, 1, 2] and d[7].tolist() == [0] * 5 + [5] * 3


@pytest.mark.parametrize("k", [1, 3, 10, 1000])
def test_faiss_heaps_keep_the_lowest_columns_of_a_tie(k):
    # Values from {0, 1, 2} only: every heap ends on a tie that straddles the k-th place, and
    # the blocks come in three widths, as the last tile of a search does.
    rng = np.random.default_rng(k)
    values = rng.integers(0, 3, (50, 2500)).astype(np.float32)
    values[0] = 1.0  # one row all equal
    blocks = [(first, torch.from_numpy(values[:, first : first + width].copy()))
              for first, width in ((0, 1024), (1024, 1024), (2048, 452))]  # fmt: skip
    got_values, got_columns = faiss_flat.smallest(iter(blocks), 50, k)
    expected = np.argsort(values, axis=1, kind="stable")[:, :k]
    assert got_columns.tolist() == expected.tolist()
    assert np.array_equal(got_values.numpy(), np.take_along_axis(values, expected, axis=1))


def brute_force_metrics(x, labels, ks, metric, reference=None, reference_labels=None):
    """Recall@K, MAP@R and R-Precision from exact distances, ties by index; a self-search
    (each query's own row excluded) without `reference`."""
    if reference is None:
        distances = exact_distances(x, x, metric)
        np.fill_diagonal(distances, np.inf)
        order = np.argsort(distances, axis=1, kind="stable")[:, : len(x) - 1]
        relevant = labels[order] == labels[:, None]
    else:
        order = np.argsort(exact_distances(x, reference, metric), axis=1, kind="stable")
        relevant = reference_labels[order] == labels[:, None]
    num_relevant = relevant.sum(axis=1)
    scored = num_relevant > 0
    relevant, num_relevant = relevant[scored], num_relevant[scored]
    first = relevant.argmax(axis=1) + 1  # rank of the first relevant reference
    result = {f"recall@{k}": (first <= k).mean() for k in ks}
    positions = np.arange(1, relevant.shape[1] + 1)
    at_r = relevant & (positions <= num_relevant[:, None])
    result["r_precision"] = (at_r.sum(axis=1) / num_relevant).mean()
    result["map@r"] = (
        (np.cumsum(at_r, axis=1) / positions * at_r).sum(axis=1) / num_relevant
    ).mean()
    return result, first, num_relevant.max()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_first_relevant_ranks_against_brute_force_with_ties(metric, dtype):
    x = tied_rows(400, seed=1)
    labels = np.random.default_rng(2).integers(0, 120, len(x))
    codes = torch.from_numpy(labels)
    cpu = torch.device("cpu")
    # self-search: each query's own row excluded
    _, first, _ = brute_force_metrics(x, labels, (1,), metric)
    scored = torch.from_numpy(np.flatnonzero(np.bincount(labels)[labels] > 1))
    data = torch.from_numpy(x.astype(dtype))
    ranks = _first_relevant_ranks(
        data[scored], data, codes[scored], codes, metric, 7, cpu, self_index=scored
    )
    assert ranks.tolist() == first.tolist()
    # queries against another set
    query, reference = slice(0, 150), slice(150, None)
    _, first, _ = brute_force_metrics(
        x[query], labels[query], (1,), metric, x[reference], labels[reference]
    )
    scored = torch.from_numpy(np.flatnonzero(np.isin(labels[query], labels[reference])))
    ranks = _first_relevant_ranks(
        data[query][scored], data[reference], codes[query][scored], codes[reference], metric,
        None, cpu,
    )  # fmt: skip
    assert ranks.tolist() == first.tolist()


@pytest.mark.parametrize("metric", METRICS)
def test_recall_beyond_max_r_against_brute_force_with_ties(metric):
    # 120 classes over 400 rows of 40 distinct values: R is at most 9, many queries meet
    # their first relevant reference far beyond it, often tied with other references.
    x = tied_rows(400, seed=1)
    labels = np.random.default_rng(2).integers(0, 120, len(x))
    ks = (1, 4, 30, 150, 399)  # 150 and 399 > SEARCHED_K: found by the second pass
    expected, first, max_r = brute_force_metrics(x, labels, ks, metric)
    assert (first > max_r).sum() > 20 and (first > 150).sum() > 0
    for data in (x, x.astype(np.float64)):  # faiss's heaps, then torch
        for chunk_size in (None, 7):
            ours = retrieval_metrics(data, labels, ks, metric=metric, chunk_size=chunk_size,
                                     device="cpu")  # fmt: skip
            for key, value in expected.items():
                assert ours[key] == pytest.approx(value, abs=1e-12), (key, data.dtype, chunk_size)
    # The same queries against the references as a separate set, own copy excluded.
    paired = retrieval_metrics(x, labels, ks, reference=x, reference_labels=labels, metric=metric,
                               exclude_same_index=True, device="cpu")  # fmt: skip
    assert paired == retrieval_metrics(x, labels, ks, metric=metric, device="cpu")
    # Queries against another set, nothing excluded.
    query, reference = slice(0, 150), slice(150, None)
    ks = (1, 4, 120, 250)
    expected, first, max_r = brute_force_metrics(
        x[query], labels[query], ks, metric, x[reference], labels[reference]
    )
    assert (first > 120).sum() > 0
    for data in (x, x.astype(np.float64)):
        ours = retrieval_metrics(data[query], labels[query], ks, reference=data[reference],
                                 reference_labels=labels[reference], metric=metric,
                                 chunk_size=7, device="cpu")  # fmt: skip
        for key, value in expected.items():
            assert ours[key] == pytest.approx(value, abs=1e-12), (key, data.dtype)


def test_recall_beyond_max_r_with_hamming_codes():
    # 8-bit codes: distances 0 to 8, ties everywhere; the second pass counts Hamming
    # distances as the search ranks them.
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, (300, 8)).astype(np.float32)
    labels = rng.integers(0, 100, len(bits))
    codes = binarize(bits - 0.5)
    assert np.array_equal(unpack_bits(codes, 8), bits)
    ks = (1, 2, 20, 120, 299)
    expected, first, max_r = brute_force_metrics(bits, labels, ks, "squared_euclidean")
    assert (first > max_r).sum() > 20
    for chunk_size in (None, 11):
        ours = retrieval_metrics(codes, labels, ks, metric="hamming", chunk_size=chunk_size)
        for key, value in expected.items():
            assert ours[key] == pytest.approx(value, abs=1e-12), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu_beyond_max_r():
    x = tied_rows(400, seed=1)
    labels = np.random.default_rng(2).integers(0, 120, len(x))
    for metric in METRICS:
        cpu = retrieval_metrics(x, labels, (1, 4, 150, 399), metric=metric, device="cpu")
        gpu = retrieval_metrics(x, labels, (1, 4, 150, 399), metric=metric, device="cuda")
        assert gpu == pytest.approx(cpu, abs=1e-12)
