"""Notebook 07's tables in Markdown, from the stored results (results/compare/cpu).

python docs/results_tables.py           # print the four tables
python docs/results_tables.py --check   # exit 1 if docs/results.md or the README lacks one

The tables of docs/results.md ("Every method under one protocol": methods, ablations,
claims) and the README's verdicts are these, so that re-made records cannot leave the docs
behind: tests/unit/test_docs_site.py runs the check. docs/results.md marks with † the
rows made on a second machine; the check ignores that mark.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from utils_cv.common.results import markdown_table, seed_table
from utils_cv.similarity import claims, compare, record_files
from utils_cv.similarity.presets import IMAGENET, SCRATCH

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = (SCRATCH, IMAGENET)
METHOD_COLUMNS = ["recall@1", "map@r", "nmi", "mean_test_distance", "seconds/epoch"]
ABLATION_COLUMNS = ["recall@1", "map@r", "best val recall@1", "seconds/epoch"]
MARK = " †"  # docs/results.md: a row made on the second machine


def _by_setting(records: Sequence[Mapping[str, Any]], methods, columns) -> str:
    rows = compare.result_rows([r for r in records if r["method"] in methods])
    tables = {s: seed_table([r for r in rows if r["setting"] == s], columns) for s in SETTINGS}
    # each setting's rows in turn: EE is named by a different base in each
    names = list(dict.fromkeys(r["method"] for s in SETTINGS for r in rows if r["setting"] == s))
    header = ["", *(f"{s}: {c}" for s in SETTINGS for c in columns)]

    def cell(name: str, setting: str, column: str) -> str:
        table = tables[setting]
        return table.loc[name, column] if name in table.index else "—"

    cells = [[name, *(cell(name, s, c) for s in SETTINGS for c in columns)] for name in names]
    return markdown_table(header, cells)


def tables(records: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """name -> Markdown table: "methods", "ablations", "claims" (docs/results.md) and
    "verdicts" (the README: the claims' verdicts alone)."""
    claim_table = claims.claims_table(records, SETTINGS)
    columns = list(claim_table.columns)
    verdicts = [f"{s}: verdict" for s in SETTINGS]
    return {
        "methods": _by_setting(records, compare.METHODS, METHOD_COLUMNS),
        "ablations": _by_setting(records, compare.ABLATIONS, ABLATION_COLUMNS),
        "claims": markdown_table(
            ["claim", *columns], ([c, *row[columns]] for c, row in claim_table.iterrows())
        ),
        "verdicts": markdown_table(
            ["claim", SCRATCH, IMAGENET], ([c, *row[verdicts]] for c, row in claim_table.iterrows())
        ),
    }


def stored_records(root: Path = record_files.RESULTS_DIR) -> list[dict[str, Any]]:
    return compare.load_results(root, "cpu")


def missing(tables: Mapping[str, str], root: Path = ROOT) -> list[str]:
    """The tables docs/results.md ("methods", "ablations", "claims") or README.md
    ("verdicts") under ``root`` does not hold line for line."""
    results = (root / "docs" / "results.md").read_text().replace(MARK, "")
    readme = (root / "README.md").read_text()
    where = {"methods": results, "ablations": results, "claims": results, "verdicts": readme}
    return [name for name, table in tables.items() if table not in where[name]]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with the docs; print only the tables they lack",
    )
    args = parser.parse_args(argv)
    made = tables(stored_records())
    if args.check:
        behind = missing(made)
        for name in behind:
            print(
                f"the {name} table in the docs is not what the stored results give:\n{made[name]}\n"
            )
        return 1 if behind else 0
    for name, table in made.items():
        print(f"## {name}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
