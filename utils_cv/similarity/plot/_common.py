"""What the plot modules share: the image type, colours and sizes, and drawing one tile.

Images are ``(N, 3, H, W)`` uint8 (or float in [0, 1]) torch tensors or NumPy arrays, as
stored in ``ImageData.images``.
"""

from __future__ import annotations

import textwrap

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

Array = torch.Tensor | np.ndarray

MATCH_COLOR = "tab:green"
MISMATCH_COLOR = "tab:red"
# A thin light frame around other tiles, so images on white backgrounds keep their edges.
TILE_EDGE_COLOR = "0.8"
TITLE_SIZE = 8
# Longest caption line before wrapping, so long class names do not run into the next tile.
CAPTION_WIDTH = 22


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


def _figure_and_axes(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax
