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


GROUP_CONFIG = """
[server]
hostname = "cas1.example.com"

[routing]
default_backend = "pair"

[groups.pair]
members = ["web1", "web2"]

[backends.web1]
host = "127.0.0.1"
[backends.web1.http]
port = 8001

[backends.web2]
host = "127.0.0.2"
[backends.web2.http]
port = 8002

[http]
enabled = true
plain_http = "serve"
keepalive_timeout = 120

[[http.listen]]
endpoint = "tcp:8081"
tls = "none"
trusted = true

[[http.vdir]]
path = "/EWS"
identity = "passthrough"
idle_timeout = 60
max_body_size = 1000

[[http.vdir]]
path = "/Microsoft-Server-ActiveSync"
long_poll_timeout = 3660

[[http.vdir]]
path = "/rpc"
long_poll_timeout = 3660
max_body_size = 0
"""


class FailoverTests(HTTPSiteTestsMixin, SynchronousTestCase):
    config = GROUP_CONFIG

    def test_idempotentRetried(self):
        """
        A GET whose connection failed before any byte was sent goes to the next member; the
        failed member's passive health counts it.
        """
        from casd.testing import failBackend

        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 8001))
        self.assertEqual(len(self.reactor.tcpClients), 1)
        failBackend(self.reactor, index=0)
        self.reactor.advance(0)
        self.assertEqual(self.reactor.tcpClients[1][:2], ("127.0.0.2", 8002))
        member = self.context.connector.members[("127.0.0.1", 8001)]
        self.assertEqual(member._passiveBad, 1)
        server, backend = self.backend(1)
        self.assertTrue(backend.value().startswith(b"GET /EWS/x HTTP/1.1\r\n"))
        server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 204 "))

    def test_postNeverReplayed(self):
        """
        A POST whose body went out to a backend that then failed is answered 502, never sent
        to another member.
        """
        self.request(
            b"POST /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 4\r\n",
            b"abcd",
        )
        server, backend = self.backend(0)
        self.assertTrue(backend.value().endswith(b"\r\n\r\nabcd"))
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        server.connectionLost(Failure(ConnectionLost()))
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 502 "), self.transport.value())

    def test_noHealthyMember(self):
        """
        Every member draining: 503 with Retry-After, no connection attempted.
        """
        self.context.connector.setDraining({"web1", "web2"})
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 503 "), out)
        self.assertIn(b"Retry-After: 30\r\n", out)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_timeout(self):
        """
        A backend that accepts but never answers: 504 after the vdir's idle timeout.
        """
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        self.backend(0)
        self.reactor.advance(59)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(2)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 504 "), self.transport.value())

    def test_targetRemembered(self):
        """
        A connection's next request for the same target takes the match of the one before
        (no look-up in the vdir table); another target is looked up; a local service
        registered meanwhile is seen.
        """
        from protocols.http.local import LocalService

        site = self.client.site
        asked = []
        match = site.vdirs.match
        site.vdirs.match = lambda path: asked.append(path) or match(path)
        get = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n"
        self.request(get)
        server, backend = self.backend(0)
        server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.request(get)
        server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(asked, [b"/EWS/x"])
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 204 "), 2)
        self.assertEqual(backend.value().count(b"GET /EWS/x HTTP/1.1\r\n"), 2)
        self.request(get.replace(b"/EWS/x", b"/nowhere"))
        self.assertEqual(asked, [b"/EWS/x", b"/nowhere"])
        self.assertIn(b"HTTP/1.1 404 ", self.transport.value())
        self.transport.clear()
        self.request(get)
        server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.transport.clear()

        class Here:
            def render(self, request):
                return b"here"

        site.local.add(LocalService(prefixes=("/EWS/x",), resource=Here()))
        self.request(get)
        self.assertTrue(self.transport.value().endswith(b"here"), self.transport.value())

    def test_timeoutKeepAlive(self):
        """
        The silence timer is the connection's, moved on for each request (not one scheduled
        and cancelled per request): a later request on the same connection still gets its 504
        after the vdir's idle timeout counted from its own start, and a timer left with no
        request fires for nobody and goes with the connection.
        """
        get = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n"
        self.request(get)
        server, backend = self.backend(0)
        timer = self.client._silence
        server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 204 "))
        self.transport.clear()
        # Answered: the timer stays pending, for nobody.
        self.assertTrue(timer.active())
        self.assertIsNone(self.client._silenceOwner)
        self.reactor.advance(50)
        self.request(get)
        self.assertIs(self.client._silence, timer)
        self.reactor.advance(59)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(2)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 504 "), self.transport.value())
        self.assertTrue(self.transport.connected)
        self.transport.clear()
        # Idle longer than the vdir's timeout: the timer fired for nobody, the connection lives
        # (the keep-alive timeout is longer), and the next request gets a timer of its own.
        self.reactor.advance(61)
        self.assertIsNone(self.client._silence)
        self.assertEqual(self.transport.value(), b"")
        self.request(get)
        self.assertTrue(self.client._silence.active())
        self.reactor.advance(61)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 504 "), self.transport.value())

    def test_timerGoesWithConnection(self):
        """
        The connection's silence timer is cancelled when the client goes.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend(0)
        server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        timer = self.client._silence
        self.assertTrue(timer.active())
        self.client.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(timer.active())
        self.assertNotIn(timer, self.reactor.getDelayedCalls())

    def test_longPoll(self):
        """
        In a long-poll vdir a response may take up to its long-poll timeout (an ActiveSync
        Ping of 59 minutes), far beyond the keep-alive and idle timeouts.
        """
        self.request(
            b"POST /Microsoft-Server-ActiveSync?Cmd=Ping HTTP/1.1\r\nHost: h\r\nAuthorization: "
            + BASIC + b"\r\nContent-Length: 2\r\n",
            b"ab",
        )
        server, backend = self.backend(0)
        self.reactor.advance(3540)
        self.assertTrue(self.transport.connected)
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\nok"))
        # Back to the ordinary keep-alive timeout afterwards.
        self.assertEqual(self.client.timeOut, 120)

    def test_rpcChannelIdleUpload(self):
        """
        An RPC_IN_DATA channel may stay silent between chunks of its body longer than the
        keep-alive timeout: casd does not cut it before the vdir's long-poll timeout.
        """
        self.request(
            b"RPC_IN_DATA /rpc/rpcproxy.dll?mbx:6001 HTTP/1.1\r\nHost: h\r\nAuthorization: "
            + BASIC + b"\r\nContent-Length: 1073741824\r\n",
            b"x" * 100,
        )
        server, backend = self.backend(0)
        for _ in range(5):
            self.reactor.advance(600)
            self.client.dataReceived(b"y" * 10)
        self.assertTrue(self.transport.connected)
        self.assertFalse(self.transport.disconnecting)
        self.assertTrue(backend.value().endswith(b"x" * 100 + b"y" * 50))

    def test_silentUpload(self):
        """
        A client that stops sending its body for longer than the vdir's idle timeout is
        disconnected (and the backend request abandoned).
        """
        self.request(
            b"PUT /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 100\r\n",
            b"abc",
        )
        server, backend = self.backend(0)
        self.reactor.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        self.assertTrue(self.transport.disconnecting)

    def test_tooLarge(self):
        """
        A declared body over C{max_body_size}: 413 at once, the connection closed, no backend.
        """
        self.request(
            b"POST /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 5000\r\n",
            b"a" * 100,
        )
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(self.transport.disconnecting)

    def test_tooLargeChunked(self):
        """
        A chunked body that grows past C{max_body_size}: 413 and closed.
        """
        self.request(
            b"POST /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nTransfer-Encoding: chunked\r\n",
            b"400\r\n" + b"a" * 1024 + b"\r\n",
        )
        self.assertIn(b"HTTP/1.1 413 ", self.transport.value())
        self.assertTrue(self.transport.disconnecting)


class StreamingTests(HTTPSiteTestsMixin, SynchronousTestCase):
    def test_bodyStreamed(self):
        """
        The backend request starts when the headers are in; body bytes follow as they arrive.
        """
        self.request(
            b"PUT /EWS/f HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 10\r\n",
            b"abc",
        )
        server, backend = self.backend()
        self.assertTrue(backend.value().endswith(b"\r\n\r\nabc"))
        self.assertEqual(backend.value().lower().count(b"content-length"), 1)
        self.assertIn(b"Content-Length: 10\r\n", backend.value())
        self.client.dataReceived(b"defghij")
        self.assertTrue(backend.value().endswith(b"\r\n\r\nabcdefghij"))

    def test_continueAfterAuthentication(self):
        """
        C{Expect: 100-continue}: the 100 is sent once the request is authenticated and routed;
        with wrong credentials the 401 comes at once (and the connection closes), without
        waiting for a body.
        """
        head = b"PUT /EWS/f HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 3\r\n"
        self.request(head + b"Authorization: " + BASIC + b"\r\n")
        self.assertEqual(self.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        server, backend = self.backend()
        self.assertNotIn(b"Expect", backend.value())
        self.client.dataReceived(b"abc")
        self.assertTrue(backend.value().endswith(b"\r\n\r\nabc"))
        self.setUp()
        self.request(head + b"Authorization: Basic " + b64encode(b"alice:wrong") + b"\r\n")
        self.reactor.advance(10)
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out)
        self.assertNotIn(b"100 Continue", out)
        self.assertIn(b"WWW-Authenticate: Basic", out)
        self.assertTrue(self.transport.disconnecting)

    def test_backendPushesBack(self):
        """
        A backend connection that cannot take more pauses reading from the client.
        """
        self.request(
            b"PUT /EWS/f HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 100\r\n",
            b"abc",
        )
        server, backend = self.backend()
        backend.producer.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        backend.producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")

    def test_slowClientPausesBackend(self):
        """
        A client that stops reading the response pauses the backend connection.
        """
        self.request(b"GET /EWS/big HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        # The client's transport says its buffer is full.
        self.transport.producer.pauseProducing()
        self.assertEqual(backend.producerState, "paused")
        self.transport.producer.resumeProducing()
        self.assertEqual(backend.producerState, "producing")

    def test_slowClientNotCut(self):
        """
        A client that reads slowly (its buffer drains now and then) is not cut by the idle
        limit however long the download takes; one that stops reading altogether is.
        """
        self.request(b"GET /EWS/big HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        for _ in range(5):
            self.transport.producer.pauseProducing()
            self.reactor.advance(100)
            self.transport.producer.resumeProducing()
        self.assertFalse(self.transport.disconnecting)
        self.transport.producer.pauseProducing()
        self.reactor.advance(121)
        self.assertEqual(backend.producerState, "stopped")

    def test_truncatedResponse(self):
        """
        A backend that dies mid-body: the client connection is closed, never a complete-looking
        response.
        """
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.request(b"GET /EWS/big HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        server.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(self.transport.disconnecting)

    def test_clientGoneStopsBackend(self):
        """
        A client that goes mid-response: the backend connection is closed.
        """
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.request(b"GET /EWS/big HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        self.client.connectionLost(Failure(ConnectionLost()))
        # stopProducing: a TCP transport closes the connection.
        self.assertEqual(backend.producerState, "stopped")

    def test_http10NotPooled(self):
        """
        A backend answering HTTP/1.0 without keep-alive closes its connection: casd does not
        put it back in the pool, the next request opens a new one.
        """
        for i in range(2):
            self.request(b"GET /EWS/" + str(i).encode() + b" HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
            server, backend = self.backend(i)
            server.dataReceived(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.reactor.advance(0)
            self.assertTrue(backend.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_staleConnection(self):
        """
        A GET sent on a pooled connection that the backend closed before answering is sent
        again on a new connection; a POST in the same case is answered 502, never sent again.
        """
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.request(b"GET /EWS/1 HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend(0)
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.reactor.advance(0)
        self.request(b"GET /EWS/2 HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        self.assertIn(b"GET /EWS/2", backend.value())
        server.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        server2, backend2 = self.backend(1)
        self.assertIn(b"GET /EWS/2", backend2.value())
        server2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 2)
        self.request(
            b"POST /EWS/3 HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\nContent-Length: 2\r\n",
            b"xy",
        )
        self.assertIn(b"POST /EWS/3", backend2.value())
        server2.connectionLost(Failure(ConnectionDone()))
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertIn(b"HTTP/1.1 502 ", self.transport.value())

    def test_head(self):
        """
        HEAD: the backend's headers, no body, and the connection stays usable.
        """
        self.request(b"HEAD /EWS/f HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend()
        self.assertTrue(backend.value().startswith(b"HEAD /EWS/f HTTP/1.1\r\n"))
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: \"x\"\r\n\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 OK\r\n"), out)
        self.assertIn(b'ETag: "x"', out)
        self.assertTrue(out.endswith(b"\r\n\r\n"), out)
        self.assertFalse(self.transport.disconnecting)
        self.request(b"GET /EWS/g HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        self.assertIn(b"GET /EWS/g", backend.value())

    def test_notModified(self):
        """
        304: passed on without a body.
        """
        self.request(b"GET /EWS/f HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\nIf-None-Match: \"x\"\r\n")
        server, backend = self.backend()
        self.assertIn(b'If-None-Match: "x"', backend.value())
        server.dataReceived(b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 304 "), out)
        self.assertTrue(out.endswith(b"\r\n\r\n"), out)

    def test_chunkedUpload(self):
        """
        A chunked upload goes to the backend chunked, streamed.
        """
        self.request(
            b"POST /EWS/f HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nTransfer-Encoding: chunked\r\n",
            b"3\r\nabc\r\n",
        )
        server, backend = self.backend()
        sent = backend.value()
        self.assertIn(b"Transfer-Encoding: chunked\r\n", sent)
        self.assertTrue(sent.endswith(b"3\r\nabc\r\n"), sent)
        self.client.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
        self.assertTrue(backend.value().endswith(b"2\r\nde\r\n0\r\n\r\n"))

    def test_keepAlive(self):
        """
        Two requests on one client connection reuse one persistent backend connection.
        """
        for i in range(2):
            self.request(b"GET /EWS/" + str(i).encode() + b" HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
            if i == 0:
                server, backend = self.backend()
            server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertIn(b"GET /EWS/1 HTTP/1.1", backend.value())
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 2)


class BackendClientTests(HTTPSiteTestsMixin, SynchronousTestCase):
    """
    The proxy on casd's own backend client (L{protocols.http.upstream}).
    """

    def get(self, path=b"/EWS/x"):
        self.request(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")

    def test_chunkedResponse(self):
        """
        A chunked response is decoded and chunked again for the client; the backend's framing
        fields never reach it.
        """
        self.get()
        server, backend = self.backend()
        server.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
            b"3;x=y\r\nabc\r\n"
        )
        server.dataReceived(b"2\r\nde\r\n0\r\nX-T: 1\r\n\r\n")
        out = self.transport.value()
        head, body = out.split(b"\r\n\r\n", 1)
        self.assertIn(b"Transfer-Encoding: chunked", head)
        self.assertNotIn(b"keep-alive", head.lower())
        self.assertEqual(body, b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        self.assertFalse(backend.disconnecting)

    def test_firstWriteExact(self):
        """
        The response head and its first bytes go out as one write, exactly as Twisted would
        frame them: chunked for an HTTP/1.1 client without a length, as they are for HTTP/1.0
        (then closed), with the backend's length as it is; a HEAD gets no body.
        """
        self.get()
        server, backend = self.backend()
        self.transport.clear()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nab")
        self.assertEqual(
            self.transport.value(),
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
        )
        server.connectionLost(None)
        self.transport.clear()
        self.request(b"GET /EWS/y HTTP/1.0\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 404 Gone Away\r\nContent-Length: 2\r\n\r\nno")
        self.assertEqual(
            self.transport.value(), b"HTTP/1.0 404 Gone Away\r\nContent-Length: 2\r\n\r\nno"
        )
        self.assertTrue(self.transport.disconnecting)

    def test_malformedResponse(self):
        """
        A response head casd cannot read with certainty: 502, and the backend connection closed.
        """
        self.get()
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 502 "), self.transport.value())
        self.assertTrue(backend.disconnecting)

    def test_answerBeforeBody(self):
        """
        A backend that answers while the client is still sending its body: the answer waits
        until the body is in (the channel reads the next request from the same stream), then
        goes out whole.
        """
        self.request(
            b"PUT /EWS/f HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 6\r\n",
            b"abc",
        )
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        self.assertEqual(self.transport.value(), b"")
        self.client.dataReceived(b"def")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 403 Forbidden\r\n"), out)
        self.assertTrue(out.endswith(b"\r\n\r\nno"), out)
        self.assertFalse(self.transport.disconnecting)

    def test_clientGoneBeforeAnswer(self):
        """
        A client that goes while the backend has not answered yet: the backend request is
        given up (its connection closed), not left to run.
        """
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        self.get()
        server, backend = self.backend()
        self.client.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(backend.disconnecting)

    def test_slowClientAtTheEnd(self):
        """
        A response that completes while the client had paused the backend: the next request
        on that backend connection is answered (the connection reads again).
        """
        self.get(b"/EWS/1")
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        self.transport.producer.pauseProducing()
        self.assertEqual(backend.producerState, "paused")
        server.dataReceived(b"cd")
        self.transport.producer.resumeProducing()
        self.get(b"/EWS/2")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(backend.producerState, "producing")
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\nok"))

    def test_malformedChunkMidBody(self):
        """
        A chunked body that turns malformed after the head went out: the client connection is
        closed (a cut body), never a second response written after the first.
        """
        self.get()
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        out = self.transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 "), 1, out)
        self.assertNotIn(b"502", out)
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(backend.disconnecting)

    def test_longUploadNotCut(self):
        """
        An upload that keeps coming for longer than the vdir's idle timeout, the backend
        waiting for all of it before answering: no 504 while the body makes progress.
        """
        self.request(
            b"PUT /EWS/f HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 100\r\n",
            b"a",
        )
        server, backend = self.backend()
        for _ in range(9):
            self.reactor.advance(50)
            self.client.dataReceived(b"b" * 10)
        self.assertEqual(self.transport.value(), b"")
        self.assertFalse(backend.disconnecting)
        self.client.dataReceived(b"c" * 9)
        server.dataReceived(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 201 "), self.transport.value())
        self.assertFalse(self.transport.disconnecting)

    def test_bytesOutCounted(self):
        """
        Body pieces after the first (written to the client's transport directly) still count in
        the access line's bytes out.
        """
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.get()
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        server.dataReceived(b"defg")
        server.dataReceived(b"hij")
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\nabcdefghij"))
        lines = [e["line"] for e in events if e.get("log_namespace") == "casd.http.access"]
        self.assertEqual(len(lines), 1)
        self.assertIn(" out=10 ", lines[0])
