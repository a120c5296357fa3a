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
The exact nearest-neighbour search itself, chunked, with its tie rule, lives in `search.py`;
`compute_distances` and `nearest_neighbors` are importable from here too.

`classification_metrics` scores a classifier on the classes it was trained on instead: top-1
and mean per-class accuracy.
"""

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from utils_cv.similarity.search import (
    METRICS,
    TILE,
    _as_embeddings,
    _as_input,
    _check_metric,
    _check_widths,
    _default_device,
    _neighbor_chunks,
    _prepare,
    _prepared,
    _score_blocks,
    _unpack,
    compute_distances,
    nearest_neighbors,
)

__all__ = [
    "METRICS",
    "classification_metrics",
    "compute_distances",
    "mean_cosine",
    "mean_distance",
    "nearest_neighbors",
    "pairwise_f1",
    "retrieval_metrics",
]


# Recall@K for K up to this comes from the search itself, which then keeps K neighbours per
# query instead of max R; a larger K from a second pass over the queries that need it (see
# `retrieval_metrics`).
SEARCHED_K = 100


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

    MAP@R and R-Precision need each query's first R neighbours in order; Recall@K only the
    rank of its first relevant reference (Recall@K is 1 when that rank is <= K). So the search
    keeps k = max(max R, max(ks)) neighbours per query when max(ks) <= `SEARCHED_K` (100), else
    k = max R; then the queries without any relevant reference among their k neighbours, and
    only those, get the rank of their first one from a second pass over all their distances
    (`_first_relevant_ranks`, same tie rule). For SOP (max R = 11, Recall@1000) that is 3 % of
    the queries, where keeping 1,000 neighbours of every query cost 2.2 to 2.7 times the
    distance computation itself. Ties and float error: see `nearest_neighbors`.
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
    k = max(max_r, ks[-1]) if ks[-1] <= SEARCHED_K else max_r

    device = _default_device(device)
    query_codes, reference_codes = query_codes[scored].to(device), reference_codes.to(device)
    num_relevant = num_relevant[scored].to(device, torch.float64)
    # Rank of each query's first relevant reference; k + 1 stands for "further down".
    first_rank = torch.full((len(scored),), k + 1, dtype=torch.int64, device=device)
    # Per-query values, summed once at the end: the result does not depend on the chunking.
    r_precision = torch.empty(len(scored), dtype=torch.float64, device=device)
    map_at_r = torch.empty(len(scored), dtype=torch.float64, device=device)
    position = torch.arange(1, max_r + 1, dtype=torch.float64, device=device)  # 1, ..., max R
    # Copying the queries that score costs memory; skip it in the usual case where all do.
    queries = query if len(scored) == len(query) else query[scored]
    self_index = scored if paired else None
    for start, _, indices in _neighbor_chunks(
        queries, reference, k, metric, chunk_size, device, self_index
    ):
        stop = start + len(indices)
        relevant = reference_codes[indices] == query_codes[start:stop, None]  # (c, k) bool
        found = relevant.any(dim=1)
        first_rank[start:stop][found] = relevant[found].int().argmax(dim=1) + 1  # first True
        # R-Precision and MAP@R look at the first R positions of each query only.
        r = num_relevant[start:stop]
        rel_at_r = relevant[:, :max_r] & (position <= r[:, None])  # rel(i) for i <= R
        r_precision[start:stop] = rel_at_r.sum(dim=1) / r
        precision_at_i = rel_at_r.cumsum(dim=1) / position  # P(i)
        map_at_r[start:stop] = (precision_at_i * rel_at_r).sum(dim=1) / r
    if ks[-1] > k:
        further = (first_rank > k).nonzero().flatten()
        if len(further) > 0:
            first_rank[further] = _first_relevant_ranks(
                queries[further.cpu()],
                reference,
                query_codes[further],
                reference_codes,
                metric,
                chunk_size,
                device,
                None if self_index is None else self_index[further.cpu()],
            )

    num_queries = len(scored)
    results: dict[str, float] = {
        f"recall@{k_}": (first_rank <= k_).sum().item() / num_queries for k_ in ks
    }
    results["map@r"] = map_at_r.mean().item()
    results["r_precision"] = r_precision.mean().item()
    if nmi:
        results["nmi"], results["f1"] = _clustering_scores(query, query_labels, metric)
    results["num_queries"] = num_queries
    results["num_skipped_queries"] = len(query) - num_queries
    return results


def _first_relevant_ranks(
    query: torch.Tensor,
    reference: torch.Tensor,
    query_codes: torch.Tensor,
    reference_codes: torch.Tensor,
    metric: str,
    chunk_size: int | None,
    device: torch.device,
    self_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rank of each query's first relevant reference, by a pass over all its distances.

    query (Q, D) and reference (N, D) as `retrieval_metrics` takes them; query_codes (Q,) and
    reference_codes (N,) their classes, on `device`; self_index (Q,) each query's own row in
    `reference`, which does not count. Every query needs a relevant reference other than its
    own row. Returns (Q,) int64 on `device`: 1 + the number of references ranked before the
    nearest relevant one (`_rank_scores` below its score, or equal with a lower index: the
    tie rule of `search._smallest`), the very scores the search ranks by.
    """
    query, reference = _prepared(query, reference, metric, device)
    # Each class's references in index order, as rows padded to the largest class.
    sizes = torch.bincount(reference_codes, minlength=int(query_codes.max()) + 1)
    members = torch.argsort(reference_codes, stable=True)
    offsets = sizes.cumsum(dim=0) - sizes
    slots = torch.arange(int(sizes.max()), device=device)
    ranks = torch.empty(len(query), dtype=torch.int64, device=device)
    for start, _, scores in _score_blocks(query, reference, metric, chunk_size, self_index):
        codes = query_codes[start : start + len(scores)]
        valid = slots < sizes[codes, None]
        columns = members[(offsets[codes, None] + slots).clamp(max=len(members) - 1)]
        columns = torch.where(valid, columns, columns[:, :1])  # padding: a repeated member
        # The own row scores the largest value (`_score_blocks`), so it is never the minimum.
        best, which = scores.gather(1, columns).min(dim=1)  # first minimum: lowest column
        best, nearest = best[:, None], columns.gather(1, which[:, None])
        # Counted TILE columns at a time, which the CPU does twice as fast as whole rows, into
        # int32 (bool sums into the default int64 are 5 times slower).
        before = torch.zeros(len(scores), dtype=torch.int32, device=device)
        equal = torch.zeros_like(before)
        for first in range(0, scores.shape[1], TILE):
            part = scores[:, first : first + TILE]
            before += (part < best).sum(dim=1, dtype=torch.int32)
            equal += (part == best).sum(dim=1, dtype=torch.int32)
        # Equal scores at a lower column come first too: only where another reference ties
        # with the nearest relevant one (duplicates, Hamming distances).
        tied = (equal > 1).nonzero().flatten()
        if len(tied) > 0:
            lower = torch.arange(scores.shape[1], device=device) < nearest[tied]
            before[tied] += ((scores[tied] == best[tied]) & lower).sum(dim=1, dtype=torch.int32)
        ranks[start : start + len(scores)] = before.long() + 1
    return ranks


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
