"""Draw docs/images/comparison.png: notebook 07's methods, test Recall@1 in both settings.

python docs/images/comparison.py      # reads the stored results in results/compare/cpu

Mean and standard deviation over the stored seeds (0, 1, 2) of the CPU preset, the methods
only (not the ablations); the numbers are notebook 07's tables.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from utils_cv.similarity import compare, record_files  # noqa: E402
from utils_cv.similarity.presets import IMAGENET, SCRATCH  # noqa: E402

OUT = Path(__file__).with_suffix(".png")


def main() -> None:
    records = [
        r
        for r in compare.load_results(record_files.RESULTS_DIR, "cpu")
        if r["method"] in compare.METHODS
    ]
    rows = compare.result_rows(records)
    for row in rows:  # EE sits on the pair-based base best on the validation classes: one row
        if row["method"].endswith(" + EE"):
            row["method"] = "EE (on the best base)"
    methods = list(dict.fromkeys(row["method"] for row in rows))
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    height = 0.38
    for offset, setting, colour in (
        (-height / 2, SCRATCH, "#4c72b0"),
        (height / 2, IMAGENET, "#dd8452"),
    ):
        means, stds = [], []
        for method in methods:
            values = [
                r["recall@1"] for r in rows if r["method"] == method and r["setting"] == setting
            ]
            means.append(np.mean(values) if values else np.nan)
            stds.append(np.std(values, ddof=1) if len(values) > 1 else 0)
        y = np.arange(len(methods)) + offset
        ax.barh(y, means, height, xerr=stds, color=colour, label=setting, capsize=2)
    ax.set_yticks(np.arange(len(methods)), methods)
    ax.invert_yaxis()
    ax.set_xlabel("test Recall@1 (mean ± std over 3 seeds)")
    ax.set_xlim(0, 0.55)
    ax.set_title("Every method under one protocol (emoji data, CPU preset)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(OUT, dpi=110)
    print(OUT)


if __name__ == "__main__":
    main()
