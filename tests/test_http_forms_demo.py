"""
The demo's C{/owa}: casd's forms login in front of the demo web backend, over the demo's HTTPS
listener, as a browser would use it (redirect to the logon page, sign in, the page, sign out).
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.support.casdnode import startDemoNode


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None


class DemoFormsTests(TestCase):
    timeout = 60

    def setUp(self):
        self.node, self.ca, ports = startDemoNode(self, os.path.abspath(self.mktemp()))
        self.url = f"https://127.0.0.1:{ports['https']}"

    def browse(self):
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=self.ca)),
            urllib.request.HTTPCookieProcessor(jar),
            NoRedirect(),
        )

        def fetch(path, data=None):
            request = urllib.request.Request(
                self.url + path,
                data=data,
                headers={"Accept": "text/html", "Connection": "close"},
            )
            try:
                with opener.open(request, timeout=15) as response:
                    return response.status, response.headers, response.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.headers, e.read().decode()

        steps = {"anonymous": fetch("/owa/")}
        steps["logon"] = page = fetch(steps["anonymous"][1]["Location"])
        csrf = re.search(r'name="csrf" value="([^"]+)"', page[2]).group(1)
        form = urllib.parse.urlencode(
            {"username": "demo", "password": "demo", "security": "public", "url": "/owa/", "csrf": csrf}
        ).encode()
        steps["post"] = fetch("/owa/_casd/logon", form)
        steps["page"] = fetch("/owa/")
        steps["logoff"] = fetch("/owa/_casd/logoff")
        steps["after"] = fetch("/owa/")
        return steps

    @defer.inlineCallbacks
    def test_formsLogon(self):
        steps = yield threads.deferToThread(self.browse)
        self.assertEqual(steps["anonymous"][0], 302)
        self.assertEqual(steps["anonymous"][1]["Location"], "/owa/_casd/logon?url=%2Fowa%2F")
        self.assertIn('<label for="username">User name</label>', steps["logon"][2])
        self.assertEqual(steps["post"][0], 302)
        self.assertEqual(steps["post"][1]["Location"], "/owa/")
        self.assertEqual(steps["page"][0], 200)
        self.assertIn("Hello, demo", steps["page"][2])
        self.assertIn("You have signed out.", steps["logoff"][2])
        self.assertEqual(steps["after"][0], 302)
