"""JupyterLab in a real browser: run the explorer notebooks, check their figures and widgets render and react.

What it does (marked ``browser``; part of the default ``make test``):

1. starts ``jupyter lab`` from the venv on 127.0.0.1, a free port and a random token, with
   ``WORKBENCH_PRESET=tiny``, its own settings/config/runtime/workspace folders (autosave and the
   news/update checks off) and a root folder that mirrors the repository in a temporary
   directory: ``<tmp>/root/notebooks`` is a *copy* of ``notebooks/`` (so nothing run here is ever
   saved into the real notebooks), ``<tmp>/root/figures`` is empty (figures the run saves stay
   there) and every other top-level entry of the repository is a symlink, so the notebooks'
   relative paths (``../data``, ``../zoo``) still work;
2. opens each of :data:`NOTEBOOKS` in Debian's Chromium (``/usr/bin/chromium``, driven by
   Playwright; no browser is downloaded) - ``notebooks/08_interference.ipynb`` and
   ``notebooks/09_mask_overlap.ipynb`` once they exist, until then the stand-in
   ``tests/fixtures/explorer_demo.ipynb``;
3. runs all cells from the *Run* menu, waits until the kernel is idle and every code cell has an
   execution count;
4. checks through the page that no cell shows an error, that every figure cell (one whose value
   is a figure, or that calls ``display(fig)``) shows a rendered ``<img>`` and no figure prints as
   ``<Figure size ...>`` text, that the widgets rendered (no "Loading
   widget..." / "Error displaying widget" placeholder), that the explorer shows an image
   (``img.wb-explorer-image``), and that choosing another option in the ``.wb-control-metric``
   dropdown changes the picture (its ``src`` and its pixels);
5. checks the error detector itself by running one extra cell that raises;
6. saves screenshots in ``screenshots/browser/<notebook>/`` (``01_after_run_all.png``,
   ``02_after_widget_change.png``, ``03_error_selfcheck.png``).

The browser and the server are stopped in fixture teardown whatever happens.
"""
from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = REPO / "screenshots" / "browser"
FIXTURE_NOTEBOOK = REPO / "tests" / "fixtures" / "explorer_demo.ipynb"
REAL_NOTEBOOKS = [REPO / "notebooks" / n for n in ("08_interference.ipynb", "09_mask_overlap.ipynb")]
#: The notebooks the test drives: the real interference and mask explorers when present, else the fixture.
NOTEBOOKS = [p for p in REAL_NOTEBOOKS if p.exists()] or [FIXTURE_NOTEBOOK]


def _controls_to_move(notebook: Path) -> tuple[str, ...]:
    """Controls moved one after the other; after each, the explorer's picture must change. The
    fixture has a dropdown and a slider; the real explorers a metric dropdown and view toggle
    buttons (dropdowns, toggle buttons and sliders are supported)."""
    return ("metric", "threshold") if notebook == FIXTURE_NOTEBOOK else ("metric", "view")


def _figure_cells(notebook: Path) -> list[int]:
    """Indices (among the code cells) of the cells that show a figure: their value is a figure
    (last line ``fig`` or a ``*_figure(...)`` call) or they call ``display(fig)``."""
    cells = [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]
    out = []
    for i, c in enumerate(cells):
        src = "".join(c["source"])
        lines = [l for l in src.splitlines() if l.strip() and not l.startswith(" ")]
        last = lines[-1].strip() if lines else ""
        if last == "fig" or "display(fig)" in src or last.split("(")[0].endswith("_figure"):
            out.append(i)
    return out

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

#: Seconds allowed for "Run All Cells" to finish (kernel idle, every cell numbered).
RUN_ALL_TIMEOUT_S = float(os.environ.get("WORKBENCH_BROWSER_RUN_TIMEOUT", "150"))

pytestmark = [pytest.mark.browser, pytest.mark.timeout(int(RUN_ALL_TIMEOUT_S) + 150)]

# JupyterLab 4 DOM
CODE_CELL = ".jp-Notebook .jp-CodeCell"
PROMPT = ".jp-InputArea-prompt"
STDERR_OUTPUT = '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]'
WIDGET_PLACEHOLDER_TEXTS = ("Loading widget...", "Error displaying widget", "Error rendering widget")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mirror_repo(root: Path) -> Path:
    """``root/notebooks`` = copy of the notebooks (+ the notebook under test), ``root/figures`` an
    empty folder (a tiny-preset run must not overwrite the real figures); the rest symlinked."""
    root.mkdir(parents=True)
    (root / "figures").mkdir()
    skip = {"notebooks", "figures", ".git", ".venv", "screenshots", ".pytest_cache"}
    for entry in REPO.iterdir():
        if entry.name not in skip:
            (root / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    nb_dir = root / "notebooks"
    src = REPO / "notebooks"
    if src.is_dir():
        shutil.copytree(src, nb_dir, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    else:
        nb_dir.mkdir()
    for notebook in NOTEBOOKS:
        if not (nb_dir / notebook.name).exists():
            shutil.copy2(notebook, nb_dir / notebook.name)
    return nb_dir


def _write_lab_settings(settings_dir: Path) -> None:
    """User settings for this server only: no autosave, no news or update checks."""
    files = {
        "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        # every cell in the DOM (no virtual scrolling), so the page can be checked cell by cell
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for rel, value in files.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"jupyter lab did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen, base: str, token: str) -> None:
    """Stop the server: ``POST /api/shutdown`` (which also shuts its kernels down), then signals
    to its process group if it is still there."""
    if proc.poll() is not None:
        return
    try:
        req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                     headers={"Authorization": f"token {token}"})
        urllib.request.urlopen(req, timeout=10).close()
        proc.wait(timeout=15)
        return
    except (urllib.error.URLError, ConnectionError, TimeoutError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=5)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """A JupyterLab server for this module: ``(base_url, token, notebooks_root)``."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} missing: run `make browser-deps` (installs Debian's chromium package)")
    if NOTEBOOKS != [FIXTURE_NOTEBOOK]:  # the real notebooks read the tiny zoo: build it (cached) first
        from workbench.reproduce import ensure_zoo

        ok, msg = ensure_zoo("tiny", log=lambda m: None)
        assert ok, msg
    tmp = tmp_path_factory.mktemp("lab")
    nb_root = _mirror_repo(tmp / "root")
    settings = tmp / "settings"
    _write_lab_settings(settings)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ, WORKBENCH_PRESET="tiny", JUPYTER_CONFIG_DIR=str(tmp / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp / "runtime"), JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"), WORKBENCH_FIGURES_DIR=str(tmp / "figures"),
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    jupyter = Path(sys.executable).parent / "jupyter"
    cmd = [str(jupyter), "lab", "--no-browser", f"--IdentityProvider.token={token}", "--ServerApp.ip=127.0.0.1",
           f"--port={port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={nb_root}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
           "--LabApp.news_url=", "--ServerApp.open_browser=False"]
    if os.geteuid() == 0:  # containers often run as root
        cmd.append("--allow-root")
    log = tmp / "jupyter.log"
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(cmd, cwd=nb_root, env=env, stdout=log_fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_for_server(f"{base}/api/status?token={token}", proc, log)
        yield base, token, nb_root
    finally:
        _stop(proc, base, token)


@pytest.fixture(scope="module")
def browser_page(lab_server, tmp_path_factory):
    """A Playwright page in Debian's Chromium (fresh profile), closed in teardown."""
    from playwright import sync_api
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            yield page
        finally:
            context.close()


# ------------------------------------------------------------------------------------ page helpers
def _error_outputs(page) -> list[str]:
    """Texts of the outputs that are errors (tracebacks), as JupyterLab 4 renders them."""
    texts = page.locator(STDERR_OUTPUT).all_inner_texts()
    return [t for t in texts if "Traceback" in t or "Error" in t]


def _prompts(page) -> list[str]:
    return [t.strip() for t in page.locator(f"{CODE_CELL} {PROMPT}").all_inner_texts()]


def _kernel_status(page) -> str:
    """The kernel status word of the status bar (``Idle``, ``Busy``, ``Starting``...), or ``""``."""
    for text in page.locator(".jp-StatusBar-TextItem").all_inner_texts():
        if "|" in text:
            return text.rsplit("|", 1)[1].strip()
    return ""


def _wait_run_finished(page, n_code_cells: int, timeout_s: float) -> None:
    """Wait until the kernel is idle and every code cell shows ``[n]:`` (none ``[*]:`` or empty)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        prompts = _prompts(page)
        numbered = [p for p in prompts if p.startswith("[") and p[1:-2].strip().isdigit()]
        status = _kernel_status(page)
        last = (status, prompts)
        if len(prompts) == n_code_cells and len(numbered) == n_code_cells and status == "Idle":
            return
        if status == "Idle" and _error_outputs(page):  # a failing cell stops "run all"
            return
        page.wait_for_timeout(500)
    raise AssertionError(f"run-all did not finish in {timeout_s:.0f} s (kernel, prompts) = {last}")


def _run_menu(page, item: str) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item:visible", has_text=item).first.click()


def _image_digest(page, selector: str) -> tuple[str, str]:
    """(``src``, sha256 of the decoded image pixels drawn on a canvas) of the first match."""
    img = page.locator(selector).first
    img.wait_for(state="visible")
    page.wait_for_function("(el) => el.complete && el.naturalWidth > 0", arg=img.element_handle())
    src = img.get_attribute("src") or ""
    data_url = img.evaluate("""(el) => {
        const c = document.createElement('canvas');
        c.width = el.naturalWidth; c.height = el.naturalHeight;
        c.getContext('2d').drawImage(el, 0, 0);
        return c.toDataURL('image/png');
    }""")
    return src, hashlib.sha256(data_url.encode()).hexdigest()


def _wait_settled(page, image_sel: str, quiet_s: float = 1.0, timeout_s: float = 30.0) -> None:
    """Wait until the kernel is idle and the image's ``src`` has not changed for ``quiet_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        src = page.locator(image_sel).first.get_attribute("src")
        if src != last:
            last, since = src, time.monotonic()
        elif _kernel_status(page) == "Idle" and time.monotonic() - since >= quiet_s:
            return
        page.wait_for_timeout(200)
    raise AssertionError(f"the explorer image did not settle in {timeout_s:.0f} s")


def _move_control(page, explorer, name: str) -> str:
    """Change the control ``wb-control-<name>`` of ``explorer``: another option of a dropdown,
    another of toggle buttons, or drag a slider's handle. Returns what was done."""
    control = explorer.locator(f".wb-control-{name}").first
    control.wait_for(state="visible")
    select = control.locator("select")
    if select.count():
        options = select.first.locator("option").all_inner_texts()
        current = select.first.evaluate("(el) => el.options[el.selectedIndex].text")
        others = [o for o in options if o != current]
        assert others, f"dropdown wb-control-{name} has a single option {options}"
        select.first.select_option(label=others[0])
        return f"{name}: {current!r} -> {others[0]!r}"
    buttons = control.locator("button.widget-toggle-button")
    if buttons.count():
        labels = buttons.all_inner_texts()
        inactive = control.locator("button.widget-toggle-button:not(.mod-active)")
        assert inactive.count(), f"toggle buttons wb-control-{name} have a single option {labels}"
        label = inactive.first.inner_text()
        inactive.first.click()
        return f"{name}: toggled to {label!r}"
    handle = control.locator(".noUi-handle, input[type=range]")
    assert handle.count(), f"wb-control-{name} is neither a dropdown, toggle buttons nor a slider"
    box = handle.first.bounding_box()
    track = control.locator(".noUi-target, input[type=range]").first.bounding_box()
    assert box and track, f"wb-control-{name} has no layout box"
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + track["width"] * 0.5, y, steps=8)
    page.mouse.up()
    return f"{name}: slider dragged right"


# ------------------------------------------------------------------------------------ the test
@pytest.mark.parametrize("NOTEBOOK", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_explorer_notebook_runs_and_reacts_in_jupyterlab(lab_server, browser_page, NOTEBOOK):
    base, token, nb_root = lab_server
    page = browser_page
    shots = SCREENSHOTS / NOTEBOOK.stem
    shots.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()

    # a workspace of its own per notebook: no tab of an earlier notebook is restored beside it
    page.goto(f"{base}/lab/workspaces/wb-{NOTEBOOK.stem}/tree/{NOTEBOOK.name}?token={token}",
              wait_until="domcontentloaded")
    n_code = sum(c["cell_type"] == "code" for c in json.loads(NOTEBOOK.read_text())["cells"])
    assert n_code > 0, f"{NOTEBOOK} has no code cell"
    # every cell rendered, and the kernel started and idle, before "Run All Cells"
    try:
        page.wait_for_function(f"() => document.querySelectorAll('{CODE_CELL}').length === {n_code}",
                               timeout=120_000)
    except Exception:
        page.screenshot(path=str(shots / "00_cells_not_rendered.png"))
        raise
    deadline = time.monotonic() + 60
    while _kernel_status(page) != "Idle":
        assert time.monotonic() < deadline, f"kernel not idle after 60 s: {_kernel_status(page)!r}"
        page.wait_for_timeout(250)

    _run_menu(page, "Run All Cells")
    _wait_run_finished(page, n_code, RUN_ALL_TIMEOUT_S)
    t_run = time.monotonic() - t0

    errors = _error_outputs(page)
    assert not errors, f"{NOTEBOOK.name}: cells with errors:\n" + "\n---\n".join(e[-1500:] for e in errors)

    # every figure cell shows a rendered picture, none prints as "<Figure size ...>"
    figure_cells = _figure_cells(NOTEBOOK)
    assert figure_cells or NOTEBOOK == FIXTURE_NOTEBOOK, f"{NOTEBOOK.name}: no figure cell found"
    for i in figure_cells:
        imgs = page.locator(CODE_CELL).nth(i).locator(".jp-OutputArea-output img:not(.wb-explorer-image)")
        assert imgs.count() > 0, f"{NOTEBOOK.name}: code cell {i} shows no image"
        assert imgs.first.evaluate("(el) => el.complete && el.naturalWidth > 100"), \
            f"{NOTEBOOK.name}: code cell {i}'s image did not load"
    figure_texts = [t for t in page.locator(".jp-OutputArea-output").all_inner_texts() if "<Figure size" in t]
    assert not figure_texts, f"{NOTEBOOK.name}: figures printed as text: {figure_texts[:3]}"

    # widgets rendered by the ipywidgets lab extension, not the placeholder text
    explorer_img = page.locator("img.wb-explorer-image").first
    explorer_img.wait_for(state="visible", timeout=30_000)
    explorer_img.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "01_after_run_all.png"))
    views = page.locator(".jp-OutputArea-output .widget-inline-hbox, .jp-OutputArea-output .lm-Widget.widget-vbox, "
                         ".jp-OutputArea-output .jupyter-widgets")
    assert views.count() > 0, "no ipywidgets view in any output"
    outputs_text = "\n".join(page.locator(".jp-OutputArea-output").all_inner_texts())
    for text in WIDGET_PLACEHOLDER_TEXTS:
        assert text not in outputs_text, f"widget not rendered: {text!r} shown"

    changes = []
    for i, name in enumerate(_controls_to_move(NOTEBOOK)):
        explorer = page.locator(".wb-explorer", has=page.locator(f".wb-control-{name}")).first
        assert explorer.count(), f"no explorer (.wb-explorer) with a control wb-control-{name}"
        image_sel = f".wb-explorer:has(.wb-control-{name}) img.wb-explorer-image"
        src_before, pix_before = _image_digest(page, image_sel)
        assert src_before, "explorer image has no src"
        what = _move_control(page, explorer, name)
        page.wait_for_function("([sel, old]) => { const el = document.querySelector(sel);"
                               " return el && el.getAttribute('src') !== old && el.complete && el.naturalWidth > 0; }",
                               arg=[image_sel, src_before], timeout=30_000)
        _wait_settled(page, image_sel)  # a slider drag sends several values: compare the final picture
        src_after, pix_after = _image_digest(page, image_sel)
        page.locator(image_sel).first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / f"02_after_widget_change{'' if i == 0 else f'_{name}'}.png"))
        assert src_after != src_before
        assert pix_after != pix_before, f"{what}: the image src changed but the picture is the same"
        assert not _error_outputs(page), f"{what}: the widget callback raised"
        changes.append(what)

    # the error detector sees a real error (so "no errors" above means something)
    last_cell = page.locator(CODE_CELL).last
    last_cell.locator(".jp-InputArea-editor").click()
    page.keyboard.press("Escape")
    page.keyboard.press("b")  # command mode: insert a cell below
    page.keyboard.press("Enter")  # edit mode in the new cell
    page.keyboard.type('raise RuntimeError("wb-browser-selfcheck")')
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(
        """(sel) => [...document.querySelectorAll(sel)].some(e => e.innerText.includes('wb-browser-selfcheck'))""",
        arg=STDERR_OUTPUT, timeout=30_000)
    page.locator(STDERR_OUTPUT).last.scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "03_error_selfcheck.png"))
    assert any("wb-browser-selfcheck" in e for e in _error_outputs(page))

    # nothing was written back into the repository's notebooks
    real = REPO / "notebooks" / NOTEBOOK.name
    if real.exists():
        assert "wb-browser-selfcheck" not in real.read_text()
    print(f"\nbrowser test: {NOTEBOOK.name} run-all finished after {t_run:.1f} s; {'; '.join(changes)}; "
          f"total {time.monotonic() - t0:.1f} s; screenshots in {shots}")
