"""
Headless Chromium (Debian C{chromium}) driven by Playwright (PyPI), for browser tests.

Playwright never downloads a browser here: it is pointed at C{/usr/bin/chromium}.  Its
synchronous API runs its own event loop, so tests call it from a thread
(L{twisted.internet.threads.deferToThread}) while casd runs on the reactor.
"""

import os

from .procs import requireBinary

CHROMIUM = ("/usr/bin/chromium", "chromium")


class Browser:
    """
    One headless Chromium with one context (cookie jar) at a time.

    @ivar page: the current L{playwright.sync_api.Page}.
    """

    def __init__(self, caPath=None):
        """
        @param caPath: unused by Chromium (it has its own store); certificate errors of the test
            CA are ignored instead, and nothing else is loaded over TLS.
        """
        self.executable = requireBinary("chromium", [CHROMIUM])
        self._playwright = None
        self.browser = None
        self.context = None
        self.page = None

    def start(self):
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(
            executable_path=self.executable,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
        )
        self.newContext()
        return self

    def newContext(self):
        """
        A fresh cookie jar and page (a new browser session).
        """
        if self.context is not None:
            self.context.close()
        self.context = self.browser.new_context(ignore_https_errors=True)
        self.context.set_default_timeout(15000)
        self.page = self.context.new_page()
        return self.page

    def goto(self, url):
        """
        C{page.goto(url)}, again (at most twice) when Chromium aborted it because the host's
        network interfaces changed (C{net::ERR_NETWORK_CHANGED}: other processes on a shared
        machine add and remove interfaces); any other error is raised at once.
        """
        from playwright.sync_api import Error

        for attempt in range(3):
            try:
                return self.page.goto(url)
            except Error as e:
                if "ERR_NETWORK_CHANGED" not in str(e) or attempt == 2:
                    raise

    def cookies(self):
        """
        @return: name -> the cookie dict Playwright reports (C{secure}, C{httpOnly}, C{sameSite}).
        """
        return {c["name"]: c for c in self.context.cookies()}

    def screenshot(self, path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.page.screenshot(path=path, full_page=True)
        return path

    def stop(self):
        try:
            if self.context is not None:
                self.context.close()
            if self.browser is not None:
                self.browser.close()
        finally:
            if self._playwright is not None:
                self._playwright.stop()
            self._playwright = self.browser = self.context = self.page = None
