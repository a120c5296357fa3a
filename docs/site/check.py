"""Check a built docs site (build.py runs it after Sphinx).

- every local link, image, stylesheet and script of every page resolves to a file of the site;
- no page loads anything from the web (the site reads offline, math included);
- every notebook page shows each image output of its notebook (as many images in its output
  cells as the notebook has image outputs);
- every page of the staged sources was built.

    python docs/site/check.py build/docs/html build/docs/src
"""

from __future__ import annotations

import json
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

# What a page may fetch from the web: nothing (MathJax is served with the site).
ALLOWED_REMOTE: tuple[str, ...] = ()
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")


class _Page(HTMLParser):
    """The references of one page, and the images inside its notebook output cells."""

    def __init__(self):
        super().__init__()
        self.references: list[tuple[str, str]] = []  # (tag, url)
        self.output_images = 0
        self._stack: list[bool] = []  # per open div: is it a cell output?

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div":
            self._stack.append("cell_output" in (attrs.get("class") or "").split())
        for name in ("href", "src"):
            if attrs.get(name) and not (tag == "a" and name == "src"):
                self.references.append((tag, attrs[name]))
        if tag == "img" and any(self._stack):
            self.output_images += 1

    def handle_endtag(self, tag):
        if tag == "div" and self._stack:
            self._stack.pop()


def image_outputs(notebook: Path) -> int:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return sum(
        any(kind in output.get("data", {}) for kind in IMAGE_TYPES)
        for cell in cells
        for output in cell.get("outputs", [])
    )


def problems(html: Path, src: Path) -> list[str]:
    found = []
    # The theme's template fragments in _static are not pages.
    pages = sorted(p for p in html.rglob("*.html") if "_static" not in p.relative_to(html).parts)
    for page in pages:
        parser = _Page()
        parser.feed(page.read_text(encoding="utf-8"))
        name = page.relative_to(html)
        for tag, url in parser.references:
            parts = urlsplit(url)
            if parts.scheme in ("http", "https"):
                remote = tag in ("script", "img", "link", "iframe")
                if remote and not url.startswith(ALLOWED_REMOTE):
                    found.append(f"{name}: loads {url} from the web")
                continue
            if parts.scheme or not parts.path:  # mailto:, javascript:, a fragment alone
                continue
            target = (page.parent / unquote(parts.path)).resolve()
            if not target.exists():
                found.append(f"{name}: {tag} {url} points at nothing")
        notebook = src / page.relative_to(html).with_suffix(".ipynb")
        if notebook.exists():
            expected = image_outputs(notebook)
            if parser.output_images != expected:
                found.append(
                    f"{name}: {parser.output_images} images in its outputs, the notebook has "
                    f"{expected} image outputs"
                )
    for source in [*src.rglob("*.md"), *src.rglob("*.ipynb")]:
        built = html / source.relative_to(src).with_suffix(".html")
        if not built.exists():
            found.append(f"{source.relative_to(src)} was not built")
    return found


def check_site(html: Path, src: Path) -> int:
    found = problems(html, src)
    for line in found:
        print(line, file=sys.stderr)
    pages = sum("_static" not in p.relative_to(html).parts for p in html.rglob("*.html"))
    print(f"checked {pages} pages: " + (f"{len(found)} problem(s)" if found else "no problem"))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(check_site(Path(sys.argv[1]), Path(sys.argv[2])))
