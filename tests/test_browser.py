"""Real-browser test: JupyterLab + headless Chromium run notebook 01 and move its "K" slider.

Skipped (with the reason) when Debian's ``chromium`` or the Python ``playwright`` package is missing;
the browser is never downloaded (launched through ``executable_path``). The server gets a free loopback port,
a random token and temporary HOME / JUPYTER_* / IPYTHONDIR directories, and runs on a *copy* of the
notebook so autosave can never write outputs into the repository.
Set ``TRE_EDU_SCREENSHOT_DIR`` to keep a PNG of the page.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "01_trust_region_entropy.ipynb"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-breakpad",
]
# user settings for the temporary JupyterLab: every cell in the DOM, no autosave, no news / update checks
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(base: str, token: str, path: str, method: str = "GET"):
    req = urllib.request.Request(f"{base}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
    return json.loads(body) if body else None


def _wait(predicate, timeout: float, what: str, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, urllib.error.URLError, ValueError) as exc:  # server not up yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_exc})")


def _wait_count(locator, n: int, timeout: float, what: str) -> None:
    seen: list[int] = []

    def check() -> bool:
        seen.append(locator.count())
        return seen[-1] == n

    try:
        _wait(check, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last count {seen[-1] if seen else None}") from None


def _start_lab(tmp: Path) -> tuple[subprocess.Popen, str, str, Path]:
    """Start JupyterLab on a copy of the notebook; returns (process, base url, token, log path)."""
    work = tmp / "work"
    (work / "notebooks").mkdir(parents=True)
    shutil.copy(NOTEBOOK, work / "notebooks" / NOTEBOOK.name)
    dirs = {name: tmp / name.lower() for name in ("HOME", "TMPDIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR")}
    dirs.update(JUPYTER_RUNTIME_DIR=tmp / "runtime", IPYTHONDIR=tmp / "ipython")
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    settings_dir = dirs["JUPYTER_CONFIG_DIR"] / "lab" / "user-settings"
    for rel, content in LAB_SETTINGS.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content))
    env = os.environ.copy()
    env.update({k: str(v) for k, v in dirs.items()})
    env.update(
        JUPYTERLAB_SETTINGS_DIR=str(settings_dir),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"),
        TRE_EDU_FAST="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    port, token = _free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ip=127.0.0.1",
        f"--port={port}",
        "--port-retries=0",
        f"--IdentityProvider.token={token}",
        f"--ServerApp.root_dir={work}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = tmp / "jupyterlab.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=work)
    return proc, f"http://127.0.0.1:{port}", token, log


def _stop_lab(proc: subprocess.Popen, base: str, token: str) -> None:
    try:
        for kernel in _api(base, token, "/api/kernels") or []:
            _api(base, token, f"/api/kernels/{kernel['id']}", method="DELETE")
    except (OSError, urllib.error.URLError, ValueError):
        pass
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _kernel_ready(base: str, token: str) -> bool:
    kernels = _api(base, token, "/api/kernels")
    return any(k.get("execution_state") == "idle" and k.get("connections", 0) > 0 for k in kernels)


def _n_code_cells() -> int:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return sum(c["cell_type"] == "code" for c in cells)


def test_notebook01_k_slider_updates_figure(tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian chromium not found on PATH (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the Python playwright package is not installed")

    n_code = _n_code_cells()
    proc, base, token, log = _start_lab(tmp_path)
    pw = browser = page = None
    try:
        _wait(lambda: proc.poll() is None and _api(base, token, "/api/status"), 90, "JupyterLab /api/status")
        pw = sync_api.sync_playwright().start()
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS + (["--no-sandbox"] if os.geteuid() == 0 else []),
            env={**os.environ, "HOME": str(tmp_path / "home")},
        )
        page = browser.new_page(viewport={"width": 1500, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(f"{base}/lab/tree/notebooks/{NOTEBOOK.name}?token={token}")

        # the kernel race: Run All before the kernel is connected opens a "Select Kernel" dialog
        _wait(lambda: _kernel_ready(base, token), 120, "an idle, connected kernel")
        page.locator(".jp-Notebook").first.wait_for()
        page.get_by_text(re.compile(r"\|\s*Idle")).first.wait_for(timeout=60_000)

        prompts = page.locator(".jp-CodeCell .jp-InputPrompt")
        done = re.compile(r"^\s*\[\d+\]:\s*$")
        started = re.compile(r"^\s*\[(\*|\d+)\]:\s*$")

        # Run All through the menu; on a loaded machine the first request can get lost (the kernel is idle and
        # every prompt stays "[ ]"), so retry until the first code cell has started
        for attempt in range(3):
            dialog_ok = page.locator(".jp-Dialog .jp-mod-accept")
            if dialog_ok.count():  # e.g. a "Select Kernel" dialog: accept the default kernel
                dialog_ok.first.click()
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
            try:
                _wait(lambda: bool(started.match(prompts.first.inner_text())), 45, "the first cell to start")
                break
            except AssertionError:
                if attempt == 2:
                    raise

        def all_ran() -> bool:
            texts = prompts.all_inner_texts()
            return len(texts) == n_code and all(done.match(t) for t in texts)

        _wait(all_ran, 300, f"all {n_code} code cells to run")
        _wait(lambda: _kernel_ready(base, token), 60, "the kernel to be idle after Run All")

        # the first K slider: the synthetic distribution's panel (section 6 has a second one on SmolLM2's logits)
        k_label = page.locator(".widget-label", has_text=re.compile(r"^K$"))
        slider = page.locator(".widget-slider").filter(has=k_label).first
        slider.wait_for()
        output = page.locator(".jp-OutputArea-output").filter(has=slider).first
        plot = output.locator(".js-plotly-plot").first
        highlighted = plot.locator(".cartesianlayer .subplot.xy .barlayer .trace").first.locator(".point path")
        readout = slider.locator(".widget-readout")

        plot.scroll_into_view_if_needed()
        _wait_count(highlighted, 2, 90, "2 highlighted bars (K = 2)")
        assert readout.inner_text().strip() == "2"
        title = plot.locator(".gtitle")
        assert "|A_TR| = 2" in (title.first.text_content() or "")

        handle = slider.locator(".noUi-handle")
        handle.focus()
        handle.press("ArrowRight")
        _wait(lambda: readout.inner_text().strip() == "3", 60, "the K readout to show 3")
        _wait_count(highlighted, 3, 90, "3 highlighted bars after moving K to 3")
        _wait(
            lambda: "|A_TR| = 3" in (title.first.text_content() or ""),
            20,
            "the figure title to say |A_TR| = 3",
        )
        legend = plot.locator(".legend").first.text_content() or ""
        assert "K = 3" in legend

        shot_dir = os.environ.get("TRE_EDU_SCREENSHOT_DIR")
        if shot_dir:
            plot.scroll_into_view_if_needed()
            page.screenshot(path=str(Path(shot_dir) / "test_browser_notebook01.png"), full_page=False)

        assert page.locator(".jupyter-widgets-error-widget").count() == 0, "a widget failed to render"
        assert page.get_by_text("VBox(children=").count() == 0, "widgets rendered as plain text"
        stderr = page.locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
        assert stderr.count() == 0, "stderr in a cell: " + " | ".join(stderr.all_inner_texts())[:2000]
    except BaseException:
        shot_dir = os.environ.get("TRE_EDU_SCREENSHOT_DIR")
        if page is not None and shot_dir:  # keep what the browser showed, for the failure report
            try:
                page.screenshot(path=str(Path(shot_dir) / "test_browser_notebook01_failure.png"))
            except Exception as exc:  # noqa: BLE001 - best effort only
                sys.stderr.write(f"no failure screenshot: {exc}\n")
        if log.exists():
            sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise
    finally:
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        _stop_lab(proc, base, token)
