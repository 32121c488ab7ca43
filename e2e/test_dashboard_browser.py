"""The dashboard in a real browser: serve it on 127.0.0.1, drive headless Chromium, wait for the plots.

Run with `make e2e` (it builds the demo store first, installs Debian's chromium if missing, and writes
screenshots to docs/screenshots/). Not part of `make test`: CI has no browser.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from dashboard.launch import dashboard_command

STORE = os.environ.get("SAEWB_STORE", "runs/demo/store")
SHOTS = Path(os.environ.get("SAEWB_SCREENSHOT_DIR", tempfile.mkdtemp(prefix="saewb-shots-")))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    assert Path(STORE, "store.sqlite").exists(), f"no store at {STORE}: run `saewb demo --no-dashboard` first"
    port = _free_port()
    proc = subprocess.Popen(dashboard_command(STORE, port, "127.0.0.1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("the dashboard did not answer /_stcore/health within 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(scope="module")
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:  # playwright gives every launch a fresh, empty profile
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        tab = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield tab
        browser.close()


def open_page(page, url: str, path: str, title: str, plots: int, last_button: str | None = None) -> str:
    """Go to a page, wait for its title (a fresh server's first load can be blank), its plots and its last button."""
    page.goto(f"{url}/{path}")  # the default page (overview) lives at "/"
    page.get_by_role("heading", name=title).first.wait_for(timeout=90_000)
    if last_button:
        page.get_by_role("button", name=last_button).first.wait_for(timeout=180_000)
    if plots:
        page.locator(".js-plotly-plot").nth(plots - 1).wait_for(timeout=90_000)
    page.wait_for_timeout(1500)  # let plotly finish drawing before the screenshot
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{path or 'overview'}.png"), full_page=True)
    text = page.inner_text("body")
    assert "Traceback" not in text and "Page not found" not in text
    return text


def test_overview(server, page):
    text = open_page(page, server, "", "Overview", plots=2)
    for run in ("topk", "mutual_choice", "feature_choice", "gradient_topk"):
        assert run in text


def test_feature_browser(server, page):
    text = open_page(page, server, "features", "Feature browser", plots=1)
    assert "feature 0" in text


def test_dead_features(server, page):
    text = open_page(page, server, "dead", "Dead features", plots=1)
    assert "dead" in text.lower()


def test_prompt_inspector_and_steering_render(server, page):
    inspector = open_page(page, server, "inspect", "Prompt inspector", 0, last_button="Open in the feature browser")
    assert "Prompt inspector" in inspector
    steering = open_page(page, server, "steering", "Steering", plots=0, last_button="Generate")
    assert "Intervention" in steering and "Positions" in steering


def test_ioi_page_runs_the_evaluation(server, page):
    text = open_page(page, server, "ioi", "IOI: SAE vs supervised dictionaries", plots=0, last_button="Run IOI")
    assert "prompts" in text and "position" in text
    page.get_by_role("button", name="Run IOI").first.click()  # 200 prompts: about two minutes on 2 cores
    page.locator(".js-plotly-plot").first.wait_for(timeout=300_000)
    page.wait_for_timeout(1500)
    page.screenshot(path=str(SHOTS / "ioi.png"), full_page=True)
    text = page.inner_text("body")
    assert "Traceback" not in text and "Clean logit diff" in text and "Best-latent F1" in text
