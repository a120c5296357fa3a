"""Notebook 00 run in JupyterLab, in a real headless browser, as a learner runs it.

The notebook tests (tests/notebooks) execute the notebooks with papermill, which never
shows what a learner sees: the JupyterLab front end, its kernel and its rendering of the
outputs. Here a ``jupyter lab`` server from this environment serves a copy of notebook 00
(smoke preset, outputs into a temporary folder), headless Chromium opens it, "Run All Cells"
runs it from the Run menu, and the page is checked: every cell ran, no traceback, the plots
are images, the kernel is idle, and the "official Jupyter news" pop-up (which the settings
in .jupyter/lab/settings/overrides.json turn off once installed into the environment) is
not in the way. The notebook is then saved from the browser and the saved file is checked
too: an error output there is an error whatever its text.

A screenshot goes to outputs/browser/jupyterlab_00.png (and the saved notebook beside it),
also when the test fails. The test is skipped only where playwright is not importable or
no Chromium is found (``UTILS_CV_CHROMIUM``, /usr/bin/chromium, ``chromium`` or
``chromium-browser`` on the PATH, or the browser of ``python -m playwright install``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.notebooks.notebook_runner import ROOT, TRAININGS, notebook_path, trainings
from tests.ports import free_port
from utils_cv.similarity.runner import TRAINING_LOG

NAME = "00_quickstart"
# The settings to install into <env>/share/jupyter/lab/settings/ (make env).
OVERRIDES = ROOT / ".jupyter" / "lab" / "settings" / "overrides.json"
SCREENSHOT = ROOT / "outputs" / "browser" / "jupyterlab_00.png"
CHROMIUM_ENV = "UTILS_CV_CHROMIUM"
INSTALL_HINT = (
    "apt-get install chromium (or point UTILS_CV_CHROMIUM at a Chromium or Chrome binary, "
    "or run `python -m playwright install chromium`)"
)
# The smoke run of notebook 00 takes 60 to 110 s on 2 busy cores, in the browser as under
# papermill.
RUN_TIMEOUT_S = 8 * 60
SERVER_TIMEOUT_S = 120
STDERR_SELECTOR = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
NEWS = "Jupyter news"

# What the page shows, read from the notebook panel with the given id (the visible one).
REPORT_JS = """
([id, stderr]) => {
  const panel = document.getElementById(id);
  if (!panel) return null;
  const prompts = [...panel.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
    .map((e) => e.textContent.trim());
  const tracebacks = [...panel.querySelectorAll(stderr)]
    .map((e) => e.textContent)
    .filter((text) => text.includes('Traceback'));
  const indicator = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const kernel = panel.querySelector('.jp-Toolbar-kernelName, .jp-KernelName');
  return {
    kernel: kernel ? kernel.textContent.trim() : null,
    status: indicator ? indicator.dataset.status : null,
    prompts: prompts,
    tracebacks: tracebacks,
    images: panel.querySelectorAll('.jp-OutputArea-output img').length,
    toasts: [...document.querySelectorAll('.Toastify__toast')].map((e) => e.textContent),
    dialogs: [...document.querySelectorAll('.jp-Dialog')].map((e) => e.textContent),
  };
}
"""


def find_chromium() -> str | None:
    """The Chromium to drive: ``$UTILS_CV_CHROMIUM``, Debian's, one on the PATH, or None."""
    override = os.environ.get(CHROMIUM_ENV)
    if override:
        path = shutil.which(override) or override
        assert Path(path).is_file(), f"{CHROMIUM_ENV}={override!r} is not an executable file"
        return path
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser")


def set_parameters(source: Path, target: Path, **parameters) -> int:
    """Copy the notebook ``source`` to ``target`` with ``parameters`` assigned in its
    "parameters" cell, as a learner edits it; return its number of code cells.

    A name the cell does not assign fails here (papermill would ignore it silently)."""
    notebook = json.loads(source.read_text())
    cells = notebook["cells"]
    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, f"{source.name} needs exactly one cell tagged 'parameters'"
    lines = "".join(tagged[0]["source"]).splitlines()
    for name, value in parameters.items():
        found = [i for i, line in enumerate(lines) if re.match(rf"{name}\s*=", line)]
        assert found, f"{source.name}'s parameters cell does not assign {name}"
        lines[found[0]] = f"{name} = {value!r}"
    tagged[0]["source"] = "\n".join(lines)
    for cell in cells:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    target.write_text(json.dumps(notebook, indent=1))
    return sum(cell["cell_type"] == "code" for cell in cells)


def _api(url: str, token: str, method: str = "GET") -> bytes:
    request = urllib.request.Request(
        url, method=method, headers={"Authorization": f"token {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the kernels of a server), on Linux."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


@contextlib.contextmanager
def jupyter_lab(root: Path, home: Path, env: dict[str, str]) -> Iterator[tuple[str, str]]:
    """A ``jupyter lab`` server of this environment serving ``root``; yields its base URL
    and token. Its configuration, data, runtime, IPython, settings and workspaces folders
    are under ``home`` so that neither the user's (~/.jupyter, ~/.ipython) changes what is
    tested nor the test changes them; the environment's own settings (overrides.json) apply.
    The server shuts its kernels down at the end; its process group (and any kernel that
    outlives it) is killed if it does not."""
    port, token = free_port(), secrets.token_hex(24)
    dirs = {
        name: home / name for name in ("config", "data", "runtime", "ipython", "settings", "ws")
    }
    for folder in dirs.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {
        **env,
        "JUPYTER_CONFIG_DIR": str(dirs["config"]),
        "JUPYTER_DATA_DIR": str(dirs["data"]),
        "JUPYTER_RUNTIME_DIR": str(dirs["runtime"]),
        "IPYTHONDIR": str(dirs["ipython"]),
        "JUPYTERLAB_SETTINGS_DIR": str(dirs["settings"]),
        "JUPYTERLAB_WORKSPACES_DIR": str(dirs["ws"]),
    }
    command = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={root}",
        f"--LabApp.user_settings_dir={dirs['settings']}",
        f"--LabApp.workspaces_dir={dirs['ws']}",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        command.append("--allow-root")
    log_path = home / "server.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    kernels: list[int] = []
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while True:
            assert server.poll() is None, (
                f"jupyter lab exited ({server.returncode}):\n{log_path.read_text()[-3000:]}"
            )
            with contextlib.suppress(OSError):
                _api(f"{base}/api/status", token)
                break
            assert time.monotonic() < deadline, (
                f"jupyter lab did not answer in {SERVER_TIMEOUT_S} s:\n"
                f"{log_path.read_text()[-3000:]}"
            )
            time.sleep(0.5)
        yield base, token
    finally:
        kernels = _children(server.pid)
        with contextlib.suppress(OSError):
            _api(f"{base}/api/shutdown", token, method="POST")  # stops its kernels too
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        for pid in kernels:  # each kernel leads its own session (jupyter_client)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        # Shown by pytest when the test fails.
        print(f"--- jupyter lab log ({log_path}):\n{log_path.read_text()[-5000:]}")


def report_of(page, panel_id: str) -> dict | None:
    """The kernel, its status, the prompts, tracebacks, images, toasts and dialogs shown."""
    return page.evaluate(REPORT_JS, [panel_id, STDERR_SELECTOR])


def wait_for_kernel(page, panel_id: str, timeout_s: float = 120) -> None:
    """Wait until the notebook's kernel is started and idle. The execution indicator reads
    "idle" before there is any kernel ("No Kernel"); a Run All then opens the Select Kernel
    dialog instead of running."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = report_of(page, panel_id)
        kernel, status = (report or {}).get("kernel"), (report or {}).get("status")
        if kernel and kernel != "No Kernel" and status == "idle":
            return
        assert time.monotonic() < deadline, (
            f"no idle kernel after {timeout_s:.0f} s: kernel {kernel!r}, status {status!r}"
        )
        time.sleep(0.5)


def run_all_and_wait(page, panel_id: str, code_cells: int, timeout_s: float) -> dict:
    """Run every cell from the Run menu and wait until the run is over: the kernel idle,
    no cell queued or running ("[*]"), twice in a row two seconds apart. A run that stops at
    an error is over too (the cells after it stay unrun). A dialog (Select Kernel, kernel
    restarting) fails at once rather than at the timeout. Returns the last report."""
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    begin = time.monotonic()
    started = done_before = False
    while True:
        report = report_of(page, panel_id)
        assert report is not None, "the notebook panel went away during the run"
        assert not report["dialogs"], f"a dialog is in the way: {report['dialogs'][0]!r}"
        assert report["status"] != "dead", f"the kernel died: {report['prompts']}"
        started = started or any(p != "[ ]:" for p in report["prompts"])
        assert started or time.monotonic() - begin < 60, (
            f"Run All Cells started no cell in 60 s: kernel {report['kernel']!r} "
            f"{report['status']}, prompts {report['prompts']}"
        )
        done = (
            started and report["status"] == "idle" and not any("*" in p for p in report["prompts"])
        )
        if done and done_before:
            return report
        done_before = done
        assert time.monotonic() - begin < timeout_s, (
            f"the run did not end in {timeout_s:.0f} s: kernel {report['status']}, "
            f"prompts {report['prompts']} (of {code_cells} code cells)"
        )
        time.sleep(2)


def show(page, panel_id: str, report: dict | None) -> None:
    """Scroll the first traceback (or, without one, the last image) into view for the
    screenshot."""
    panel = page.locator(f'[id="{panel_id}"]')
    if report and report["tracebacks"]:
        target = panel.locator(STDERR_SELECTOR, has_text="Traceback").first
    else:
        target = panel.locator(".jp-OutputArea-output img").last
    with contextlib.suppress(Exception):
        target.scroll_into_view_if_needed(timeout=5000)


def launch(playwright, executable: str | None):
    """Chromium, headless; without a sandbox as root, where Chromium refuses its own."""
    return playwright.chromium.launch(
        executable_path=executable, headless=True, args=["--no-sandbox"]
    )


def test_overrides_are_valid_settings_of_the_installed_jupyterlab():
    """overrides.json turns the news and update checks off with the value types that the
    installed JupyterLab's schema declares (fetchNews is the string "false", not a boolean):
    a wrongly typed override is dropped by JupyterLab without a word, and the pop-up stays."""
    jsonschema = pytest.importorskip("jsonschema")
    from jupyterlab.commands import get_app_dir

    overrides = json.loads(OVERRIDES.read_text())
    schemas = Path(get_app_dir()) / "schemas"
    for plugin, settings in overrides.items():
        package, _, name = plugin.rpartition(":")
        schema = json.loads((schemas / package / f"{name}.json").read_text())
        jsonschema.validate(settings, schema)
    notification = overrides["@jupyterlab/apputils-extension:notification"]
    assert notification == {"fetchNews": "false", "checkForUpdates": False}, notification


@pytest.mark.notebook
def test_notebook_00_runs_in_jupyterlab(tmp_path):
    """Run All Cells on notebook 00 (smoke preset) in JupyterLab in headless Chromium: every
    cell runs, no traceback, at least one image, the kernel ends idle, no news pop-up; the
    saved notebook holds no error and every code cell's execution count; the notebook wrote
    its metrics (smoke preset) and trained into the temporary folder."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed: pip install playwright")
    executable = find_chromium()

    root, outputs = tmp_path / "lab", tmp_path / "outputs"
    root.mkdir()
    notebook = root / f"{NAME}.ipynb"
    code_cells = set_parameters(
        notebook_path(NAME), notebook, PRESET="smoke", OUTPUT_DIR=str(outputs)
    )
    env = {**os.environ, TRAINING_LOG: str(outputs / TRAININGS)}
    # A learner's kernel picks the inline backend itself; tests/conftest.py sets Agg.
    env.pop("MPLBACKEND", None)
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    saved = SCREENSHOT.with_suffix(".ipynb")
    saved.unlink(missing_ok=True)

    with sync_playwright() as playwright:
        if executable is None:  # the browser of `python -m playwright install chromium`?
            if not Path(playwright.chromium.executable_path).is_file():
                pytest.skip(f"no Chromium found: {INSTALL_HINT}")
        with jupyter_lab(root, tmp_path / "home", env) as (base, token):
            browser = launch(playwright, executable)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            panel_id, report = None, None
            try:
                # ?reset: a fresh workspace, only this notebook open.
                page.goto(f"{base}/lab/tree/{notebook.name}?reset&token={token}")
                current = ".lm-DockPanel-tabBar .lm-TabBar-tab.lm-mod-current"
                tab = page.locator(current, has_text=notebook.name)
                panel_id = tab.get_attribute("data-id")
                wait_for_kernel(page, panel_id)
                start = time.monotonic()
                report = run_all_and_wait(page, panel_id, code_cells, RUN_TIMEOUT_S)
                print(f"Run All Cells took {time.monotonic() - start:.0f} s: {report}")
                # Saved from the browser (Ctrl+S), the file tells errors from stderr for sure.
                page.keyboard.press("Control+s")
                page.locator(f"{current}:not(.jp-mod-dirty)", has_text=notebook.name).wait_for()
                shutil.copyfile(notebook, saved)
            finally:
                with contextlib.suppress(Exception):  # the failure matters, not the screenshot's
                    if panel_id:
                        show(page, panel_id, report)
                    page.screenshot(path=str(SCREENSHOT), full_page=True)
                browser.close()

    assert not report["tracebacks"], "a cell failed:\n" + report["tracebacks"][0][-3000:]
    code = [c for c in json.loads(saved.read_text())["cells"] if c["cell_type"] == "code"]
    errors = [o for c in code for o in c["outputs"] if o["output_type"] == "error"]
    assert not errors, (
        f"error output in the saved notebook: {errors[0]['ename']}: {errors[0]['evalue']}"
    )
    ran = [p for p in report["prompts"] if re.fullmatch(r"\[\d+\]:", p)]
    assert len(ran) == len(report["prompts"]) == code_cells, (
        f"only {len(ran)} of {code_cells} code cells ran: {report['prompts']}"
    )
    unrun = [i for i, c in enumerate(code) if c["execution_count"] is None]
    assert not unrun, f"code cells {unrun} have no execution count in the saved notebook"
    images = sum("image/png" in o.get("data", {}) for c in code for o in c["outputs"])
    assert report["images"] >= max(images, 1), (
        f"{report['images']} images shown for {images} image outputs: the plots did not render"
    )
    assert report["status"] == "idle", f"the kernel is {report['status']} at the end"
    news = [t for t in report["toasts"] if NEWS in t]
    assert not news, (
        f"the news pop-up is shown ({news[0]!r}): install {OVERRIDES.relative_to(ROOT)} "
        f"into {Path(sys.prefix) / 'share/jupyter/lab/settings'}/ (make env)"
    )
    metrics = json.loads((outputs / "metrics.json").read_text())
    assert metrics["preset"] == "smoke", f"the notebook ran the {metrics['preset']} preset"
    assert trainings(outputs), f"no training logged in {outputs / TRAININGS}"
