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

    def test_poolFactory(self):
        """
        The connection pool builds its connections with its C{_factory} (which the proxy
        replaces with a quiet one).
        """
        from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

        self.assertIs(HTTPConnectionPool._factory, _HTTP11ClientFactory)
        import inspect

        self.assertIn("self._factory(", inspect.getsource(HTTPConnectionPool._newConnection))
        # The proxy's factory builds its own protocol from the factory's quiescent callback.
        self.assertIn(
            "HTTP11ClientProtocol(self._quiescentCallback)",
            inspect.getsource(_HTTP11ClientFactory.buildProtocol),
        )

    def test_clientFinishResponse(self):
        """
        The backend connection's response end is dispatched by state to
        C{_finishResponse_WAITING} / C{_TRANSMITTING}, which read the parser's C{connHeaders}
        (the proxy adds C{close} there for an HTTP/1.0 response).
        """
        import inspect

        from twisted.web._newclient import HTTP11ClientProtocol, HTTPClientParser

        source = inspect.getsource(HTTP11ClientProtocol._finishResponse_WAITING)
        self.assertIn('self._parser.connHeaders.getRawHeaders(b"Connection"', source)
        self.assertIn("_finishResponse_WAITING", vars(HTTP11ClientProtocol))
        self.assertIn("_finishResponse_TRANSMITTING", vars(HTTP11ClientProtocol))
        self.assertIn("connHeaders", inspect.getsource(HTTPClientParser.connectionMade))
