"""Sphinx configuration of the docs site (``make docs``; docs/site/build.py stages the pages).

Sphinx with myst-nb (the engine under Jupyter Book 1) and the book theme: it builds offline,
renders the executed notebooks with their outputs, reads the Markdown pages as they are on
GitHub, and documents the library from its docstrings (autodoc, Google style via napoleon).
"""

from pathlib import Path

project = "Metric-learning recipes"
author = "the utils_cv authors"
copyright = "the utils_cv authors, MIT licence"

extensions = ["myst_nb", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.viewcode"]
# The notebooks are shown as `make run` (or the smoke tests) executed them: never re-run here.
nb_execution_mode = "off"
# No widget manager from a CDN (build.py drops the widget views; nothing is fetched online).
nb_ipywidgets_js: dict = {}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
# A link to a repository file that is not a page (a script, a JSON result) is copied beside
# the page it is linked from and offered as a download.
myst_all_links_external = False
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]

autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    # a package page documents what is defined there, not what its __all__ re-exports
    "ignore-module-all": True,
}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not a second description of each

html_theme = "sphinx_book_theme"
html_title = "Metric-learning recipes"
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
    "home_page_in_toc": True,
}
# MathJax from the jupyter-server-mathjax package, copied beside the site by build.py, so the
# math renders offline too (the default loads it from a CDN).
html_static_path = [str(Path(__file__).resolve().parents[2] / "build" / "docs" / "static")]
mathjax_path = "mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"  # the config it ships
# MathJax 2's form of what myst-nb asks of MathJax 3: render the math spans inside notebook
# sections, which myst-nb marks to be skipped otherwise.
# The package ships the STIX web fonts only (not MathJax's TeX fonts).
mathjax2_config = {
    "HTML-CSS": {"webFont": "STIX-Web", "availableFonts": [], "imageFont": None},
    "tex2jax": {
        "processClass": "tex2jax_process|mathjax_process|math|output_area",
        "ignoreClass": "tex2jax_ignore|mathjax_ignore",
    },
}
