"""Record a notebook's key numbers in OUTPUT_DIR/metrics.json.

Notebook tests read this file to assert on losses and metrics, so it must always be valid JSON:
values are checked before anything is written, and the file is replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
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
    _write_atomic(file, merged)
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


def _write_atomic(file: Path, data: dict[str, Any]) -> None:
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
