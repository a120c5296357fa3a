"""Exact nearest-neighbour search, float and Hamming: what metrics, binary codes and indexes share.

Distances: "euclidean" ||q - r||, "squared_euclidean" ||q - r||^2, "cosine" 1 - cos(q, r), and
"hamming" for packed uint8 codes (`binary.binarize`): the number of differing bits, which is
exactly the squared Euclidean distance between the unpacked {0, 1} vectors.

Chunked: the distance matrix of N queries against N references does not fit in memory for
large N (60,502 SOP test images: 14.6 GB in float32), so queries are processed in chunks; each
chunk is one matrix product against all references followed by `torch.topk`, and memory grows
as O(chunk_size * N). On the CPU, float32 scores are computed `TILE` references at a time
instead, each tile handed to faiss's heaps of the k best while it is still in the cache
(`_heap_chunks`, `faiss_flat.smallest`).

Ties: equal distances come in reference order, whatever k and the chunking (`_smallest`, and
faiss's heaps by construction, see `faiss_flat.py`), so a metric never changes with the other K
asked for, and the Hamming search agrees exactly with a float search of the unpacked bits.

How Hamming distances are computed:

- on the CPU, XOR and popcount with `faiss.hammings`. Measured with one thread (best of 3, two
  runs on a shared 2-core machine) for 32 queries against 60,502 random codes, 512 bits:
  faiss 5-7 ms, numpy.bitwise_count on uint64 words 99-103 ms, on bytes 102-139 ms, a 256-entry
  table 460-489 ms, ±1 matrix product in float32 88-142 ms, and for comparison float32
  distances at 512 dimensions (one addmm) 222-240 ms; 2048 bits: 51-74, 202-251, 339-412,
  1,483-1,662, 311-365 and 679-955 ms.
- on the CPU, the k nearest with faiss's `IndexBinaryFlat` in its counting mode
  (`use_heap = False`, `faiss_flat.hamming_chunks`), which keeps, for each distance, the first
  references met in index order, so ties come out by reference index as everywhere else
  (tests check it against a float search of the unpacked bits). Ranking a full (queries, R)
  block of distances with `torch.topk` took longer than computing it: 2000 queries x 60,502
  codes of 512 bits ran at 1,700 queries/s that way, against 9,400 with the counting search,
  and 2048 bits at 480 against 1,200 (benchmarks/binary_search.py).
- elsewhere (a GPU), matrix products of ±1 vectors, where a GPU is fastest: for ±1 vectors of
  length L, q.r = L - 2 * hamming(q, r). Each product is an integer, exact in float32 up to
  L = 2^24 bits.
"""

from collections.abc import Iterator

import numpy as np
import torch

from utils_cv.similarity import faiss_flat

METRICS = ("euclidean", "squared_euclidean", "cosine", "hamming")

# Memory for one chunk's block of distances; sets the default chunk size.
# 256 MB holds 1,109 rows against the 60,502 SOP test images in float32.
BLOCK_BYTES = 256 * 2**20
# References scored at once on the CPU (`_heap_chunks`): a (1,109, 1,024) float32 tile, 4.5 MB,
# is still in the cache when faiss's heaps read it. 512 and 2,048 were slower.
TILE = 1024


def _as_embeddings(x, name: str) -> torch.Tensor:
    """Return `x` as a (N, D) float tensor (float64 kept, other dtypes as float32)."""
    x = torch.as_tensor(x)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array; got shape {tuple(x.shape)}")
    if x.dtype != torch.float64:
        x = x.float()
    bad_rows = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
    if len(bad_rows) > 0:
        raise ValueError(
            f"{name} has {len(bad_rows)} of {len(x)} rows with NaN or inf values "
            f"(first rows: {bad_rows[:5].tolist()}); a diverged model produces these: "
            "check the training loss and learning rate"
        )
    return x


def _as_input(x, name: str, metric: str) -> torch.Tensor:
    """Packed uint8 codes for metric="hamming", float embeddings for the others."""
    return _as_codes(x, name) if metric == "hamming" else _as_embeddings(x, name)


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not supported; use one of {METRICS}")


def _check_widths(query: torch.Tensor, reference: torch.Tensor, metric: str, name="query") -> None:
    if query.shape[1] != reference.shape[1]:
        unit = "bytes per code" if metric == "hamming" else "dimensions"
        raise ValueError(
            f"{name} has {query.shape[1]} {unit} but reference has {reference.shape[1]}; "
            "both need the same size"
        )


def _prepare(x: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "hamming":
        return _searchable(x)  # codes on the CPU, ±1 vectors on a GPU (see the docstring)
    # Cosine distance is the Euclidean geometry of unit vectors; normalize once, not per chunk.
    # A zero vector has no direction: it stays zero and is at cosine distance 1 from everything.
    return torch.nn.functional.normalize(x, dim=1) if metric == "cosine" else x


def _rank_scores(
    query: torch.Tensor,
    reference: torch.Tensor,
    metric: str,
    reference_sq: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores that order references exactly like the distance, with a single matrix product.

    query: (Q, D), reference: (R, D), both already through `_prepare`; returns (Q, R).
    euclidean:  ||r||^2 - 2 q.r  (= ||q - r||^2 - ||q||^2; the constant ||q||^2 of a row is
                added back only for the k distances kept, see `_scores_to_distances`)
    cosine:     -q.r             (= (1 - cos) - 1 for unit vectors)
    hamming:    the Hamming distance itself, exact integers (int32 from popcount on the CPU)
    `out` lets the caller reuse one buffer for every chunk instead of allocating each time.
    """
    if metric == "hamming":
        return _hamming_block(query, reference, out=out)
    if metric == "cosine":
        # alpha=-1 scales inside the product: no negated copy of the queries (beta=0: the
        # zero added is ignored).
        return torch.addmm(query.new_zeros(()), query, reference.T, beta=0, alpha=-1, out=out)
    if reference_sq is None:
        reference_sq = (reference * reference).sum(dim=1)
    # addmm writes reference_sq into the result and lets the BLAS add -2 q.r on top of it.
    return torch.addmm(reference_sq, query, reference.T, alpha=-2, out=out)


def _scores_to_distances(scores: torch.Tensor, query: torch.Tensor, metric: str) -> torch.Tensor:
    """Turn `_rank_scores` (Q, k) into distances; the expansion can dip below 0 by rounding."""
    if metric == "hamming":
        return scores
    if metric == "cosine":
        return (scores + 1).clamp_(0, 2)
    squared = (scores + (query * query).sum(dim=1, keepdim=True)).clamp_(min=0)
    return squared.sqrt_() if metric == "euclidean" else squared


def compute_distances(query, reference, metric: str = "euclidean") -> torch.Tensor:
    """All pairwise distances between two sets of embeddings.

    Args:
        query: (Q, D) float, torch tensor or numpy array.
        reference: (R, D) float.
        metric: "euclidean" ||q - r||, "squared_euclidean" ||q - r||^2, "cosine" 1 - cos(q, r),
            or "hamming" for packed uint8 codes (`hamming_distances`).

    Returns:
        (Q, R) tensor on the inputs' device, float64 for float64 inputs, int32 for "hamming",
        float32 otherwise.

    Computed as ||q||^2 + ||r||^2 - 2 q.r (one matrix product). In float32 this expansion
    loses about 7 digits relative to ||q||^2 + ||r||^2: two identical unit vectors come out at
    a distance near 3e-4 instead of 0. This function is meant for the small sets shown in
    plots, so it computes in float64 (error about 1e-8 for unit vectors) and clamps the tiny
    negative squared distances that rounding still leaves to 0. It holds the whole (Q, R)
    matrix: use `nearest_neighbors` for large sets.
    """
    _check_metric(metric)
    if metric == "hamming":
        return hamming_distances(query, reference)
    query, reference = _as_embeddings(query, "query"), _as_embeddings(reference, "reference")
    _check_widths(query, reference, metric)
    dtype = query.dtype
    query64 = _prepare(query.double(), metric)
    reference64 = _prepare(reference.double().to(query.device), metric)
    scores = _rank_scores(query64, reference64, metric)
    return _scores_to_distances(scores, query64, metric).to(dtype)


def _default_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _prepared(
    query: torch.Tensor, reference: torch.Tensor, metric: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both sets on `device` through `_prepare`, the references in the queries' type."""
    reference = _prepare(reference.to(device, query.dtype), metric)
    return _prepare(query.to(device), metric), reference


def _chunk_plan(
    query: torch.Tensor, reference: torch.Tensor, metric: str, chunk_size: int | None, itemsize: int
) -> tuple[int, torch.Tensor | None]:
    """Queries per chunk (by default, as many as fill `BLOCK_BYTES` of scores against all
    references) and the references' squared norms where the metric's scores need them."""
    if chunk_size is None:
        chunk_size = max(1, BLOCK_BYTES // (itemsize * len(reference)))
    euclidean = metric in ("euclidean", "squared_euclidean")
    reference_sq = (reference * reference).sum(dim=1) if euclidean else None
    return min(chunk_size, len(query)), reference_sq


def _score_blocks(
    query: torch.Tensor,
    reference: torch.Tensor,
    metric: str,
    chunk_size: int | None,
    self_index: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (start, chunk, scores): the `_rank_scores` (c, N) of each chunk of c queries.

    query (Q, D) and reference (N, D) come from `_prepared`. One block is reused from chunk to
    chunk: memory O(chunk_size * N). self_index: (Q,) position of each query in `reference`;
    that reference gets the largest score, so that it comes after every other.
    """
    device = reference.device
    # Popcount gives int32 Hamming distances; everything else scores in the reference's type.
    dtype = reference.dtype if reference.is_floating_point() else torch.int32
    chunk_size, reference_sq = _chunk_plan(query, reference, metric, chunk_size, dtype.itemsize)
    block = torch.empty(chunk_size, len(reference), dtype=dtype, device=device)
    excluded = torch.inf if dtype.is_floating_point else torch.iinfo(dtype).max
    for start in range(0, len(query), chunk_size):
        chunk = query[start : start + chunk_size]
        scores = _rank_scores(chunk, reference, metric, reference_sq, out=block[: len(chunk)])
        if self_index is not None:
            # By index, not by distance 0: a duplicate of the query is a genuine neighbour.
            rows = torch.arange(len(chunk), device=device)
            scores[rows, self_index[start : start + len(chunk)].to(device)] = excluded
        yield start, chunk, scores


def _neighbor_chunks(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    metric: str,
    chunk_size: int | None,
    device: torch.device,
    self_index: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield (start, distances (c, k), indices (c, k)) on `device` for chunks of c queries.

    query: (Q, D), reference: (N, D) (packed codes for "hamming"). self_index: (Q,) position
    of each query in `reference` when the query belongs to it; that one reference is excluded
    from the query's neighbours.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of queries")
    if metric == "hamming" and device.type == "cpu":
        yield from faiss_flat.hamming_chunks(query, reference, k, chunk_size, self_index)
        return
    query, reference = _prepared(query, reference, metric, device)
    if device.type == "cpu" and reference.dtype == torch.float32:
        yield from _heap_chunks(query, reference, k, metric, chunk_size, self_index)
        return
    for start, chunk, scores in _score_blocks(query, reference, metric, chunk_size, self_index):
        values, indices = _smallest(scores, k)
        yield start, _scores_to_distances(values, chunk, metric), indices


def _heap_chunks(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    metric: str,
    chunk_size: int | None,
    self_index: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """`_neighbor_chunks` for float32 on the CPU: scores by tiles, the k best by faiss's heaps.

    query, reference: from `_prepared`. A full (c, N) block of scores leaves the cache before
    `torch.topk` reads it back, and topk then costs a third of the matrix product (20,000 x 512
    on 2 cores, 1,109 queries at a time: 0.49 s with k = 12, against 1.58 s for the products).
    Here each chunk's `_rank_scores` are computed `TILE` references at a time, and faiss's
    heaps take each tile while it is still in the cache (`faiss_flat.smallest`, which keeps
    equal scores in index order: the results of `_smallest`): products and heaps took 1.46 to
    1.60 s where the products alone in full blocks took 1.49 to 1.56 s. With `self_index`,
    each query keeps k + 1 neighbours and drops its own row. Memory: O(chunk_size * TILE).

    torch's and faiss's threads take turns every tile, and OpenMP threads spin while they wait
    for work: on cores that other processes keep busy, this path slows down more than one large
    product does (1.3 to 2.4 times the products, measured on 2 shared cores; setting
    OMP_WAIT_POLICY=PASSIVE helps), where full blocks and `torch.topk` cost about 1.3 times
    the products on idle cores.
    """
    chunk_size, reference_sq = _chunk_plan(query, reference, metric, chunk_size, itemsize=4)
    buffer = torch.empty(chunk_size * min(TILE, len(reference)))
    kept = k + int(self_index is not None)

    def tiles(chunk: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        for first in range(0, len(reference), TILE):
            tile = reference[first : first + TILE]
            tile_sq = None if reference_sq is None else reference_sq[first : first + TILE]
            out = buffer[: len(chunk) * len(tile)].view(len(chunk), len(tile))
            yield first, _rank_scores(chunk, tile, metric, tile_sq, out=out)

    for start in range(0, len(query), chunk_size):
        chunk = query[start : start + chunk_size]
        values, indices = faiss_flat.smallest(tiles(chunk), len(chunk), kept)
        if self_index is not None:
            own = self_index[start : start + len(chunk)].cpu()
            values, indices = faiss_flat.drop_own(values, indices, own)
        yield start, _scores_to_distances(values, chunk, metric), indices


def _smallest(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest scores of each row and their columns, ordered by (score, column).

    `torch.topk` alone breaks ties in an order that changes with k, so Recall@1 would depend
    on which other K were asked for. Here equal scores come in column order, and a tie that
    straddles the k-th place keeps its lowest columns. Rows without ties cost nothing extra;
    a straddling tie, the rule for Hamming distances, costs a few passes over the row.
    """
    extra = int(k < scores.shape[1])  # one more to see whether a tie straddles the k-th place
    values, indices = torch.topk(scores, k + extra, dim=1, largest=False)
    straddles = values[:, -1] == values[:, -2] if extra and k > 0 else None
    values, indices = values[:, :k], indices[:, :k]
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1)
    if straddles is not None:
        tied &= ~straddles  # those rows are fully sorted below anyway
    if tied.any():
        # One sort by (run of equal values, column); the values are already in order.
        rows = tied.nonzero().flatten()
        row_values, row_indices = values[rows], indices[rows]
        run = torch.zeros_like(row_indices)
        run[:, 1:] = (row_values[:, 1:] != row_values[:, :-1]).cumsum(dim=1)
        order = (run * scores.shape[1] + row_indices).argsort(dim=1)
        values[rows], indices[rows] = row_values.gather(1, order), row_indices.gather(1, order)
    if straddles is not None and straddles.any():
        # Keep every score below the k-th value and the lowest columns of those equal to it:
        # k per row, found in column order. A full sort of each row would cost far more.
        rows = straddles.nonzero().flatten()
        row_scores, kth = scores[rows], values[rows, k - 1 :]
        below, at = row_scores < kth, row_scores == kth
        needed = k - below.sum(dim=1, keepdim=True, dtype=torch.int32)
        keep = below | (at & (at.cumsum(dim=1, dtype=torch.int32) <= needed))
        columns = keep.nonzero()[:, 1].view(len(rows), k)
        row_values = row_scores.gather(1, columns)
        row_values, order = torch.sort(row_values, dim=1, stable=True)
        values[rows], indices[rows] = row_values, columns.gather(1, order)
    return values, indices


def nearest_neighbors(
    query,
    reference=None,
    k: int = 10,
    metric: str = "euclidean",
    chunk_size: int | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of every query, nearest first.

    Args:
        query: (Q, D) float, torch tensor or numpy array.
        reference: (N, D) float; None searches `query` against itself, each query's own row
            excluded (by index: an exact duplicate of a query still counts as a neighbour).
        k: neighbours per query, at most N (N - 1 when `reference` is None).
        metric: "euclidean", "squared_euclidean", "cosine" (1 - cos), or "hamming" for packed
            uint8 codes (Q, B) and (N, B), see `compute_distances`.
        chunk_size: queries per chunk; memory is about chunk_size * N distances (chunk_size
            * `TILE` for float32 on the CPU). None picks the chunk so that one block of
            chunk_size * N distances takes `BLOCK_BYTES` (256 MB).
        device: where to compute; None means CUDA when available, else CPU.

    Returns:
        distances (Q, k) float (int32 for "hamming") and indices (Q, k) int64 into
        `reference`, on the CPU.

    The search computes float32 distances (float64 for float64 inputs) by the expansion of
    `compute_distances`: squared distances carry an absolute error of about
    1e-7 * (||q||^2 + ||r||^2), so references closer to each other than that may swap ranks.
    faiss, behind pytorch-metric-learning, has the same property. Ties (equal distances, e.g.
    duplicate references) come in reference order, whatever k and the chunking, so a metric
    does not change with the other K asked for.
    """
    _check_metric(metric)
    query = _as_input(query, "query", metric)
    self_index = None
    if reference is None:
        reference, self_index = query, torch.arange(len(query))
    else:
        reference = _as_input(reference, "reference", metric)
    _check_widths(query, reference, metric)
    available = len(reference) - (self_index is not None)
    if not 1 <= k <= available:
        raise ValueError(
            f"k={k} but there are {available} references per query; use 1 <= k <= {available}"
        )
    dtype = torch.int32 if metric == "hamming" else query.dtype
    distances = torch.empty(len(query), k, dtype=dtype)
    indices = torch.empty(len(query), k, dtype=torch.int64)
    for start, chunk_distances, chunk_indices in _neighbor_chunks(
        query, reference, k, metric, chunk_size, _default_device(device), self_index
    ):
        distances[start : start + len(chunk_distances)] = chunk_distances.cpu()
        indices[start : start + len(chunk_indices)] = chunk_indices.cpu()
    return distances, indices


def _as_codes(codes, name: str) -> torch.Tensor:
    """`codes` as a contiguous (N, bytes) uint8 tensor, or a clear error."""
    x = torch.as_tensor(codes)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(
            f"{name} must be a non-empty (N, bytes) array of packed bits; "
            f"got shape {tuple(x.shape)}"
        )
    if x.dtype != torch.uint8:
        hint = " (float embeddings: pack them with binarize first)" if x.is_floating_point() else ""
        raise ValueError(f"{name} must be uint8 packed bits, 8 per byte; got {x.dtype}{hint}")
    return x.contiguous()


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """(N, bytes) uint8 -> (N, 8 * bytes) uint8 {0, 1}, in `binarize`'s bit order."""
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return ((codes[:, :, None] >> shifts) & 1).flatten(1)


def _searchable(codes: torch.Tensor) -> torch.Tensor:
    """Codes as `_hamming_block` takes them: uint8 on the CPU, ±1 float32 elsewhere."""
    return codes if codes.device.type == "cpu" else _plus_minus(codes)


def _plus_minus(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, bytes) uint8 -> (N, 8 * bytes) vectors of -1 (bit 0) and +1 (bit 1)."""
    return _unpack(codes).to(dtype).mul_(2).sub_(1)


def _hamming_block(
    query: torch.Tensor, reference: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """(c, R) Hamming distances between two sets from `_searchable` (both uint8 or both ±1).

    uint8 codes on the CPU give int32 (faiss's popcount); ±1 vectors give exact integers in
    their float type. `out`, if given, must be contiguous and of that type.
    """
    if query.is_floating_point():
        # q.r = (agreeing bits) - (differing bits) = L - 2 hamming; padding bits always agree.
        half = torch.tensor(query.shape[1] / 2, dtype=query.dtype, device=query.device)
        return torch.addmm(half, query, reference.T, alpha=-0.5, out=out)
    import faiss

    if out is None:
        out = torch.empty(len(query), len(reference), dtype=torch.int32)
    # faiss reads raw memory: the arrays must be contiguous, or it reads the wrong bytes.
    query_np, reference_np = query.contiguous().numpy(), reference.contiguous().numpy()
    out_np = out.numpy()
    assert out_np.flags.c_contiguous and out_np.dtype == np.int32
    faiss.hammings(
        faiss.swig_ptr(query_np),
        faiss.swig_ptr(reference_np),
        len(query),
        len(reference),
        query.shape[1],
        faiss.swig_ptr(out_np),
    )
    return out


def hamming_distances(query_codes, reference_codes, chunk_size: int | None = None) -> torch.Tensor:
    """All exact Hamming distances between two sets of packed codes.

    Args:
        query_codes: (Q, B) uint8, numpy array or torch tensor, e.g. from `binarize`.
        reference_codes: (R, B) uint8, packed the same way.
        chunk_size: queries per block on a GPU, where each block is an extra (chunk_size, R)
            float32 matrix; None picks blocks of about 256 MB. On the CPU, popcount writes
            straight into the result and needs no block.

    Returns:
        (Q, R) int32 tensor on the device of `query_codes`.
    """
    query = _as_codes(query_codes, "query_codes")
    reference = _as_codes(reference_codes, "reference_codes").to(query.device)
    _check_widths(query, reference, "hamming", "query_codes")
    if chunk_size is None:
        chunk_size = max(1, BLOCK_BYTES // (4 * len(reference)))
    elif chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be a positive number of queries")
    distances = torch.empty(len(query), len(reference), dtype=torch.int32, device=query.device)
    reference = _searchable(reference)
    if not reference.is_floating_point():
        return _hamming_block(query, reference, out=distances)
    for start in range(0, len(query), chunk_size):
        chunk = _searchable(query[start : start + chunk_size])
        distances[start : start + len(chunk)] = _hamming_block(chunk, reference)
    return distances


def hamming_neighbors(
    query_codes, reference_codes=None, k: int = 10, chunk_size: int | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest codes by Hamming distance, nearest first, ties by reference index.

    Args:
        query_codes: (Q, B) uint8 packed bits, numpy array or torch tensor.
        reference_codes: (R, B) uint8; None searches `query_codes` against themselves, each
            query's own row excluded by index (a duplicate code still counts as a neighbour).
        k, chunk_size, device: see `nearest_neighbors`.

    Returns:
        distances (Q, k) int32 and indices (Q, k) int64 into the reference codes, on the CPU:
        exactly what `nearest_neighbors(metric="squared_euclidean")` gives on the unpacked bits.
    """
    return nearest_neighbors(
        query_codes, reference_codes, k=k, metric="hamming", chunk_size=chunk_size, device=device
    )
