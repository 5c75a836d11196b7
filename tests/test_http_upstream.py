"""
casd's pooled HTTP/1.1 backend client (L{protocols.http.upstream}) on a L{MemoryReactorClock}:
what it writes, how it reads a response's framing, when it reuses a connection.
"""

from __future__ import annotations

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyClass, verifyObject

from casd.routing.router import BackendTarget
from casd.testing import acceptBackend, failBackend
from protocols.http.proxy import BodyPipe
from protocols.http.upstream import IResponseSink, UpstreamPool, hostHeader


class Connector:
    """
    Plain TCP endpoints on the memory reactor (the real connector adds TLS and its timeouts).
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def endpointFor(self, target):
        return TCP4ClientEndpoint(self.reactor, target.host, target.port, timeout=5)


@implementer(IResponseSink)
class Sink:
    """
    Records what the pool tells a request.
    """

    def __init__(self) -> None:
        self.events = []
        self.data = []
        self.head = None

    def connectFailed(self, reason):
        self.events.append(("connectFailed", reason.type))

    def failed(self, reason):
        self.events.append(("failed", reason.getErrorMessage()))

    def responseStarted(self, exchange, code, phrase, headers):
        self.head = (code, phrase, headers)
        self.events.append(("started", code))

    def responseData(self, data):
        self.data.append(data)

    def responseEnded(self, complete):
        self.events.append(("ended", complete))


TARGET = BackendTarget("web", "127.0.0.1", 8080, "none", "127.0.0.1")


class UpstreamTestsMixin:
    maxConnections = 4

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(
            self.reactor, Connector(self.reactor), maxConnections=self.maxConnections, maxIdle=2,
            idleTimeout=60,
        )

    def send(self, method=b"GET", path=b"/x", headers=(), body=None, target=TARGET):
        sink = Sink()
        exchange = self.pool.request(target, method, path, list(headers), body, sink)
        return sink, exchange

    def accept(self, index=-1):
        return acceptBackend(self.reactor, index)


class RequestTests(UpstreamTestsMixin, SynchronousTestCase):
    def test_headInOneWrite(self):
        """
        The request head is written at once: request line, C{Host} (the member, without the
        scheme's default port), the given fields in order, then the framing.
        """
        self.send(headers=[(b"Accept", b"*/*"), (b"Cookie", b"a=1"), (b"Cookie", b"b=2")])
        connection, transport = self.accept()
        self.assertEqual(
            transport.value(),
            b"GET /x HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nAccept: */*\r\nCookie: a=1\r\n"
            b"Cookie: b=2\r\n\r\n",
        )
        self.assertEqual(hostHeader(BackendTarget("w", "::1", 80, "none", "")), b"[::1]")
        self.assertEqual(hostHeader(BackendTarget("w", "h.example", 443, "implicit", "h")), b"h.example")

    def test_oneWrite(self):
        """
        The head goes out in one transport write.
        """
        from twisted.internet.testing import StringTransport

        writes = []

        class Counting(StringTransport):
            def write(self, data):
                writes.append(data)
                super().write(data)

        self.send(headers=[(b"A", b"1"), (b"B", b"2")])
        host, port, factory = self.reactor.tcpClients[-1][:3]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(Counting())
        self.assertEqual(len(writes), 1)
        self.assertTrue(writes[0].endswith(b"B: 2\r\n\r\n"))

    def test_lineBreakInValue(self):
        """
        A value with a line break (a directory attribute, say) cannot start a field of its own.
        """
        self.send(headers=[(b"X-Remote-User", b"alice\r\nX-Admin: 1")])
        _, transport = self.accept()
        self.assertIn(b"X-Remote-User: alice X-Admin: 1\r\n", transport.value())
        self.assertNotIn(b"\r\nX-Admin", transport.value())

    def test_framing(self):
        """
        A body of known length gets its C{Content-Length}, one of unknown length is sent
        chunked; a POST without a body says C{Content-Length: 0}.
        """
        pipe = BodyPipe(3, lambda: None, lambda: None)
        self.send(b"PUT", body=pipe)
        _, transport = self.accept()
        pipe.write(b"abc")
        pipe.finish()
        self.assertTrue(transport.value().endswith(b"Content-Length: 3\r\n\r\nabc"))
        chunked = BodyPipe(None, lambda: None, lambda: None)
        self.send(b"POST", body=chunked)
        _, transport = self.accept()
        chunked.write(b"hello")
        chunked.finish()
        self.assertTrue(
            transport.value().endswith(b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
        )
        self.send(b"POST")
        _, transport = self.accept()
        self.assertTrue(transport.value().endswith(b"Content-Length: 0\r\n\r\n"))

    def test_sinkInterface(self):
        """
        The proxy's relay (and this test's sink) are what the pool expects.
        """
        from protocols.http.relay import Relay

        self.assertTrue(verifyClass(IResponseSink, Relay))
        self.assertTrue(verifyObject(IResponseSink, Sink()))


class ResponseTests(UpstreamTestsMixin, SynchronousTestCase):
    def respond(self, data, method=b"GET"):
        sink, exchange = self.send(method)
        connection, transport = self.accept()
        connection.dataReceived(data)
        return sink, connection, transport

    def test_lengthBody(self):
        """
        A C{Content-Length} body goes through as the pieces it arrived in; hop-by-hop fields
        (and those C{Connection} names) are removed, the length kept; the connection is reused.
        """
        sink, connection, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nConnection: keep-alive, X-Hop\r\n"
            b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nETag: \"e\"\r\nSet-Cookie: a=1\r\n"
            b"Set-Cookie: b=2\r\n\r\n0123"
        )
        self.assertEqual(
            sink.head,
            (200, b"OK", [(b"Content-Length", b"10"), (b"ETag", b'"e"'), (b"Set-Cookie", b"a=1"),
                          (b"Set-Cookie", b"b=2")]),
        )
        piece = b"456789"
        connection.dataReceived(piece)
        self.assertEqual(sink.data, [b"0123", piece])
        self.assertIs(sink.data[1], piece)
        self.assertEqual(sink.events, [("started", 200), ("ended", True)])
        self.assertFalse(transport.disconnecting)
        sink2, _ = self.send()
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertIn(b"GET /x HTTP/1.1", transport.value().split(b"\r\n\r\n", 1)[1])

    def test_valuesTrimmed(self):
        """
        White space around a field's value is not part of it, whether or not a line of the head
        ends in white space (two parsers, the quicker for heads without).
        """
        sink, _, _ = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nA:  x  \r\nB:\r\nC: \t\r\nD:y z\t \r\n"
            b"Connection: close\r\n\r\n"
        )
        self.assertEqual(
            sink.head[2],
            [(b"Content-Length", b"0"), (b"A", b"x"), (b"B", b""), (b"C", b""), (b"D", b"y z")],
        )
        sink, _, _ = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nA:\t x\r\nB: y z\r\n\r\n")
        self.assertEqual(sink.head[2], [(b"Content-Length", b"0"), (b"A", b"x"), (b"B", b"y z")])

    def test_plainNamesRemembered(self):
        """
        A field name seen as end-to-end is remembered (no lower case computed again), and is
        still dropped when a later response's C{Connection} names it; a remembered spelling
        never hides a hop-by-hop field in another spelling.
        """
        from protocols.http import backendconn

        sink, connection, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Later-Hop: 1\r\n\r\n"
        )
        self.assertIn(b"X-Later-Hop", backendconn._PLAIN)
        self.assertNotIn(b"Content-Length", backendconn._PLAIN)
        self.assertEqual(sink.head, (200, b"OK", [(b"Content-Length", b"0"), (b"X-Later-Hop", b"1")]))
        sink, exchange = self.send()
        connection.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: x-later-hop\r\n"
            b"X-Later-Hop: 2\r\nTRANSFER-encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        self.assertEqual(sink.head, (200, b"OK", []))
        self.assertEqual(sink.events, [("started", 200), ("ended", True)])

    def test_headInPieces(self):
        """
        A head that arrives a byte at a time is read once it is whole.
        """
        sink, exchange = self.send()
        connection, transport = self.accept()
        for byte in b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n":
            connection.dataReceived(bytes([byte]))
        self.assertEqual(sink.head, (204, b"No Content", [(b"X-A", b"1")]))
        self.assertEqual(sink.events, [("started", 204), ("ended", True)])

    def test_chunked(self):
        """
        A chunked body is decoded wherever its pieces are cut, extensions and trailers
        dropped; the connection is reused.
        """
        body = b"4;ext=1\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\n"
        for cut in (1, 3, 7, len(body)):
            self.setUp()
            sink, connection, transport = self.respond(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            )
            for i in range(0, len(body), cut):
                connection.dataReceived(body[i:i + cut])
            self.assertEqual(b"".join(sink.data), b"Wikipedia in \r\n\r\nchunks.")
            self.assertEqual(sink.head[2], [])
            self.assertEqual(sink.events, [("started", 200), ("ended", True)], cut)
            self.assertFalse(transport.disconnecting)

    def test_malformedChunk(self):
        """
        A malformed chunk size fails the response and closes the connection.
        """
        sink, connection, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\nzz\r\n"
        )
        self.assertEqual(sink.events[-1], ("failed", "malformed chunk size"))
        self.assertTrue(transport.disconnecting)
        sink, connection, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWikiXY"
        )
        self.assertEqual(sink.events[-1], ("failed", "malformed chunk"))

    def test_untilClose(self):
        """
        No length and no chunking: the body runs to the end of the connection, which is then
        complete (and not reused).
        """
        sink, connection, transport = self.respond(b"HTTP/1.1 200 OK\r\n\r\nabc")
        connection.dataReceived(b"def")
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(b"".join(sink.data), b"abcdef")
        self.assertEqual(sink.events, [("started", 200), ("ended", True)])
        self.send()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_truncated(self):
        """
        A C{Content-Length} body cut short ends incomplete.
        """
        sink, connection, transport = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
        connection.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(sink.events, [("started", 200), ("ended", False)])

    def test_noBody(self):
        """
        HEAD, 204 and 304 answers have no body whatever their fields say; the connection
        stays usable.
        """
        sink, connection, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", method=b"HEAD"
        )
        self.assertEqual(sink.events, [("started", 200), ("ended", True)])
        self.assertEqual(sink.head[2], [(b"Content-Length", b"1234")])
        sink2, _ = self.send()
        connection.dataReceived(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
        self.assertEqual(sink2.events, [("started", 304), ("ended", True)])
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertFalse(transport.disconnecting)

    def test_connectionClose(self):
        """
        C{Connection: close}, or HTTP/1.0 without C{keep-alive}: the connection is closed
        after the response; HTTP/1.0 with C{keep-alive} is reused.
        """
        for head, reused in (
            (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", False),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
            (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n", True),
        ):
            self.setUp()
            sink, connection, transport = self.respond(head)
            self.assertEqual(sink.events, [("started", 200), ("ended", True)])
            self.assertEqual(transport.disconnecting, not reused, head)

    def test_bytesAfterResponse(self):
        """
        Bytes after a complete response (a framing disagreement): not reused.
        """
        sink, connection, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"
        )
        self.assertEqual(sink.data, [b"ok"])
        self.assertEqual(sink.events, [("started", 200), ("ended", True)])
        self.assertTrue(transport.disconnecting)

    def test_bothLengthAndChunked(self):
        """
        C{Content-Length} with C{Transfer-Encoding: chunked}: the chunking frames the body, the
        length is dropped and the connection is not reused.
        """
        sink, connection, transport = self.respond(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n"
        )
        self.assertEqual(sink.head[2], [])
        self.assertEqual(sink.data, [b"ok"])
        self.assertEqual(sink.events, [("started", 200), ("ended", True)])
        self.assertTrue(transport.disconnecting)

    def test_malformedHeads(self):
        """
        Heads that two parsers could read differently fail the request (a 502 for the
        client) and close the connection.
        """
        for head in (
            b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\n\r\n",
            b"HTTP/1.1 200 OK\nX-A: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX A: 1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1, 1\r\n\r\n",
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        ):
            self.setUp()
            sink, connection, transport = self.respond(head)
            self.assertEqual([e[0] for e in sink.events], ["failed"], head)
            self.assertTrue(transport.disconnecting, head)
        self.setUp()
        sink, connection, transport = self.respond(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000)
        self.assertEqual(sink.events, [("failed", "response head too large")])

    def test_informational(self):
        """
        A C{100 Continue} (or C{103}) before the answer is skipped.
        """
        sink, connection, transport = self.respond(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertEqual(sink.events, [("started", 201), ("ended", True)])

    def test_idleBytes(self):
        """
        Bytes on an idle connection: it is closed, never given to a request.
        """
        sink, connection, transport = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        connection.dataReceived(b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.disconnecting)
        connection.connectionLost(Failure(ConnectionDone()))
        self.send()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_pausedThenReused(self):
        """
        A response that ends while the client had paused the backend connection: the
        connection reads again before it carries the next request.
        """
        sink, exchange = self.send()
        connection, transport = self.accept()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        exchange.pauseResponse()
        self.assertEqual(transport.producerState, "paused")
        connection.dataReceived(b"cd")
        self.assertEqual(sink.events[-1], ("ended", True))
        self.assertEqual(transport.producerState, "producing")

    def test_answerBeforeBody(self):
        """
        A backend that answers before the whole request body: the rest of the body is not
        sent, and the connection is not reused.
        """
        pipe = BodyPipe(10, lambda: None, lambda: None)
        sink, exchange = self.send(b"PUT", body=pipe)
        connection, transport = self.accept()
        pipe.write(b"abc")
        connection.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(sink.events, [("started", 413), ("ended", True)])
        pipe.write(b"defg")
        self.assertTrue(transport.value().endswith(b"abc"))
        self.assertTrue(transport.disconnecting)


class PoolTests(UpstreamTestsMixin, SynchronousTestCase):
    maxConnections = 1

    def test_cap(self):
        """
        At most C{maxConnections} connections to a member: another request waits, and takes
        the connection once it is free.
        """
        sink1, _ = self.send(path=b"/1")
        connection, transport = self.accept()
        sink2, _ = self.send(path=b"/2")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"GET /2 HTTP/1.1", transport.value())
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_waiterAfterClose(self):
        """
        A waiting request gets a new connection when the busy one closes.
        """
        sink1, _ = self.send(path=b"/1")
        connection, transport = self.accept()
        sink2, _ = self.send(path=b"/2")
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 2)
        _, transport2 = self.accept()
        self.assertIn(b"GET /2 HTTP/1.1", transport2.value())

    def test_cancelWaiting(self):
        """
        A waiting request given up leaves the queue.
        """
        self.send(path=b"/1")
        connection, transport = self.accept()
        sink2, exchange2 = self.send(path=b"/2")
        exchange2.cancel()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertNotIn(b"/2", transport.value())
        self.assertEqual(sink2.events, [])

    def test_idleTimeout(self):
        """
        An idle connection is closed after C{idleTimeout}.
        """
        self.send()
        connection, transport = self.accept()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.reactor.advance(59)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)

    def test_keepAliveRace(self):
        """
        A reused connection closed by the backend before any answer: a GET is sent once more
        on a new connection; a second such failure, or a request with a body, fails.
        """
        self.send()
        connection, transport = self.accept()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        sink, _ = self.send(path=b"/again")
        connection.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.reactor.tcpClients), 2)
        connection2, transport2 = self.accept()
        self.assertIn(b"GET /again", transport2.value())
        connection2.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(sink.events, [("failed", "Connection was closed cleanly.")])
        self.assertEqual(len(self.reactor.tcpClients), 2)
        # With a body: never sent twice.
        self.send()
        connection3, _ = self.accept()
        connection3.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        pipe = BodyPipe(2, lambda: None, lambda: None)
        sink, _ = self.send(b"PUT", body=pipe)
        pipe.write(b"ab")
        connection3.connectionLost(Failure(ConnectionDone()))
        self.assertEqual([e[0] for e in sink.events], ["failed"])
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_connectFailed(self):
        """
        A connection that cannot be opened: C{connectFailed}, and the slot is free again.
        """
        sink, _ = self.send()
        failBackend(self.reactor)
        self.assertEqual(sink.events, [("connectFailed", ConnectionRefusedError)])
        self.assertEqual(self.pool.backendFor(TARGET).open, 0)
        self.send()
        self.assertEqual(len(self.reactor.tcpClients), 2)

    def test_closeIdle(self):
        """
        C{closeIdle} closes the idle connections (at stop).
        """
        self.send()
        connection, transport = self.accept()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.pool.closeIdle()
        self.assertTrue(transport.disconnecting)


class WriteThroughTests(SynchronousTestCase):
    def test_backendConnection(self):
        """
        A backend connection's TCP transport is switched to the core's write-through
        (L{casd.session.relay.writeThrough}): a request head goes to the socket at once.
        """
        import socket

        from twisted.internet import tcp

        from casd.session.relay import _WriteThroughClient
        from protocols.http.backendconn import UpstreamConnection

        sock = socket.socket()
        self.addCleanup(sock.close)
        transport = tcp.Client.__new__(tcp.Client)
        transport.TLS = False
        transport.socket = sock
        pool = UpstreamPool(MemoryReactorClock(), None)
        connection = UpstreamConnection(pool, pool.backendFor(TARGET))
        connection.transport = transport
        connection.connectionMade()
        self.assertIs(type(transport), _WriteThroughClient)
        self.assertEqual(transport.bufferSize, 256 * 1024)


class IdleDoubtTests(UpstreamTestsMixin, SynchronousTestCase):
    def test_notReusedOnceDoubted(self):
        """
        An idle connection that sent unexpected bytes is no longer handed to a request, even
        before its close completes.
        """
        self.send()
        connection, transport = self.accept()
        connection.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        connection.dataReceived(b"junk")
        self.send()
        self.assertEqual(len(self.reactor.tcpClients), 2)
