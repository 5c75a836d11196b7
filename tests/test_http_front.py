"""
The HTTP front end's decisions: vdir matching, header filtering, status mapping, authentication
answers, the routing order, sites, health pages, the plain-HTTP redirect and the access log.
"""

from __future__ import annotations

import os
from base64 import b64encode

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from casd.auth import UserRecord
from casd.config import ConfigError, parseConfig
from casd.failures import (
    AuthenticationFailed,
    BackendUnavailable,
    DirectoryUnavailable,
    PolicyRefused,
    ProtocolViolation,
    Throttled,
)
from casd.session.clientinfo import ClientInfo
from casd.testing import connectFrontend, makeContext
from protocols.http import http
from protocols.http.headers import backendRequestHeaders, filterCookies
from protocols.http.routing import RouteCookies, anchorHeader, explicitMailbox, mayOpen
from protocols.http.status import BackendTimedOut, BadGateway, SiteRedirect, httpError
from protocols.http.vdir import VdirTable, VirtualDirectory, readVdirs
from tests.test_http_site import BASIC, CONFIG, HTTPSiteTestsMixin


class VdirTests(SynchronousTestCase):
    table = VdirTable(
        [
            VirtualDirectory(path="/EWS"),
            VirtualDirectory(path="/owa"),
            VirtualDirectory(path="/owa/calendar", caseInsensitive=False),
            VirtualDirectory(path="/Microsoft-Server-ActiveSync"),
        ]
    )

    def match(self, path):
        vdir = self.table.match(path)
        return vdir.path if vdir is not None else None

    def test_segments(self):
        """
        A prefix matches whole segments only; case is ignored unless the vdir says otherwise;
        the longest prefix wins; absolute-form targets match nothing.
        """
        self.assertEqual(self.match(b"/EWS"), "/EWS")
        self.assertEqual(self.match(b"/ews/Exchange.asmx"), "/EWS")
        self.assertEqual(self.match(b"/EWS?wsdl"), "/EWS")
        self.assertIsNone(self.match(b"/EWSx"))
        self.assertEqual(self.match(b"/owa/calendar/x"), "/owa/calendar")
        self.assertEqual(self.match(b"/OWA/Calendar/x"), "/owa")
        self.assertEqual(self.match(b"/microsoft-server-activesync?Cmd=Ping"), "/Microsoft-Server-ActiveSync")
        self.assertIsNone(self.match(b"http://evil/EWS"))
        self.assertIsNone(self.match(b"/"))

    def test_backendPath(self):
        """
        The vdir's prefix is replaced by C{backend_path}; the query is kept.
        """
        v = VirtualDirectory(path="/dav", backendPath="/SOGo/dav")
        self.assertEqual(v.backendPathFor(b"/dav/alice/Calendar?x=1"), b"/SOGo/dav/alice/Calendar?x=1")
        self.assertEqual(v.backendPathFor(b"/dav"), b"/SOGo/dav")
        self.assertEqual(v.backendPathFor(b"/dav?x"), b"/SOGo/dav?x")
        self.assertEqual(VirtualDirectory(path="/EWS").backendPathFor(b"/EWS/a"), b"/EWS/a")
        root = VirtualDirectory(path="/owa", backendPath="/")
        self.assertEqual(root.backendPathFor(b"/owa/x"), b"/x")

    def config(self, vdirs):
        text = '[http]\nenabled = true\n[[http.listen]]\nendpoint = "tcp:80"\ntls = "none"\n' + vdirs
        return parseConfig(text, "t.toml", [http])

    def test_invalid(self):
        """
        A vdir without a path, with an unknown method or twice the same path is refused at
        load with the key named.
        """
        for text, key in (
            ('[[http.vdir]]\npath = "EWS"\n', "http.vdir[0].path"),
            ('[[http.vdir]]\npath = "/EWS"\nauth = ["ntlm"]\n', "http.vdir[0].auth"),
            ('[[http.vdir]]\npath = "/a"\n[[http.vdir]]\npath = "/A"\n', "http.vdir[1].path"),
            ('[[http.vdir]]\npath = "/a"\nidentity = "master"\n', "http.vdir[0].master_user"),
            ('[[http.vdir]]\npath = "/a"\nauth = ["none"]\n', "http.vdir[0].backend"),
        ):
            config = self.config(text)
            e = self.assertRaises(ConfigError, readVdirs, "t.toml", config.protocols["http"].vdir)
            self.assertEqual(e.key, key)
        e = self.assertRaises(ConfigError, self.config, '[[http.vdir]]\npath = "/a"\nbogus = 1\n')
        self.assertEqual(e.key, "http.vdir[0].bogus")

    def test_unknownBackend(self):
        """
        A vdir naming a backend that is not configured stops start-up with the key named.
        """
        from casd.testing import makeContext

        context = makeContext(MemoryReactorClock(), config=CONFIG + 'backend = "nowhere"\n')
        section = context.config.protocols["http"]
        e = self.assertRaises(ConfigError, http.buildFactory, context, section, section.listeners[0])
        self.assertEqual(e.key, "http.vdir[0].backend")


def client(tls=True, peer="198.51.100.7"):
    return ClientInfo("sid1", "http", "l", peer, 4000, "127.0.0.1", 443, tls, False)


def asHeaders(pairs):
    """
    The C{(name, value)} pairs the proxy sends, as L{Headers} to look into.
    """
    headers = Headers()
    for name, value in pairs:
        headers.addRawHeader(name, value)
    return headers


class HeaderTests(SynchronousTestCase):
    def test_filtered(self):
        """
        Hop-by-hop headers (and those C{Connection} names), the client's forwarding and
        identity headers are dropped; casd's are set from the real client.
        """
        incoming = Headers(
            {
                b"Connection": [b"keep-alive, X-Secret-Hop"],
                b"X-Secret-Hop": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"Proxy-Authorization": [b"Basic eA=="],
                b"Upgrade": [b"h2c"],
                b"TE": [b"trailers, deflate"],
                b"X-Forwarded-For": [b"10.9.9.9"],
                b"Forwarded": [b"for=10.9.9.9"],
                b"X-Remote-User": [b"mallory"],
                b"x-webobjects-remote-user": [b"mallory"],
                b"X-Custom-Id": [b"mallory"],
                b"Authorization": [b"Basic eHg6eXk="],
                b"Accept": [b"text/html", b"*/*"],
            }
        )
        vdir = VirtualDirectory(path="/dav", identity="header", identityHeader=b"X-Custom-Id")
        user = UserRecord(login="alice", address="alice@example.com")
        out = asHeaders(backendRequestHeaders(incoming, vdir, client(), b"mail.example.com", user))
        names = {n.lower() for n, _ in out.getAllRawHeaders()}
        for gone in (b"connection", b"x-secret-hop", b"keep-alive", b"proxy-authorization", b"upgrade", b"authorization", b"x-remote-user", b"x-webobjects-remote-user"):
            self.assertNotIn(gone, names)
        self.assertEqual(out.getRawHeaders(b"X-Custom-Id"), [b"alice"])
        self.assertEqual(out.getRawHeaders(b"TE"), [b"trailers"])
        self.assertEqual(out.getRawHeaders(b"X-Forwarded-For"), [b"198.51.100.7"])
        self.assertEqual(out.getRawHeaders(b"X-Forwarded-Proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"X-Forwarded-Host"), [b"mail.example.com"])
        self.assertEqual(out.getRawHeaders(b"Forwarded"), [b"for=198.51.100.7;proto=https;host=mail.example.com"])
        self.assertEqual(out.getRawHeaders(b"Accept"), [b"text/html", b"*/*"])

    def test_passthroughAndMaster(self):
        """
        Pass-through keeps the client's C{Authorization}; master replaces it with the master
        credentials and names the user in the identity header; an IPv6 client is quoted in
        C{Forwarded}.
        """
        incoming = Headers({b"Authorization": [b"Basic eHg6eXk="]})
        out = asHeaders(backendRequestHeaders(incoming, VirtualDirectory(path="/EWS"), client(peer="2001:db8::1"), b"h"))
        self.assertEqual(out.getRawHeaders(b"Authorization"), [b"Basic eHg6eXk="])
        self.assertEqual(out.getRawHeaders(b"Forwarded"), [b'for="[2001:db8::1]";proto=https;host=h'])
        master = VirtualDirectory(path="/EWS", identity="master", masterUser="cas", masterPassword=b"pw")
        out = asHeaders(backendRequestHeaders(incoming, master, client(), b"h", UserRecord(login="alice")))
        self.assertEqual(out.getRawHeaders(b"Authorization"), [b"Basic " + b64encode(b"cas:pw")])
        self.assertEqual(out.getRawHeaders(b"X-Remote-User"), [b"alice"])

    def test_cookies(self):
        """
        casd's own cookies are removed from the C{Cookie} header; the backend's stay.
        """
        self.assertEqual(
            filterCookies(b"a=1; casd-route=xyz;b=2", lambda n: n != b"casd-route"), b"a=1; b=2"
        )


class StatusTests(SynchronousTestCase):
    def test_mapping(self):
        """
        401 only for credentials; directory and backend trouble 503 with Retry-After; 429, 502,
        504, 403; 451 with X-MS-Location; anything else 500 without details.
        """
        def code(exc):
            return httpError(exc).code

        self.assertEqual(code(AuthenticationFailed()), 401)
        self.assertIn(b"WWW-Authenticate", dict(httpError(AuthenticationFailed()).headers))
        for exc in (DirectoryUnavailable("ldap down"), BackendUnavailable("x")):
            error = httpError(exc)
            self.assertEqual(error.code, 503)
            self.assertEqual(dict(error.headers)[b"Retry-After"], b"30")
            self.assertNotIn(b"WWW-Authenticate", dict(error.headers))
            self.assertNotIn(b"ldap", error.body)
        self.assertEqual(code(Throttled()), 429)
        self.assertEqual(code(BadGateway()), 502)
        self.assertEqual(code(BackendTimedOut()), 504)
        self.assertEqual(code(PolicyRefused()), 403)
        self.assertEqual(code(ProtocolViolation()), 400)
        error = httpError(SiteRedirect(451, "https://b.example.com/Microsoft-Server-ActiveSync"))
        self.assertEqual(error.code, 451)
        self.assertEqual(
            dict(error.headers)[b"X-MS-Location"], b"https://b.example.com/Microsoft-Server-ActiveSync"
        )
        error = httpError(ValueError("secret detail"))
        self.assertEqual(error.code, 500)
        self.assertNotIn(b"secret", error.body)


class AuthTests(HTTPSiteTestsMixin, SynchronousTestCase):
    def setUp(self):
        from tests.support.certs import selfSigned

        cert, key = selfSigned(self.mktemp(), ["localhost"], "server")
        self.config = (
            f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
            + CONFIG.replace('tls = "none"\ntrusted = true', 'tls = "implicit"')
        )
        super().setUp()

    def get(self, authorization=None):
        head = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\n"
        if authorization is not None:
            head += b"Authorization: " + authorization + b"\r\n"
        self.request(head)
        self.reactor.advance(60)
        return self.transport.value()

    def test_badPassword(self):
        """
        A wrong password: 401 with the challenge, after the shared penalty's delay, and the
        penalty counts it against the address and the user as IMAP's would.
        """
        out = self.get(b"Basic " + b64encode(b"alice:wrong"))
        self.assertTrue(out.startswith(b"HTTP/1.1 401 "), out)
        self.assertIn(b"WWW-Authenticate: Basic", out)
        self.assertEqual(self.reactor.tcpClients, [])
        penalty = self.context.authenticator.penalty
        self.assertGreater(penalty.currentDelay(self.client.client), 0)

    def test_sharedWithIMAP(self):
        """
        Password guesses on /EWS lock the user out of IMAP too: one penalty for every protocol.
        """
        from casd.session.clientinfo import ClientInfo as Info

        self.config = self.config.replace("[routing]", "[auth]\nuser_lockout_threshold = 3\n\n[routing]", 1)
        super().setUp()
        for i in range(3):
            self.client, self.transport = connectFrontend(http, self.context, peer=(f"198.51.100.{i + 1}", 4000))
            self.get(b"Basic " + b64encode(f"alice:guess{i}".encode()))
            self.reactor.advance(120)
        imapClient = Info("s", "imap", "imap", "203.0.113.50", 5000, "127.0.0.1", 993, True, False)
        self.assertTrue(self.context.authenticator.penalty.locked("alice", imapClient))
        # And the locked-out user gets 429 on HTTP with the right password: not a 401.
        self.client, self.transport = connectFrontend(http, self.context, peer=("203.0.113.51", 4000))
        self.assertTrue(self.get(BASIC).startswith(b"HTTP/1.1 429 "))

    def test_badBase64(self):
        """
        Undecodable Basic credentials are refused credentials (401), not a crash.
        """
        for value in (b"Basic !!!", b"Basic " + b64encode(b"nocolon"), b"Basic " + b64encode(b"\xff:\xfe")):
            self.setUp()
            self.assertTrue(self.get(value).startswith(b"HTTP/1.1 401 "), value)

    def test_otherScheme(self):
        """
        A scheme casd does not know (Negotiate) is no credentials: the challenge.
        """
        self.assertTrue(self.get(b"Negotiate YIIx").startswith(b"HTTP/1.1 401 "))

    def test_directoryDown(self):
        """
        The directory down: 503 with Retry-After, never 401.
        """
        self.context.directory.error = DirectoryUnavailable("ldap gone")
        out = self.get(BASIC)
        self.assertTrue(out.startswith(b"HTTP/1.1 503 "), out)
        self.assertIn(b"Retry-After", out)
        self.assertNotIn(b"WWW-Authenticate", out)

    def test_lockedOut(self):
        """
        Past the penalty's lockout: 429, not 401.
        """
        penalty = self.context.authenticator.penalty
        penalty.locked = lambda user, client: "locked out"
        out = self.get(BASIC)
        self.assertTrue(out.startswith(b"HTTP/1.1 429 "), out)


class PlainCONFIGTests(SynchronousTestCase):
    def test_basicNeedsTLS(self):
        """
        On a plain listener that serves (behind a TLS-terminating balancer), Basic credentials
        from an untrusted client are refused (403), never checked.
        """
        reactor = MemoryReactorClock()
        context = makeContext(reactor, users={"alice": "secret"}, config=CONFIG.replace("trusted = true", "trusted = false"))
        proto, transport = connectFrontend(http, context, peer=("203.0.113.9", 5000))
        proto.dataReceived(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n\r\n")
        reactor.advance(5)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "), transport.value())
        self.assertEqual(context.directory.checks, 0)


REDIRECT_CONFIG = """
[server]
hostname = "cas1.example.com"

[routing]
default_backend = "web"

[backends.web]
host = "127.0.0.1"
[backends.web.http]
port = 8080

[http]
enabled = true
https_port = 8443

[[http.listen]]
endpoint = "tcp:8081"
tls = "none"

[[http.vdir]]
path = "/owa"
backend = "web"
"""


class RedirectTests(HTTPSiteTestsMixin, SynchronousTestCase):
    config = REDIRECT_CONFIG

    def test_redirect(self):
        """
        A plain listener sends everything to https with 301, the path and query kept.
        """
        self.request(b"GET /owa/?a=b HTTP/1.1\r\nHost: mail.example.com\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 301 "), out)
        self.assertIn(b"Location: https://mail.example.com:8443/owa/?a=b\r\n", out)

    def test_badHost(self):
        """
        A Host header that is not a host name does not end up in the Location.
        """
        self.request(b"GET /owa/ HTTP/1.1\r\nHost: evil.example/x\r\n")
        self.assertIn(b"Location: https://cas1.example.com:8443/owa/\r\n", self.transport.value())

    def test_healthOnPlain(self):
        """
        Health pages are answered on the plain listener too (load balancers probe there).
        """
        self.request(b"GET /owa/healthcheck.htm HTTP/1.1\r\nHost: h\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertTrue(out.endswith(b"200 OK\ncas1.example.com\n"), out)


class HealthTests(HTTPSiteTestsMixin, SynchronousTestCase):
    config = REDIRECT_CONFIG.replace('[http]\nenabled = true', '[http]\nenabled = true\nplain_http = "serve"')

    def get(self, path):
        self.setUp()
        self.request(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n")
        return self.transport.value()

    def test_healthy(self):
        """
        Anonymous GET of a vdir's healthcheck.htm (any case): 200, "200 OK" and the name.
        """
        for path in (b"/owa/healthcheck.htm", b"/OWA/HealthCheck.htm", b"/healthcheck.htm"):
            out = self.get(path)
            self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
            self.assertIn(b"200 OK\ncas1.example.com\n", out)
        self.assertEqual(self.context.directory.checks, 0)

    def test_noHealthyBackend(self):
        """
        The vdir's backend draining (or DOWN): 503.
        """
        self.setUp()
        self.context.connector.setDraining({"web"})
        self.request(b"GET /owa/healthcheck.htm HTTP/1.1\r\nHost: h\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 503 "))

    def test_nodeDraining(self):
        """
        While the node drains (SIGUSR1, C{[server] drain}), the health pages are 503.
        """
        self.setUp()
        self.context.node.drain("SIGUSR1")
        self.request(b"GET /owa/healthcheck.htm HTTP/1.1\r\nHost: h\r\n")
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 503 "), out)


SITES_CONFIG = """
[server]
hostname = "cas1.example.com"
site = "east"

[routing]
default_backend = "web1"

[backends.web1]
host = "127.0.0.1"
site = "east"
[backends.web1.http]
port = 8001

[backends.shared1]
host = "127.0.0.3"
site = "east"
[backends.shared1.http]
port = 8003

[backends.westcas]
host = "127.0.0.9"
site = "west"
[backends.westcas.http]
port = 8443
tls = "none"

[sites.west]
action = "proxy"
cas = "westcas"

[sites.north]
action = "redirect"
redirect_url = "https://north.example.com"

[http]
enabled = true
plain_http = "serve"

[[http.listen]]
endpoint = "tcp:8081"
tls = "none"
trusted = true

[[http.vdir]]
path = "/owa"

[[http.vdir]]
path = "/Microsoft-Server-ActiveSync"
site_redirect = "451"

[[http.vdir]]
path = "/EWS"

[[http.vdir]]
path = "/dav"
identity = "header"
backend_path = "/SOGo/dav"
"""

USERS = {
    "alice": ("secret", UserRecord(
        login="alice", address="alice@example.com",
        policy=[("mailbox_access", "shared@example.com")],
    )),
    "shared": ("unused", UserRecord(login="shared", address="shared@example.com", mailHost="shared1")),
    "boss": ("x", UserRecord(login="boss", address="boss@example.com", mailHost="shared1")),
    "wendy": ("secret", UserRecord(login="wendy", address="wendy@example.com", site="west")),
    "nora": ("secret", UserRecord(login="nora", address="nora@example.com", site="north")),
}


def basic(user, password="secret"):
    return b"Basic " + b64encode(f"{user}:{password}".encode())


class RoutingTests(HTTPSiteTestsMixin, SynchronousTestCase):
    config = SITES_CONFIG
    users = USERS

    def setUp(self):
        super().setUp()
        self.lookups = []
        directory = self.context.directory
        original = directory.lookup

        def lookup(name):
            self.lookups.append(name)
            return original(name)

        directory.lookup = lookup

    def send(self, head):
        self.request(head + b"\r\n")
        return self.reactor.tcpClients[-1][:2] if self.reactor.tcpClients else None

    def test_ownMailbox(self):
        """
        Without an anchor the router decides (the default backend).
        """
        self.assertEqual(self.send(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice")), ("127.0.0.1", 8001))

    def test_backendPathKeepAlive(self):
        """
        The backend path of a keep-alive connection's requests: the same target again, then
        another, each with the vdir's C{backend_path} (the connection remembers the last).
        """
        from casd.testing import acceptBackend

        auth = b"\r\nAuthorization: " + basic("alice") + b"\r\n\r\n"
        sent = []
        accepted = 0
        for target in (b"/dav/alice/x?a=1", b"/dav/alice/x?a=1", b"/DAV/alice/y", b"/EWS/z"):
            self.client.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: h" + auth)
            self.reactor.advance(0)
            if len(self.reactor.tcpClients) > accepted:
                # A new backend connection (else the pooled one is reused).
                accepted = len(self.reactor.tcpClients)
                server, backend = acceptBackend(self.reactor, -1)
            sent.append(backend.value().split(b"\r\n", 1)[0])
            backend.clear()
            server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(
            sent,
            [
                b"GET /SOGo/dav/alice/x?a=1 HTTP/1.1",
                b"GET /SOGo/dav/alice/x?a=1 HTTP/1.1",
                b"GET /SOGo/dav/alice/y HTTP/1.1",
                b"GET /EWS/z HTTP/1.1",
            ],
        )
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 204 "), 4)

    def test_routeRememberedByConnection(self):
        """
        A connection's next request asking the same (user, target, anchor) takes the last
        request's own route without asking the router; an anchor, another user or the end of
        the router's cache time asks it again.
        """
        from casd.testing import acceptBackend

        router = self.client.site.router
        asked = []
        route = router.route
        router.route = lambda request, *a: asked.append(request.uri) or route(request, *a)
        routed = []
        servers = {}
        accepted = 0

        def get(head):
            # One pooled backend connection per address, each answering 204.
            nonlocal accepted
            sent = [len(server[1].value()) for server in servers.values()]
            self.client.dataReceived(head + b"\r\n\r\n")
            self.reactor.advance(0)
            if len(self.reactor.tcpClients) > accepted:
                accepted = len(self.reactor.tcpClients)
                servers[self.reactor.tcpClients[-1][:2]] = acceptBackend(self.reactor, -1)
            for (address, (server, backend)), before in zip(servers.items(), sent + [0]):
                if len(backend.value()) > before:
                    routed.append(address)
                    server.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")

        own = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice")
        get(own)
        get(own)
        self.assertEqual(asked, [b"/EWS/x"])
        get(own + b"\r\nX-AnchorMailbox: SMTP:shared@example.com")
        self.assertEqual(len(asked), 2)
        self.assertEqual(routed[-1], ("127.0.0.3", 8003))
        get(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("boss", "x"))
        self.assertEqual(len(asked), 3)
        self.assertEqual(routed[-1], ("127.0.0.3", 8003))
        get(own)
        get(own)
        self.assertEqual(len(asked), 4)
        self.reactor.advance(router.cacheTTL + 1)
        get(own)
        self.assertEqual(len(asked), 5)
        self.assertEqual(routed[:2] + routed[4:], [("127.0.0.1", 8001)] * 5)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 204 "), 7)

    def test_anchorHeader(self):
        """
        X-AnchorMailbox of a mailbox the user may open routes to that mailbox's server.
        """
        head = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice")
        self.assertEqual(self.send(head + b"\r\nX-AnchorMailbox: SMTP:shared@example.com"), ("127.0.0.3", 8003))
        self.assertEqual(self.lookups, ["shared@example.com"])

    def test_anchorNotAllowed(self):
        """
        An anchor the user may not open is ignored: the user's own route.
        """
        head = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice")
        self.assertEqual(self.send(head + b"\r\nX-AnchorMailbox: boss@example.com"), ("127.0.0.1", 8001))
        self.assertEqual(self.lookups, [])

    def test_explicitPath(self):
        """
        An explicit logon path wins over the header.
        """
        head = b"GET /owa/shared@example.com/ HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice")
        self.assertEqual(self.send(head + b"\r\nX-AnchorMailbox: alice@example.com"), ("127.0.0.3", 8003))

    def test_routingCookie(self):
        """
        The routing cookie set after an anchor look-up saves the next look-up; it only counts
        for the user it was issued to, and a forged one is ignored.
        """
        head = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice") + b"\r\nX-AnchorMailbox: shared@example.com"
        self.send(head)
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        out = self.transport.value()
        cookie = out.split(b"Set-Cookie: casd-route=")[1].split(b";")[0]
        self.assertIn(b"; Secure; HttpOnly", out)
        self.assertNotIn(b"casd-route", backend.value())
        self.lookups.clear()
        self.setUp()
        cookies = self.client.site.router.cookies
        user = "alice"
        self.assertEqual(cookies.open(user, cookies.seal(user, "shared@example.com", "shared1")), ("shared@example.com", "shared1"))
        self.assertIsNone(cookies.open("mallory", cookies.seal(user, "shared@example.com", "shared1")))
        sealed = cookies.seal(user, "shared@example.com", "shared1")
        self.assertIsNone(cookies.open(user, sealed[:-2] + b"AA"))
        self.assertEqual(
            self.send(head + b"\r\nCookie: casd-route=" + sealed), ("127.0.0.3", 8003)
        )
        self.assertEqual(self.lookups, [])
        self.assertTrue(cookie)

    def test_routeRemembered(self):
        """
        A user's own route is remembered for C{cacheTTL} seconds, and forgotten when the
        configuration is reloaded.
        """
        router = self.context.router
        calls = []
        locate = router.locate
        router.locate = lambda *a, **k: calls.append(a) or locate(*a, **k)
        head = b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("alice") + b"\r\n\r\n"

        def send():
            # A new connection each time (the site's router, and its memory, are shared).
            client, transport = connectFrontend(http, self.context)
            client.dataReceived(head)
            self.reactor.advance(0)

        send()
        send()
        self.assertEqual(len(calls), 1)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(31)
        send()
        self.assertEqual(len(calls), 2)
        router.reconfigure(parseConfig(SITES_CONFIG, "t.toml", [http]))
        send()
        self.assertEqual(len(calls), 3)

    def test_cookieExpires(self):
        now = [1000.0]
        cookies = RouteCookies([b"k" * 32], lifetime=60, clock=lambda: now[0])
        sealed = cookies.seal("alice", "a@b", "s")
        now[0] += 61
        self.assertIsNone(cookies.open("alice", sealed))

    def test_otherSiteProxied(self):
        """
        A user of a site that says proxy goes to that site's casd.
        """
        self.assertEqual(self.send(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("wendy")), ("127.0.0.9", 8443))

    def test_proxyTTL(self):
        """
        A request proxied to another site's casd carries the hops left; a trusted casd's count
        is continued, and a spent one is refused (503): proxies looping between sites stop.
        """
        self.send(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("wendy"))
        server, backend = self.backend()
        sent = backend.value().lower()
        self.assertIn(b"x-casd-proxy-ttl: 4\r\n", sent)
        # The far casd authenticates again: the client's credentials, the client's path.
        self.assertIn(b"authorization: " + basic("wendy").lower(), sent)
        self.assertTrue(sent.startswith(b"get /ews/x http/1.1"))
        self.setUp()
        self.send(b"GET /dav/wendy/ HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("wendy"))
        server, backend = self.backend()
        sent = backend.value().lower()
        self.assertTrue(sent.startswith(b"get /dav/wendy/ http/1.1"), sent)
        self.assertIn(b"authorization: " + basic("wendy").lower(), sent)
        self.assertNotIn(b"x-remote-user", sent)
        self.setUp()
        self.send(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nX-Casd-Proxy-TTL: 3\r\nAuthorization: " + basic("wendy"))
        server, backend = self.backend()
        self.assertIn(b"x-casd-proxy-ttl: 2\r\n", backend.value().lower())
        self.setUp()
        self.send(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nX-Casd-Proxy-TTL: 1\r\nAuthorization: " + basic("wendy"))
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 503 "), self.transport.value())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_otherSiteRedirected(self):
        """
        A user of a site that says redirect: /owa gets 302 to that site's URL with the path;
        ActiveSync gets 451 with X-MS-Location.
        """
        self.send(b"GET /owa/?ae=Folder HTTP/1.1\r\nHost: h\r\nAuthorization: " + basic("nora"))
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 302 "), out)
        self.assertIn(b"Location: https://north.example.com/owa/?ae=Folder\r\n", out)
        self.setUp()
        self.send(b"POST /Microsoft-Server-ActiveSync?Cmd=Sync HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\nAuthorization: " + basic("nora"))
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 451 "), out)
        self.assertIn(b"x-ms-location: https://north.example.com/microsoft-server-activesync\r\n", out.lower())
        self.assertEqual(self.reactor.tcpClients, [])


class AnchorUnitTests(SynchronousTestCase):
    def test_explicit(self):
        v = VirtualDirectory(path="/owa")
        self.assertEqual(explicitMailbox(v, b"/owa/Shared%40Example.com/?x"), "shared@example.com")
        self.assertEqual(explicitMailbox(v, b"/owa/?x"), "")
        self.assertEqual(explicitMailbox(v, b"/owa/%ff@x/"), "")

    def test_anchorHeader(self):
        def anchor(*values):
            from twisted.web.test.requesthelper import DummyRequest

            request = DummyRequest([b""])
            for v in values:
                request.requestHeaders.addRawHeader(b"X-AnchorMailbox", v)
            return anchorHeader(request)

        self.assertEqual(anchor(b"SMTP:Shared@Example.com"), "shared@example.com")
        self.assertEqual(anchor(b"a@b", b"c@d"), "")
        self.assertEqual(anchor(b"nobody"), "")
        self.assertEqual(anchor(b"\xff@x"), "")

    def test_mayOpen(self):
        alice = UserRecord(login="alice", address="alice@example.com", policy=[("mailbox_access", "a@x.com, @team.example.com")])
        self.assertTrue(mayOpen(alice, "ALICE@example.com"))
        self.assertTrue(mayOpen(alice, "a@x.com"))
        self.assertTrue(mayOpen(alice, "anyone@team.example.com"))
        self.assertFalse(mayOpen(alice, "boss@example.com"))


class AccessLogTests(HTTPSiteTestsMixin, SynchronousTestCase):
    def test_line(self):
        """
        One line per request with vdir, client, user, backend, status, bytes and session; no
        Authorization value, cookie or password.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.request(
            b"POST /EWS/x?token=abc HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nCookie: session=sekrit\r\nContent-Length: 3\r\n",
            b"abc",
        )
        server, backend = self.backend()
        server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        lines = [e for e in events if e.get("log_namespace") == "casd.http.access"]
        self.assertEqual(len(lines), 1)
        line = lines[0]["line"]
        for part in ("vdir=/EWS", "user=alice", "backend=web(127.0.0.1:8080)", "status=200", "in=3", "out=2", f"session={self.client.client.sessionId}", "path=/EWS/x "):
            self.assertIn(part, line)
        everything = repr(events)
        for secret in ("secret", "sekrit", BASIC.decode()[6:], "token=abc"):
            self.assertNotIn(secret, everything)


class LocalServiceTests(HTTPSiteTestsMixin, SynchronousTestCase):
    """
    The local-service seam (Autodiscover, the logon page): answered before the vdirs, with the
    body read, authenticated when asked.
    """

    def setUp(self):
        super().setUp()
        from twisted.web.resource import Resource

        from protocols.http.local import LocalService

        seen = self.seen = []

        class Echo(Resource):
            isLeaf = True

            def render_POST(self, request):
                seen.append((request.content.read(), request.prepath, request.postpath, request.user))
                request.setHeader(b"Content-Type", b"text/xml")
                return b"<ok/>"

            render_GET = render_POST

        self.client.site.local.add(
            LocalService(("/echo/service.xml",), Echo(), needsAuth=True, maxBodySize=100, name="echo")
        )
        self.client.site.local.add(LocalService(("/public/",), Echo(), name="public"))

    def test_authenticatedPost(self):
        """
        A POST to an authenticated local service: the body is read, the user is set, the
        resource answers; no backend.
        """
        self.request(
            b"POST /Echo/Service.xml HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 7\r\n",
            b"<x>1</x>"[:7],
        )
        out = self.transport.value()
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out)
        self.assertTrue(out.endswith(b"<ok/>"))
        body, prepath, postpath, user = self.seen[0]
        self.assertEqual(body, b"<x>1</x")
        self.assertEqual(user.login, "alice")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_unauthenticated(self):
        """
        Without credentials: the challenge, the resource not called.
        """
        self.request(b"POST /echo/service.xml HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n", b"x")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 401 "))
        self.assertEqual(self.seen, [])

    def test_tooLarge(self):
        """
        A body over the service's limit: 413, the resource not called.
        """
        self.request(
            b"POST /echo/service.xml HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nContent-Length: 1000\r\n",
            b"x" * 1000,
        )
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(self.seen, [])

    def test_anonymousPrefix(self):
        """
        An anonymous service under a prefix: prepath and postpath split around it.
        """
        self.request(b"GET /public/a/b HTTP/1.1\r\nHost: h\r\n")
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 200 "), self.transport.value())
        body, prepath, postpath, user = self.seen[0]
        self.assertEqual((prepath, postpath, user), ([b"public"], [b"a", b"b"], None))


class ForwardedTests(HTTPSiteTestsMixin, SynchronousTestCase):
    def forwarded(self, peer):
        self.client, self.transport = connectFrontend(http, self.context, peer=(peer, 4000))
        self.request(
            b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nX-Forwarded-For: 10.9.9.9, 198.51.100.20\r\nX-Forwarded-Proto: https\r\n"
        )
        server, backend = self.backend()
        return backend.value()

    def test_trustedBalancer(self):
        """
        Behind a trusted balancer that terminated TLS, the address it reports (the last of
        X-Forwarded-For) is the client, and the scheme it reports is kept.
        """
        sent = self.forwarded("127.0.0.1")
        self.assertIn(b"X-Forwarded-For: 198.51.100.20\r\n", sent)
        self.assertIn(b"X-Forwarded-Proto: https\r\n", sent)

    def test_untrusted(self):
        """
        An untrusted client's forwarding headers are ignored.
        """
        from tests.support.certs import selfSigned

        cert, key = selfSigned(self.mktemp(), ["localhost"], "server")
        self.config = (
            f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
            + CONFIG.replace('tls = "none"\ntrusted = true', 'tls = "implicit"')
        )
        self.setUp()
        sent = self.forwarded("203.0.113.9")
        self.assertIn(b"X-Forwarded-For: 203.0.113.9\r\n", sent)
        self.assertNotIn(b"198.51.100.20", sent)
