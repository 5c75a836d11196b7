# -*- test-case-name: tests.test_http_site,tests.test_http_front -*-
"""
The HTTP front end: virtual directories (C{/owa}, C{/EWS}, C{/Microsoft-Server-ActiveSync}, C{/dav},
...) authenticated once through the core's portal, routed per user and proxied through casd's own
pooled, streaming HTTP/1.1 client (L{upstream}); local services (health pages, Autodiscover) answered by
casd itself.

The modules: L{vdir} (the C{[[http.vdir]]} tables and matching), L{auth} (Basic, and the seam
for other methods), L{local} (local services), L{status} (failures as HTTP responses),
L{routing} (the routing order), L{headers} (what crosses the proxy), L{upstream} (the pooled
backend client), L{proxy} (request body streaming) and L{site} (the listener's factory).  See C{docs/protocols/http.md}.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.plugin import IPlugin

from casd.keyfiles import keyLines
from casd.nodesecret import ROUTE_COOKIE_KEY, derivedKey
from casd.config import ConfigError, Setting
from casd.interfaces import ICASProtocol
from casd.pool.health import HealthProbe
from protocols.http.clientcert import CERT_SETTINGS
from protocols.http.forms import FORMS_SETTINGS
from protocols.http.vdir import VDIR_SETTINGS


def _readKeys(path: str) -> tuple[bytes, ...]:
    if not path:
        return ()
    keys = tuple(bytes.fromhex(line) for _, line in keyLines(path, ValueError))
    if not keys or any(len(k) < 16 for k in keys):
        raise ValueError("expected lines of at least 32 hexadecimal digits")
    return keys


class _Shared:
    """
    What every listener of one process shares: the backend connection pool, the authenticator, the
    routing cookies.  Built on first use for a context.
    """

    def __init__(self, context, section, descriptor) -> None:
        from protocols.http.auth import BasicCredentials, HTTPAuthenticator
        from protocols.http.upstream import UpstreamPool
        from protocols.http.routing import RequestRouter, RouteCookies
        from protocols.http.vdir import readVdirs

        config = context.config
        self.vdirs = readVdirs(config.path, section.vdir)
        for i, vdir in enumerate(self.vdirs.vdirs):
            if vdir.backend and vdir.backend not in config.groups and vdir.backend not in config.backends:
                raise ConfigError(
                    config.path,
                    f"http.vdir[{i}].backend",
                    f"expected a [backends.NAME] or [groups.NAME], {vdir.backend!r} is neither",
                )
        try:
            keys = _readKeys(section.route_cookie_key_file)
        except (OSError, ValueError) as e:
            raise ConfigError(config.path, "http.route_cookie_key_file", str(e)) from None
        if not keys:
            # Under --workers N, the node's key (casd.nodesecret); alone, RouteCookies' random one.
            nodeKey = derivedKey(ROUTE_COOKIE_KEY)
            keys = () if nodeKey is None else (nodeKey,)
        self.cookies = RouteCookies(keys, clock=context.reactor.seconds)
        self.authenticator = HTTPAuthenticator([BasicCredentials(context.authenticator)])
        self.upstream = UpstreamPool(
            context.reactor,
            context.connector,
            maxConnections=section.backend_connections,
            maxIdle=section.backend_idle_connections,
        )
        self.router = RequestRouter(context, descriptor, self.cookies)


@implementer(IPlugin, ICASProtocol)
class HTTPProtocol:
    """
    The descriptor of casd's HTTP front end.
    """

    name = "http"
    description = (
        "HTTP front end: virtual directories authenticated once, routed per user and proxied"
        " (Outlook on the web, EWS, ActiveSync, MAPI, CalDAV/CardDAV, webmail)"
    )
    defaultListeners = ({"endpoint": "tcp:443", "tls": "implicit"},)
    defaultBackendPort = 80
    defaultBackendTLS = "none"
    #: Only HTTP/1.1 is offered in ALPN: Twisted's HTTP/2 cuts idle streams at the site
    #: timeout, which would end long polls (ActiveSync Ping, RPC channels).
    alpnProtocols = ("http/1.1",)
    def tlsClientCAFile(self, section) -> str:
        """
        Client certificates are asked for on the TLS listeners when a vdir accepts C{cert}
        logon: the CAs of C{client_ca_file} are named to the client.
        """
        if any("cert" in [m.lower() for m in values.auth] for values in section.vdir):
            return section.client_ca_file
        return ""

    healthProbe = HealthProbe(
        expect=b"HTTP/1.",
        send=b"OPTIONS * HTTP/1.1\r\nHost: casd-health\r\nConnection: close\r\n\r\n",
    )
    settings = (
        Setting(
            "enabled",
            "bool",
            False,
            "Serve HTTP.  Off unless set, so that a configuration written before casd spoke HTTP"
            " opens no new port.",
        ),
        Setting(
            "vdir",
            "tables",
            (),
            "The virtual directories, one C{[[http.vdir]]} table each (keys below).",
            schema=VDIR_SETTINGS,
        ),
        Setting(
            "plain_http",
            "choice",
            "redirect",
            "What a listener with C{tls = \"none\"} does: C{redirect} every request but the"
            " health pages to https with 301, or C{serve} (behind a load balancer that"
            " terminated TLS; Basic credentials are then accepted only from trusted clients).",
            choices=("redirect", "serve"),
        ),
        Setting(
            "https_port",
            "int",
            443,
            "The port C{plain_http = \"redirect\"} sends clients to.",
            minimum=1,
        ),
        Setting(
            "keepalive_timeout",
            "float",
            120.0,
            "Seconds an idle client connection is kept between requests.",
            minimum=0.001,
        ),
        Setting(
            "header_timeout",
            "float",
            30.0,
            "Seconds a client has to send a request's headers once it has started it.",
            minimum=0.001,
        ),
        Setting(
            "backend_connections",
            "int",
            256,
            "Most concurrent requests (connections) to one backend member; more wait.",
            minimum=1,
        ),
        Setting(
            "backend_idle_connections",
            "int",
            32,
            "Idle persistent connections kept per backend member.",
            minimum=0,
        ),
        Setting(
            "route_cookie_key_file",
            "path",
            "",
            "File of hex HMAC keys (one a line, first signs, all verify) for the routing cookie,"
            " shared by the array; empty: a random key per node, shared by its workers (C{--workers N}).",
        ),
    ) + FORMS_SETTINGS + CERT_SETTINGS

    def __init__(self) -> None:
        self._shared: dict = {}

    def shared(self, context, section) -> _Shared:
        key = id(context)
        entry = self._shared.get(key)
        if entry is None or entry[0] is not context:
            entry = self._shared[key] = (context, _Shared(context, section, self))
        return entry[1]

    def buildFactory(self, context, section, listener):
        from protocols.http.local import loadProviders
        from protocols.http.site import HTTPSite

        shared = self.shared(context, section)
        plain = listener.tls != "implicit"
        site = HTTPSite(
            context,
            section,
            listener,
            self,
            shared.vdirs,
            shared.authenticator,
            shared.upstream,
            shared.router,
            redirectToHTTPS=plain and section.plain_http == "redirect",
        )
        site.local = loadProviders(context, section, site)
        return site

    @staticmethod
    def renderFailure(exc: BaseException) -> bytes:
        from protocols.http.status import httpError

        error = httpError(exc)
        return f"{error.code}".encode("ascii")


http = HTTPProtocol()

__all__ = ["http", "HTTPProtocol"]
