"""
What a keep-alive connection remembers of its last request's head
(L{protocols.http.channel.ProxyChannel._sectionMemo}, L{protocols.http.site.HTTPSite._attempt}'s
C{_fieldsMemo}): the same header section is not parsed again and gives the same backend fields,
while anything that differs (the section, the credentials, the request line, the vdir) is
read anew and checked as before.  The credential cache's expiry, a cleared cache, a changed
password and a lock-out during a connection are C{tests.test_http_basicmemo}'s, whose requests
repeat one head and so go through these memos.
"""

from __future__ import annotations

from base64 import b64encode

from twisted.trial.unittest import SynchronousTestCase

from tests.test_http_site import BASIC, CONFIG, HTTPSiteTestsMixin

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BOB = b"Basic " + b64encode(b"bob:hunter2")
SECTION = b"Host: h\r\nUser-Agent: a/1\r\nAuthorization: " + BASIC + b"\r\n"

TWO_VDIRS = CONFIG + """
[[http.vdir]]
path = "/Other"
identity = "header"
identity_header = "X-Other-User"
"""


class SameSectionTests(HTTPSiteTestsMixin, SynchronousTestCase):
    users = {"alice": "secret", "bob": "hunter2"}
    config = TWO_VDIRS

    def sent(self, head: bytes, body: bytes = b"") -> bytes:
        """
        Send one request, answer it, and return what the backend got for it.
        """
        before = len(self.reactor.tcpClients)
        self.request(head, body)
        if before == 0:
            self.server, self.backendTransport = self.backend()
        got = self.backendTransport.value()
        self.backendTransport.clear()
        self.server.dataReceived(OK)
        self.reactor.advance(0)
        return got

    def test_sameSectionSameFields(self):
        """
        A second request with the same header section takes the first one's parsed table (a
        copy of its own) and backend fields; its new request line is read.
        """
        first = self.sent(b"GET /EWS/a HTTP/1.1\r\n" + SECTION)
        second = self.sent(b"GET /EWS/b?x=1 HTTP/1.1\r\n" + SECTION)
        self.assertTrue(first.startswith(b"GET /EWS/a HTTP/1.1\r\n"), first)
        self.assertTrue(second.startswith(b"GET /EWS/b?x=1 HTTP/1.1\r\n"), second)
        self.assertEqual(first.split(b"\r\n", 1)[1], second.split(b"\r\n", 1)[1])
        self.assertIn(b"X-Remote-User: alice\r\n", second)
        self.assertIn(b"User-Agent: a/1\r\n", second)
        self.assertNotIn(b"Authorization", second)
        memo = self.client._sectionMemo
        self.assertEqual(memo[0], SECTION[:-2])
        self.assertIsNotNone(self.client._fieldsMemo)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_sameRequestLine(self):
        """
        The same request line again is taken from the connection's memo: the same method,
        target and path (without the query) as parsed the first time.
        """
        for _ in range(2):
            self.request(b"PUT /EWS/a?q=1 HTTP/1.1\r\n" + SECTION + b"X-N: 1\r\n")
            if not hasattr(self, "server"):
                self.server, self.backendTransport = self.backend()
            request = self.client.requests[-1]
            self.assertEqual((request.method, request.uri, request.path), (b"PUT", b"/EWS/a?q=1", b"/EWS/a"))
            self.assertTrue(self.backendTransport.value().startswith(b"PUT /EWS/a?q=1 HTTP/1.1\r\n"))
            self.backendTransport.clear()
            self.server.dataReceived(OK)
        self.assertEqual(self.client._lineMemo[0], b"PUT /EWS/a?q=1 HTTP/1.1")

    def test_tablesNotShared(self):
        """
        Each request gets its own header table (the remembered one is not the request's).
        """
        self.request(b"GET /EWS/a HTTP/1.1\r\n" + SECTION)
        self.server, self.backendTransport = self.backend()
        first = self.client.requests[-1]
        self.server.dataReceived(OK)
        self.request(b"GET /EWS/a HTTP/1.1\r\n" + SECTION)
        second = self.client.requests[-1]
        self.assertIsNot(first, second)
        raw1, raw2 = first.requestHeaders._rawHeaders, second.requestHeaders._rawHeaders
        self.assertEqual(raw1, raw2)
        self.assertIsNot(raw2, raw1)
        self.assertIsNot(raw2, self.client._sectionMemo[1])

    def test_otherCredentialsReadAnew(self):
        """
        Other credentials make another section: parsed and authenticated again, the other
        user named to the backend; wrong ones after good ones get 401.
        """
        self.sent(b"GET /EWS/a HTTP/1.1\r\n" + SECTION)
        bob = self.sent(b"GET /EWS/a HTTP/1.1\r\nHost: h\r\nUser-Agent: a/1\r\nAuthorization: " + BOB + b"\r\n")
        self.assertIn(b"X-Remote-User: bob\r\n", bob)
        self.assertNotIn(b"alice", bob)
        self.transport.clear()
        wrong = b"Basic " + b64encode(b"alice:wrong")
        self.request(b"GET /EWS/a HTTP/1.1\r\nHost: h\r\nUser-Agent: a/1\r\nAuthorization: " + wrong + b"\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 401 "), self.transport.value())

    def test_otherVdirOtherFields(self):
        """
        The same section for another vdir: that vdir's identity header, not the last one's.
        """
        ews = self.sent(b"GET /EWS/a HTTP/1.1\r\n" + SECTION)
        other = self.sent(b"GET /Other/a HTTP/1.1\r\n" + SECTION)
        self.assertIn(b"X-Remote-User: alice\r\n", ews)
        self.assertIn(b"X-Other-User: alice\r\n", other)
        self.assertNotIn(b"X-Remote-User", other)

    def test_requestLineStillChecked(self):
        """
        A remembered section does not spare the new request line its checks: a bare CR in it
        is refused with 400 and nothing reaches the backend.
        """
        self.sent(b"GET /EWS/a HTTP/1.1\r\n" + SECTION)
        self.transport.clear()
        self.request(b"GET /EWS/\rb HTTP/1.1\r\n" + SECTION)
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        self.assertEqual(self.backendTransport.value(), b"")
        self.assertTrue(self.transport.disconnecting)

    def test_badRequestLineAfterMemo(self):
        """
        A malformed request line (leading blank) with a remembered section: 400.
        """
        self.sent(b"GET /EWS/a HTTP/1.1\r\n" + SECTION)
        self.transport.clear()
        self.request(b" GET /EWS/a HTTP/1.1\r\n" + SECTION)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 "), self.transport.value())

    def test_framedSectionNotRemembered(self):
        """
        A section with a framing field (Content-Length, Transfer-Encoding) is parsed every
        time: two POSTs with the same head each deliver their own body, and a smuggling
        attempt after them is still refused.
        """
        head = b"POST /EWS/a HTTP/1.1\r\n" + SECTION + b"Content-Length: 3\r\n"
        first = self.sent(head, b"abc")
        self.assertIsNone(self.client._sectionMemo)
        second = self.sent(head, b"xyz")
        self.assertTrue(first.endswith(b"\r\n\r\nabc"), first)
        self.assertTrue(second.endswith(b"\r\n\r\nxyz"), second)
        self.transport.clear()
        self.request(head + b"Transfer-Encoding: chunked\r\n", b"abc")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 400 "), self.transport.value())
        self.assertEqual(self.backendTransport.value(), b"")

    def test_forwardedClientPerSection(self):
        """
        A trusted balancer's C{X-Forwarded-For}: the same section names the same real client
        again, another section its own.
        """
        xff = b"GET /EWS/a HTTP/1.1\r\n" + SECTION + b"X-Forwarded-For: 192.0.2.7\r\n"
        for _ in range(2):
            self.assertIn(b"X-Forwarded-For: 192.0.2.7\r\n", self.sent(xff))
        other = self.sent(xff.replace(b"192.0.2.7", b"192.0.2.8"))
        self.assertIn(b"X-Forwarded-For: 192.0.2.8\r\n", other)
        self.assertNotIn(b"192.0.2.7", other)
        self.assertIn(b"X-Forwarded-For: 127.0.0.1\r\n", self.sent(b"GET /EWS/a HTTP/1.1\r\n" + SECTION))


class RememberedMembersTests(HTTPSiteTestsMixin, SynchronousTestCase):
    """
    The route's pool members remembered by a keep-alive connection
    (L{protocols.http.site.HTTPSite._availableFor}): their health and draining still decide
    every request.
    """

    from tests.test_http_site import GROUP_CONFIG as config

    def get(self) -> None:
        self.request(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")

    def test_memberDownMeanwhile(self):
        """
        After a request through the first member, that member going DOWN sends the
        connection's next request to the second; both DOWN or draining: 503.
        """
        self.get()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("127.0.0.1", 8001))
        server, backend = self.backend(0)
        server.dataReceived(OK)
        self.assertIsNotNone(self.client._membersMemo)
        members = self.context.connector.members
        first = members[("127.0.0.1", 8001)]
        self.assertEqual(first.state, "UP")
        first._goDown("test")
        self.get()
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("127.0.0.2", 8002))
        server2, backend2 = self.backend(-1)
        server2.dataReceived(OK)
        self.context.connector.setDraining({"web2"})
        self.transport.clear()
        self.get()
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 503 "), self.transport.value())

    def test_successCounted(self):
        """
        A response through a remembered member still counts as its passive success.
        """
        self.get()
        server, backend = self.backend(0)
        server.dataReceived(OK)
        member = self.context.connector.members[("127.0.0.1", 8001)]
        member._passiveBad = 1
        self.get()
        server.dataReceived(OK)
        self.assertEqual(member._passiveBad, 0)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 2)

    def test_silenceTimerMovedEarlier(self):
        """
        The connection's silence timer, left by a long-poll vdir's request (3660 s), is moved
        earlier for the next request to a vdir with a shorter timeout (60 s): that one gets its
        504 after 60 s.
        """
        self.request(b"GET /Microsoft-Server-ActiveSync/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n")
        server, backend = self.backend(0)
        server.dataReceived(OK)
        timer = self.client._silence
        self.assertGreater(timer.getTime(), 3000)
        self.transport.clear()
        self.get()
        self.reactor.advance(59)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(2)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 504 "), self.transport.value())

    def test_silenceTimerLeftForLater(self):
        """
        A timer due before the next request's deadline is left as it is and, when it fires
        during that request, set again for the rest: the 504 comes 60 s after the request's
        start, not at the timer's first due time.
        """
        self.get()
        server, backend = self.backend(0)
        server.dataReceived(OK)
        self.reactor.advance(30)
        self.transport.clear()
        self.get()
        self.reactor.advance(31)
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNotNone(self.client._silence)
        self.reactor.advance(28)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(2)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 504 "), self.transport.value())
