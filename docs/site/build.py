"""Build the docs site offline: ``make docs`` (``python docs/site/build.py``).

The site mirrors the repository: the README is the home page, ``notebooks/NN_*.ipynb`` the
lessons (executed, from ``OUTPUTS/<name>/<name>.ipynb`` as ``make run`` or the smoke tests
leave them; a notebook not executed yet is shown without outputs, with a note that says so),
``docs/*.md`` the guides and results, ``data/README.md`` the datasets and their licences,
``benchmarks/README.md`` the benchmarks, and ``api/`` the library's reference, one page per
module, from its docstrings. Because the pages keep their repository paths, the relative links
written for GitHub work on the site too. The pages are staged in ``build/docs/src`` and Sphinx
(docs/site/conf.py) writes ``build/docs/html``; every warning (a broken cross-reference, a page
missing from the navigation, a docstring Sphinx cannot read) fails the build. Then
``docs/site/check.py`` checks the built pages: every local link and image resolves, no page
loads anything from the web, and every notebook page shows as many images as its
notebook has image outputs.

    python docs/site/build.py --outputs outputs        # after make run
    python docs/site/build.py --outputs outputs/smoke  # after the smoke tests (make test)
"""

from __future__ import annotations

import argparse
import json
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "docs"
# Guides and results, in the order the navigation shows them (docs/README.md lists them all).
GUIDES = ["docs/README", "docs/lessons", "docs/results", "docs/datasets", "docs/benchmarks/cub",
          "docs/benchmarks/cars196", "docs/benchmarks/sop", "docs/benchmarks/inshop",
          "docs/evaluation", "docs/distributed", "docs/triplet_collapse", "docs/reliability",
          "docs/testing", "docs/layout", "data/README", "benchmarks/README"]  # fmt: skip
# Notebook 08's retrieval browser (ipywidgets) is live in JupyterLab only; its saved view would
# load the widget manager from a CDN. The notebook draws a static figure of it too.
WIDGET = "application/vnd.jupyter.widget-view+json"
NOT_EXECUTED = (
    "```{note}\nThis page shows the notebook without its outputs: it was not executed when the "
    "site was built. `make run` executes every notebook (`make docs` then shows their plots).\n```"
)


def notebook_names() -> list[str]:
    """The lessons in order, then the recipes (stored with their outputs)."""
    return sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")) + ["recipes"]


def stage_notebooks(stage: Path, outputs: Path) -> dict[str, bool]:
    """Each lesson, executed where ``outputs`` has it; {name: executed}."""
    (stage / "notebooks").mkdir(parents=True)
    executed = {}
    for name in notebook_names():
        run = outputs / name / f"{name}.ipynb"
        if name == "recipes":  # its outputs are in the repository, checked by nbval
            run = ROOT / "notebooks" / "recipes.ipynb"
        executed[name] = run.exists()
        notebook = json.loads(
            (run if run.exists() else ROOT / "notebooks" / f"{name}.ipynb").read_text()
        )
        for cell in notebook["cells"]:  # a live widget needs a kernel; the site has none
            cell["outputs"] = [
                o for o in cell.get("outputs", []) if WIDGET not in o.get("data", {})
            ]
            tags = cell.setdefault("metadata", {}).get("tags", [])
            if "injected-parameters" in tags:  # papermill's: the run's paths, not the lesson
                cell["metadata"]["tags"] = [*tags, "remove-cell"]
        notebook.get("metadata", {}).pop("widgets", None)
        if not executed[name]:
            note = {
                "cell_type": "markdown",
                "id": "not-executed",
                "metadata": {},
                "source": NOT_EXECUTED,
            }
            notebook["cells"].insert(1, note)
        (stage / "notebooks" / f"{name}.ipynb").write_text(json.dumps(notebook))
    return executed


def module_names() -> list[str]:
    import utils_cv

    return ["utils_cv"] + [
        m.name for m in pkgutil.walk_packages(utils_cv.__path__, "utils_cv.")
        if not m.name.rsplit(".", 1)[-1].startswith("_")
    ]  # fmt: skip


def stage_api(stage: Path) -> list[str]:
    """One page per public module (autodoc), and an index of them; the page names."""
    api = stage / "api"
    api.mkdir()
    pages = []
    for name in module_names():
        directive = f"```{{eval-rst}}\n.. automodule:: {name}\n   :members:\n```\n"
        title = name.removeprefix("utils_cv.similarity.").removeprefix("utils_cv.")
        (api / f"{name}.md").write_text(f"# {title}\n\n{directive}")  # short: it wraps
        pages.append(f"api/{name}")
    toctree = "\n".join(page.removeprefix("api/") for page in pages)
    (api / "index.md").write_text(
        "# API reference\n\nEvery public module of `utils_cv`, from its docstrings.\n\n"
        f"```{{toctree}}\n:maxdepth: 1\n\n{toctree}\n```\n"
    )
    return pages


LINK = re.compile(r"\]\(([^)\s]+)\)")


def copy_linked_files(src: Path) -> None:
    """Copy into the stage every repository file a page links to by a relative path (a
    script, a JSON result, an image) that is not staged yet, so that the link works on the
    site as on GitHub (Sphinx offers it as a download). A link to a missing file stays broken,
    and the build's warnings name it."""
    for page in [*src.rglob("*.md"), *src.rglob("*.ipynb")]:
        folder = page.parent.relative_to(src)
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            target = target.split("#")[0].replace("\\n", "")
            if not target or re.match(r"^[a-z]+:", target) or target.startswith("/"):
                continue
            source = (ROOT / folder / target).resolve()
            staged = (src / folder / target).resolve()
            if source.is_file() and not staged.exists() and ROOT in source.parents:
                staged.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, staged)


def stage_mathjax() -> None:
    """MathJax 2 from jupyter-server-mathjax into build/docs/static/mathjax (conf.py serves it)."""
    import jupyter_server_mathjax

    target = BUILD / "static" / "mathjax"
    if not target.exists():
        shutil.copytree(Path(jupyter_server_mathjax.__file__).parent / "static", target)


def stage(outputs: Path) -> tuple[Path, dict[str, bool]]:
    """Copy the pages into build/docs/src; {notebook: executed}."""
    src = BUILD / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    shutil.copytree(
        ROOT / "docs", src / "docs", ignore=shutil.ignore_patterns("site", "__pycache__")
    )
    for page in ("data/README.md", "benchmarks/README.md"):
        (src / page).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / page, src / page)
    executed = stage_notebooks(src, outputs)
    stage_api(src)
    lessons = [f"notebooks/{name}" for name in notebook_names()]
    navigation = "".join(
        f"\n```{{toctree}}\n:hidden:\n:caption: {caption}\n\n" + "\n".join(pages) + "\n```\n"
        for caption, pages in (("Lessons", lessons), ("Guides and results", GUIDES),
                               ("Reference", ["api/index"]))
    )  # fmt: skip
    (src / "index.md").write_text((ROOT / "README.md").read_text() + navigation)
    copy_linked_files(src)
    stage_mathjax()
    return src, executed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs",
                        help="where the executed notebooks are (OUTPUTS of make run)")  # fmt: skip
    parser.add_argument("--require-outputs", action="store_true",
                        help="fail when a lesson has not been executed (make test)")  # fmt: skip
    args = parser.parse_args(argv)
    src, executed = stage(args.outputs.resolve())
    missing = [name for name, done in executed.items() if not done]
    if args.require_outputs and missing:
        print(f"no executed notebook in {args.outputs} for {missing}", file=sys.stderr)
        return 1
    html = BUILD / "html"
    shutil.rmtree(html, ignore_errors=True)
    command = [sys.executable, "-m", "sphinx", "-b", "html", "-c", str(ROOT / "docs" / "site"),
               "-W", "--keep-going", "-q", str(src), str(html)]  # fmt: skip
    if subprocess.run(command).returncode != 0:
        print("the docs did not build: fix the warnings above", file=sys.stderr)
        return 1
    shown = sum(executed.values())
    print(f"built {html / 'index.html'}: {shown} of {len(executed)} notebooks with outputs")
    from check import check_site  # docs/site/check.py, beside this file

    return check_site(html, src)


if __name__ == "__main__":
    sys.exit(main())
