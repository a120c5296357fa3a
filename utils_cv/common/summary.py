"""``outputs/summary.md``: one table of every notebook's key numbers and wall time.

``make run`` executes each notebook into ``outputs/<notebook>/``, writes the seconds it
took to ``outputs/<notebook>/wall_seconds`` and then calls

    python -m utils_cv.common.summary outputs

Each notebook names its key numbers under "summary" in its metrics.json (a flat dict of
name -> number, recorded by its last cell); this module only lays them out.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

from utils_cv.common.results import METRICS_FILE, load_metrics, markdown_table

SUMMARY_FILE = "summary.md"
WALL_SECONDS_FILE = "wall_seconds"
_NOTEBOOK_DIR = re.compile(r"\d\d_\w+")


def format_seconds(seconds: float) -> str:
    """73 -> "1 min 13 s"; 9.4 -> "9 s"."""
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def _wall_time(folder: Path) -> str:
    try:
        return format_seconds(float((folder / WALL_SECONDS_FILE).read_text().strip()))
    except (OSError, ValueError):
        return "not measured"


def _key_numbers(summary: dict) -> str:
    parts = []
    for name, value in summary.items():
        shown = f"{value:.3f}" if isinstance(value, float) else str(value)
        parts.append(f"{name} {shown}")
    return "; ".join(parts) if parts else "(the notebook records no summary)"


def write_summary(outputs_dir: str | os.PathLike) -> Path:
    """Write ``outputs_dir/summary.md`` from the notebook folders in it; return its path.

    A folder named like a notebook (``00_quickstart``) without metrics.json is listed as
    not finished, so a failed run is not mistaken for a complete one.
    """
    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        raise FileNotFoundError(f"{outputs_dir} does not exist; run the notebooks first (make run)")
    folders = sorted(
        p for p in outputs_dir.iterdir() if p.is_dir() and _NOTEBOOK_DIR.fullmatch(p.name)
    )
    rows = []
    for folder in folders:
        if not (folder / METRICS_FILE).exists():
            rows.append(
                [folder.name, "", "", _wall_time(folder), f"did not finish: no {METRICS_FILE}"]
            )
            continue
        metrics = load_metrics(folder)
        seeds = ", ".join(str(seed) for seed in metrics.get("seeds", []))
        rows.append([folder.name, metrics.get("preset", "?"), seeds, _wall_time(folder),
                     _key_numbers(metrics.get("summary", {}))])  # fmt: skip
    if not folders:
        rows.append(["(no notebook outputs found)", "", "", "", ""])
    lines = [
        "# Results of `make run`",
        "",
        "Each notebook's key numbers from its `metrics.json`, and the wall time of the whole",
        "notebook (kernel start, data, training, evaluation and plots).",
        "",
        markdown_table(["notebook", "preset", "seeds", "wall time", "key numbers"], rows),
    ]
    path = outputs_dir / SUMMARY_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs_dir", nargs="?", default="outputs")
    path = write_summary(parser.parse_args().outputs_dir)
    print(path.read_text(encoding="utf-8"), end="")
    print(f"(written to {path})")


if __name__ == "__main__":
    main()
