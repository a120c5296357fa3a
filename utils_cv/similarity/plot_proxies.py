"""Plots for losses with class representatives: ProxyNCA's proxies, NormSoftmax's weights.

Every function returns its matplotlib Figure and never calls ``plt.show()``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from utils_cv.similarity.metrics import mean_cosine

Array = torch.Tensor | np.ndarray


def plot_softmax_over_proxies(distances: Sequence[float], scales: Sequence[float]) -> Figure:
    """The probabilities ``softmax(-scale * d)`` of one sample over its proxies, per scale.

    Args:
        distances: the sample's squared distances to each proxy (the first is its own).
        scales: the inverse temperatures to compare; one panel each.
    """
    d = torch.as_tensor(distances, dtype=torch.float64)
    if d.ndim != 1 or len(d) < 2 or not scales:
        raise ValueError("pass at least two distances and one scale")
    fig, axes = plt.subplots(
        1, len(scales), figsize=(3 * len(scales), 2.6), sharey=True, layout="constrained"
    )
    for ax, scale in zip(np.atleast_1d(axes), scales, strict=True):
        probabilities = torch.softmax(-scale * d, dim=0).numpy()
        colours = ["tab:green"] + ["tab:gray"] * (len(d) - 1)
        ax.bar(range(len(d)), probabilities, color=colours)
        ax.set_xticks(range(len(d)), ["own"] + [f"{i}" for i in range(1, len(d))])
        ax.set_title(f"scale {scale:g}: p(own) = {probabilities[0]:.2f}", fontsize=9)
        ax.set_ylim(0, 1)
    np.atleast_1d(axes)[0].set_ylabel("probability")
    return fig


def plot_point_snapshots(
    snapshots: Sequence[tuple[str, Array, Array]], labels: Array, ncols: int = 4
) -> Figure:
    """2-D points and proxies at several moments of training, on the unit circle.

    Args:
        snapshots: (title, points (N, 2), proxies (C, 2)) per panel; both are drawn
            normalized to unit length, as the loss sees them. Proxy c is class c's.
        labels: (N,) int class of each point, colouring points and proxies alike.
    """
    if not snapshots:
        raise ValueError("snapshots is empty")
    labels = np.asarray(torch.as_tensor(labels).cpu())
    ncols = min(ncols, len(snapshots))
    nrows = -(-len(snapshots) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3 * ncols, 3 * nrows), squeeze=False, layout="constrained"
    )
    colours = plt.get_cmap("tab10")
    circle = np.linspace(0, 2 * np.pi, 200)
    for ax, (title, points, proxies) in zip(axes.flat, snapshots, strict=False):
        points = F.normalize(torch.as_tensor(points).float(), dim=1).numpy()
        proxies = F.normalize(torch.as_tensor(proxies).float(), dim=1).numpy()
        ax.plot(np.cos(circle), np.sin(circle), color="0.85", lw=1)
        ax.scatter(*points.T, c=[colours(int(y) % 10) for y in labels], s=18, alpha=0.7)
        ax.scatter(*proxies.T, c=[colours(c % 10) for c in range(len(proxies))], marker="*",
                   s=260, edgecolors="black", linewidths=0.8)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(snapshots) :]:
        ax.remove()
    return fig


def plot_proxy_map(
    embeddings: Array, labels: Array, proxies: Array, max_classes: int = 10
) -> Figure:
    """Where the proxies land: a PCA map of embeddings with the proxies, and proxy cosines.

    Left: the embeddings of the first ``max_classes`` classes (coloured by class) and all
    proxies (black stars), L2-normalized and projected together onto their first two
    principal components; the title gives the mean cosine between embeddings (of all
    classes, ``metrics.mean_cosine``), to compare with the proxies'. Right: the histogram
    of the cosine similarity between every two distinct proxies (0: orthogonal; near 1:
    two proxies in one place).

    Args:
        embeddings: (N, D); labels: (N,) int; proxies: (P, D), all on any device.
    """
    x = F.normalize(torch.as_tensor(embeddings).float().cpu(), dim=1)
    p = F.normalize(torch.as_tensor(proxies).detach().float().cpu(), dim=1)
    labels = torch.as_tensor(labels).cpu()
    if x.shape[1] != p.shape[1]:
        raise ValueError(f"embeddings have D={x.shape[1]} but proxies D={p.shape[1]}")
    shown = torch.isin(labels, torch.unique(labels)[:max_classes])
    both = torch.cat([x[shown], p])
    centred = both - both.mean(dim=0)
    _, _, v = torch.linalg.svd(centred, full_matrices=False)
    xy = (centred @ v[:2].T).numpy()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    count = int(shown.sum())
    left.scatter(*xy[count:].T, marker="*", s=40, c="black", label="proxies")
    left.scatter(*xy[:count].T, c=labels[shown].numpy(), cmap="tab10", s=14, label="embeddings")
    spread = mean_cosine(x, max_points=1000)
    left.set_title(
        f"{max_classes} classes' embeddings (mean cosine of all {spread:.2f}) and "
        f"{len(p)} proxies (PCA)",
        fontsize=10,
    )
    left.legend(fontsize=8)
    cosine = p @ p.T
    off_diagonal = cosine[~torch.eye(len(p), dtype=torch.bool)].numpy()
    right.hist(off_diagonal, bins=50, color="tab:blue")
    right.set_title(f"cosine between proxies (mean {mean_cosine(p):.3f})")
    right.set_xlabel("cosine similarity")
    return fig
