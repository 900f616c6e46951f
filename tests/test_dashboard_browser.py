"""The dashboard in a real browser: `peftlab dashboard` on a free 127.0.0.1 port against the
fixture store, every page loaded in headless Debian Chromium through Selenium and chromedriver.

Each page must show its title and a number known from the fixture, and no exception; a
screenshot of each lands in the test's temporary directory.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_dashboard import (
    CURVED,
    EXPERIMENTS,
    RANKED,
    ROOT,
    expected_summary,
    has_bias,
    write_fixture_store,
)

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--window-size=1400,1000"]
EXCEPTION_TEXT = ("Traceback (most recent call last)", "StreamlitAPIException", "Page not found")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(tmp_path):
    """`peftlab dashboard` on a fixture store; yields (base URL, the fixture's trials)."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    trials = write_fixture_store(url)
    port = free_port()
    env = {**os.environ, "PEFTLAB_HOME": str(tmp_path / "home")}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = (tmp_path / "dashboard.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "peftlab.cli", "dashboard", "--store", url, "--port", str(port)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.fail(f"dashboard did not start:\n{(tmp_path / 'dashboard.log').read_text()}")
            time.sleep(0.5)
        yield base, trials
    finally:
        # Its own session: the signal reaches peftlab and the Streamlit child it started.
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # An explicit driver path: Selenium Manager never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def known_numbers(trials) -> dict[str, tuple[str, str, str]]:
    """Per page: (URL path, title, a number the page must show), from the fixture."""
    summary = expected_summary(trials)
    fomc = summary[(summary.experiment == "cross") & (summary.task == "fomc")]
    best = fomc[fomc.verdict == "best"].iloc[0]
    curved = next(t for t in trials if t.trial_id == CURVED)
    fomc_trials = [t for t in trials if t.experiment == "cross" and t.task == "fomc" and t.objective is not None]
    bitfit = [t.objective for t in fomc_trials if t.method == "bitfit"]
    sst2 = [t for t in trials if (t.experiment, t.task) == ("cross", "sst2") and t.status.value in RANKED]
    biased = f"{sum(has_bias(t) for t in sst2)} of {len(sst2)} finished trial(s) on sst2 have bias/crows_pairs"
    return {
        "overview": ("", "Overview", str(len(trials))),  # the default page lives at /
        "overview by name": ("overview", "Overview", str(len(trials))),  # and at its own address
        "leaderboard": ("leaderboard", "Leaderboard", f"{best['mean']:.4f}"),
        "domains": ("domains", "Methods x domains", "1.00"),
        "pareto": ("pareto", "Pareto", f"of {len(fomc_trials)} trials are on the Pareto front"),
        "sensitivity": ("sensitivity", "Sensitivity", f"{max(bitfit):.4f}"),
        "bias": ("bias", "Bias", biased),
        "trial": (f"trial?experiment=cross&trial={CURVED}", "Trial", f"{curved.objective:.4f}"),
    }


def test_every_page_renders_in_chromium(served, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, trials = served
    assert len(EXPERIMENTS) == 4
    for name, (path, title, number) in known_numbers(trials).items():
        browser.get(f"{base}/{path}")

        def shown(driver, title=title, number=number):
            heads = [h.text for h in driver.find_elements(By.CSS_SELECTOR, "h1")]
            return title in heads and number in driver.find_element(By.TAG_NAME, "body").text

        try:
            WebDriverWait(browser, 60, poll_frequency=0.5).until(shown)
        finally:
            browser.save_screenshot(str(tmp_path / f"{name}.png"))
        body = browser.find_element(By.TAG_NAME, "body").text
        assert browser.current_url.rstrip("/") == f"{base}/{path}".rstrip("/"), (name, browser.current_url)
        assert "no corresponding file" not in body and "Page not found" not in body, name
        assert not browser.find_elements(By.CSS_SELECTOR, '[data-testid="stException"]'), name
        assert not any(text in body for text in EXCEPTION_TEXT), (name, body[:2000])
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
