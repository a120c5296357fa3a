"""What each notebook's GPU preset took, beside what utils_cv/similarity/budget.py expected.

    python .ci/gpu_report.py /tmp/gpu-check    # by .ci/gpu-check, at its end

Reads gpu-check's times.txt ("NN exit-status seconds" per notebook) and the training logs
its gpu tests left (runner.TRAINING_LOG: one JSON line per training), prints one row per
notebook and writes them to report.json in the same folder. Developer tool for the GPU
machine; runs anywhere the package imports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def notebook_name(number: str) -> str:
    found = sorted((ROOT / "notebooks").glob(f"{number}_*.ipynb"))
    if not found:
        raise SystemExit(f"no notebook {number}_*.ipynb")
    return found[0].stem


def report(work: Path) -> list[dict]:
    from utils_cv.similarity import budget
    from utils_cv.similarity.presets import preset_config
    from utils_cv.similarity.runner import read_training_log

    rows = []
    for line in (work / "times.txt").read_text().splitlines():
        number, status, seconds = line.split()
        name = notebook_name(number)
        config = preset_config("gpu", name)
        planned = budget.planned_trainings(name, config)
        log = [entry for path in sorted(work.glob(f"{number}_*/**/trainings.jsonl"))
               for entry in read_training_log(path)]  # fmt: skip
        passes = sum(entry["image_passes"] for entry in log)
        rows.append({
            "notebook": name,
            "passed": status == "0",
            "seconds": int(seconds),
            "estimated seconds": round(budget.gpu_seconds(planned, budget.default_images(config), config)),
            "trainings": len(log),
            "planned trainings": len(planned),
            "million image passes": round(passes / 1e6, 2),
            "images/s": round(passes / max(int(seconds), 1)),
            "training seconds (sum)": round(sum(entry["seconds"] for entry in log)),
        })  # fmt: skip
    return rows


def main() -> None:
    work = Path(sys.argv[1])
    rows = report(work)
    (work / "report.json").write_text(json.dumps(rows, indent=1) + "\n")
    columns = list(rows[0]) if rows else []
    print(" | ".join(columns))
    for row in rows:
        print(" | ".join(str(row[c]) for c in columns))
    print(
        f"all: {sum(r['seconds'] for r in rows)} s, estimated {sum(r['estimated seconds'] for r in rows)} s"
    )


if __name__ == "__main__":
    main()
