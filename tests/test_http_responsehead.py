"""
A backend's response head relayed in one pass (L{protocols.http.relay.Relay._start}): the
backend's fields in their order and spelling less the hop-by-hop ones, framed as Twisted would
frame them, sent with the first body bytes; the slower path through Twisted's L{Headers} when
casd adds fields of its own.
"""

from __future__ import annotations

import gc

from twisted.trial.unittest import SynchronousTestCase

from tests.test_http_site import BASIC, HTTPSiteTestsMixin


class ResponseHeadTests(HTTPSiteTestsMixin, SynchronousTestCase):
    def get(self, version=b"HTTP/1.1", method=b"GET", connect=True):
        self.request(method + b" /EWS/x " + version + b"\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        if connect:
            self.server, self.backendTransport = self.backend()
        self.transport.clear()

    def test_fieldsAsSent(self):
        """
        The fields go to the client in the backend's order and spelling, repeated ones
        included; hop-by-hop fields (named by Connection too) do not.
        """
        self.get()
        self.server.dataReceived(
            b"HTTP/1.1 200 Fine\r\nset-cookie: a=1\r\nX-B: 2\r\nConnection: keep-alive, X-Hop\r\n"
            b"X-Hop: gone\r\nKeep-Alive: timeout=5\r\nSet-Cookie: c=3\r\ncontent-length: 2\r\n\r\nok"
        )
        self.assertEqual(
            self.transport.value(),
            b"HTTP/1.1 200 Fine\r\nset-cookie: a=1\r\nX-B: 2\r\nSet-Cookie: c=3\r\n"
            b"content-length: 2\r\n\r\nok",
        )
        self.assertFalse(self.transport.disconnecting)

    def test_emptyBody(self):
        """
        A response with an empty body: its head alone, and the connection kept.
        """
        self.get()
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.get(connect=False)
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(self.transport.value().endswith(b"\r\n\r\nok"), self.transport.value())

    def test_chunkedInPieces(self):
        """
        A chunked backend response for an HTTP/1.1 client: chunked again, the head with the
        first chunk, the last chunk at the end.
        """
        self.get()
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.server.dataReceived(b"3\r\nabc\r\n")
        self.server.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
        self.assertEqual(
            self.transport.value(),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )

    def test_http10UntilClose(self):
        """
        An HTTP/1.0 client without a length: the body unframed, and the connection closed.
        """
        self.get(b"HTTP/1.0")
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        self.assertEqual(self.transport.value(), b"HTTP/1.0 200 OK\r\n\r\nabc")
        self.assertTrue(self.transport.disconnecting)

    def test_clientAsksToClose(self):
        """
        A client's C{Connection: close}: the response says so (Twisted's path, since casd adds
        that field) and the connection closes after it.
        """
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nConnection: close\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend()
        self.transport.clear()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        out = self.transport.value()
        self.assertIn(b"\r\nConnection: close\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\nok"), out)
        self.assertTrue(self.transport.disconnecting)

    def test_cutBeforeBodyWritesNothing(self):
        """
        A response cut before its first body byte: no head is sent, the client connection
        closed.
        """
        self.get()
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.server.connectionLost(None)
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_headNoBody(self):
        """
        HEAD: the backend's head and no body (Twisted's path).
        """
        self.get(method=b"HEAD")
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(self.transport.value(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_bytesCounted(self):
        """
        The access line's byte count is the body's.
        """
        self.get()
        request = self.client.requests[-1]
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab")
        self.server.dataReceived(b"cde")
        self.assertEqual(request.sentLength, 5)
        self.assertEqual(request.code, 200)

    def test_producerEndsWithResponse(self):
        """
        The relay is the client's producer while the response lasts (a full client buffer
        pauses the backend), and no longer once it is complete.
        """
        self.get()
        request = self.client.requests[-1]
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        relay = request._relay
        self.assertIs(self.client._requestProducer, relay)
        self.assertIs(request.producer, relay)
        self.client.pauseProducing()
        self.assertTrue(self.server.paused)
        self.client.resumeProducing()
        self.assertFalse(self.server.paused)
        self.server.dataReceived(b"cd")
        self.assertIsNone(self.client._requestProducer)
        self.assertIsNone(request.producer)
        self.assertTrue(request.finished)
        self.assertEqual(self.client.requests, [])
        # Nor does the request hold its relay (which holds the request: a cycle for the collector).
        self.assertIsNone(request._relay)

    def test_noCycleLeft(self):
        """
        A completed exchange leaves nothing for the garbage collector: the request, its relay
        and their headers are freed by reference counting (casd/service/gctune.py).
        """
        self.get()
        request = self.client.requests[-1]
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            self.server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab")
            del request
            gc.collect()
            kept = sorted({type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("protocols.")})
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
        self.assertEqual(kept, [])


class ReadSwitchTests(HTTPSiteTestsMixin, SynchronousTestCase):
    """
    The client connection's reading paused and resumed through its read switch
    (L{protocols.http.channel.ReadSwitch}): the end of a request resumes a paused transport,
    and leaves a reading one alone.
    """

    def test_pipelinedFloodPausedThenResumed(self):
        """
        Over 16 KiB of pipelined requests behind a proxied one pause reading (Twisted's
        channel); the proxied response's end resumes it and the next requests are answered.
        """
        get = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n\r\n"
        filler = b"GET /healthcheck.htm HTTP/1.1\r\nHost: h\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n"
        self.client.dataReceived(get + filler * 20)
        self.reactor.advance(0)
        self.assertEqual(self.transport.producerState, "paused")
        self.assertTrue(self.client._networkProducer.paused)
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.reactor.advance(0)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertFalse(self.client._networkProducer.paused)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK\r\n"), 21)

    def test_readingLeftAlone(self):
        """
        A request's end does not resume a transport that was never paused.
        """
        calls = []
        switch = self.client._networkProducer
        original = switch.producer

        class Counting:
            def resumeProducing(self):
                calls.append("resume")
                original.resumeProducing()

            def pauseProducing(self):
                calls.append("pause")
                original.pauseProducing()

        switch.producer = Counting()
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertIn(b"\r\n\r\nok", self.transport.value())
        self.assertEqual(calls, [])

    def test_bodyPausesThroughSwitch(self):
        """
        A request body the backend does not take yet pauses reading through the switch; once
        the backend takes it, reading resumes.
        """
        self.client.dataReceived(
            b"POST /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 400000\r\n\r\n" + b"a" * 300000
        )
        self.reactor.advance(0)
        self.assertTrue(self.client._networkProducer.paused)
        self.assertEqual(self.transport.producerState, "paused")
        server, backend = self.backend()
        self.assertFalse(self.client._networkProducer.paused)
        self.assertEqual(self.transport.producerState, "producing")


class IdleTimerTests(HTTPSiteTestsMixin, SynchronousTestCase):
    """
    The client connection's idle (keep-alive) timer: restarted by the client's bytes unless
    they made a request that is answered, and by each request's end.
    """

    def get(self) -> None:
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")

    def test_countsFromTheResponsesEnd(self):
        """
        A request answered 50 s after it came: the connection is idle from the answer on, and
        closed 120 s later.
        """
        self.get()
        server, backend = self.backend()
        self.reactor.advance(50)
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.reactor.advance(119)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        self.assertTrue(self.transport.disconnecting)

    def test_bodyBytesRestartIt(self):
        """
        A request head with the start of its body after 100 s of idleness restarts the timer:
        the connection is still open when the rest of the body comes 100 s later.
        """
        self.get()
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.reactor.advance(100)
        self.client.dataReceived(
            b"POST /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 10\r\n\r\n01234"
        )
        self.reactor.advance(100)
        self.assertFalse(self.transport.disconnecting)
        # (The idle backend connection was closed meanwhile: the POST has a new one.)
        server, backend = self.backend()
        self.client.dataReceived(b"56789")
        self.assertTrue(backend.value().startswith(b"POST /EWS/x "), backend.value())
        self.assertTrue(backend.value().endswith(b"\r\n\r\n0123456789"), backend.value())
