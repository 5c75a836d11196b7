"""
Forms login inside the HTTP front end (L{protocols.http.site}): configuration, the logon page as a
local service, the session reaching the backend as the vdir's identity header, casd's cookies kept
from the backend, a refreshed cookie beside the backend's own.
"""

from __future__ import annotations

import re
from urllib.parse import urlencode

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.config import ConfigError
from casd.testing import acceptBackend, connectFrontend, makeContext
from protocols.http import http

CONFIG = """
[routing]
default_backend = "web"

[backends.web]
host = "127.0.0.1"

[backends.web.http]
port = 8080

[http]
enabled = true
plain_http = "serve"
forms_public_timeout = 600

[[http.listen]]
endpoint = "tcp:8081"
tls = "none"
trusted = true

[[http.vdir]]
path = "/owa"
auth = ["forms"]
identity = "header"
"""


class Exchange:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.code = int(lines[0].split(b" ")[1])
        self.status = lines[0]
        self.headers = [tuple(x.strip() for x in line.split(b":", 1)) for line in lines[1:]]

    def all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def one(self, name: bytes) -> bytes | None:
        values = self.all(name)
        return values[0] if values else None


class FormsSiteTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.context = makeContext(self.reactor, users={"alice": "secret"}, config=CONFIG)
        self.cookies: dict[bytes, bytes] = {}

    def send(self, head: bytes, body: bytes = b"") -> Exchange:
        client, transport = connectFrontend(http, self.context)
        if self.cookies:
            head += b"Cookie: " + b"; ".join(k + b"=" + v for k, v in self.cookies.items()) + b"\r\n"
        client.dataReceived(head + b"\r\n" + body)
        self.reactor.advance(0)
        self.transport = transport
        return self.read(transport)

    def read(self, transport) -> Exchange:
        response = Exchange(transport.value())
        for value in response.all(b"set-cookie"):
            name, _, rest = value.partition(b"=")
            cookieValue = rest.split(b";")[0]
            if b"Max-Age=0" in value:
                self.cookies.pop(name, None)
            elif name.startswith(b"__Host-"):
                self.cookies[name] = cookieValue
        return response

    def logon(self, security="private") -> Exchange:
        page = self.send(b"GET /owa/_casd/logon?url=%2Fowa%2Finbox HTTP/1.1\r\nHost: mail.example.com\r\n")
        self.assertEqual(page.code, 200)
        csrf = re.search(rb'name="csrf" value="([^"]+)"', page.body).group(1).decode()
        form = urlencode(
            {"username": "alice", "password": "secret", "security": security, "url": "/owa/inbox", "csrf": csrf}
        ).encode()
        return self.send(
            b"POST /owa/_casd/logon HTTP/1.1\r\nHost: mail.example.com\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n" % len(form),
            form,
        )

    def test_settings(self):
        """
        The forms keys are part of the C{[http]} section, with their documented defaults.
        """
        names = {s.key for s in http.settings}
        for key in ("forms_key_files", "forms_public_timeout", "forms_private_timeout", "forms_background"):
            self.assertIn(key, names)

    def test_navigationRedirected(self):
        response = self.send(b"GET /owa/inbox HTTP/1.1\r\nHost: mail.example.com\r\nAccept: text/html\r\n")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.one(b"location"), b"/owa/_casd/logon?url=%2Fowa%2Finbox")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_xhr440(self):
        response = self.send(b"GET /owa/x HTTP/1.1\r\nHost: mail.example.com\r\nX-Requested-With: XMLHttpRequest\r\n")
        self.assertEqual(response.status, b"HTTP/1.1 440 Login Timeout")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_sessionReachesBackend(self):
        """
        After the logon, a request goes to the backend as the user (the trusted header), without
        casd's cookies and with the client's other cookies; a refreshed session cookie travels
        back beside the backend's own cookie.
        """
        response = self.logon()
        self.assertEqual(response.code, 302)
        self.assertEqual(response.one(b"location"), b"/owa/inbox")
        self.assertIn(b"__Host-casd", self.cookies)
        self.cookies[b"app"] = b"1"
        self.reactor.advance(120)
        client, transport = connectFrontend(http, self.context)
        client.dataReceived(
            b"GET /owa/inbox HTTP/1.1\r\nHost: mail.example.com\r\nX-Remote-User: mallory\r\nCookie: "
            + b"; ".join(k + b"=" + v for k, v in self.cookies.items())
            + b"\r\n\r\n"
        )
        self.reactor.advance(0)
        server, backend = acceptBackend(self.reactor)
        sent = backend.value()
        self.assertIn(b"X-Remote-User: alice\r\n", sent)
        self.assertNotIn(b"mallory", sent)
        self.assertNotIn(b"__Host-casd", sent)
        self.assertIn(b"Cookie: app=1\r\n", sent)
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: app=2\r\n\r\nok")
        self.reactor.advance(0)
        answer = Exchange(transport.value())
        self.assertEqual(answer.code, 200)
        setCookies = answer.all(b"set-cookie")
        self.assertIn(b"app=2", setCookies)
        self.assertTrue(any(c.startswith(b"__Host-casd=") for c in setCookies), setCookies)

    def test_badKeyFile(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("tooshort\n")
        config = CONFIG.replace("forms_public_timeout = 600", f'forms_key_files = ["{path}"]')
        context = makeContext(self.reactor, users={"alice": "secret"}, config=config)
        e = self.assertRaises(ConfigError, connectFrontend, http, context)
        self.assertIn("forms_key_files", str(e))

    def test_badBackgroundPattern(self):
        config = CONFIG.replace("forms_public_timeout = 600", 'forms_background = ["(unclosed"]')
        context = makeContext(self.reactor, users={"alice": "secret"}, config=config)
        e = self.assertRaises(ConfigError, connectFrontend, http, context)
        self.assertIn("forms_background", str(e))

    def test_revocationStoreDown(self):
        """
        When the revocation set cannot answer, a request with a session cookie gets 503 with
        Retry-After (not the logon page, not a 500), and nothing reaches the backend.
        """
        self.logon()
        forms = [s for s in self._sites() if "forms" in s.authenticator.sources][0]
        cookies = forms.authenticator.sources["forms"].cookies

        class Down:
            def add(self, tokenId, expiresAt):
                return defer.fail(ConnectionRefusedError())

            def contains(self, tokenId):
                return defer.fail(ConnectionRefusedError())

        cookies.revocations = Down()
        response = self.send(b"GET /owa/inbox HTTP/1.1\r\nHost: mail.example.com\r\nAccept: text/html\r\n")
        self.assertEqual(response.code, 503)
        self.assertIsNotNone(response.one(b"retry-after"))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(len(self.flushLoggedErrors(ConnectionRefusedError)), 1)

    def _sites(self):
        return [http.buildFactory(self.context, self.context.config.protocols["http"], listener)
                for listener in self.context.config.protocols["http"].listeners]

    def test_formsNeedsAnIdentity(self):
        """
        A forms-only vdir that would pass the client's (absent) Authorization through is a
        configuration error naming the vdir.
        """
        config = CONFIG.replace('identity = "header"\n', "")
        context = makeContext(self.reactor, users={"alice": "secret"}, config=config)
        e = self.assertRaises(ConfigError, connectFrontend, http, context)
        self.assertIn("/owa", str(e))
        self.assertIn("identity", str(e))
