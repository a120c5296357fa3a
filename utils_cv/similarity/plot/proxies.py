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
from utils_cv.similarity.plot._common import Array


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


def plot_temperatures(
    temperatures: Sequence[float], num_classes: int, margins: Sequence[float] | None = None
) -> Figure:
    """What the temperature T of a cosine softmax does, as a function of the margin.

    A sample's logits are its cosines to the C class weights divided by T. Take the simplest
    case: its own class at cosine ``m`` above the C - 1 others, which are all equal. Then

        p(own) = 1 / (1 + (C - 1) exp(-m / T)),   d loss / d cos(own) = -(1 - p(own)) / T.

    Left: p(own) against m, one line per T. Right: the size of that gradient (log axis).
    Each legend gives the smallest loss T allows with C classes: own cosine 1, the others at
    -1 / (C - 1) (the most any C unit vectors can spread), ``log(1 + (C - 1) exp(-(1 + 1 /
    (C - 1)) / T))``: at T = 1 and hundreds of classes the loss cannot fall below several
    nats, so every sample keeps pulling; at T = 0.05 it can reach zero.

    Args:
        temperatures: the values of T (> 0) to compare.
        num_classes: C (>= 2).
        margins: the values of m on the x axis (default -0.5 to 1).
    """
    if num_classes < 2 or not temperatures or min(temperatures) <= 0:
        raise ValueError("pass num_classes >= 2 and at least one temperature > 0")
    m = np.linspace(-0.5, 1.0, 301) if margins is None else np.asarray(margins, dtype=float)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    others = num_classes - 1
    for t in temperatures:
        # p = sigmoid(m / T - log(C - 1)) and 1 - p, each written without cancellation.
        z = np.clip(m / t - np.log(others), -700, 700)
        p_own, p_rest = 1 / (1 + np.exp(-z)), 1 / (1 + np.exp(z))
        floor = np.log1p(others * np.exp(-(1 + 1 / others) / t))
        left.plot(m, p_own, label=f"T = {t:g} (loss ≥ {floor:.2g})")
        right.plot(m, p_rest / t, label=f"T = {t:g}")
    left.set_ylabel("p(own class)")
    right.set_ylabel("|d loss / d cos(own)|")
    right.set_yscale("log")
    right.set_ylim(bottom=1e-4)  # below, the image is done: nothing pulls any more
    for ax in (left, right):
        ax.set_xlabel(f"margin m: own cosine minus the others' ({num_classes} classes)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig
