"""Images: a grid of images, a dataset's first look (class examples), the designs' credits."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure

from utils_cv.similarity.plot._common import Array, _as_numpy, _show_tile


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
