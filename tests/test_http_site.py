"""
The HTTP front end on a L{StringTransport}: a client's request in, the backend request the
proxy makes on a L{MemoryReactorClock}, the backend's response back.
"""

from __future__ import annotations

from base64 import b64encode

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

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

[[http.listen]]
endpoint = "tcp:8081"
tls = "none"
trusted = true

[[http.vdir]]
path = "/EWS"
identity = "header"
"""

BASIC = b"Basic " + b64encode(b"alice:secret")


class HTTPSiteTestsMixin:
    config = CONFIG
    users = {"alice": "secret"}

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, users=self.users, config=self.config)
        self.client, self.transport = connectFrontend(http, self.context)

    def request(self, head: bytes, body: bytes = b"") -> None:
        self.client.dataReceived(head + b"\r\n" + body)
        self.reactor.advance(0)

    def backend(self, index=-1):
        return acceptBackend(self.reactor, index)


class ProxyTests(HTTPSiteTestsMixin, SynchronousTestCase):
    def test_proxied(self):
        """
        An authenticated GET reaches the backend with the vdir's identity header (the client's
        own dropped) and the forwarding headers; the response comes back with its length.
        """
        self.request(
            b"GET /ews/Exchange.asmx?a=1 HTTP/1.1\r\nHost: mail.example.com\r\n"
            b"Authorization: " + BASIC + b"\r\nX-Remote-User: mallory\r\n"
        )
        server, backend = self.backend()
        sent = backend.value()
        self.assertTrue(sent.startswith(b"GET /EWS/Exchange.asmx?a=1 HTTP/1.1\r\n"), sent)
        self.assertIn(b"X-Remote-User: alice\r\n", sent)
        self.assertNotIn(b"mallory", sent)
        self.assertNotIn(b"Authorization", sent)
        self.assertIn(b"X-Forwarded-For: 127.0.0.1\r\n", sent)
        self.assertIn(b"X-Forwarded-Host: mail.example.com\r\n", sent)
        server.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=b\r\n"
            b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nhello"
        )
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b"Content-Length: 5\r\n", out)
        self.assertIn(b"Set-Cookie: a=b\r\n", out)
        self.assertNotIn(b"Keep-Alive", out)
        self.assertTrue(out.endswith(b"\r\n\r\nhello"))

    def test_noCredentials(self):
        """
        Without credentials: 401 with a Basic challenge, and no backend connection.
        """
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out)
        self.assertIn(b'WWW-Authenticate: Basic realm="casd"', out)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_unknownPath(self):
        """
        A path no vdir claims: 404, without a directory look-up.
        """
        self.request(b"GET /nothing HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 404 "))
        self.assertEqual(self.context.directory.checks, 0)
