import faiss
import numpy as np
import pytest
import torch

from utils_cv.similarity.binary import binarize, hamming_distances, hamming_neighbors, unpack_bits
from utils_cv.similarity.metrics import compute_distances, nearest_neighbors, retrieval_metrics
from utils_cv.similarity.search import _hamming_block, _plus_minus


def random_codes(num_rows, dim, seed):
    """Codes of random signs in `dim` dimensions (padding bits 0, as binarize leaves them)."""
    rng = np.random.default_rng(seed)
    return binarize(rng.normal(size=(num_rows, dim)))


def naive_hamming(query_codes, reference_codes):
    """Differing bits, counted byte by byte in plain Python."""
    return [
        [sum(bin(a ^ b).count("1") for a, b in zip(q.tolist(), r.tolist(), strict=True))
         for r in reference_codes]
        for q in query_codes
    ]  # fmt: skip


def tied_codes(num_rows=300, num_classes=10, seed=0):
    """8-bit codes (256 possible values) for 300 items: many equal distances, duplicate codes
    across classes. Each class draws from its own 40 codes, which overlap between classes."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, num_rows)
    own_codes = rng.integers(0, 256, (num_classes, 40), dtype=np.uint8)
    codes = own_codes[labels, rng.integers(0, 40, num_rows)][:, None]
    pairs = np.unique(np.stack([codes[:, 0], labels]), axis=1)
    assert len(np.unique(codes)) < pairs.shape[1] < num_rows  # duplicates, across classes too
    return np.ascontiguousarray(codes), labels


@pytest.mark.parametrize("dim", [13, 64, 100])
def test_hamming_distances_against_a_python_loop(dim):
    query, reference = random_codes(7, dim, seed=dim), random_codes(11, dim, seed=dim + 1)
    distances = hamming_distances(query, reference)
    assert distances.dtype == torch.int32 and distances.shape == (7, 11)
    assert distances.tolist() == naive_hamming(query, reference)
    assert 0 < distances.min() and distances.max() <= dim
    # any bytes, not only binarize's: every bit of every byte counts
    rng = np.random.default_rng(dim)
    query, reference = (rng.integers(0, 256, (n, 9), dtype=np.uint8) for n in (5, 6))
    assert hamming_distances(query, reference).tolist() == naive_hamming(query, reference)


@pytest.mark.parametrize("dim", [13, 64, 100])
def test_hamming_is_squared_euclidean_on_the_bits(dim):
    query, reference = random_codes(20, dim, seed=1), random_codes(30, dim, seed=2)
    squared = compute_distances(
        unpack_bits(query, dim).astype(np.float64),
        unpack_bits(reference, dim).astype(np.float64),
        metric="squared_euclidean",
    )
    assert torch.equal(hamming_distances(query, reference).double(), squared)
    assert torch.equal(compute_distances(query, reference, metric="hamming"), squared.int())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dim", [13, 64, 100])
def test_plus_minus_products_equal_popcount(dtype, dim):
    # The GPU computes Hamming distances as (L - q.r) / 2 on ±1 vectors; here on the CPU.
    query, reference = random_codes(17, dim, seed=3), random_codes(23, dim, seed=4)
    query_pm, reference_pm = (_plus_minus(torch.from_numpy(c), dtype) for c in (query, reference))
    assert set(query_pm.unique().tolist()) == {-1.0, 1.0}
    block = _hamming_block(query_pm, reference_pm)
    assert block.dtype == dtype
    assert torch.equal(block, hamming_distances(query, reference).to(dtype))


def test_chunking_changes_nothing():
    codes, labels = tied_codes()
    full = hamming_distances(codes, codes)
    full_d, full_i = hamming_neighbors(codes, k=30, chunk_size=len(codes))
    full_metrics = retrieval_metrics(codes, labels, metric="hamming", chunk_size=len(codes))
    for chunk_size in (1, 3, None):
        assert torch.equal(hamming_distances(codes, codes, chunk_size=chunk_size), full)
        d, i = hamming_neighbors(codes, k=30, chunk_size=chunk_size)
        assert torch.equal(d, full_d) and torch.equal(i, full_i)
        metrics = retrieval_metrics(codes, labels, metric="hamming", chunk_size=chunk_size)
        assert metrics == full_metrics


def test_neighbors_are_sorted_by_distance_then_index():
    codes, _ = tied_codes(num_rows=120, seed=1)
    distances = np.array(naive_hamming(codes, codes))
    np.fill_diagonal(distances, 10**6)  # the query itself, excluded
    order = np.argsort(distances, axis=1, kind="stable")  # stable: (distance, index)
    for k in (1, 5, 40, 119):
        d, i = hamming_neighbors(codes, k=k)
        assert d.dtype == torch.int32 and i.dtype == torch.int64
        assert i.tolist() == order[:, :k].tolist()
        assert d.tolist() == np.take_along_axis(distances, order[:, :k], axis=1).tolist()
    d, i = hamming_neighbors(codes[:50], codes, k=7)  # a reference set: nothing excluded
    assert (d[:, 0] == 0).all()
    full = np.array(naive_hamming(codes[:50], codes))
    assert i.tolist() == np.argsort(full, axis=1, kind="stable")[:, :7].tolist()


def test_the_query_is_excluded_by_index_among_more_than_k_duplicates():
    # Six copies of one code, then six of another: the first neighbours of query 4 are copies
    # 0, 1, 2 that come before it, for query 0 they are 1, 2, 3 (itself skipped).
    codes = np.repeat(np.array([[0, 0], [255, 1]], dtype=np.uint8), 6, axis=0)
    d, i = hamming_neighbors(codes, k=3)
    assert i[4].tolist() == [0, 1, 2] and i[0].tolist() == [1, 2, 3]
    assert i[11].tolist() == [6, 7, 8] and d.unique().tolist() == [0]
    d, i = hamming_neighbors(codes, k=8)
    assert i[7].tolist() == [6, 8, 9, 10, 11, 0, 1, 2] and d[7].tolist() == [0] * 5 + [9] * 3


def test_packed_metrics_equal_float_metrics_on_the_bits_with_many_ties():
    codes, labels = tied_codes()
    bits = unpack_bits(codes, 8)
    ks = (1, 2, 4, 8, 16, 32)
    packed = retrieval_metrics(codes, labels, ks, metric="hamming", nmi=True)
    unpacked = retrieval_metrics(bits, labels, ks, metric="squared_euclidean", nmi=True)
    assert packed == unpacked
    assert 0.05 < packed["recall@1"] < 0.9  # not a trivial value
    d, i = hamming_neighbors(codes, k=100)
    float_d, float_i = nearest_neighbors(bits, k=100, metric="squared_euclidean")
    assert torch.equal(i, float_i) and torch.equal(d.float(), float_d)
    # query/reference form: nothing excluded; queries meet duplicates of their codes at 0
    query, reference = slice(0, 100), slice(100, None)
    packed = retrieval_metrics(
        codes[query], labels[query], ks, reference=codes[reference],
        reference_labels=labels[reference], metric="hamming",
    )  # fmt: skip
    unpacked = retrieval_metrics(
        bits[query], labels[query], ks, reference=bits[reference],
        reference_labels=labels[reference], metric="squared_euclidean",
    )  # fmt: skip
    assert packed == unpacked


# Four 8-bit codes; row 1 has an exact duplicate of another class with a lower index (row 0):
#   index  code        class
#   0      0000 0000   X
#   1      0000 0000   Y   the duplicate of row 0
#   2      1000 0000   Y   (bit 0 set) row 1's positive, one bit away
#   3      1111 1111   X
# Neighbours, self excluded by index, ties by index (distance: index class):
#   q0 X: 0:1 Y, 1:2 Y, 8:3 X   first hit at rank 3
#   q1 Y: 0:0 X, 1:2 Y, 8:3 X   rank 2 (excluding by distance 0 would drop row 0: rank 1)
#   q2 Y: 1:0 X, 1:1 Y, 7:3 X   rank 2 (the tie at distance 1 goes to the lower index)
#   q3 X: 7:2 Y, 8:0 X, 8:1 Y   rank 2
HAND_CODES = np.array([[0b00000000], [0b00000000], [0b00000001], [0b11111111]], dtype=np.uint8)
HAND_LABELS = ["X", "Y", "Y", "X"]


def test_query_excluded_by_index_not_by_distance():
    d, i = hamming_neighbors(HAND_CODES, k=3)
    assert i.tolist() == [[1, 2, 3], [0, 2, 3], [0, 1, 3], [2, 0, 1]]
    assert d.tolist() == [[0, 1, 8], [0, 1, 8], [1, 1, 7], [7, 8, 8]]
    expected = {
        "recall@1": 0.0, "recall@2": 0.75, "recall@3": 1.0, "map@r": 0.0, "r_precision": 0.0,
        "num_queries": 4, "num_skipped_queries": 0,
    }  # fmt: skip
    assert retrieval_metrics(HAND_CODES, HAND_LABELS, (1, 2, 3), metric="hamming") == expected
    bits = unpack_bits(HAND_CODES, 8)
    assert retrieval_metrics(bits, HAND_LABELS, (1, 2, 3), metric="squared_euclidean") == expected


@pytest.mark.parametrize("dim", [1, 7, 8, 9, 100])
def test_pack_unpack_round_trip(dim):
    x = np.random.default_rng(dim).normal(size=(6, dim)).astype(np.float32)
    codes = binarize(x)
    assert codes.dtype == np.uint8 and codes.shape == (6, -(-dim // 8))
    assert np.array_equal(unpack_bits(codes, dim), (x > 0).astype(np.uint8))
    unpacked = unpack_bits(torch.from_numpy(codes), dim)  # a tensor in, a tensor out
    assert isinstance(unpacked, torch.Tensor) and torch.equal(
        unpacked, torch.from_numpy(x > 0).byte()
    )
    # padding bits are 0: all-positive rows fill exactly `dim` bits
    assert unpack_bits(binarize(np.ones((1, dim))), 8 * codes.shape[1]).sum() == dim


def test_bit_order_is_least_significant_first_as_in_faiss():
    x = -np.ones((1, 10), dtype=np.float32)
    x[0, [0, 9]] = 1  # bit 0 is the lowest bit of byte 0; bit 9 the second lowest of byte 1
    assert binarize(x).tolist() == [[1, 2]]
    # faiss's own packing (which sets bits for >= 0) gives the same bytes when no value is 0
    x = np.random.default_rng(0).normal(size=(5, 100)).astype(np.float32)
    faiss_codes = np.empty((5, 13), dtype=np.uint8)
    faiss.fvecs2bitvecs(faiss.swig_ptr(x), faiss.swig_ptr(faiss_codes), 100, 5)
    assert np.array_equal(binarize(x), faiss_codes)


def test_binarize_threshold_and_input_types():
    x = np.array([[0.0, -0.0, -1.0, 2.0, 1e-30, -1e-30, 3.0, -5.0]])
    assert unpack_bits(binarize(x), 8).tolist() == [[0, 0, 0, 1, 1, 0, 1, 0]]
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10, 37)).astype(np.float32)
    x[:, :3] = 0
    codes = binarize(x)
    for same in (torch.from_numpy(x), torch.from_numpy(x).half(), x.astype(np.float64)):
        assert np.array_equal(binarize(same), codes)


def test_errors():
    codes = random_codes(4, 20, seed=0)
    with pytest.raises(ValueError, match=r"\(N, D\) array; got shape \(5,\)"):
        binarize(np.ones(5))
    with pytest.raises(ValueError, match="got shape"):
        binarize(np.ones((0, 5)))
    with pytest.raises(ValueError, match="must be float to binarize; got torch.int64"):
        binarize(torch.ones(3, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"1 of 2 rows with NaN or inf.*\[1\]"):
        binarize(np.array([[1.0, 2.0], [np.nan, 1.0]]))
    with pytest.raises(ValueError, match="codes have 3 bytes per row, which hold 17 to 24 bits"):
        unpack_bits(codes, 16)
    with pytest.raises(ValueError, match="dim=25"):
        unpack_bits(codes, 25)
    with pytest.raises(ValueError, match="uint8 packed bits.*float32.*binarize"):
        hamming_distances(codes.astype(np.float32), codes)
    with pytest.raises(ValueError, match="non-empty"):
        hamming_distances(codes[0], codes)
    with pytest.raises(ValueError, match="query_codes has 3 bytes per code but reference has 2"):
        hamming_distances(codes, codes[:, :2])
    with pytest.raises(ValueError, match="query has 3 bytes per code but reference has 2"):
        hamming_neighbors(codes, codes[:, :2], k=1)
    with pytest.raises(ValueError, match="embeddings has 3 bytes per code but reference has 2"):
        retrieval_metrics(
            codes, [0, 0, 1, 1], metric="hamming", reference=codes[:, :2], reference_labels=[0] * 4
        )
    with pytest.raises(ValueError, match="embeddings must be uint8 packed bits"):
        retrieval_metrics(np.ones((4, 3)), [0, 0, 1, 1], ks=(1,), metric="hamming")
    with pytest.raises(ValueError, match="k=4 but there are 3 references"):
        hamming_neighbors(codes, k=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu():
    codes, labels = tied_codes()
    wide = random_codes(500, 1000, seed=5)
    on_gpu = torch.from_numpy(wide).cuda()
    assert torch.equal(
        hamming_distances(on_gpu, on_gpu, chunk_size=7).cpu(), hamming_distances(wide, wide)
    )
    for data in (codes, wide):
        cpu_d, cpu_i = hamming_neighbors(data, k=50, device="cpu")
        gpu_d, gpu_i = hamming_neighbors(data, k=50, device="cuda")
        assert torch.equal(cpu_i, gpu_i) and torch.equal(cpu_d, gpu_d)
    cpu = retrieval_metrics(codes, labels, metric="hamming", device="cpu")
    assert retrieval_metrics(codes, labels, metric="hamming", device="cuda") == cpu
