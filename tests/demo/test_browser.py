"""The explorer in a real headless browser: Debian's chromium driven by Playwright, against a `vitlab demo`
server this test starts on 127.0.0.1. Skips, saying why, where gradio, playwright or a browser is missing."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from vitlab.train.predict import predict

pytestmark = pytest.mark.optional_env  # CI may lack a browser (apt-get could not install chromium)
CHROMIUM = Path("/usr/bin/chromium")
STARTUP_S = 180  # importing gradio on a busy 2-core machine takes a while


def _needs_browser():
    for module, extra in (("gradio", "demo"), ("playwright", "dev"), ("matplotlib", "plot")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'vitlab[{extra}]')")
    if not CHROMIUM.is_file():
        pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium; .ci/run installs it)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(demo_run, cifar_dir, tmp_path):
    """(url, run dir): `vitlab demo` serving the demo run, with the real CIFAR-10 test split to pick from."""
    _needs_browser()
    run, port = demo_run(), _free_port()
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "demo", str(run), "--port", str(port),
                             "--data", str(cifar_dir)], stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vitlab demo exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"vitlab demo did not listen within {STARTUP_S} s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/", run
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def page():
    _needs_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])  # root in CI
        yield browser.new_page(viewport={"width": 1400, "height": 1800})
        browser.close()


def _status_has(page, words: str) -> None:
    page.wait_for_function(f"document.querySelector('#status').innerText.includes({words!r})", timeout=120_000)


def test_upload_a_cifar_image_and_see_the_prediction_and_rollout(server, page, cifar_dir, tmp_path):
    from vitlab.data import load_cifar10

    url, run = server
    test = load_cifar10(cifar_dir, "test")
    image = tmp_path / "cifar_test_0.png"
    Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).save(image)
    [want] = predict(run, [image])

    page.goto(url)
    page.locator("#input-image input[type=file]").set_input_files(str(image))
    _status_has(page, "Predicted")
    assert f"Predicted {want.labels[0]} ({want.probs[0]:.1%})" in page.locator("#status").inner_text()
    assert want.labels[0] in page.locator("#top5").inner_text()
    rollout = page.locator("#rollout img")
    rollout.wait_for()
    assert rollout.evaluate("img => img.complete && img.naturalWidth") > 0  # the overlay was sent and drawn
    artifacts = Path(os.environ.get("VITLAB_TEST_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(artifacts / "demo.png"), full_page=True)
    print(f"screenshot: {artifacts / 'demo.png'}")

    # click a patch: the attention map switches to that patch's query
    page.locator("#patch-grid img").click(position={"x": 5, "y": 5})
    page.wait_for_function("document.querySelector('#query input:checked').value === 'clicked patch'")


def test_bad_upload_shows_a_message_and_the_server_keeps_going(server, page, cifar_dir, tmp_path):
    from vitlab.data import load_cifar10

    url, _ = server
    test = load_cifar10(cifar_dir, "test")
    bad = tmp_path / "holiday.png"
    bad.write_text("this is not a picture")
    page.goto(url)
    page.locator("#input-image input[type=file]").set_input_files(str(bad))
    _status_has(page, "Cannot use this image")
    page.locator("#test-index input").fill("7")
    page.locator("#use-test-image").click()
    _status_has(page, "true class")  # the next image works
    assert f"true class {test.classes[int(test.labels[7])]}" in page.locator("#status").inner_text()


def test_skip_reason_names_the_missing_browser(monkeypatch):
    if shutil.which("chromium") is None:
        pytest.skip("covered by the skips above on this machine")
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", Path("/nonexistent/chromium"))
    with pytest.raises(pytest.skip.Exception, match="no browser at /nonexistent/chromium"):
        _needs_browser()
