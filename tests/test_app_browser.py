"""Browser tests of the app: tools/serve_app.sh (Voila, with tools/app_server/voila.py) serves
notebooks/app.ipynb on 127.0.0.1 and Debian's Chromium, driven by Playwright, uploads a phantom slice
and waits for the overlay and the lesion area; and page visits do not leave their kernels behind.

Needs ``/usr/bin/chromium`` (``apt-get install chromium``) and the ``voila`` and ``playwright``
Python packages (never a browser downloaded by ``playwright install``); skipped without them.
ipywidgets' FileUpload keeps its ``<input type=file>`` out of the page, so the test clicks the
upload button and answers Chromium's file chooser, as a person would.
The screenshot lands in the test's tmp_path and is copied to /tmp/app_browser.png.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
SCREENSHOT_COPY = Path("/tmp/app_browser.png")


def _require_browser_tools():
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)")
    for module in ("playwright.sync_api", "voila"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"the '{module.split('.')[0]}' package is absent: pip install voila playwright")
    if not (ROOT / "notebooks" / "app.ipynb").is_file():
        pytest.skip("notebooks/app.ipynb is absent")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port: int, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"voila exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise AssertionError(f"voila did not open port {port} in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid`` (Linux /proc), deepest first: the kernels Voila started."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found[::-1]


def _stop(server: subprocess.Popen) -> None:
    """Terminate the server we started and every process below it, by process id."""
    below = _descendants(server.pid) if Path("/proc").is_dir() else []
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=5)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kernels(server: subprocess.Popen) -> list[int]:
    """Process ids of the kernels the server started (each page visit starts one)."""
    found = []
    for pid in _descendants(server.pid):
        try:
            if b"ipykernel" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            pass
    return found


@contextlib.contextmanager
def _serve(tmp_path: Path, runs: Path, *extra: str):
    """tools/serve_app.sh (as `make app` runs it) on a free port; yields (server, url, log path)."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        STROKEKIT_RUNS=str(runs),
        STROKEKIT_DATA=str(tmp_path / "data"),
        STROKEKIT_PROFILE="quick",
        TF_CPP_MIN_LOG_LEVEL="2",
        MPLBACKEND="Agg",
        CUDA_VISIBLE_DEVICES="",
        PORT=str(port),
        VENV=sys.prefix,  # the environment running the tests, which has voila
    )
    log = tmp_path / "voila.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(["bash", str(ROOT / "tools" / "serve_app.sh"), *extra], cwd=ROOT, env=env,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_port(port, server, log, timeout=90)
        yield server, f"http://127.0.0.1:{port}/", log
    finally:
        _stop(server)


LOADED = "() => /loaded/.test(document.querySelector('.sk-status')?.innerText || '')"


def _tiny_run(folder: Path) -> None:
    """A run folder with an untrained tiny U-Net: the app lists and loads it like a trained one."""
    from strokekit.augment import NO_AUGMENT
    from strokekit.config import to_dict
    from strokekit.models import build_model
    from strokekit.train import TrainConfig

    config = TrainConfig(filters=(4, 8), image_size=32, num_epochs=1, augment=NO_AUGMENT)
    model = build_model(config.arch, **config.model_kwargs())
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    (folder / "config.json").write_text(json.dumps(to_dict(config), indent=2))
    (folder / "metrics.json").write_text(json.dumps({"dice": 0.0}))


def _phantom_png(path: Path) -> None:
    """The slice with the largest lesion of phantom patient P01, brain window, 8-bit PNG."""
    from PIL import Image

    from strokekit.phantom import PhantomConfig, make_volume
    from strokekit.preprocess import window_hu

    volume = make_volume(0, PhantomConfig(image_size=128, n_slices=12))
    k = int(np.argmax(volume.lesion_area))
    buffer = io.BytesIO()
    Image.fromarray(np.rint(window_hu(volume.hu[k], "brain") * 255).astype(np.uint8)).save(
        buffer, format="PNG"
    )
    path.write_bytes(buffer.getvalue())


def _upload(page, path: Path) -> None:
    """Click the FileUpload button and answer the file chooser (its <input> is never in the page)."""
    with page.expect_file_chooser(timeout=30_000) as chooser:
        page.click(".widget-upload")
    chooser.value.set_files(str(path))


def test_upload_in_chromium_shows_overlay_and_area(tmp_path):
    _require_browser_tools()
    from playwright.sync_api import sync_playwright

    runs = tmp_path / "runs"
    _tiny_run(runs / "tiny")
    slice_png = tmp_path / "phantom_P01.png"
    _phantom_png(slice_png)
    bad_png = tmp_path / "not_an_image.png"
    bad_png.write_bytes(b"GIF89a this is not a PNG")

    with _serve(tmp_path, runs) as (server, url, log):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 1100})
                page.goto(url, timeout=60_000)
                # The kernel runs the notebook (Keras import, model loading) before the widgets render.
                page.wait_for_function(LOADED, timeout=240_000)
                # Every text the status line shows, to see the busy indicator that precedes the result.
                page.evaluate("""() => {
                    window.skStatus = [];
                    const node = document.querySelector('.sk-status');
                    new MutationObserver(() => window.skStatus.push(node.innerHTML))
                        .observe(node, {childList: true, subtree: true, characterData: true});
                }""")
                _upload(page, slice_png)
                page.wait_for_selector("img.sk-overlay", state="visible", timeout=120_000)
                page.wait_for_function(
                    "() => /Lesion area:/.test(document.querySelector('.sk-area')?.innerText || '')",
                    timeout=60_000,
                )
                page.wait_for_function(
                    "() => /segmented/.test(document.querySelector('.sk-status')?.innerText || '')",
                    timeout=60_000,
                )
                area = page.inner_text(".sk-area")
                status = page.inner_text(".sk-status")
                seen = page.evaluate("() => window.skStatus")
                size = page.eval_on_selector("img.sk-overlay", "img => [img.naturalWidth, img.naturalHeight]")
                link = page.get_attribute(".sk-download a", "href")
                # A pixel size typed for this upload gives mm² in the panel and the status line alike.
                page.fill(".sk-pixel input", "0.5")
                page.press(".sk-pixel input", "Enter")
                page.wait_for_function(
                    "() => /mm²/.test(document.querySelector('.sk-status')?.innerText || '')", timeout=60_000
                )
                typed_area, typed_status = page.inner_text(".sk-area"), page.inner_text(".sk-status")
                shot = tmp_path / "app_browser.png"
                page.locator(".sk-status").scroll_into_view_if_needed()
                page.screenshot(path=str(shot))
                shutil.copyfile(shot, SCREENSHOT_COPY)

                # A bad file: a message on the page, the previous result cleared, the typed size too.
                _upload(page, bad_png)
                page.wait_for_function(
                    "() => /not a PNG image/.test(document.querySelector('.sk-status')?.innerText || '')",
                    timeout=60_000,
                )
                bad_status = page.inner_text(".sk-status")
                overlay_hidden = page.is_hidden("img.sk-overlay")
                pixel_after = page.input_value(".sk-pixel input")
            finally:
                browser.close()

    px = re.search(r"Lesion area:\s*(\d+) px", area)
    assert px, area
    assert "phantom_P01.png: 1 slice of 128x128 segmented" in status, status
    assert f"; lesion {px.group(1)} px" in status, (status, area)  # the same number in both places
    assert any("sk-busy" in text and "Segmenting 1 file(s)" in text for text in seen), seen
    assert "mm² needs the pixel size" in area
    mm2 = re.search(r"Lesion area:\s*\d+ px = ([\d.]+) mm²", typed_area)
    assert mm2 and f"= {mm2.group(1)} mm²" in typed_status and "typed above" in typed_area, (typed_area, typed_status)
    assert size == [128, 128]
    assert link.startswith("data:image/png;base64,")
    assert "not_an_image.png: not a PNG image" in bad_status and "Traceback" not in bad_status
    assert overlay_hidden and float(pixel_after) == 0.0
    assert shot.stat().st_size > 10_000
    assert server.poll() is not None


def test_closed_pages_free_their_kernels(tmp_path):
    """Five visits, each page closed as a person closes a tab: no kernel outlives its page.

    A page that closes sends Voila's shutdown request, which needs the `_xsrf` cookie that
    tools/app_server/voila.py makes Voila set; a page that vanishes without a word (a browser
    crash: here the context is closed without 'beforeunload') is culled once idle. The culler's
    timeout is shortened here (10 minutes in the shipped settings).
    """
    _require_browser_tools()
    from playwright.sync_api import sync_playwright

    runs = tmp_path / "runs"
    _tiny_run(runs / "tiny")
    cull = ("--MappingKernelManager.cull_idle_timeout=15", "--MappingKernelManager.cull_interval=2")
    open_counts, closed_counts = [], []
    with _serve(tmp_path, runs, *cull) as (server, url, log):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                for _ in range(5):
                    context = browser.new_context()
                    page = context.new_page()
                    page.goto(url, timeout=60_000)
                    page.wait_for_function(LOADED, timeout=240_000)
                    open_counts.append(len(_kernels(server)))
                    page.close(run_before_unload=True)  # as closing the tab: 'beforeunload' runs
                    deadline = time.monotonic() + 10    # well inside the culler's 15 s
                    while _kernels(server) and time.monotonic() < deadline:
                        time.sleep(0.3)
                    closed_counts.append(len(_kernels(server)))
                    context.close()
                # A page that vanishes without 'beforeunload': its kernel is culled once idle.
                context = browser.new_context()
                page = context.new_page()
                page.goto(url, timeout=60_000)
                page.wait_for_function(LOADED, timeout=240_000)
                context.close()
                crashed_count = len(_kernels(server))
                deadline = time.monotonic() + 60
                while _kernels(server) and time.monotonic() < deadline:
                    time.sleep(1)
                final_count = len(_kernels(server))
            finally:
                browser.close()
        text = log.read_text()

    print(f"kernels with the page open {open_counts}, after closing {closed_counts}; "
          f"crashed page {crashed_count} -> {final_count} after culling")
    assert open_counts == [1] * 5, open_counts
    assert closed_counts == [0] * 5, (closed_counts, text[-3000:])
    assert "403 POST /voila/api/shutdown" not in text
    assert crashed_count == 1 and final_count == 0, text[-3000:]
    assert text.count("Culling 'idle' kernel") == 1  # only the crashed page's: the others were shut down
