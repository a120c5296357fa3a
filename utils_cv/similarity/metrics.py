"""Retrieval evaluation: distances, exact nearest neighbours, Recall@K, MAP@R, R-Precision, NMI.

The protocol of the field (Musgrave et al., "A Metric Learning Reality Check", 2020): every
test image is a query, all other test images are the reference set, and a reference is
*relevant* when it has the query's class. With the K nearest references of a query,

- Recall@K is 1 when at least one of them is relevant, else 0 (this is the metric-learning
  Recall@K, not the information-retrieval recall);
- R-Precision is (number of relevant among the first R) / R, where R is the number of relevant
  references the query has;
- MAP@R is (1/R) * sum_{i=1..R} P(i) * rel(i), where rel(i) is 1 when the i-th neighbour is
  relevant and P(i) is the precision among the first i neighbours;

each averaged over the queries. Queries whose class has no other member in the reference set
cannot score and are left out of all of them, as pytorch-metric-learning does.

metric="hamming" takes packed binary codes (`binary.binarize`) instead of float embeddings and
gives exactly the numbers of metric="squared_euclidean" on the unpacked bits, ties included.

Exact search: the distance matrix of N queries against N references does not fit in memory for
large N (60,502 SOP test images: 14.6 GB in float32), so queries are processed in chunks; each
chunk is one matrix product against all references followed by `torch.topk`, and memory grows
as O(chunk_size * N).

`classification_metrics` scores a classifier on the classes it was trained on instead: top-1
and mean per-class accuracy.
"""

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch

from utils_cv.similarity.binary import (
    _as_codes,
    _faiss_neighbor_chunks,
    _hamming_block,
    _searchable,
    _unpack,
    hamming_distances,
)

METRICS = ("euclidean", "squared_euclidean", "cosine", "hamming")

# Memory for one chunk's block of distances; sets the default chunk size.
# 256 MB holds 1,109 rows against the 60,502 SOP test images in float32.
BLOCK_BYTES = 256 * 2**20


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
        return _searchable(x)  # codes on the CPU, ±1 vectors on a GPU (see binary.py)
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
        return torch.mm(-query, reference.T, out=out)
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
            or "hamming" for packed uint8 codes (`binary.hamming_distances`).

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
        yield from _faiss_neighbor_chunks(query, reference, k, chunk_size, self_index)
        return
    reference = _prepare(reference.to(device, query.dtype), metric)
    query = _prepare(query.to(device), metric)
    # Popcount gives int32 Hamming distances; everything else scores in the reference's type.
    dtype = reference.dtype if reference.is_floating_point() else torch.int32
    if chunk_size is None:
        chunk_size = max(1, BLOCK_BYTES // (dtype.itemsize * len(reference)))
    chunk_size = min(chunk_size, len(query))
    euclidean = metric in ("euclidean", "squared_euclidean")
    reference_sq = (reference * reference).sum(dim=1) if euclidean else None
    block = torch.empty(chunk_size, len(reference), dtype=dtype, device=device)
    excluded = torch.inf if dtype.is_floating_point else torch.iinfo(dtype).max
    for start in range(0, len(query), chunk_size):
        chunk = query[start : start + chunk_size]
        scores = _rank_scores(chunk, reference, metric, reference_sq, out=block[: len(chunk)])
        if self_index is not None:
            # By index, not by distance 0: a duplicate of the query is a genuine neighbour.
            rows = torch.arange(len(chunk), device=device)
            scores[rows, self_index[start : start + len(chunk)].to(device)] = excluded
        values, indices = _smallest(scores, k)
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
        chunk_size: queries per chunk; memory is about chunk_size * N distances. None picks
            the chunk so that one block of distances takes `BLOCK_BYTES` (256 MB).
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


def _as_labels(labels, num_rows: int, name: str) -> np.ndarray:
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if labels.shape != (num_rows,):
        raise ValueError(
            f"{name} has shape {labels.shape} but there are {num_rows} embeddings; "
            "give one label per embedding row"
        )
    return labels


def _ks(ks: int | Iterable[int]) -> list[int]:
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks or any(int(k) != k or k < 1 for k in ks):
        raise ValueError(f"ks={ks} must be positive integers, e.g. (1, 2, 4, 8)")
    return sorted({int(k) for k in ks})


def retrieval_metrics(
    embeddings,
    labels,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    reference=None,
    reference_labels=None,
    metric: str = "euclidean",
    nmi: bool = False,
    exclude_same_index: bool = False,
    chunk_size: int | None = None,
    device=None,
) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision (and optionally NMI) by exact nearest-neighbour search.

    Args:
        embeddings: (N, D) float, torch tensor or numpy array: the queries; (N, B) uint8
            packed bits for metric="hamming".
        labels: (N,) class of each query (any integers or strings).
        ks: the K of Recall@K; CUB/Cars report (1, 2, 4, 8), SOP (1, 10, 100, 1000).
        reference, reference_labels: (M, D) and (M,): a separate reference set (In-Shop style).
            None: every query searches all other `embeddings` (the query itself excluded).
            With a reference set nothing is excluded, so don't pass the queries as references.
        metric: "euclidean", "squared_euclidean" (same ranking), "cosine" or "hamming" (packed
            codes), see `compute_distances`.
        nmi: also cluster the queries with k-means (faiss, k = number of query classes,
            20 iterations, seed 0, on unit vectors for metric="cosine", on the bits as 0.0 and
            1.0 for metric="hamming") and return the two clustering metrics the papers report:
            "nmi", the normalized mutual information between clusters and labels (sklearn's
            `normalized_mutual_info_score`, average_method="arithmetic"), and "f1", the
            pairwise F-measure of the clustering: over all pairs of queries, precision = the
            share of same-cluster pairs that share a label, recall = the share of same-label
            pairs put in one cluster, F1 = 2PR / (P + R) (from sklearn's
            `pair_confusion_matrix`). All queries are clustered, including those without a
            positive. Slow for many classes.
        exclude_same_index: with a reference set of the same length, query i does not see
            reference i: for queries that are altered copies of the references (occluded,
            noisy), so that no query finds its own clean copy. R then counts one less.
        chunk_size, device: see `nearest_neighbors`.

    Returns:
        {"recall@K" for each K, "map@r", "r_precision", "nmi" and "f1" (if asked), "num_queries": the
        queries scored, "num_skipped_queries": those without any relevant reference}.

    The search keeps k = max(max(ks), max R) neighbours per query; a query's R relevant
    references are all among them. Ties and float error: see `nearest_neighbors`.
    """
    _check_metric(metric)
    ks = _ks(ks)
    query = _as_input(embeddings, "embeddings", metric)
    query_labels = _as_labels(labels, len(query), "labels")
    self_search = reference is None
    if self_search:
        if reference_labels is not None:
            raise ValueError("reference_labels given without reference; pass both or neither")
        reference, reference_labels = query, query_labels
    else:
        if reference_labels is None:
            raise ValueError("reference given without reference_labels; pass both")
        reference = _as_input(reference, "reference", metric)
        reference_labels = _as_labels(reference_labels, len(reference), "reference_labels")
        _check_widths(query, reference, metric, "embeddings")
        if exclude_same_index and (
            len(reference) != len(query) or (reference_labels != query_labels).any()
        ):
            raise ValueError(
                "exclude_same_index needs reference i to be a copy of query i, with its label: "
                f"got {len(query)} queries and {len(reference)} references, or other labels; "
                "pass the references in the queries' order"
            )
    paired = self_search or exclude_same_index  # query i never sees reference i

    # One integer code per class over queries and references together, so classes compare as ints.
    _, codes = np.unique(np.concatenate([query_labels, reference_labels]), return_inverse=True)
    query_codes = torch.from_numpy(codes[: len(query)].astype(np.int64))
    reference_codes = torch.from_numpy(codes[len(query) :].astype(np.int64))
    class_sizes = torch.bincount(reference_codes, minlength=int(codes.max()) + 1)
    num_relevant = class_sizes[query_codes] - int(paired)  # R of each query
    scored = (num_relevant > 0).nonzero().flatten()
    if len(scored) == 0:
        raise ValueError(
            "no query has a same-class item in the reference set, so no retrieval metric is "
            "defined; every class needs at least two images (or one in the reference set)"
        )
    available = len(reference) - int(paired)
    if ks[-1] > available:
        raise ValueError(
            f"recall@{ks[-1]} asked but each query has only {available} references; "
            f"use ks no larger than {available}"
        )
    max_r = int(num_relevant[scored].max())
    k = max(ks[-1], max_r)

    device = _default_device(device)
    query_codes, reference_codes = query_codes[scored].to(device), reference_codes.to(device)
    num_relevant = num_relevant[scored].to(device, torch.float64)
    hits = torch.zeros(len(ks), dtype=torch.int64, device=device)
    # Per-query values, summed once at the end: the result does not depend on the chunking.
    r_precision = torch.empty(len(scored), dtype=torch.float64, device=device)
    map_at_r = torch.empty(len(scored), dtype=torch.float64, device=device)
    position = torch.arange(1, max_r + 1, dtype=torch.float64, device=device)  # 1, ..., max R
    # Copying the queries that score costs memory; skip it in the usual case where all do.
    queries = query if len(scored) == len(query) else query[scored]
    for start, _, indices in _neighbor_chunks(
        queries,
        reference,
        k,
        metric,
        chunk_size,
        device,
        self_index=scored if paired else None,
    ):
        stop = start + len(indices)
        relevant = reference_codes[indices] == query_codes[start:stop, None]  # (c, k) bool
        for i, k_ in enumerate(ks):
            hits[i] += relevant[:, :k_].any(dim=1).sum()
        # R-Precision and MAP@R look at the first R positions of each query only.
        r = num_relevant[start:stop]
        rel_at_r = relevant[:, :max_r] & (position <= r[:, None])  # rel(i) for i <= R
        r_precision[start:stop] = rel_at_r.sum(dim=1) / r
        precision_at_i = rel_at_r.cumsum(dim=1) / position  # P(i)
        map_at_r[start:stop] = (precision_at_i * rel_at_r).sum(dim=1) / r

    num_queries = len(scored)
    results: dict[str, float] = {
        f"recall@{k_}": hit / num_queries for k_, hit in zip(ks, hits.tolist(), strict=True)
    }
    results["map@r"] = map_at_r.mean().item()
    results["r_precision"] = r_precision.mean().item()
    if nmi:
        results["nmi"], results["f1"] = _clustering_scores(query, query_labels, metric)
    results["num_queries"] = num_queries
    results["num_skipped_queries"] = len(query) - num_queries
    return results


def _clustering_scores(
    embeddings: torch.Tensor, labels: np.ndarray, metric: str, seed: int = 0
) -> tuple[float, float]:
    """NMI and pairwise F1 between labels (N,) and the k-means clusters of embeddings (N, D),
    k = number of classes."""
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    # On bits, squared L2 is the Hamming distance; the padding bits are 0 everywhere.
    x = _unpack(embeddings) if metric == "hamming" else _prepare(embeddings, metric)
    x = np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)
    num_classes = len(np.unique(labels))
    # min_points_per_centroid=1: few images per class is the normal case here, not a mistake
    # for faiss to warn about.
    kmeans = faiss.Kmeans(
        x.shape[1], num_classes, niter=20, seed=seed, min_points_per_centroid=1, verbose=False
    )
    kmeans.train(x)
    _, clusters = kmeans.index.search(x, 1)
    nmi = normalized_mutual_info_score(labels, clusters[:, 0], average_method="arithmetic")
    return float(nmi), pairwise_f1(labels, clusters[:, 0])


def pairwise_f1(labels, clusters) -> float:
    """The pairwise F-measure of a clustering (the "F1" of metric-learning papers).

    Over all unordered pairs of items: true positives are pairs in one cluster with one
    label, precision = TP / (pairs in one cluster), recall = TP / (pairs with one label),
    F1 = 2 P R / (P + R); 0 when no pair shares a cluster or no pair shares a label.
    """
    from sklearn.metrics.cluster import pair_confusion_matrix

    # sklearn counts ordered pairs (each twice): rows = same label or not, columns = same
    # cluster or not; the factor 2 cancels in P and R.
    (_, fp), (fn, tp) = pair_confusion_matrix(np.asarray(labels), np.asarray(clusters))
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return float(2 * precision * recall / (precision + recall))


def mean_distance(embeddings, max_points: int = 500) -> float:
    """Mean Euclidean distance between the first ``max_points`` embeddings, all pairs.

    A quick measure of how spread out an embedding is: random directions on the unit
    sphere lie about sqrt(2) = 1.41 apart; a collapsed embedding gives nearly 0. The first
    ``max_points`` keep it cheap (O(max_points^2)); pass len(embeddings) for all of them.

    embeddings: (N, D) float with N >= 2.
    """
    x = _as_embeddings(embeddings, "embeddings")[:max_points].float()
    if len(x) < 2:
        raise ValueError(f"mean_distance needs at least two embeddings, got {len(x)}")
    return torch.pdist(x).mean().item()


def mean_cosine(embeddings, max_points: int | None = None) -> float:
    """Mean cosine similarity between every two distinct rows, each L2-normalized first.

    About 0 for directions spread over the sphere (random directions in high dimensions,
    or well separated class proxies), 1 when all rows point the same way. Only the first
    ``max_points`` rows count when given (O(max_points^2) memory).

    embeddings: (N, D) float with N >= 2.
    """
    x = _as_embeddings(embeddings, "embeddings")[:max_points]
    if len(x) < 2:
        raise ValueError(f"mean_cosine needs at least two rows, got {len(x)}")
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-12)
    gram = x @ x.T
    return ((gram.sum() - gram.diagonal().sum()) / (len(x) * (len(x) - 1))).item()


def classification_metrics(predictions, labels, num_classes: int | None = None) -> dict:
    """Top-1 accuracy and mean per-class ("macro") accuracy of a classifier.

    Args:
        predictions: (N, C) float logits (or probabilities), whose argmax is the predicted
            class, or (N,) int predicted classes. Tensor or numpy array.
        labels: (N,) int true classes. With logits they must lie in 0..C-1.
        num_classes: C; when given, logits must have C columns and every class in
            ``predictions`` and ``labels`` must lie in 0..C-1.

    Returns:
        {"top1": share of correct predictions, "macro_accuracy": the mean over the classes
        present in ``labels`` of each class's share of correct predictions, "per_class":
        those shares, one per class present, in the order of the sorted labels,
        "num_samples": N}. On imbalanced data the two differ: top-1 weighs each image equally,
        so the large classes dominate it; macro accuracy weighs each class equally. Classes absent
        from ``labels`` are left out of the mean (TensorFlow's mean_per_class_accuracy,
        which the ranking-regularizer code reports, counts them as 0).
    """
    predictions = torch.as_tensor(predictions)
    if predictions.ndim == 2:
        logits = _as_embeddings(predictions, "logits")
        if num_classes is not None and logits.shape[1] != num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} columns but num_classes={num_classes}; pass "
                "one column per class"
            )
        num_classes = logits.shape[1]
        predictions = logits.argmax(dim=1)
    elif predictions.ndim != 1 or predictions.is_floating_point() or len(predictions) == 0:
        raise ValueError(
            f"predictions must be non-empty (N, C) logits or (N,) integer classes, got shape "
            f"{tuple(predictions.shape)} {predictions.dtype}"
        )
    predictions = predictions.cpu().numpy()
    labels = _as_labels(labels, len(predictions), "labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if num_classes is not None:
        for name, values in (("predictions", predictions), ("labels", labels)):
            if values.min() < 0 or values.max() >= num_classes:
                raise ValueError(
                    f"{name} range from {values.min()} to {values.max()} but there are "
                    f"num_classes={num_classes} classes; number the classes 0..{num_classes - 1}"
                )
    correct = predictions == labels
    _, codes = np.unique(labels, return_inverse=True)
    per_class = np.bincount(codes, weights=correct) / np.bincount(codes)
    return {
        "top1": float(correct.mean()),
        "macro_accuracy": float(per_class.mean()),
        "per_class": per_class.tolist(),
        "num_samples": len(labels),
    }
