"""
Headless Chromium (Debian's, at /usr/bin/chromium) driven by Playwright in a subprocess: the real
browser loads a page, waits for it to be ready, reports what it shows and saves a screenshot.
No browser is downloaded: Playwright is pointed at Debian's binary.
"""

import json
import os
import subprocess
import sys

CHROMIUM = "/usr/bin/chromium"

#: The flags this machine's closed network needs (no background connections, no sandbox as root).
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

_SCRIPT = r"""
import json, sys
from playwright.sync_api import sync_playwright
job = json.loads(sys.stdin.read())
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=job["chromium"], args=job["args"], headless=True)
    context = browser.new_context(http_credentials=job.get("credentials"), ignore_https_errors=True,
                                  viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.goto(job["url"], wait_until="load", timeout=job["timeout"] * 1000)
    if job.get("waitFor"):
        page.wait_for_selector(job["waitFor"], timeout=job["timeout"] * 1000)
    texts = {sel: page.inner_text(sel) for sel in job.get("read", [])}
    page.screenshot(path=job["screenshot"], full_page=True)
    print(json.dumps({"title": page.title(), "texts": texts}))
    browser.close()
"""


def available() -> bool:
    return os.path.exists(CHROMIUM)


def snapshot(url, screenshot, waitFor=None, read=(), credentials=None, timeout=30):
    """
    Load C{url} in headless Chromium, wait for C{waitFor} (a CSS selector), read the inner text of
    each selector in C{read} and save a full-page PNG at C{screenshot}.

    @param credentials: C{{"username": ..., "password": ...}} for HTTP authentication, or C{None}.
    @return: C{{"title": ..., "texts": {selector: text}}}.
    @raise RuntimeError: with Playwright's error output, when the page could not be loaded.
    """
    job = dict(
        chromium=CHROMIUM,
        args=ARGS,
        url=url,
        screenshot=screenshot,
        waitFor=waitFor,
        read=list(read),
        credentials=credentials,
        timeout=timeout,
    )
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        input=json.dumps(job).encode(),
        capture_output=True,
        timeout=timeout + 30,
    )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.decode(errors="replace")[-2000:])
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])
