"""Embedding maps: t-SNE and PCA maps, what triplet mining picks, Embedding Expansion on 2-D."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage

from utils_cv.similarity.plot._common import (
    TITLE_SIZE,
    Array,
    _as_numpy,
    _figure_and_axes,
    _to_hwc,
)


def plot_embedding_map(
    embeddings: Array,
    labels: Array,
    images: Array | None = None,
    method: str = "tsne",
    seed: int = 0,
    max_points: int = 2000,
    num_thumbnails: int = 40,
    class_names: Sequence[str] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Project embeddings to 2-D and scatter them, coloured by class.

    Args:
        embeddings: (N, D) float.
        labels: (N,) int.
        images: (N, 3, H, W) or None; if given, thumbnails are drawn at up to
            ``num_thumbnails`` points spread over the map.
        method: "tsne" (sklearn TSNE, init="pca") or "pca" (faster, linear).
        seed: seeds the subsample, the projection and the choice of thumbnails.
        max_points: at most this many points (a seeded random subset) are projected.
        num_thumbnails: how many thumbnails to draw at most.
        class_names: names indexed by label, shown in a legend when there are at most 10 classes.
        ax: axes to draw on; a new figure if None.
        title: axes title (default: the method).
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    embeddings = torch.as_tensor(embeddings).detach().float().cpu().numpy()
    labels = torch.as_tensor(labels).cpu().numpy()
    count = len(embeddings)
    if len(labels) != count:
        raise ValueError(f"got {len(labels)} labels for {count} embeddings")
    if images is not None and len(images) != count:
        raise ValueError(f"got {len(images)} images for {count} embeddings")
    if count < 3:
        raise ValueError(f"need at least 3 embeddings for a 2-D map, got {count}")
    if not np.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or inf; check the model's training")

    rng = np.random.default_rng(seed)
    subset = np.sort(rng.choice(count, size=min(count, max_points), replace=False))
    points = embeddings[subset]
    if method == "tsne":
        # perplexity is the effective number of neighbours; it must stay below the number of
        # points, and near it every point is everyone's neighbour and the clusters blur.
        perplexity = min(30.0, max(1.0, (len(points) - 1) / 3))
        projection = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity)
    elif method == "pca":
        projection = PCA(n_components=2, random_state=seed)
    else:
        raise ValueError(f"method={method!r} is not supported; use 'tsne' or 'pca'")
    xy = projection.fit_transform(points)

    fig, ax = _figure_and_axes(ax, figsize=(7, 6))
    classes, color_index = np.unique(labels[subset], return_inverse=True)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "turbo")
    colors = cmap(
        color_index % 10 if len(classes) <= 10 else color_index / max(len(classes) - 1, 1)
    )
    ax.scatter(xy[:, 0], xy[:, 1], c=colors, s=12, linewidths=0)
    if class_names is not None and len(classes) <= 10:
        for i, label in enumerate(classes):
            ax.scatter([], [], color=cmap(i), s=12, label=class_names[label])
        ax.legend(fontsize=TITLE_SIZE, markerscale=1.5)
    if images is not None:
        images = _as_numpy(images)
        for point in _spread_points(xy, num_thumbnails, rng):
            thumbnail = OffsetImage(_to_hwc(images[subset[point]]), zoom=24 / images.shape[-1])
            box = AnnotationBbox(
                thumbnail,
                tuple(xy[point]),
                frameon=True,
                pad=0.1,
                bboxprops={"edgecolor": colors[point], "linewidth": 1.5},
            )
            ax.add_artist(box)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(
        title or f"{method.upper() if method == 'pca' else 't-SNE'} of {len(xy)} embeddings"
    )
    return fig


def plot_mining_choices(points: Array, labels: Array, anchor: int = 0) -> Figure:
    """What each triplet mining picks for one anchor, on 2-D points.

    Arrows from the anchor (a star) to its hardest positive (the farthest of its class,
    solid), its hardest negative (the closest of another class, dashed) and, for the
    hardest positive, the semi-hard negative (the closest negative farther than that
    positive, dotted; none when every negative is closer).

    Args:
        points: (N, 2) float. labels: (N,) int. anchor: index of the anchor.
    """
    points, labels = torch.as_tensor(points).float(), torch.as_tensor(labels)
    if points.ndim != 2 or points.shape[1] != 2 or len(labels) != len(points):
        raise ValueError(f"points must be (N, 2) with N labels, got {tuple(points.shape)}")
    distances = torch.cdist(points, points)[anchor]
    same = labels == labels[anchor]
    positives = [i for i in range(len(points)) if same[i] and i != anchor]
    negatives = [i for i in range(len(points)) if not same[i]]
    if not positives or not negatives:
        raise ValueError(f"anchor {anchor} needs a positive and a negative among the points")
    hardest_positive = max(positives, key=lambda i: distances[i])
    farther = [i for i in negatives if distances[i] > distances[hardest_positive]]
    marks = [
        (hardest_positive, "hardest positive", "-"),
        (min(negatives, key=lambda i: distances[i]), "hardest negative", "--"),
    ]
    if farther:
        semi_hard = min(farther, key=lambda i: distances[i])
        marks.append((semi_hard, "semi-hard negative\n(for the hardest positive)", ":"))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for label in torch.unique(labels).tolist():
        ax.scatter(*points[labels == label].T, label=f"class {label}", s=40)
    ax.scatter(*points[anchor], marker="*", s=300, c="black", label="anchor")
    for index, text, style in marks:
        ax.annotate("", points[index], points[anchor], arrowprops={"arrowstyle": "->", "ls": style})
        ax.annotate(text, points[index], textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_aspect("equal")
    ax.legend(fontsize=TITLE_SIZE, loc="lower right")
    ax.set_title("What each strategy picks for one anchor")
    return fig


def plot_embedding_expansion(points: Array, labels: Array, n_points: int = 2, anchor: int = 0):
    """Embedding Expansion on 2-D points: pairs, synthetic points, the mined hardest negative.

    Two panels, without and with the L2 projection of the synthetic points. Each shows the
    unit circle, the original points (filled), the segment of each same-class pair and its
    ``n_points`` synthetic points (hollow), the anchor (star) and its group (ringed), an arrow
    from the group to the hardest negative that hard negative pair mining picks (red), and
    a dashed arrow to the hardest *original* negative, the one batch-hard mining alone picks.

    Args:
        points: (N, 2) float. labels: (N,) int, an even count per class. anchor: its index.
    """
    from utils_cv.similarity.losses import EmbeddingExpansion, TripletLoss

    points, labels = torch.as_tensor(points).float(), torch.as_tensor(labels)
    if points.ndim != 2 or points.shape[1] != 2 or len(labels) != len(points):
        raise ValueError(f"points must be (N, 2) with N labels, got {tuple(points.shape)}")
    num = len(points)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    circle = np.linspace(0, 2 * np.pi, 200)
    for ax, normalize in zip(axes, (False, True), strict=True):
        ee = EmbeddingExpansion(TripletLoss(), n_points=n_points, normalize=normalize)
        mined = ee.mine(points, labels)
        everything, point_labels = mined["points"].detach(), mined["labels"]
        ax.plot(np.cos(circle), np.sin(circle), color="0.85", lw=1)
        first, second = EmbeddingExpansion.pairs(labels) if n_points else (torch.empty(0),) * 2
        for i, j in zip(first.tolist(), second.tolist(), strict=True):
            color = colors[int(labels[i]) % len(colors)]
            ax.plot(*points[[i, j]].T, color=color, lw=0.8, alpha=0.6)
        for label in torch.unique(labels).tolist():
            color = colors[label % len(colors)]
            ax.scatter(*points[labels == label].T, color=color, s=45, label=f"class {label}")
            synthetic = (point_labels == label) & (torch.arange(len(everything)) >= num)
            ax.scatter(*everything[synthetic].T, facecolors="none", edgecolors=color, s=45)
        group = everything[mined["group"][anchor]]
        ax.scatter(*group.T, facecolors="none", edgecolors="black", s=160, lw=0.8)
        ax.scatter(*points[anchor], marker="*", s=160, c="black", label="anchor", zorder=3)
        hardest = int(mined["hardest_negative"][anchor])
        source = group[torch.cdist(everything[hardest][None], group).argmin()]
        original = int(torch.cdist(points[anchor][None], points)[0].masked_fill(
            labels == labels[anchor], torch.inf).argmin())  # fmt: skip
        mined_xy, source_xy = everything[hardest].tolist(), source.tolist()
        ax.annotate("", mined_xy, source_xy, zorder=4,
                    arrowprops={"arrowstyle": "->", "lw": 1.5, "color": "crimson"})  # fmt: skip
        ax.annotate("", points[original].tolist(), points[anchor].tolist(), zorder=4,
                    arrowprops={"arrowstyle": "->", "ls": "--"})  # fmt: skip
        kind = "synthetic" if hardest >= num else "original"
        ax.set_title(f"{'with' if normalize else 'without'} L2 projection: hardest negative "
                     f"is {kind}", fontsize=TITLE_SIZE)  # fmt: skip
        ax.set_aspect("equal")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Embedding Expansion: synthetic points (hollow) on each pair's segment; "
                 "red arrow: mined negative, dashed: batch-hard's", fontsize=TITLE_SIZE)  # fmt: skip
    fig.tight_layout()
    return fig


def _spread_points(xy: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """Indices of up to ``count`` points of ``xy`` (M, 2), none closer than a share of the map."""
    # Thumbnails on top of each other hide both, so keep a minimum gap between chosen points.
    min_gap = 0.06 * float(np.max(np.ptp(xy, axis=0)))
    chosen: list[int] = []
    for point in rng.permutation(len(xy)):
        if len(chosen) == count:
            break
        if not chosen or np.min(np.linalg.norm(xy[chosen] - xy[point], axis=1)) > min_gap:
            chosen.append(int(point))
    return chosen
