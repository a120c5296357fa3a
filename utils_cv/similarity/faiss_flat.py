"""faiss's exact selection on the CPU, held to the package's tie rule (see `search.py`).

The rule: equal distances come in reference order, and a tie that straddles the k-th place
keeps its lowest indices. Two pieces of faiss follow it by construction, and are used here:

- `IndexBinaryFlat` in its counting mode (`use_heap = False`), for Hamming distances: it keeps,
  for each distance, the first references met in index order (`hamming_chunks`).
- `float_maxheap_array_t`, faiss's array of max-heaps of the k smallest values, fed blocks of
  columns in order (`smallest`): a value enters a heap only when it is below the heap's
  largest, so a later (higher) column never displaces an equal value, and the heap compares
  (value, column) pairs, so an entering value displaces the highest column among the equal
  largest values, and the heaps come out sorted by (value, column).

faiss's own flat searches (`IndexFlatIP`, `IndexFlatL2`, `faiss.knn`) fuse products and heaps
too, but with the OpenBLAS that faiss-cpu bundles, slower here than torch's MKL: 20,000 x 512
against itself on 2 cores took 1.68 s with `faiss.knn` (inner products, k = 13), 1.96 s for
L2, and 1.46 to 1.60 s with torch's products in tiles and these heaps. And faiss 1.15's
searches do not all follow the rule. Checked on heavily tied data, 1 to 3,000 queries against
500 and 12,000 references, k from 1 to 1,001: the inner-product search, on every path, returned
the right k best values, but equal products in decreasing index order, and where a tie
straddled the k-th place it kept other members of it than the lowest (its min-heap displaces
the lowest index among the tied); with k = 1 on its BLAS path (at least 128,000 / D queries) it
returned a tied maximum other than the first. The L2 search followed the rule, except on its
path for fewer queries than threads against at least 10,000 references, which lost tied
members at k = 1,001.
"""

from collections.abc import Iterable, Iterator

import numpy as np
import torch


def smallest(
    blocks: Iterable[tuple[int, torch.Tensor]], rows: int, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k smallest values of each row and their columns, ordered by (value, column).

    blocks: (first column, values) for consecutive blocks of columns, in column order, each
    a contiguous (rows, w) float32 CPU tensor; at least k columns in all. Each block is taken
    by faiss's heaps as it comes, so it can be computed into the same buffer as the last one.

    Returns values (rows, k) float32 and columns (rows, k) int64.
    """
    import faiss

    values = np.empty((rows, k), dtype=np.float32)
    columns = np.empty((rows, k), dtype=np.int64)
    heaps = faiss.float_maxheap_array_t()
    heaps.nh, heaps.k = rows, k
    heaps.val, heaps.ids = faiss.swig_ptr(values), faiss.swig_ptr(columns)
    heaps.heapify()
    for first_column, block in blocks:
        assert block.is_contiguous() and block.dtype == torch.float32 and len(block) == rows
        heaps.addn(block.shape[1], faiss.swig_ptr(block.numpy()), first_column, 0, rows)
    heaps.reorder()  # from heap order to sorted
    return torch.from_numpy(values), torch.from_numpy(columns)


def drop_own(
    values: torch.Tensor, indices: torch.Tensor, own: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop from each row of (rows, k + 1) neighbours its query's own row `own` (rows,), or
    the last neighbour where the own row is not among them (more than k references tie with
    it or come before it); returns (rows, k)."""
    keep = indices != own[:, None]
    keep[keep.all(dim=1), -1] = False
    return values[keep].view(len(own), -1), indices[keep].view(len(own), -1)


def hamming_chunks(
    query: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    chunk_size: int | None,
    self_index: torch.Tensor | None = None,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """`search._neighbor_chunks` for uint8 codes on the CPU, by faiss's counting search.

    Yields (start, distances (c, k) int32, indices (c, k) int64). With `self_index`, each
    query asks for k + 1 neighbours and drops its own row (`drop_own`).
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
            own = self_index[start : start + len(chunk)].cpu()
            distances, indices = drop_own(distances, indices, own)
        yield start, distances, indices
