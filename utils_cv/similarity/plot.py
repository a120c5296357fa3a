"""Plots for retrieval: rank lists, distances, embedding maps, recall and training curves.

Every function returns its matplotlib Figure and never calls ``plt.show()``. Figures are made
with pyplot so that notebooks show them inline; write ``fig = plot_...(...)`` to avoid showing a
figure twice. Images are ``(N, 3, H, W)`` uint8 (or float in [0, 1]) torch tensors or NumPy
arrays, as stored in ``ImageData.images``.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from matplotlib.ticker import MaxNLocator

Array = torch.Tensor | np.ndarray

MATCH_COLOR = "tab:green"
MISMATCH_COLOR = "tab:red"
# A thin light frame around other tiles, so images on white backgrounds keep their edges.
TILE_EDGE_COLOR = "0.8"
TITLE_SIZE = 8
# Longest caption line before wrapping, so long class names do not run into the next tile.
CAPTION_WIDTH = 22


def show_image_grid(
    images: Array, titles: Sequence[str] | None = None, ncols: int = 8, tile_size: float = 1.5
) -> Figure:
    """Show images in a grid, for a look at the data.

    Args:
        images: (N, 3, H, W) uint8 or float in [0, 1].
        titles: N captions, or None.
        ncols: tiles per row.
        tile_size: width of a tile in inches.
    """
    images = _as_numpy(images)
    count = len(images)
    if count == 0:
        raise ValueError("images is empty; pass at least one image")
    if titles is not None and len(titles) != count:
        raise ValueError(f"got {len(titles)} titles for {count} images; pass one title per image")
    ncols = min(ncols, count)
    nrows = -(-count // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(tile_size * ncols, tile_size * nrows * 1.15),
        squeeze=False,
        layout="constrained",
    )
    for i, ax in enumerate(axes.flat):
        if i < count:
            _show_tile(ax, images[i], None if titles is None else titles[i])
        else:
            ax.remove()
    return fig


def show_class_examples(data, count: int = 6, per_class: int = 4) -> Figure:
    """A first look at a dataset: ``count`` classes with up to ``per_class`` images each.

    With domains, each class shows one image per domain (in the order the domains first
    appear) and the classes are the first, in label order, that have the most domains;
    without, the first classes with the most images. Captions give class and domain.
    ``data`` is an ``ImageData``.
    """
    labels = data.labels.tolist()
    order = list(dict.fromkeys(d for d in data.domains if d))
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(labels):
        seen = {data.domains[j] for j in by_class.get(label, [])}
        if not order or data.domains[i] not in seen:  # one image per domain
            by_class.setdefault(label, []).append(i)
    ranked = sorted(by_class, key=lambda label: (-len(by_class[label]), label))[:count]
    if not ranked:
        raise ValueError("data has no images to show")
    rank = {domain: k for k, domain in enumerate(order)}
    tiles, titles, shown = [], [], []
    for label in sorted(ranked):
        for i in sorted(by_class[label], key=lambda i: rank.get(data.domains[i], 0))[:per_class]:
            tiles.append(data.images[i])
            titles.append(f"{data.class_names[label][:18]}\n{data.domains[i]}".rstrip())
            shown.append(data.domains[i])
    # As many whole classes a row as fit in eight tiles (two of four, one of eight).
    fig = show_image_grid(torch.stack(tiles), titles, ncols=per_class * max(1, 8 // per_class))
    return credit_designs(fig, shown)


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


def credit_designs(fig: Figure, domains: Sequence[str]) -> Figure:
    """Put the attribution of the emoji designs among ``domains`` under ``fig``.

    Figures that show emoji images must credit their designers (data/README.md); other
    domains (your own folders) add nothing. Returns ``fig``.
    """
    from utils_cv.similarity.datasets.emoji import attribution

    line = attribution(set(domains))
    if line:
        text = textwrap.fill(line, 160, break_on_hyphens=False)
        fig.supxlabel(text, fontsize=6, color="0.35")
    return fig


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


def plot_recall_curves(
    results: Mapping[str, Mapping[str, float]], ax: Axes | None = None, title: str | None = None
) -> Figure:
    """Plot Recall@K against K (log2 axis), one line per method.

    Args:
        results: method name -> metrics dict with "recall@K" keys, as from retrieval_metrics.
        ax: axes to draw on; a new figure if None.
        title: axes title.
    """
    if not results:
        raise ValueError("results is empty; pass {method name: retrieval_metrics(...)}")
    fig, ax = _figure_and_axes(ax, figsize=(5, 3.5))
    all_ks: set[int] = set()
    for name, metrics in results.items():
        curve = sorted(
            (int(match.group(1)), float(value))
            for key, value in metrics.items()
            if (match := re.fullmatch(r"recall@(\d+)", key))
        )
        if not curve:
            raise ValueError(
                f"results[{name!r}] has no 'recall@K' keys (keys: {sorted(metrics)}); "
                "pass the dict returned by retrieval_metrics"
            )
        ks, recalls = zip(*curve, strict=True)
        ax.plot(ks, recalls, marker="o", label=name)
        all_ks.update(ks)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=TITLE_SIZE)
    if title:
        ax.set_title(title)
    return fig


def plot_seed_bars(
    values: Mapping[str, Mapping[str, Sequence[float]]],
    metric: str = "Recall@1",
    ax: Axes | None = None,
) -> Figure:
    """One bar per method and group (a setting), the mean over seeds, with each seed as a dot
    and the standard deviation as an error bar.

    values: group -> method -> the metric of each seed; methods in the order of the first
        group that has them; a method missing from a group leaves its bar out.
    """
    if not values or not any(values.values()):
        raise ValueError("values is empty; pass {setting: {method: [value of each seed]}}")
    methods = list(dict.fromkeys(m for group in values.values() for m in group))
    fig, ax = _figure_and_axes(ax, figsize=(max(6.0, 0.75 * len(methods) + 2), 3.5))
    width = 0.8 / len(values)
    x = np.arange(len(methods))
    for g, (group, by_method) in enumerate(values.items()):
        offset = x - 0.4 + width * (g + 0.5)
        shown = [(i, by_method[m]) for i, m in enumerate(methods) if m in by_method]
        means = [float(np.mean(v)) for _, v in shown]
        errors = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for _, v in shown]
        where = [offset[i] for i, _ in shown]
        ax.bar(where, means, width, yerr=errors, capsize=3, label=group, alpha=0.8)
        for w, (_, v) in zip(where, shown, strict=True):
            ax.plot([w] * len(v), v, "k.", markersize=3)
    ax.set_xticks(x, methods, rotation=35, ha="right")
    ax.set_ylabel(f"{metric} (mean over seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=TITLE_SIZE)
    return fig


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


def plot_training_curves(history: Sequence[Mapping[str, float]]) -> Figure:
    """Plot losses and validation metrics against the epoch.

    Args:
        history: one dict per epoch with "epoch" and numeric values, e.g.
            ``{"epoch": 0, "train_loss": 2.3, "val_recall@1": 0.12}``. Keys containing "loss"
            share the left panel; any other numeric key is drawn in the right panel. Epochs
            without a key are skipped for that line.
    """
    if not history:
        raise ValueError("history is empty; train for at least one epoch")
    for i, entry in enumerate(history):
        if "epoch" not in entry:
            raise ValueError(f"history[{i}] has no 'epoch' key (keys: {sorted(entry)})")
    keys = list(dict.fromkeys(key for entry in history for key in entry if key != "epoch"))
    curves = {}
    for key in keys:
        points = [
            (float(entry["epoch"]), float(entry[key]))
            for entry in history
            if key in entry and _is_number(entry[key])
        ]
        if points:
            curves[key] = points
    loss_keys = [key for key in curves if "loss" in key]
    metric_keys = [key for key in curves if "loss" not in key]
    panels = [
        (group, name) for group, name in [(loss_keys, "loss"), (metric_keys, "metric")] if group
    ]
    if not panels:
        raise ValueError(f"history has no numeric values besides 'epoch' (keys: {keys})")

    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.5 * len(panels), 3.2), squeeze=False, layout="constrained"
    )
    for ax, (panel_keys, ylabel) in zip(axes[0], panels, strict=True):
        for key in panel_keys:
            epochs, values = zip(*curves[key], strict=True)
            ax.plot(epochs, values, marker="o", markersize=3, label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=TITLE_SIZE)
    return fig


def plot_histories(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    keys: Mapping[str, str],
    log_scale: Sequence[str] = (),
) -> Figure:
    """Several runs' training histories side by side: one panel per key, one line per run.

    Args:
        histories: run name -> history (one dict per epoch with "epoch"), as ``Run.history``.
        keys: history key -> panel title, e.g. ``{"train_loss": "training loss",
            "val_recall@1": "validation Recall@1"}``. A run without a key is left out of
            that panel (a softmax run has no share of active triplets).
        log_scale: the keys whose panel gets a logarithmic y axis.
    """
    if not histories or not keys:
        raise ValueError("pass at least one history and one key")
    fig, axes = plt.subplots(
        1, len(keys), figsize=(4.6 * len(keys), 3.4), squeeze=False, layout="constrained"
    )
    for ax, (key, title) in zip(axes[0], keys.items(), strict=True):
        for name, history in histories.items():
            points = [(e["epoch"], e[key]) for e in history if _is_number(e.get(key))]
            if points:
                ax.plot(*zip(*points, strict=True), label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if key in log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=TITLE_SIZE)
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


def _show_tile(
    ax: Axes, image: np.ndarray, title: str | None = None, frame_color: str | None = None
) -> None:
    ax.imshow(_to_hwc(image), cmap="gray" if image.shape[0] == 1 else None)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        lines = [textwrap.fill(line, CAPTION_WIDTH) for line in title.split("\n")]
        ax.set_title("\n".join(lines), fontsize=TITLE_SIZE)
    for spine in ax.spines.values():
        spine.set_edgecolor(frame_color or TILE_EDGE_COLOR)
        spine.set_linewidth(1 if frame_color is None else 4)


def _as_numpy(images: Array) -> np.ndarray:
    """(..., C, H, W) tensor or array -> NumPy array on the CPU, dtype kept."""
    if isinstance(images, torch.Tensor):
        return images.detach().cpu().numpy()
    return np.asarray(images)


def _to_hwc(image: np.ndarray) -> np.ndarray:
    """(C, H, W) uint8 or float in [0, 1] -> (H, W, C) or (H, W) for imshow."""
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"expected an image of shape (3, H, W) or (1, H, W), got {tuple(image.shape)}"
        )
    if image.dtype != np.uint8:
        image = np.clip(image.astype(np.float32), 0.0, 1.0)
    return image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)


def _is_number(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.dtype != torch.bool
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


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
