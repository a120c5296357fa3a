"""The docs site's checks (docs/site/check.py) find what they promise, and the README stays
a front page. `make test` builds the site itself on the smoke runs' notebooks."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
spec = importlib.util.spec_from_file_location("site_check", ROOT / "docs" / "site" / "check.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def notebook(images: int) -> dict:
    outputs = [{"output_type": "display_data", "data": {"image/png": "iVBOR"}}] * images
    return {"cells": [{"cell_type": "code", "outputs": outputs, "source": ""}]}


def site(tmp_path: Path, page: str, images_in_notebook: int) -> tuple[Path, Path]:
    html, src = tmp_path / "html", tmp_path / "src"
    (html / "notebooks").mkdir(parents=True)
    (src / "notebooks").mkdir(parents=True)
    (html / "_images").mkdir()
    (html / "_images" / "a.png").write_bytes(b"png")
    (html / "_static" / "mathjax").mkdir(parents=True)
    (html / "_static" / "mathjax" / "MathJax.js").write_text("")
    (html / "notebooks" / "00.html").write_text(page)
    (src / "notebooks" / "00.ipynb").write_text(json.dumps(notebook(images_in_notebook)))
    return html, src


GOOD = """<html><head><script src="../_static/mathjax/MathJax.js"></script></head>
<body><a href="#top">x</a><a href="https://example.org">web</a>
<div class="cell_output docutils container"><div><img src="../_images/a.png"></div></div>
<img src="../_images/a.png"></body></html>"""


def test_a_good_page_passes(tmp_path):
    assert check.problems(*site(tmp_path, GOOD, images_in_notebook=1)) == []


def test_broken_links_remote_assets_and_missing_images_are_found(tmp_path):
    page = GOOD.replace("../_images/a.png", "../_images/b.png", 1).replace(
        "</head>", '<link rel="stylesheet" href="https://fonts.example.org/f.css"></head>'
    )
    found = check.problems(*site(tmp_path, page, images_in_notebook=2))
    assert any("img ../_images/b.png points at nothing" in f for f in found)
    assert any("loads https://fonts.example.org/f.css from the web" in f for f in found)
    assert any("1 images in its outputs, the notebook has 2 image outputs" in f for f in found)
    # an image outside the output cells (a markdown figure) does not count as an output
    assert len(found) == 3


def test_a_staged_page_that_was_not_built_is_found(tmp_path):
    html, src = site(tmp_path, GOOD, images_in_notebook=1)
    (src / "docs").mkdir()
    (src / "docs" / "guide.md").write_text("# Guide\n")
    assert check.problems(html, src) == ["docs/guide.md was not built"]


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move details to docs/"


spec = importlib.util.spec_from_file_location("results_tables", ROOT / "docs" / "results_tables.py")
results_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(results_tables)


@pytest.fixture(scope="module")
def made() -> dict[str, str]:
    """The tables the stored records give, computed once for the tests below."""
    return results_tables.tables(results_tables.stored_records())


def test_the_docs_tables_are_what_the_stored_results_give(made):
    assert results_tables.missing(made) == [], "run `python docs/results_tables.py` and paste"
    assert made["verdicts"].count("\n") == 2 + len(results_tables.claims.CLAIMS) - 1


def test_a_verdict_edited_in_the_readme_or_a_number_in_the_results_is_found(made, tmp_path):
    (tmp_path / "docs").mkdir()
    results = (ROOT / "docs" / "results.md").read_text()
    readme = (ROOT / "README.md").read_text()
    edited = readme.replace("| reproduced | not reproduced |", "| reproduced | reproduced |", 1)
    (tmp_path / "README.md").write_text(edited)
    (tmp_path / "docs" / "results.md").write_text(results.replace("0.436 ± 0.013", "0.446 ± 0.013"))
    assert edited != readme and "0.436 ± 0.013" in results
    assert results_tables.missing(made, tmp_path) == ["methods", "claims", "verdicts"]
