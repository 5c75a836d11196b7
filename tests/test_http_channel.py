"""
The HTTP front end's request-head parser (L{protocols.http.channel.ProxyChannel}): the whole
head parsed at once, with the limits and strictness of Twisted's line parser and casd's own,
pipelining, and the Twisted sources it was written against.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from protocols.http.channel import ProxyChannel, twistedSourcesChanged
from protocols.http.local import LocalService, LocalServices
from protocols.http.site import leanInitSourcesChanged
from tests.test_http_site import BASIC, HTTPSiteTestsMixin

AUTH = b"Authorization: " + BASIC + b"\r\n"
HEALTH = b"GET /healthcheck.htm HTTP/1.1\r\nHost: h\r\n\r\n"


class TwistedSourcesTests(SynchronousTestCase):
    def test_twistedSourcesUnchanged(self):
        """
        If this fails after a Twisted upgrade: compare each listed source with what
        C{ProxyChannel._headReceived} and C{dataReceived} repeat or rely on (the line parser's
        checks, the transfer decoders, the request hand-over, C{Headers._rawHeaders}), adapt
        them, and update C{TWISTED_SOURCES}.
        """
        self.assertEqual(twistedSourcesChanged(), [])


class HeadParserTests(HTTPSiteTestsMixin, SynchronousTestCase):
    def assertBadRequest(self):
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:200])
        self.assertEqual(out.count(b"HTTP/1.1 400 "), 1, out[:400])
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_headersReachTheBackendCanonical(self):
        """
        Header names are stored in their canonical spelling and values without the
        surrounding blanks; repeated headers keep every value in order.
        """
        self.request(
            b"GET /EWS/x HTTP/1.1\r\nhost: h\r\n" + AUTH + b"x-thing:   one \t\r\nX-THING: two\r\n"
        )
        server, backend = self.backend()
        sent = backend.value()
        self.assertIn(b"X-Thing: one\r\nX-Thing: two\r\n", sent)
        self.assertNotIn(b"x-thing", sent)
        self.assertIn(b"X-Forwarded-Host: h\r\n", sent)

    def test_rememberedLines(self):
        """
        Lines of harmless fields are remembered whole and give the same headers when they come
        again; credential and framing lines never are, and are checked each time.
        """
        from protocols.http import channel

        channel._LINES.clear()
        head = (
            b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nUser-Agent: agent/1\r\nAccept: */*\r\n"
            + AUTH + b"Cookie: a=b\r\nAccept:  text/plain \r\n"
        )
        self.request(head)
        self.assertIn(b"User-Agent: agent/1", channel._LINES)
        self.assertEqual(channel._LINES[b"Accept:  text/plain "], (b"Accept", b"text/plain"))
        for line in channel._LINES:
            self.assertNotIn(BASIC, line)
            self.assertFalse(line.startswith(b"Cookie"), line)
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.request(head)
        request = self.client.requests[-1]
        raw = request.requestHeaders._rawHeaders
        self.assertEqual(raw[b"Accept"], [b"*/*", b"text/plain"])
        self.assertEqual(raw[b"User-Agent"], [b"agent/1"])
        self.assertEqual(raw[b"Host"], [b"h"])
        self.assertNotIn(AUTH[:-2], channel._LINES)

    def test_rememberedLinesFraming(self):
        """
        Remembered lines do not spare a request the framing checks (CL with TE: 400).
        """
        from protocols.http import channel

        channel._LINES[b"User-Agent: agent/1"] = (b"User-Agent", b"agent/1")
        self.request(
            b"POST /EWS/x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\nUser-Agent: agent/1\r\n",
            b"abc",
        )
        out = self.transport.value()
        self.assertIn(b"HTTP/1.1 400 ", out)

    def test_tooManyHeaders(self):
        """
        More header lines than C{maxHeaders}: 400.
        """
        extra = b"".join(b"X-%d: v\r\n" % i for i in range(ProxyChannel.maxHeaders))
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH + extra)
        self.assertBadRequest()

    def test_headerSectionTooLarge(self):
        """
        A complete head over C{totalHeadersSize}: 400.
        """
        big = b"X-Big: " + b"a" * ProxyChannel.totalHeadersSize + b"\r\n"
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH + big)
        self.assertBadRequest()

    def test_endlessHead(self):
        """
        A head that keeps coming without its end is refused once it cannot fit the limit,
        without waiting for the deadline.
        """
        self.client.dataReceived(b"GET /EWS/x HTTP/1.1\r\nX-Big: ")
        for _ in range(20):
            if self.transport.disconnecting:
                break
            self.client.dataReceived(b"a" * 8192)
        self.assertBadRequest()

    def test_longHeaderLine(self):
        """
        One long header line (a Kerberos token, a forms cookie) is accepted within
        C{totalHeadersSize}: there is no separate per-line limit.
        """
        token = b"Negotiate " + b"A" * 30000
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"X-Token: " + token + b"\r\n")
        server, backend = self.backend()
        self.assertIn(b"X-Token: " + token + b"\r\n", backend.value())

    def test_bareCRInValue(self):
        """
        A CR inside a value (not part of a line end): 400.
        """
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n" + AUTH)
        self.assertBadRequest()

    def test_badHeaderName(self):
        """
        A header name that is not a token, or an empty one: 400.
        """
        for line in (b"X A: b", b": b", b"X\x7f: b", b"no colon"):
            with self.subTest(line):
                self.setUp()
                self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + line + b"\r\n" + AUTH)
                self.assertBadRequest()

    def test_badRequestLine(self):
        """
        A request line that is not C{method SP target SP HTTP/1.x}, or starts with a blank: 400.
        """
        for line in (b"GET /EWS/x", b" GET /EWS/x HTTP/1.1", b"GET /EWS/x HTTP/2.0", b"GET  HTTP/1.1"):
            with self.subTest(line):
                self.setUp()
                self.request(line + b"\r\nHost: h\r\n" + AUTH)
                self.assertBadRequest()

    def test_pipelined(self):
        """
        Requests sent together are answered in order, each once, however many arrive in one
        read (without growing the stack: each is parsed after the previous one's answer).
        """
        self.client.dataReceived(HEALTH * 300)
        out = self.transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 200 OK\r\n"), 300)
        self.assertFalse(self.transport.disconnecting)

    def test_pipelinedAfterProxied(self):
        """
        A request behind a proxied one waits until the first is answered.
        """
        self.client.dataReceived(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"\r\n" + HEALTH)
        self.reactor.advance(0)
        self.assertEqual(self.transport.value(), b"")
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nproxied")
        self.reactor.advance(0)
        out = self.transport.value()
        self.assertEqual(out.count(b"HTTP/1.1 200 OK\r\n"), 2, out)
        self.assertLess(out.index(b"prox"), out.index(b"healthcheck") if b"healthcheck" in out else len(out))
        self.assertIn(b"200 OK\n", out.split(b"prox", 1)[1])

    def test_bodyThenNextRequest(self):
        """
        A body and the next request in one read: the body goes to the backend, the next
        request is answered after the first.
        """
        self.client.dataReceived(
            b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"Content-Length: 3\r\n\r\nabc" + HEALTH
        )
        self.reactor.advance(0)
        server, backend = self.backend()
        self.assertTrue(backend.value().endswith(b"\r\n\r\nabc"), backend.value())
        server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.reactor.advance(0)
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 204 "), out)
        self.assertIn(b"HTTP/1.1 200 OK\r\n", out)

    def test_blankLineBeforeRequest(self):
        """
        One empty line before a request (sent by some clients after a body) is skipped; two
        are a bad request line.
        """
        self.client.dataReceived(b"\r\n" + HEALTH)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.setUp()
        self.client.dataReceived(b"\r\n\r\n" + HEALTH)
        self.assertBadRequest()

    def test_headByteByByte(self):
        """
        A head arriving one byte at a time is parsed once complete, and a body after it is
        streamed.
        """
        data = b"POST /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH + b"Content-Length: 2\r\n\r\nok"
        for i in range(len(data)):
            self.client.dataReceived(data[i : i + 1])
        self.reactor.advance(0)
        server, backend = self.backend()
        self.assertTrue(backend.value().endswith(b"\r\n\r\nok"))

    def test_completeHeadArmsNoDeadline(self):
        """
        A head that arrives whole needs no header deadline: no timer is armed for it (the
        slow-header deadline is for heads that arrive in pieces:
        C{tests.test_http_smuggling.SmugglingTests.test_slowHeaders}).
        """
        before = len(self.reactor.getDelayedCalls())
        self.client.dataReceived(HEALTH)
        self.assertEqual(len(self.reactor.getDelayedCalls()), before)
        self.assertIsNone(self.client._headerTimer)


class LocalMatchTests(SynchronousTestCase):
    """
    L{LocalServices.match} asks only the services whose prefixes share the path's first
    segment, with the answer of asking every service in order.
    """

    def services(self):
        return LocalServices([
            LocalService(("/autodiscover/autodiscover.xml",), None, name="pox"),
            LocalService(("/EWS/healthcheck.htm",), None, name="ews health"),
            LocalService(("/Private/",), None, caseInsensitive=False, name="private"),
            LocalService(("/owa/auth/", "/owa/logon.htm"), None, name="logon"),
            LocalService(("/healthcheck.htm",), None, name="health"),
            LocalService(("/",), None, name="root"),
            LocalService(("/owa/",), None, name="owa after root"),
        ])

    def test_sameAsAskingEach(self):
        services = self.services()
        paths = [
            b"/autodiscover/autodiscover.xml", b"/Autodiscover/Autodiscover.XML?x=1",
            b"/autodiscover/autodiscover.xml/more", b"/autodiscover/autodiscover.xmlx",
            b"/ews/healthcheck.htm", b"/EWS/Exchange.asmx", b"/Private/x", b"/private/x",
            b"/Private", b"/owa/auth/logon.aspx", b"/OWA/logon.htm", b"/owa/", b"/healthcheck.htm",
            b"/", b"", b"*", b"http://h/owa/auth/", b"/b/small",
        ]
        for path in paths:
            expected = next((s for s in services.services if s.matches(path)), None)
            self.assertIs(services.match(path), expected, path)
        noRoot = LocalServices([s for s in services.services if s.name != "root"])
        for path in paths:
            expected = next((s for s in noRoot.services if s.matches(path)), None)
            self.assertIs(noRoot.match(path), expected, path)
        self.assertIsNone(noRoot.match(b"/b/small"))

    def test_onlyCandidatesAsked(self):
        """
        A path whose first segment no prefix has asks no service; an added service is seen.
        """
        asked = []

        class Spy(LocalService):
            def matches(self, path):
                asked.append(self.name)
                return super().matches(path)

        services = LocalServices([Spy(("/EWS/healthcheck.htm",), None, name="a"), Spy(("/x/",), None, name="b")])
        self.assertIsNone(services.match(b"/b/small"))
        self.assertEqual(asked, [])
        self.assertEqual(services.match(b"/ews/healthcheck.htm").name, "a")
        self.assertEqual(asked, ["a"])
        services.add(Spy(("/b/",), None, name="c"))
        self.assertEqual(services.match(b"/b/small").name, "c")


class LeanRequestTests(HTTPSiteTestsMixin, SynchronousTestCase):
    """
    L{protocols.http.site.ProxyRequest} sets up what Twisted's request would, without the
    parts casd does not use up front; the response head goes out in one write.
    """

    def test_twistedSourcesUnchanged(self):
        """
        If this fails after a Twisted upgrade: compare the listed sources with
        C{ProxyRequest.__init__}, C{_cleanup} and C{connectionLost}, and update
        C{LEAN_INIT_SOURCES}.
        """
        self.assertEqual(leanInitSourcesChanged(), [])

    def test_host(self):
        """
        C{request.host} is the listener's address, looked up when asked; C{setHost} still
        replaces it.
        """
        seen = []

        class Probe(Resource):
            isLeaf = True

            def render_GET(self, request):
                seen.append(request.host)
                request.setHost(b"example.com", 8443)
                seen.append(request.host)
                return b"ok"

        self.client.site.local.add(LocalService(("/probe",), Probe(), name="probe"))
        self.client.dataReceived(b"GET /probe HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(seen[0], self.transport.getHost())
        self.assertEqual((seen[1].host, seen[1].port), (b"example.com", 8443))

    def test_responseHeadInOneWrite(self):
        """
        The status line, every header (repeated ones in order) and the first body bytes are
        one transport write.
        """
        writes = []
        write = self.transport.write
        self.transport.write = lambda data: (writes.append(data), write(data))
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH)
        server, backend = self.backend()
        server.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\nok"
        )
        self.reactor.advance(0)
        self.assertEqual(len(writes), 1, writes)
        head, body = writes[0].split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 200 OK\r\n"), head)
        self.assertIn(b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\n", head + b"\r\n")
        self.assertIn(b"Content-Length: 2", head)
        self.assertEqual(body, b"ok")

    def test_headWithoutBody(self):
        """
        A response without body bytes (HEAD, 204, 304, an empty body) still gets its head, once,
        before anything else.
        """
        for method, status, extra in (
            (b"HEAD", b"200 OK", b"Content-Length: 5\r\n\r\nhello"),
            (b"GET", b"204 No Content", b"\r\n"),
            (b"GET", b"304 Not Modified", b"\r\n"),
            (b"GET", b"200 OK", b"Content-Length: 0\r\n\r\n"),
        ):
            with self.subTest((method, status)):
                self.setUp()
                self.request(method + b" /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH)
                server, backend = self.backend()
                server.dataReceived(b"HTTP/1.1 " + status + b"\r\n" + extra)
                self.reactor.advance(0)
                out = self.transport.value()
                self.assertTrue(out.startswith(b"HTTP/1.1 " + status + b"\r\n"), out)
                self.assertEqual(out.count(b"HTTP/1.1 "), 1, out)
                self.assertTrue(out.endswith(b"\r\n\r\n"), out)

    def test_chunkedResponse(self):
        """
        A response of unknown length goes out chunked, the head with the first chunk, the
        terminator last.
        """
        writes = []
        write = self.transport.write
        self.transport.write = lambda data: (writes.append(data), write(data))
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH)
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        self.reactor.advance(0)
        server.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
        self.reactor.advance(0)
        out = b"".join(writes)
        self.assertTrue(writes[0].startswith(b"HTTP/1.1 200 OK\r\n"), writes)
        self.assertTrue(writes[0].endswith(b"\r\n\r\n3\r\nabc\r\n"), writes)
        self.assertTrue(out.endswith(b"2\r\nde\r\n0\r\n\r\n"), out)

    def test_accessLineOncePerRequest(self):
        """
        Each request's access line is written once: when its response is complete, or when the
        connection is lost before.
        """
        lines = []
        self.client.site.accessLog = lines.append
        self.client.dataReceived(HEALTH * 2)
        self.assertEqual([r.code for r in lines], [200, 200])
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n" + AUTH)
        self.assertEqual(len(lines), 2)
        self.client.connectionLost(None)
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[-1].user.login, "alice")


class PersistenceTests(HTTPSiteTestsMixin, SynchronousTestCase):
    """
    Whether the connection stays open after a response (read from the parsed head).
    """

    def test_keepAlive(self):
        self.client.dataReceived(HEALTH)
        self.assertNotIn(b"Connection: close", self.transport.value())
        self.assertFalse(self.transport.disconnecting)

    def test_connectionClose(self):
        for value in (b"close", b"Keep-Alive close", b"CLOSE"):
            with self.subTest(value):
                self.setUp()
                self.client.dataReceived(HEALTH.replace(b"\r\n\r\n", b"\r\nConnection: " + value + b"\r\n\r\n"))
                self.assertIn(b"Connection: close\r\n", self.transport.value())
                self.assertTrue(self.transport.disconnecting)

    def test_http10(self):
        self.client.dataReceived(HEALTH.replace(b"HTTP/1.1", b"HTTP/1.0"))
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.0 200 "))
        self.assertTrue(self.transport.disconnecting)

    def test_cookiesParsed(self):
        """
        Cookies are parsed when there are any (and C{received_cookies} is empty otherwise).
        """
        seen = []

        class Probe(Resource):
            isLeaf = True

            def render_GET(self, request):
                seen.append(dict(request.received_cookies))
                return b"ok"

        self.client.site.local.add(LocalService(("/probe",), Probe(), name="probe"))
        self.client.dataReceived(
            b"GET /probe HTTP/1.1\r\nHost: h\r\n\r\n"
            b"GET /probe HTTP/1.1\r\nHost: h\r\nCookie: a=1; b=2\r\nCookie: c=3\r\n\r\n"
        )
        self.assertEqual(seen, [{}, {b"a": b"1", b"b": b"2", b"c": b"3"}])


class IdleTimeoutTests(HTTPSiteTestsMixin, SynchronousTestCase):
    """
    The keep-alive timeout counts only between requests: a request answered slowly is not
    cut by it, and it starts again once the response is complete.
    """

    def test_slowAnswerNotCut(self):
        from twisted.web.server import NOT_DONE_YET

        pending = []

        class Slow(Resource):
            isLeaf = True

            def render_GET(self, request):
                pending.append(request)
                return NOT_DONE_YET

        self.client.site.local.add(LocalService(("/slow",), Slow(), name="slow"))
        keepalive = self.client.site.timeOut
        self.client.dataReceived(b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n")
        self.reactor.advance(keepalive * 3)
        self.assertFalse(self.transport.disconnecting)
        pending[0].write(b"late")
        pending[0].finish()
        self.assertIn(b"late", self.transport.value())
        self.reactor.advance(keepalive - 1)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        self.assertTrue(self.transport.disconnecting)

    def test_idleBetweenRequests(self):
        keepalive = self.client.site.timeOut
        self.client.dataReceived(HEALTH)
        self.reactor.advance(keepalive - 1)
        self.client.dataReceived(HEALTH)
        self.reactor.advance(keepalive - 1)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 2)


class HeaderValuesTests(SynchronousTestCase):
    """
    L{headerValues} reads what C{getRawHeaders} reads, by the canonical name.
    """

    def test_sameAsGetRawHeaders(self):
        from twisted.web.http_headers import Headers

        from protocols.http.channel import canonicalName, headerValues

        headers = Headers()
        headers.addRawHeader(b"x-anchormailbox", b"a@example.com")
        headers.addRawHeader(b"X-Casd-Proxy-TTL", b"3")
        headers.addRawHeader(b"Authorization", b"Basic x")
        headers.addRawHeader(b"authorization", b"Basic y")
        for name in (b"X-AnchorMailbox", b"X-Casd-Proxy-TTL", b"Authorization", b"Cookie"):
            self.assertEqual(
                headerValues(headers, canonicalName(name)), headers.getRawHeaders(name), name
            )
