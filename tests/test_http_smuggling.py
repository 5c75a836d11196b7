"""
Request smuggling probes: each malformed request gets 400 and never reaches a backend; and the
private Twisted attributes the streaming request factory relies on are still there.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from protocols.http.site import ProxyChannel
from tests.test_http_site import BASIC, HTTPSiteTestsMixin

AUTH = b"Authorization: " + BASIC + b"\r\n"

PROBES = {
    "CL+TE": b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE+CL": b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
    "two Content-Lengths": b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    "Content-Length list": b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"Content-Length: 4, 4\r\n\r\nabcd",
    "signed Content-Length": b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"Content-Length: +4\r\n\r\nabcd",
    "space before colon": b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "unknown coding": b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "coding list": b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH
    + b"X-Thing: a\r\n Transfer-Encoding: chunked\r\n\r\n",
    "bare LF": b"GET /EWS/x HTTP/1.1\nHost: h\n" + AUTH.replace(b"\r\n", b"\n") + b"\n",
    "bare LF in one header": b"GET /EWS/x HTTP/1.1\r\nHost: h\nX-A: b\r\n" + AUTH + b"\r\n",
    "NUL in a value": b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n" + AUTH + b"\r\n",
}


class SmugglingTests(HTTPSiteTestsMixin, SynchronousTestCase):
    def probe(self, name):
        self.client.dataReceived(PROBES[name])
        self.reactor.advance(0)
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), f"{name}: {out!r}")
        self.assertEqual(self.reactor.tcpClients, [], f"{name} reached a backend")
        self.assertEqual(self.context.directory.checks, 0)

    def test_probes(self):
        """
        Every probe: 400, no backend connection, no directory look-up.
        """
        for name in PROBES:
            with self.subTest(name):
                self.setUp()
                self.probe(name)

    def test_bareLFInBodyIsData(self):
        """
        A body may hold bare LFs: only the header section is checked.
        """
        self.client.dataReceived(
            b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"Content-Length: 3\r\n\r\na\nb"
        )
        self.reactor.advance(0)
        server, backend = self.backend()
        self.assertTrue(backend.value().endswith(b"\r\n\r\na\nb"))

    def test_headersSplitAcrossReads(self):
        """
        CR and LF arriving in different reads are one line end, not a bare LF.
        """
        data = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"\r\n"
        for i in range(len(data)):
            self.client.dataReceived(data[i : i + 1])
        self.reactor.advance(0)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_slowHeaders(self):
        """
        Headers that do not complete within C{header_timeout}: 400 and closed, even if the
        client keeps dripping bytes (which would reset an idle timer).
        """
        self.client.dataReceived(b"GET /EWS/x HTTP/1.1\r\n")
        for _ in range(40):
            self.reactor.advance(1)
            self.client.dataReceived(b"X-A: b\r\n")
        self.assertIn(b"400 Bad Request", self.transport.value())
        self.assertEqual(self.reactor.tcpClients, [])


class TwistedPrivatesTests(SynchronousTestCase):
    """
    L{protocols.http.site} relies on private parts of L{twisted.web.http.HTTPChannel}; if a
    Twisted upgrade moves them, these fail (and the pin in setup.cfg must not be raised until
    the site is adapted).
    """

    def test_requestLineOnChannel(self):
        """
        The request line is on the channel (C{_command}, C{_path}, C{_version}) when the
        request's C{gotLength} runs.
        """
        seen = []

        class Probe(http.Request):
            def gotLength(self, length):
                channel = self.channel
                seen.append((channel._command, channel._path, channel._version, length))
                super().gotLength(length)

        channel = http.HTTPChannel()
        channel.requestFactory = Probe
        from twisted.internet.testing import StringTransport

        channel.makeConnection(StringTransport())
        channel.dataReceived(b"PUT /a?b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(seen, [(b"PUT", b"/a?b", b"HTTP/1.1", 2)])
        channel.connectionLost(None)

    def test_delayedCallTime(self):
        """
        A L{DelayedCall}'s due time is C{time + delayed_time} (L{protocols.http.relay.Relay}
        reads both instead of calling C{getTime}).
        """
        from twisted.internet.testing import MemoryReactorClock

        clock = MemoryReactorClock()
        call = clock.callLater(5, lambda: None)
        clock.advance(1)
        call.reset(10)
        self.assertEqual(call.time + call.delayed_time, call.getTime())
        self.assertEqual(call.getTime(), 11)
        call.cancel()

    def test_savedTimeout(self):
        """
        C{allContentReceived} keeps the channel's timeout in C{_savedTimeOut} and
        C{requestDone} restores it from there.
        """
        self.assertIn("_savedTimeOut", vars(http.HTTPChannel))
        import inspect

        source = inspect.getsource(http.HTTPChannel.allContentReceived)
        self.assertIn("self._savedTimeOut = self.setTimeout(None)", source)
        source = inspect.getsource(http.HTTPChannel.requestDone)
        self.assertIn("self.setTimeout(self._savedTimeOut)", source)

    def test_channelAttributes(self):
        """
        The channel attributes the site uses exist: C{line_mode}, C{_handlingRequest},
        C{_respondToBadRequestAndDisconnect}, and the HTTP/1.1 parser is the class we extend.
        """
        channel = ProxyChannel()
        self.assertTrue(hasattr(channel, "line_mode"))
        self.assertFalse(channel._handlingRequest)
        self.assertTrue(callable(channel._respondToBadRequestAndDisconnect))
        self.assertTrue(issubclass(ProxyChannel, http.HTTPChannel))

    def test_responseHeaderTable(self):
        """
        The proxy's relay fills a response's L{Headers} through C{_rawHeaders} (a dict of
        lists) under the names C{_nameEncoder.encode} spells, as C{addRawHeader} does.
        """
        from twisted.web.http_headers import Headers, _nameEncoder

        headers = Headers()
        self.assertEqual(headers._rawHeaders, {})
        headers._rawHeaders.setdefault(_nameEncoder.encode(b"etag"), []).append(b'"x"')
        headers._rawHeaders.setdefault(_nameEncoder.encode(b"Set-Cookie"), []).append(b"a=1")
        headers.addRawHeader(b"set-cookie", b"b=2")
        self.assertEqual(headers.getRawHeaders(b"ETag"), [b'"x"'])
        self.assertEqual(headers.getRawHeaders(b"Set-Cookie"), [b"a=1", b"b=2"])
        self.assertEqual(list(headers.getAllRawHeaders()), [(b"ETag", [b'"x"']), (b"Set-Cookie", [b"a=1", b"b=2"])])

    def test_deferredState(self):
        """
        The proxy reads a fired L{Deferred}'s result at once (C{protocols.http.site.resultNow})
        through C{called}, C{paused} and C{result}.
        """
        from twisted.internet import defer

        from protocols.http.site import _PENDING, resultNow

        self.assertEqual(resultNow(defer.succeed(3)), 3)
        self.assertIs(resultNow(defer.Deferred()), _PENDING)
        failed = defer.fail(ValueError())
        self.assertIs(resultNow(failed), _PENDING)
        failed.addErrback(lambda f: None)
        waiting = defer.Deferred()
        chained = defer.succeed(None)
        chained.addCallback(lambda _: waiting)
        self.assertIs(resultNow(chained), _PENDING)
        waiting.callback(4)
        self.assertEqual(resultNow(chained), 4)
        d = defer.succeed(5)
        d.pause()
        self.assertIs(resultNow(d), _PENDING)
        d.unpause()
        self.assertEqual(resultNow(d), 5)
        # A failure of a Failure subclass is no success either.
        from twisted.python.failure import Failure

        class OwnFailure(Failure):
            pass

        own = defer.fail(OwnFailure(ValueError()))
        self.assertIs(resultNow(own), _PENDING)
        own.addErrback(lambda f: None)
