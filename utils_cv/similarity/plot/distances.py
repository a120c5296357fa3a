"""Distances: the pairwise distances of a few images, same- against different-class histograms."""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from utils_cv.similarity.plot._common import (
    MATCH_COLOR,
    MISMATCH_COLOR,
    TITLE_SIZE,
    Array,
    _as_numpy,
    _figure_and_axes,
    _show_tile,
)


def plot_distance_grid(
    images: Array,
    embeddings: Array,
    metric: str = "euclidean",
    tile_size: float = 0.8,
) -> Figure:
    """Show the pairwise distances of a few images as an annotated N x N grid.

    The thumbnails label the rows and the columns; the cell in row i, column j holds the
    distance between images i and j.

    Args:
        images: (N, 3, H, W), N at most 16.
        embeddings: (N, D) float.
        metric: "euclidean", "squared_euclidean" or "cosine".
        tile_size: size of a cell in inches.
    """
    from utils_cv.similarity.metrics import compute_distances

    images = _as_numpy(images)
    count = len(images)
    if not 2 <= count <= 16:
        raise ValueError(
            f"plot_distance_grid shows 2 to 16 images, got {count}; pass a subset like images[:8]"
        )
    if len(embeddings) != count:
        raise ValueError(f"got {len(embeddings)} embeddings for {count} images")
    embeddings = torch.as_tensor(embeddings)
    distances = compute_distances(embeddings, embeddings, metric=metric).cpu().numpy()

    fig = plt.figure(
        figsize=(tile_size * (count + 2), tile_size * (count + 1)), layout="constrained"
    )
    grid = fig.add_gridspec(count + 1, count + 2, width_ratios=[1] * (count + 1) + [0.3])
    heatmap = fig.add_subplot(grid[1:, 1 : count + 1])
    mesh = heatmap.imshow(distances, cmap="viridis", aspect="auto")
    heatmap.set_xticks([])
    heatmap.set_yticks([])
    threshold = distances.min() + 0.5 * np.ptp(distances)
    for i in range(count):
        for j in range(count):
            # Dark text on the bright end of viridis, light text on the dark end.
            color = "black" if distances[i, j] > threshold else "white"
            heatmap.text(
                j, i, f"{distances[i, j]:.2f}", ha="center", va="center", fontsize=7, color=color
            )
        _show_tile(fig.add_subplot(grid[0, i + 1]), images[i])
        _show_tile(fig.add_subplot(grid[i + 1, 0]), images[i])
    colorbar = fig.colorbar(mesh, cax=fig.add_subplot(grid[1:, count + 1]))
    colorbar.set_label(f"{metric} distance")
    return fig


def plot_distance_histograms(
    embeddings: Array,
    labels: Array,
    metric: str = "euclidean",
    ax: Axes | None = None,
    title: str | None = None,
    bins: int = 50,
    max_points: int = 2000,
    seed: int = 0,
) -> Figure:
    """Histogram the distances of same-class pairs against different-class pairs.

    Well separated histograms mean a good embedding; overlapping ones near zero mean collapse.
    Both are normalized to unit area, since different-class pairs far outnumber same-class ones.

    Args:
        embeddings: (N, D) float.
        labels: (N,) int.
        metric: "euclidean", "squared_euclidean" or "cosine".
        ax: axes to draw on; a new figure if None.
        title: axes title.
        bins: number of bins shared by both histograms.
        max_points: at most this many embeddings (a seeded random subset) are paired.
        seed: seeds the subset.
    """
    from utils_cv.similarity.metrics import compute_distances

    embeddings = torch.as_tensor(embeddings)
    labels = torch.as_tensor(labels)
    count = len(embeddings)
    if len(labels) != count:
        raise ValueError(f"got {len(labels)} labels for {count} embeddings")
    if count > max_points:
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(count, generator=generator)[:max_points].sort().values
        embeddings, labels = embeddings[subset], labels[subset]
    labels = labels.cpu()
    distances = compute_distances(embeddings, embeddings, metric=metric).cpu()
    upper = torch.triu(torch.ones_like(distances, dtype=torch.bool), diagonal=1)
    same = labels[:, None] == labels[None, :]
    same_distances = distances[upper & same].numpy()
    different_distances = distances[upper & ~same].numpy()
    if len(same_distances) == 0 or len(different_distances) == 0:
        raise ValueError(
            "need pairs of the same class and pairs of different classes; got "
            f"{len(same_distances)} same-class and {len(different_distances)} different-class "
            "pairs (pass images of at least two classes, some class with two or more images)"
        )

    fig, ax = _figure_and_axes(ax, figsize=(5, 3.5))
    edges = np.histogram_bin_edges(np.concatenate([same_distances, different_distances]), bins)
    for values, color, name in [
        (same_distances, MATCH_COLOR, "same class"),
        (different_distances, MISMATCH_COLOR, "different class"),
    ]:
        ax.hist(
            values,
            bins=edges,
            density=True,
            histtype="stepfilled",
            alpha=0.45,
            color=color,
            edgecolor=color,
            label=f"{name} ({len(values):,} pairs)",
        )
    # From 0, so that a collapsed embedding shows as a spike at 0, not as a wide histogram.
    ax.set_xlim(left=0)
    ax.set_xlabel(f"{metric} distance")
    ax.set_ylabel("density")
    ax.legend(fontsize=TITLE_SIZE)
    if title:
        ax.set_title(title)
    return fig


def plot_distance_panels(embeddings: Mapping[str, Array], labels: Array) -> Figure:
    """``plot_distance_histograms`` of several embeddings of the same images, side by side.

    Args:
        embeddings: name -> (N, D) embeddings, for example {"untrained": ..., "trained": ...}.
        labels: (N,) int, shared by all of them.

    Each panel's title gives the mean distance (``metrics.mean_distance``); each has its own
    distance axis, so a collapsed embedding shows as histograms squeezed against zero.
    """
    from utils_cv.similarity.metrics import mean_distance

    if not embeddings:
        raise ValueError("embeddings is empty; pass {name: (N, D) embeddings}")
    fig, axes = plt.subplots(
        1, len(embeddings), figsize=(4.5 * len(embeddings), 3), squeeze=False, layout="constrained"
    )
    for ax, (name, values) in zip(axes[0], embeddings.items(), strict=True):
        title = f"{name} (mean {mean_distance(values):.3f})"
        plot_distance_histograms(values, labels, ax=ax, title=title)
    return fig
