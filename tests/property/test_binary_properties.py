"""Properties of binary codes: packing, Hamming distances and search, metrics on codes.

Codes of any number of bits, including numbers that are not a multiple of 8 (the last byte
then has padding bits, which `binarize` leaves at 0).
"""

from unittest import mock

import numpy as np
import torch
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from utils_cv.similarity import metrics, search
from utils_cv.similarity.binary import binarize, hamming_distances, hamming_neighbors, unpack_bits
from utils_cv.similarity.metrics import retrieval_metrics

MAX_ROWS = 30
MAX_BITS = 40


@st.composite
def bit_rows(draw, max_rows: int = MAX_ROWS, max_bits: int = MAX_BITS):
    """(N, dim) uint8 bits 0/1, some rows copied over others (equal codes)."""
    num_rows, dim = draw(st.integers(1, max_rows)), draw(st.integers(1, max_bits))
    bits = draw(arrays(np.uint8, (num_rows, dim), elements=st.integers(0, 1)))
    copies = st.tuples(st.integers(0, num_rows - 1), st.integers(0, num_rows - 1))
    for source, target in draw(st.lists(copies, max_size=num_rows // 2)):
        bits[target] = bits[source]
    return bits


def any_bytes(num_rows: int, num_bytes: int):
    return arrays(np.uint8, (num_rows, num_bytes), elements=st.integers(0, 255))


def plus_minus(bits: np.ndarray) -> np.ndarray:
    return 2 * bits.astype(np.float32) - 1


def popcount_of_xor(query: np.ndarray, reference: np.ndarray) -> list[list[int]]:
    """Differing bits of every pair, counted byte by byte in plain Python."""
    return [
        [sum(bin(a ^ b).count("1") for a, b in zip(q.tolist(), r.tolist(), strict=True))
         for r in reference]
        for q in query
    ]  # fmt: skip


@given(
    arrays(
        np.float32,
        st.tuples(st.integers(1, MAX_ROWS), st.integers(1, MAX_BITS)),
        elements=st.floats(-2, 2, width=32) | st.sampled_from([0.0, -0.0]),
    )
)
def test_unpacking_binarized_embeddings_gives_their_signs_for_any_dim(embeddings):
    """Bit j is 1 exactly where value j is > 0 (0 and -0 give 0); the padding bits are 0."""
    dim = embeddings.shape[1]
    codes = binarize(embeddings)
    assert codes.dtype == np.uint8 and codes.shape == (len(embeddings), -(-dim // 8))
    assert np.array_equal(unpack_bits(codes, dim), (embeddings > 0).astype(np.uint8))
    assert not (codes[:, -1] >> (dim - 8 * (codes.shape[1] - 1))).any()
    assert np.array_equal(binarize(torch.from_numpy(embeddings)), codes)


@given(bit_rows())
def test_binarizing_unpacked_bits_gives_back_the_codes_for_any_dim(bits):
    """pack(unpack(codes)) == codes, for codes whose padding bits are 0."""
    dim = bits.shape[1]
    codes = np.packbits(bits, axis=1, bitorder="little")
    unpacked = unpack_bits(codes, dim)
    assert np.array_equal(unpacked, bits)
    assert np.array_equal(binarize(plus_minus(unpacked)), codes)
    as_tensor = unpack_bits(torch.from_numpy(codes), dim)
    assert isinstance(as_tensor, torch.Tensor) and np.array_equal(as_tensor.numpy(), bits)


@st.composite
def code_pairs(draw, max_rows: int = 12, max_bytes: int = 6):
    """(query (Q, B), reference (R, B)): any bytes, padding bits set or not."""
    num_bytes = draw(st.integers(1, max_bytes))
    query = draw(any_bytes(draw(st.integers(1, max_rows)), num_bytes))
    return query, draw(any_bytes(draw(st.integers(1, max_rows)), num_bytes))


@given(code_pairs(), st.none() | st.integers(1, 8))
def test_hamming_distances_equal_the_popcount_of_xor_of_any_bytes(codes, chunk_size):
    query, reference = codes
    distances = hamming_distances(query, reference, chunk_size=chunk_size)
    assert distances.dtype == torch.int32
    assert distances.tolist() == popcount_of_xor(query, reference)


@given(code_pairs())
def test_plus_minus_products_give_the_popcount_of_xor(codes):
    """The GPU's formula, hamming = (L - q.r) / 2 on ±1 vectors, run here on the CPU."""
    query, reference = (torch.from_numpy(part) for part in codes)
    distances = search._hamming_block(search._plus_minus(query), search._plus_minus(reference))
    assert distances.tolist() == popcount_of_xor(*codes)


def brute_force_neighbors(codes: np.ndarray, k: int) -> tuple[list, list]:
    """Each row's k nearest other rows by (Hamming distance, index)."""
    distances = popcount_of_xor(codes, codes)
    nearest = [
        sorted((d, j) for j, d in enumerate(row) if j != i)[:k] for i, row in enumerate(distances)
    ]
    return [[d for d, _ in row] for row in nearest], [[j for _, j in row] for row in nearest]


@given(bit_rows(), st.data())
def test_hamming_neighbors_are_the_brute_force_ones_ties_by_index_own_row_excluded(bits, data):
    assume(len(bits) >= 2)
    k = data.draw(st.integers(1, len(bits) - 1))
    chunk_size = data.draw(st.none() | st.integers(1, len(bits)))
    codes = binarize(plus_minus(bits))
    distances, indices = hamming_neighbors(codes, k=k, chunk_size=chunk_size)
    expected_distances, expected_indices = brute_force_neighbors(codes, k)
    assert distances.tolist() == expected_distances
    assert indices.tolist() == expected_indices


@st.composite
def labelled_codes(draw):
    """(bits (N, dim), labels (N,), ks): at least one label shared by two rows."""
    bits = draw(bit_rows(max_bits=20))
    assume(len(bits) >= 2)
    num_classes = draw(st.integers(1, len(bits)))
    labels = draw(arrays(np.int64, len(bits), elements=st.integers(0, num_classes - 1)))
    assume(len(np.unique(labels)) < len(bits))
    ks = draw(st.lists(st.integers(1, len(bits) - 1), min_size=1, max_size=4))
    return bits, labels, ks


@given(
    labelled_codes(),
    st.sampled_from(["all_against_all", "query_against_reference", "exclude_same_index"]),
    st.none() | st.integers(1, MAX_ROWS),
    st.sampled_from([metrics.SEARCHED_K, 0]),
)
def test_metrics_on_codes_equal_metrics_on_the_plus_minus_one_vectors_ties_included(
    data, form, chunk_size, searched_k
):
    """Hamming = (D - q.r) / 2 = ||q - r||^2 / 4 on ±1 vectors = ||q - r||^2 on 0/1 bits: the
    same ranking, and all break ties by reference index. SEARCHED_K = 0 also runs the second pass
    (`metrics._first_relevant_ranks`) on the queries that need it."""
    bits, labels, ks = data
    query_bits, query_labels = reference_bits, reference_labels = bits, labels
    if form == "query_against_reference":  # the first half queries the second
        half = len(bits) // 2
        assume(half >= 1 and np.isin(labels[:half], labels[half:]).any())
        query_bits, reference_bits = bits[:half], bits[half:]
        query_labels, reference_labels = labels[:half], labels[half:]
        ks = [min(k, len(reference_bits)) for k in ks]

    def run(encode, metric):
        options = {}
        if form != "all_against_all":
            options = {
                "reference": encode(reference_bits),
                "reference_labels": reference_labels,
                "exclude_same_index": form == "exclude_same_index",
            }
        with mock.patch.object(metrics, "SEARCHED_K", searched_k):
            return retrieval_metrics(
                encode(query_bits),
                query_labels,
                ks,
                metric=metric,
                chunk_size=chunk_size,
                **options,
            )

    on_codes = run(lambda b: binarize(plus_minus(b)), "hamming")
    on_plus_minus = run(plus_minus, "euclidean")
    on_bits = run(lambda b: b.astype(np.float32), "squared_euclidean")
    assert on_codes == on_plus_minus == on_bits
