"""Rank lists: a query beside its nearest references, closest first; the example queries."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from utils_cv.similarity.plot._common import (
    MATCH_COLOR,
    MISMATCH_COLOR,
    Array,
    _as_numpy,
    _show_tile,
)
from utils_cv.similarity.plot.images import credit_designs


def plot_rank(
    query_image: Array,
    reference_images: Array,
    distances: Array,
    matches: Array | Sequence[bool] | None = None,
    query_title: str | None = None,
    reference_titles: Sequence[str] | None = None,
    tile_size: float = 1.6,
) -> Figure:
    """Show a query beside its nearest references, closest first.

    Each reference tile is captioned ``rank: 1, dist: 0.81``; if ``matches`` is given, a green
    frame and the word "match" mark a reference of the query's class, a red frame and "no match"
    one of another class.

    Args:
        query_image: (3, H, W).
        reference_images: (k, 3, H, W), in rank order.
        distances: (k,) distance of each reference to the query.
        matches: (k,) bool, whether each reference has the query's label; None draws no frames.
        query_title: caption of the query tile (default "query").
        reference_titles: k extra caption lines, e.g. class names.
        tile_size: width of a tile in inches.
    """
    k = len(reference_images)
    fig, axes = plt.subplots(
        1,
        k + 1,
        figsize=(tile_size * (k + 1), tile_size * 1.5),
        squeeze=False,
        layout="constrained",
    )
    _draw_rank_row(
        axes[0],
        _as_numpy(query_image),
        _as_numpy(reference_images),
        distances,
        matches,
        query_title,
        reference_titles,
    )
    return fig


def plot_rank_examples(
    images: Array,
    labels: Array,
    embeddings: Array,
    query_indices: Sequence[int] | Array,
    k: int = 5,
    metric: str = "euclidean",
    titles: Sequence[str] | None = None,
    tile_size: float = 1.6,
) -> Figure:
    """Show several queries, one per row, each beside its k nearest neighbours in the same set.

    Neighbours come from ``utils_cv.similarity.metrics.nearest_neighbors`` with the query
    itself excluded; frames mark whether each neighbour shares the query's label.

    Args:
        images: (N, 3, H, W).
        labels: (N,) int.
        embeddings: (N, D) float, or (N, B) uint8 packed codes for metric="hamming".
        query_indices: indices into the N images of the queries to show.
        k: neighbours per query.
        metric: "euclidean", "squared_euclidean", "cosine" or "hamming".
        titles: N per-image captions (e.g. class names) shown under rank and distance.
        tile_size: width of a tile in inches.
    """
    from utils_cv.similarity.metrics import nearest_neighbors

    images_np = _as_numpy(images)
    labels = torch.as_tensor(labels).cpu()
    embeddings = torch.as_tensor(embeddings)
    query_indices = torch.as_tensor(query_indices, dtype=torch.long).reshape(-1).cpu()
    count = len(images_np)
    if not (len(labels) == len(embeddings) == count):
        raise ValueError(
            f"images ({count}), labels ({len(labels)}) and embeddings ({len(embeddings)}) "
            "must have the same length"
        )
    if titles is not None and len(titles) != count:
        raise ValueError(f"got {len(titles)} titles for {count} images; pass one per image")
    if len(query_indices) == 0:
        raise ValueError("query_indices is empty; pass at least one query index")
    bad = query_indices[(query_indices < 0) | (query_indices >= count)]
    if len(bad):
        raise ValueError(f"query index {bad[0].item()} is out of range for {count} images")
    if not 1 <= k < count:
        raise ValueError(f"k={k} must be between 1 and {count - 1} (the images minus the query)")

    # Ask for one extra neighbour and drop the query itself; if exact duplicates pushed the query
    # out of the list, the extra one is dropped instead.
    distances, indices = nearest_neighbors(
        embeddings[query_indices], embeddings, k=k + 1, metric=metric
    )
    distances, indices = distances.cpu(), indices.cpu()

    rows = len(query_indices)
    fig, axes = plt.subplots(
        rows,
        k + 1,
        figsize=(tile_size * (k + 1), tile_size * 1.5 * rows),
        squeeze=False,
        layout="constrained",
    )
    for row, query in enumerate(query_indices.tolist()):
        keep = indices[row] != query
        if keep.all():
            keep[-1] = False
        neighbours, dists = indices[row][keep], distances[row][keep]
        query_title = "query" if titles is None else f"query\n{titles[query]}"
        _draw_rank_row(
            axes[row],
            images_np[query],
            images_np[neighbours.numpy()],
            dists,
            labels[neighbours] == labels[query],
            query_title,
            None if titles is None else [titles[i] for i in neighbours.tolist()],
        )
    return fig


def plot_example_queries(
    data, embeddings: Array, count: int = 4, k: int = 5, metric: str = "euclidean", **kwargs
) -> Figure:
    """Rank plots of the fixed example queries (``example_queries``), captioned by class name.

    The same queries appear in every notebook, so their rank plots can be compared from one
    method to the next. ``data`` is an ``ImageData`` (the test split) and ``embeddings`` its
    (N, D) embeddings (packed codes for ``metric="hamming"``); ``kwargs`` go to
    ``example_queries`` (``domain``).
    """
    from utils_cv.similarity.datasets import example_queries

    names = [data.class_names[label] for label in data.labels.tolist()]
    queries = example_queries(data, count=count, **kwargs)
    fig = plot_rank_examples(
        data.images, data.labels, embeddings, queries, k=k, metric=metric, titles=names
    )
    return credit_designs(fig, data.domains)


def _draw_rank_row(
    axes: Sequence[Axes],
    query_image: np.ndarray,
    reference_images: np.ndarray,
    distances: Array,
    matches: Array | Sequence[bool] | None,
    query_title: str | None,
    reference_titles: Sequence[str] | None,
) -> None:
    k = len(reference_images)
    distances = np.asarray(torch.as_tensor(distances).detach().cpu(), dtype=float).reshape(-1)
    if len(distances) != k:
        raise ValueError(f"got {len(distances)} distances for {k} reference images")
    if matches is not None:
        matches = np.asarray(torch.as_tensor(matches).cpu(), dtype=bool).reshape(-1)
        if len(matches) != k:
            raise ValueError(f"got {len(matches)} matches for {k} reference images")
    if reference_titles is not None and len(reference_titles) != k:
        raise ValueError(f"got {len(reference_titles)} reference_titles for {k} references")
    _show_tile(axes[0], query_image, query_title or "query")
    axes[0].title.set_fontweight("bold")
    for rank in range(k):
        caption = f"rank: {rank + 1}, dist: {distances[rank]:.2f}"
        color = None
        if matches is not None:
            caption += "\nmatch" if matches[rank] else "\nno match"
            color = MATCH_COLOR if matches[rank] else MISMATCH_COLOR
        if reference_titles is not None:
            caption += "\n" + reference_titles[rank]
        _show_tile(axes[rank + 1], reference_images[rank], caption, frame_color=color)
