"""The README's dashboard images: the Leaderboard, Pareto and Bias pages of a real results store,
rendered by `peftlab dashboard` in headless Chromium and saved as PNGs under 300 KB (a page
that shows only its empty state, such as Bias on a store without bias scores, is skipped).

The store is never written: it is copied read-only (SQLite's backup API) to a temporary file,
which is migrated to the dashboard's views if it predates them.

    .venv/bin/python scripts/screenshots.py [--store sqlite:///peftlab-runs/results.db] [--out docs]
"""
from __future__ import annotations

import argparse
import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from PIL import Image
from sqlalchemy.engine import make_url

from peftlab import settings
from peftlab.store import ResultsStore

ROOT = Path(__file__).resolve().parent.parent
PAGES = {"leaderboard": "Leaderboard", "pareto": "Pareto", "bias": "Bias"}
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1"]
LIMIT = 300_000


def readonly_copy(url: str, workdir: Path) -> str:
    source = make_url(url).database
    if make_url(url).get_backend_name() != "sqlite" or not source or not Path(source).is_file():
        raise SystemExit(f"no SQLite results store at {url}")
    copy = workdir / "results.db"
    with sqlite3.connect(f"{Path(source).resolve().as_uri()}?mode=ro", uri=True) as original, \
            sqlite3.connect(copy) as target:
        original.backup(target)
    copy_url = f"sqlite:///{copy}"
    ResultsStore(copy_url).close()  # migrate the copy: a store written before the views
    return copy_url


def serve(url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (workdir / "dashboard.log").open("w")
    process = subprocess.Popen([sys.executable, "-m", "peftlab.cli", "dashboard", "--store", url,
                                "--port", str(port)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as response:
                if response.read() == b"ok":
                    return process, base
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise SystemExit(f"dashboard did not start:\n{(workdir / 'dashboard.log').read_text()}")
        time.sleep(0.5)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)


def small_png(png: bytes, path: Path) -> int:
    """Save as a 256-colour PNG (screens are flat colours and text): a few hundred KB at most."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    for colors in (256, 128, 64):
        buffer = io.BytesIO()
        image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
        if buffer.tell() < LIMIT:
            break
    path.write_bytes(buffer.getvalue())
    return buffer.tell()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=None, help="results store (default: as `peftlab results`)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--size", default="1400,1050", help="browser window, WIDTH,HEIGHT")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="peftlab-shots-") as tmp:
        workdir = Path(tmp)
        process, base = serve(readonly_copy(settings.store_url(args.store), workdir), workdir)
        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for flag in [*FLAGS, f"--window-size={args.size}", f"--user-data-dir={workdir / 'profile'}"]:
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"), options=options)
        try:
            for path, title in PAGES.items():
                driver.get(f"{base}/{path}")
                WebDriverWait(driver, 90).until(
                    lambda d, title=title: title in [h.text for h in d.find_elements(By.CSS_SELECTOR, "h1")]
                    and (d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot")
                         and d.find_elements(By.CSS_SELECTOR, '[data-testid="stDataFrame"]')
                         or d.find_elements(By.CSS_SELECTOR, '[data-testid="stAlert"]')))
                if not driver.find_elements(By.CSS_SELECTOR, ".js-plotly-plot"):
                    alert = driver.find_element(By.CSS_SELECTOR, '[data-testid="stAlert"]').text
                    print(f"{path}: skipped, the page shows no chart: {alert}")
                    continue
                time.sleep(2)  # Plotly's and the data grid's first paint
                size = small_png(driver.get_screenshot_as_png(), args.out / f"{path}.png")
                print(f"{args.out / f'{path}.png'}: {size / 1000:.0f} KB")
        finally:
            driver.quit()
            stop(process)


if __name__ == "__main__":
    main()
