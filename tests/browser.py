"""A real browser for the page's test: Debian's headless Chromium (/usr/bin/chromium, installed by .ci/run)
driven by Playwright, with no browser download and no network; and the app served by uvicorn in a thread.

Also a script that takes the page's screenshot from a running `recsys serve`:

    python tests/browser.py http://127.0.0.1:8000 docs/page.png [CUSTOMER_ID]
"""
from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

CHROMIUM = os.environ.get("RECSYS_CHROMIUM", "/usr/bin/chromium")
# A fresh profile (user_data_dir) per run; nothing that reaches out to the network.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1500, "height": 820}


@contextlib.contextmanager
def chromium(user_data_dir: str | Path) -> Iterator:
    """A Playwright browser context on Debian's Chromium."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=CHROMIUM, headless=True, args=FLAGS, viewport=VIEWPORT)
        try:
            yield context
        finally:
            context.close()


@contextlib.contextmanager
def serving(app) -> Iterator[str]:
    """Run the ASGI app with uvicorn on a free localhost port in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def show_customer(page, base_url: str, customer_id: str) -> None:
    """Open the page, look the customer up as a person would, wait for both tables."""
    page.goto(base_url + "/")
    page.locator("#customer-id").fill(customer_id)
    page.locator("#show").click()
    page.locator("#recommendations tbody tr").first.wait_for()
    page.wait_for_function("document.querySelector('#purchases-note').textContent !== 'loading…'")


def screenshot(base_url: str, out: str | Path, customer_id: str | None = None) -> Path:
    """The page with one customer shown (the first example if none given), saved as PNG."""
    import json
    from urllib.request import urlopen

    if customer_id is None:
        with urlopen(base_url + "/customers/examples?n=4") as response:
            customer_id = json.load(response)["customer_ids"][1]
    with tempfile.TemporaryDirectory() as profile, chromium(profile) as browser:
        page = browser.new_page()
        show_customer(page, base_url, customer_id)
        page.screenshot(path=str(out), full_page=True)
    return Path(out)


if __name__ == "__main__":
    url, target = sys.argv[1], sys.argv[2]
    print(screenshot(url, target, sys.argv[3] if len(sys.argv) > 3 else None))
