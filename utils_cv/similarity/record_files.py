"""Stored training records: one small checksummed JSON per training (notebook 07's results,
``make compare``, ``make paper``).

A record holds what was trained and what it measured; ``checksum`` covers all of it, so a
number edited by hand is refused when read (``read_record``). ``environment`` and
``git_commit`` say where and from which commit it was made, ``provenance`` sums that up for a
set of records, and ``recheck_band`` is the range a re-trained run must fall in to agree with
the stored seeds. What a record must contain, and which records may be compared, is the
comparison's business (``compare.make_record``, ``compare.load_results``).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

import utils_cv
from utils_cv.common.device import cpu_model
from utils_cv.common.results import write_atomic

SCHEMA = 1
REPOSITORY = Path(__file__).resolve().parents[2]
# The stored results of the CPU preset, in the repository (benchmarks/compare.py writes them).
RESULTS_DIR = REPOSITORY / "results" / "compare"


class StoredResultError(RuntimeError):
    """A stored result cannot be used: edited, made on other data or under another protocol."""


def checksum(record: Mapping[str, Any]) -> str:
    """sha256 of the record without its "checksum" field, in a canonical JSON form: any
    change to a stored number changes it."""
    body = {key: value for key, value in record.items() if key != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def git_commit(repository: Path = REPOSITORY) -> dict[str, Any]:
    """The checkout's commit and whether it has uncommitted changes (None outside git)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(repository), *args], capture_output=True,
                                  text=True, timeout=30, check=True)  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def cpu_name() -> str:
    """The processor's model and the vector instructions torch uses on it ("AMD EPYC, AVX512"):
    two machines that both say "Linux x86_64, 2 CPUs" can differ by half in seconds per epoch."""
    return f"{cpu_model()}, {torch.backends.cpu.get_cpu_capability()}"


def environment() -> dict[str, Any]:
    """Where a result was made: versions, commit, machine, device."""
    import torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {
        "utils_cv": utils_cv.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        **git_commit(),
        "machine": f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} CPUs",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
    }


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def result_path(root: str | os.PathLike, preset: str, setting: str, method: str, seed: int) -> Path:
    """Where one training's record lives: ``root/<preset>/<setting>/<method>/seed<k>.json``."""
    return Path(root) / preset / _slug(setting) / method / f"seed{seed}.json"


def save_record(root: str | os.PathLike, record: Mapping[str, Any]) -> Path:
    """Write ``record`` to its ``result_path``, atomically (a crash leaves no half file)."""
    if record.get("checksum") != checksum(record):
        raise StoredResultError("the record's checksum does not match its contents")
    path = result_path(root, record["preset"], record["setting"], record["method"], record["seed"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, record)
    return path


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """One stored record, its checksum verified."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise StoredResultError(f"{path} cannot be read ({error}); delete it and re-make it "
                                "with benchmarks/compare.py") from error  # fmt: skip
    if not isinstance(record, dict) or record.get("checksum") != checksum(record):
        raise StoredResultError(
            f"{path} was changed after it was made: its checksum does not match its contents. "
            "Stored results are never edited by hand; delete the file and re-make it with "
            "`python benchmarks/compare.py` (it trains only what is missing)"
        )
    return record


def provenance(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """When, where and from which commits the records were made."""
    records = list(records)
    if not records:
        raise ValueError("no records")
    made = sorted(r["made"] for r in records)
    environments = [r["environment"] for r in records]
    return {
        "records": len(records),
        "made": f"{made[0]} to {made[-1]}",
        "commits": sorted({str(e["commit"])[:12] for e in environments}),
        "uncommitted changes": any(e["dirty"] for e in environments),
        # records per machine: seconds per epoch compare only between records of one machine
        "machines": dict(
            sorted(Counter(f"{e['machine']}, {e['device']}" for e in environments).items())
        ),
        "torch": sorted({e["torch"] for e in environments}),
    }


# A re-trained run passes the re-check when its Recall@1 lies within this many standard
# deviations of the stored seeds' mean, or within RECHECK_FLOOR when the seeds agree closely
# (CPU runs of one seed differed by up to 0.017 across sessions of this machine).
RECHECK_STDS, RECHECK_FLOOR = 3.0, 0.02


def recheck_band(values: Sequence[float]) -> tuple[float, float]:
    """The (low, high) Recall@1 band a re-trained run must fall in, from the stored seeds."""
    mean = sum(values) / len(values)
    std = float(torch.tensor(values, dtype=torch.float64).std()) if len(values) > 1 else 0.0
    half = max(RECHECK_STDS * std, RECHECK_FLOOR)
    return mean - half, mean + half
