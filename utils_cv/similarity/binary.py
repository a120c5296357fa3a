"""Binary codes and exact Hamming search.

Binarization keeps one bit per dimension: the sign of the final embedding (bit = value > 0).
The bits are packed eight to a byte, so 2048 bits take 256 bytes, the memory of 64 float32
values: 32 times less than the float embedding. The distance between two codes is the Hamming
distance, the number of bits in which they differ. Between {0, 1} vectors the squared Euclidean
distance is exactly that number, so a float search on the unpacked bits ranks like a Hamming
search; both break ties by reference index (see `metrics._smallest`), so they agree exactly.

Bit order: bit j of a row is bit j % 8 of byte j // 8, counted from the least significant bit
(numpy's `packbits(..., bitorder="little")`). faiss's `fvecs2bitvecs` packs in the same order,
though it sets a bit for values >= 0 where this module takes > 0. The order does not change any
distance, as long as every code is packed the same way: XOR and popcount work bit by bit.

How distances are computed:
- on the CPU, XOR and popcount with `faiss.hammings`. Measured with one thread (best of 3, two
  runs on a shared 2-core machine) for 32 queries against 60,502 random codes, 512 bits:
  faiss 5-7 ms, numpy.bitwise_count on uint64 words 99-103 ms, on bytes 102-139 ms, a 256-entry
  table 460-489 ms, ±1 matrix product in float32 88-142 ms, and for comparison float32
  distances at 512 dimensions (one addmm) 222-240 ms; 2048 bits: 51-74, 202-251, 339-412,
  1,483-1,662, 311-365 and 679-955 ms.
- on the CPU, the k nearest with faiss's `IndexBinaryFlat` in its counting mode
  (`use_heap = False`), which keeps, for each distance, the first references met in index
  order, so ties come out by reference index as everywhere else in this package (tests check
  it against a float search of the unpacked bits). Ranking a full (queries, R) block of
  distances with `torch.topk` took longer than computing it: 2000 queries x 60,502 codes of
  512 bits ran at 1,700 queries/s that way, against 9,400 with the counting search, and 2048
  bits at 480 against 1,200 (benchmarks/binary_search.py).
- elsewhere (a GPU), matrix products of ±1 vectors, where a GPU is fastest: for ±1 vectors of
  length L, q.r = L - 2 * hamming(q, r). Each product is an integer, exact in float32 up to
  L = 2^24 bits.
"""

from collections.abc import Iterator

import numpy as np
import torch


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


def binarize(embeddings) -> np.ndarray:
    """Pack the signs of embeddings into bits: bit j of a row is 1 when its value j is > 0.

    Args:
        embeddings: (N, D) float, torch tensor (on any device) or numpy array.

    Returns:
        codes: (N, ceil(D / 8)) uint8 numpy array. Bit j of a row is bit j % 8 of byte j // 8,
        least significant first (see the module docstring); the unused bits of the last byte
        are 0, so they add nothing to any Hamming distance.

    A value of exactly 0 gives bit 0, like a negative one. The codes are numpy arrays because
    they are what gets stored and what faiss's binary indexes take; to search them on a GPU,
    `torch.from_numpy(codes).cuda()`.
    """
    x = torch.as_tensor(embeddings)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"embeddings must be a non-empty (N, D) array; got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"embeddings must be float to binarize; got {x.dtype}")
    bad_rows = (~torch.isfinite(x).all(dim=1)).nonzero().flatten()
    if len(bad_rows) > 0:
        raise ValueError(
            f"embeddings has {len(bad_rows)} of {len(x)} rows with NaN or inf values "
            f"(first rows: {bad_rows[:5].tolist()}); a NaN would silently become bit 0: "
            "check the training loss and learning rate"
        )
    return np.packbits((x > 0).cpu().numpy(), axis=1, bitorder="little")


def _unpack(codes: torch.Tensor) -> torch.Tensor:
    """(N, bytes) uint8 -> (N, 8 * bytes) uint8 {0, 1}, in `binarize`'s bit order."""
    shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    return ((codes[:, :, None] >> shifts) & 1).flatten(1)


def unpack_bits(codes, dim: int):
    """The bits of packed codes as (N, dim) uint8 0s and 1s: the inverse of `binarize`'s packing.

    Args:
        codes: (N, ceil(dim / 8)) uint8, numpy array or torch tensor.
        dim: bits per code, the D of the embeddings the codes were made from.

    Returns:
        (N, dim) uint8 of the same kind as `codes` (a tensor stays on its device). The padding
        bits of the last byte are dropped.
    """
    x = _as_codes(codes, "codes")
    if dim < 1 or x.shape[1] != -(-dim // 8):
        raise ValueError(
            f"codes have {x.shape[1]} bytes per row, which hold {8 * x.shape[1] - 7} to "
            f"{8 * x.shape[1]} bits, but dim={dim}; pass the size of the embeddings they come from"
        )
    bits = _unpack(x)[:, :dim]
    return bits if isinstance(codes, torch.Tensor) else bits.numpy()


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
    from utils_cv.similarity.metrics import BLOCK_BYTES, _check_widths  # metrics imports us

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


def _faiss_neighbor_chunks(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    chunk_size: int | None,
    self_index: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """`metrics._neighbor_chunks` for uint8 codes on the CPU, by faiss's counting search.

    Yields (start, distances (c, k) int32, indices (c, k) int64). With `self_index`, each
    query asks for k + 1 neighbours and drops its own row, or the last one when its own row is
    not among them (more than k duplicates of it come earlier in index order).
    """
    import faiss

    index = faiss.IndexBinaryFlat(8 * reference.shape[1])
    index.use_heap = False  # counting: equal distances in index order, by construction
    index.add(reference.cpu().numpy())
    extra = int(self_index is not None)
    chunk_size = len(query) if chunk_size is None else chunk_size
    for start in range(0, len(query), chunk_size):
        chunk = query[start : start + chunk_size].cpu().numpy()
        distances, indices = (torch.from_numpy(a) for a in index.search(chunk, k + extra))
        if extra:
            keep = indices != self_index[start : start + len(chunk), None].cpu()
            keep[keep.all(dim=1), -1] = False
            distances, indices = distances[keep].view(-1, k), indices[keep].view(-1, k)
        yield start, distances, indices


def hamming_neighbors(
    query_codes, reference_codes=None, k: int = 10, chunk_size: int | None = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest codes by Hamming distance, nearest first, ties by reference index.

    Args:
        query_codes: (Q, B) uint8 packed bits, numpy array or torch tensor.
        reference_codes: (R, B) uint8; None searches `query_codes` against themselves, each
            query's own row excluded by index (a duplicate code still counts as a neighbour).
        k, chunk_size, device: see `metrics.nearest_neighbors`.

    Returns:
        distances (Q, k) int32 and indices (Q, k) int64 into the reference codes, on the CPU:
        exactly what `nearest_neighbors(metric="squared_euclidean")` gives on the unpacked bits.
    """
    from utils_cv.similarity.metrics import nearest_neighbors  # metrics imports this module

    return nearest_neighbors(
        query_codes, reference_codes, k=k, metric="hamming", chunk_size=chunk_size, device=device
    )
