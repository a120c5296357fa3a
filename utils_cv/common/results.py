"""Record a notebook's key numbers in OUTPUT_DIR/metrics.json, and summarize runs over seeds.

Notebook tests read this file to assert on losses and metrics, so it must always be valid JSON:
values are checked before anything is written, and the file is replaced atomically.
``seed_summary`` and ``seed_table`` turn one dict per run into the mean ± std over seeds
that every notebook reports.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

METRICS_FILE = "metrics.json"


def record_metrics(
    output_dir: str | os.PathLike, metrics: Mapping[str, Any], prefix: str | None = None
) -> Path:
    """Merge ``metrics`` into ``output_dir/metrics.json`` and return the file's path.

    Args:
        output_dir: folder of the file; created if missing.
        metrics: string keys to numbers, strings, booleans, None, lists of those, or nested
            dicts of the same. NumPy and single-element torch values become plain ints/floats.
        prefix: if given, the metrics are stored under this key, e.g. ``prefix="softmax"``
            gives ``{"softmax": {...}}``, so several runs can share one file.

    Nested dicts are merged key by key with what the file already holds; any other value
    replaces the old one. Non-finite numbers (NaN, inf) raise ValueError naming the key, and the
    file is then left untouched.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict of name -> value, got {type(metrics).__name__}")
    if prefix is not None and (not isinstance(prefix, str) or not prefix):
        raise ValueError(f"prefix={prefix!r} must be a non-empty string or None")
    new = _clean(metrics, path=prefix or "")
    if prefix is not None:
        new = {prefix: new}
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    file = output_dir / METRICS_FILE
    merged = _merge(_read(file) if file.exists() else {}, new)
    write_atomic(file, merged)
    return file


def load_metrics(output_dir: str | os.PathLike) -> dict[str, Any]:
    """Return the dict stored in ``output_dir/metrics.json``.

    Raises FileNotFoundError if nothing was recorded there yet.
    """
    file = Path(output_dir) / METRICS_FILE
    if not file.exists():
        raise FileNotFoundError(
            f"{file} does not exist; record metrics first with record_metrics({str(output_dir)!r}, ...)"
        )
    return _read(file)


def _read(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file} is not valid JSON ({error}); delete or fix it") from error
    if not isinstance(data, dict):
        raise ValueError(f"{file} holds a {type(data).__name__}, not a JSON object; delete it")
    return data


def _clean(value: Any, path: str) -> Any:
    """Return ``value`` as plain JSON types, raising on non-finite or unsupported values."""
    name = path or "metrics"
    if isinstance(value, Mapping):
        cleaned = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"metric key {key!r} in {name!r} must be a string")
            cleaned[key] = _clean(item, f"{path}/{key}" if path else key)
        return cleaned
    if isinstance(value, (list, tuple)):
        return [_clean(item, f"{name}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"metric {name!r} is a tensor of shape {tuple(value.shape)}; "
                "record a single number (e.g. tensor.item()) or a list (tensor.tolist())"
            )
        value = value.item()
    elif isinstance(value, (np.generic, np.ndarray)):
        if np.size(value) != 1:
            raise TypeError(
                f"metric {name!r} is an array of shape {np.shape(value)}; "
                "record a single number or a list (array.tolist())"
            )
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"metric {name!r} is {value}; only finite numbers can be recorded "
                "(a NaN or inf usually means the training diverged)"
            )
        return value
    raise TypeError(
        f"metric {name!r} has type {type(value).__name__}; use a number, string, bool, None, "
        "list or dict"
    )


def _merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    merged = dict(old)
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_atomic(file: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` as JSON to ``file``: readers see the old file or the new one, never a
    half-written one."""
    # A temporary file in the same folder, then os.replace: readers see the old file or the
    # new one, never a half-written one, even if the process dies mid-write.
    handle, tmp_name = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file readable by its owner only; metrics are not secret.
        os.chmod(tmp_name, 0o644)
        with os.fdopen(handle, "w", encoding="utf-8") as tmp:
            json.dump(data, tmp, indent=2, allow_nan=False)
            tmp.write("\n")
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, file)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` with every float rounded to ``digits`` places, inside dicts and lists too.

    >>> rounded({"recall@1": 0.123456, "by_seed": [0.5, 0.333333]})
    {'recall@1': 0.1235, 'by_seed': [0.5, 0.3333]}
    """
    if isinstance(value, Mapping):
        return {key: rounded(item, digits) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(item, digits) for item in value]
    if isinstance(value, torch.Tensor) and value.numel() == 1 or isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return round(value, digits)
    return value


def seed_summary(
    runs: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    by: str = "method",
    per_seed: str = "recall@1",
    digits: int = 4,
) -> dict[str, dict[str, Any]]:
    """Mean and spread over seeds of each group of runs, for metrics.json.

    Args:
        runs: one dict per run, e.g. ``{"method": "semi_hard", "seed": 0, "recall@1": 0.15}``.
        columns: the numeric keys to summarize.
        by: the key that names the group (the method).
        per_seed: a column also listed run by run, as ``"<per_seed>_by_seed"``.

    Returns:
        {group: {column: mean, column + "_std": sample standard deviation (only with two
        runs or more), per_seed + "_by_seed": [value of each run]}}, groups in the order
        they first appear, numbers rounded to ``digits``. A column that is None in every
        run of a group (a measure that does not apply to it) is None there, without std.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for i, run in enumerate(runs):
        missing = [key for key in (by, per_seed, *columns) if key not in run]
        if missing:
            raise KeyError(
                f"run {i} has no {missing} (it has {sorted(run)}); give every run the group "
                f"key by={by!r}, per_seed={per_seed!r} and each of the columns"
            )
        groups.setdefault(run[by], []).append(run)
    summary = {}
    for name, rows in groups.items():
        entry: dict[str, Any] = {}
        for column in columns:
            raw = [row[column] for row in rows]
            if all(value is None for value in raw):  # not measured for this group
                entry[column] = None
                continue
            if any(value is None for value in raw):
                raise ValueError(
                    f"{name!r} has {column!r} in some runs and None in others: {raw}; give "
                    "every run of a group the value, or None in all of them"
                )
            values = np.array([float(value) for value in raw])
            entry[column] = values.mean()
            if len(rows) > 1:
                entry[f"{column}_std"] = values.std(ddof=1)
        entry[f"{per_seed}_by_seed"] = [float(row[per_seed]) for row in rows]
        summary[name] = rounded(entry, digits)
    return summary


def seed_table(
    runs: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    by: str = "method",
    per_seed: str = "recall@1",
    digits: int = 3,
) -> pd.DataFrame:
    """A table of ``seed_summary``: one row per group, "mean ± std" in each column.

    No "±" with one run per group. The last column lists ``per_seed`` run by run
    ("0.186 / 0.166 / 0.175"), so a reader can compare the groups seed by seed.
    """
    summary = seed_summary(runs, columns, by=by, per_seed=per_seed, digits=6)
    rows = {}
    for name, entry in summary.items():
        cells = {}
        for column in columns:
            if entry[column] is None:
                cells[column] = "—"
                continue
            cell = f"{entry[column]:.{digits}f}"
            if f"{column}_std" in entry:
                cell += f" ± {entry[f'{column}_std']:.{digits}f}"
            cells[column] = cell
        by_seed = entry[f"{per_seed}_by_seed"]
        cells[f"{per_seed} by seed"] = " / ".join(f"{v:.{digits}f}" for v in by_seed)
        rows[name] = cells
    return pd.DataFrame.from_dict(rows, orient="index")


def markdown_table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table, one line per row, each cell as ``str`` gives it (no escaping:
    a cell must not hold "|"), without a final newline.

    >>> print(markdown_table(["method", "recall@1"], [["softmax", 0.31]]))
    | method | recall@1 |
    |---|---|
    | softmax | 0.31 |
    """

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(map(str, cells)) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])
