"""The repository's own rules: dependencies agree, notebooks are stored clean.

The lesson notebooks (``notebooks/NN_*.ipynb``) are stored without outputs. The one
exception is ``notebooks/recipes.ipynb``: stored with its outputs, which nbval checks in
``make test``, and marked ``"keep_output": true`` so nbstripout leaves them.
"""

from __future__ import annotations

import ast
import json
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "constraints.txt"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _normalize(requirement: str) -> str:
    return re.sub(r"\s+", "", requirement).lower()


def _environment_pip_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    requirements = set()
    for line in lines[start + 1 :]:
        stripped = line.strip()
        if not stripped.startswith("- "):
            if stripped and not stripped.startswith("#"):
                break
            continue
        value = stripped[2:].strip()
        if value not in ("-e .", f"-c {LOCK.name}"):
            requirements.add(_normalize(value))
    return requirements


def _declared() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["dependencies"] + project["optional-dependencies"]["dev"]


def _pins() -> dict[str, str]:
    """constraints.txt as {canonical name: version}; every line a comment or name==version."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!_-]+)", line)
        assert match, f"{LOCK.name}: {line!r} is not name==version"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_environment_yml_mirrors_pyproject():
    declared = {_normalize(r) for r in _declared()}
    in_conda = _environment_pip_requirements()
    assert in_conda == declared, (
        f"only in pyproject.toml: {sorted(declared - in_conda)}; "
        f"only in environment.yml: {sorted(in_conda - declared)}"
    )


def test_the_lock_pins_every_declared_dependency_within_its_range():
    pins = _pins()
    for line in _declared():
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is declared but not pinned in {LOCK.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{LOCK.name} pins {name}=={pins[name]}, outside pyproject's {requirement}: "
            "run make lock"
        )


def test_make_env_and_environment_yml_install_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert f"LOCK := {LOCK.name}" in makefile
    install = next(
        line for line in makefile.splitlines() if '-e ".[dev]"' in line and "BIN" in line
    )
    assert "-c $(LOCK)" in install, install
    assert f"- -c {LOCK.name}" in (ROOT / "environment.yml").read_text()
    # pip itself is pinned and installed first, so a new pip release changes nothing
    upgrade = next(line for line in makefile.splitlines() if line.rstrip().endswith(" pip"))
    assert "BIN" in upgrade and "-c $(LOCK)" in upgrade, upgrade
    assert {"pip", "setuptools"} <= _pins().keys()


def test_the_lock_matches_this_environment():
    """What is installed here is what the lock says (make env installs it; a package added
    by hand, or a version changed by hand, shows up here). Skipped outside make env's .venv."""
    from importlib.metadata import distributions

    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    if canonicalize_name("utils_cv") not in installed:
        pytest.skip("utils_cv is not installed in this environment")
    pins = _pins()
    # Pins of packages absent here (another platform's) are not compared.
    differ = {n: (v, installed[n]) for n, v in pins.items() if installed.get(n, v) != v}
    assert not differ, f"pinned vs installed: {differ}; run make env (or make lock)"


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no numbered notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_clean(path):
    notebook = json.loads(path.read_text())
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name} is stored with outputs: run nbstripout"
            assert cell.get("execution_count") is None, f"{path.name} has execution counts"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_holds_plain_literals(path):
    notebook = json.loads(path.read_text())
    tagged = [
        c
        for c in notebook["cells"]
        if c["cell_type"] == "code" and "parameters" in c.get("metadata", {}).get("tags", [])
    ]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    tree = ast.parse("".join(tagged[0]["source"]))
    names = {}
    for node in tree.body:
        assert isinstance(node, ast.Assign), f"{path.name}: only assignments belong in parameters"
        target = node.targets[0]
        assert isinstance(target, ast.Name) and target.id.isupper(), ast.dump(target)
        names[target.id] = ast.literal_eval(node.value)
    assert names.get("PRESET") == "auto"
    assert "OUTPUT_DIR" in names and ("SEED" in names or "SEEDS" in names)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_in_readme_table(path):
    assert f"notebooks/{path.name}" in (ROOT / "README.md").read_text()


def test_recipes_notebook_keeps_its_outputs_and_is_checked_by_nbval():
    path = ROOT / "notebooks" / "recipes.ipynb"
    notebook = json.loads(path.read_text())
    assert notebook["metadata"].get("keep_output") is True, "nbstripout would strip it"
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    without = [i for i, cell in enumerate(code[1:], start=1) if not cell["outputs"]]
    assert not without, f"recipe cells {without} have no stored output: re-run and save it"
    # nbval skips (and fails) cells without an execution count, so the git filter that
    # strips the lesson notebooks must leave this one alone.
    assert all(cell["execution_count"] is not None for cell in code), "re-run and save it"
    attributes = (ROOT / ".gitattributes").read_text().splitlines()
    assert "notebooks/recipes.ipynb -filter" in attributes
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "notebooks/recipes.ipynb" in config["testpaths"] and "--nbval" in config["addopts"]


def test_the_licence_is_declared_as_spdx_and_shipped():
    """pyproject declares an SPDX expression (the table form is deprecated by setuptools and
    its builds stop being supported in 2027) and the LICENSE file it names holds that licence."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")
