"""Curves and bars: training curves and histories, Recall@K curves, results over seeds."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from utils_cv.similarity.plot._common import TITLE_SIZE, _figure_and_axes


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


def _is_number(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.dtype != torch.bool
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
