# -*- test-case-name: tests.test_http_site,tests.test_http_front -*-
"""
Local services: answers casd gives itself, without a backend (health pages, Autodiscover,
autoconfig, the logon page).

The site asks these before the vdirs.  A local service is a path prefix (matched per segment,
optionally ignoring case) and a L{twisted.web.resource.IResource}; the site reads the request
body first (within C{maxBodySize}: 413 beyond it), authenticates the request when the service
asks for it (the L{casd.interfaces.IMailboxUser} is then C{request.user}; C{None} for an
anonymous service), and renders the resource as twisted.web does (C{render_GET}, C{render_POST},
C{NOT_DONE_YET}) with C{request.prepath}/C{postpath} split around the prefix and the body in
C{request.content}.  C{request.client} is the connection's L{casd.session.clientinfo.ClientInfo}.

Other modules add services through a provider: a callable C{(context, section, site) ->
iterable of L{LocalService}} named in L{PROVIDERS} (Autodiscover adds its own there).
"""

from __future__ import annotations

import socket
from typing import Iterable

from attrs import frozen
from zope.interface import Interface

from twisted.python.reflect import namedAny
from twisted.web.resource import Resource

#: Dotted names of the local-service providers of the built-in HTTP front end; each is called
#: as C{provider(context, section, site)} and returns L{LocalService}s.
PROVIDERS = (
    "protocols.http.local.healthServices",
    "protocols.http.autodiscover.provider.autodiscoverServices",
    "protocols.http.forms.formsServices",
    "protocols.http.clientcert.certServices",
)


class ILocalServiceProvider(Interface):
    """
    What a name in L{PROVIDERS} is: C{__call__(context, section, site)} returning an iterable of
    L{LocalService}.  C{site} is the L{protocols.http.site.HTTPSite} being built (its C{vdirs},
    C{authenticator}, C{pool}).
    """

    def __call__(context, section, site):
        pass


@frozen
class LocalService:
    """
    One local answer.

    @ivar prefixes: path prefixes, e.g. C{("/autodiscover/autodiscover.xml",)}.
    @ivar resource: the L{twisted.web.resource.IResource} rendering it (C{render_GET}, ...).
    @ivar caseInsensitive: match the prefixes ignoring case.
    @ivar needsAuth: authenticate first with C{authVdir}'s methods (a failure is answered like a
        vdir's: 401 + challenge, 503, 429).
    @ivar authVdir: the L{protocols.http.vdir.VirtualDirectory} whose methods authenticate; by
        default Basic with realm C{casd}.
    @ivar maxBodySize: the largest request body read before rendering (413 beyond).
    @ivar anonymousOnPlain: served on a plain-HTTP redirecting listener too (health pages).
    @ivar name: the name in the access log.
    """

    prefixes: tuple[str, ...]
    resource: object
    caseInsensitive: bool = True
    needsAuth: bool = False
    authVdir: object = None
    maxBodySize: int = 1024 * 1024
    anonymousOnPlain: bool = False
    name: str = "local"

    def matches(self, path: bytes) -> bool:
        path = path.split(b"?", 1)[0]
        target = path.lower() if self.caseInsensitive else path
        for prefix in self.prefixes:
            p = prefix.encode("utf-8")
            if self.caseInsensitive:
                p = p.lower()
            if p.endswith(b"/"):
                if target.startswith(p) or target == p[:-1]:
                    return True
            elif target == p or target.startswith(p + b"/"):
                return True
        return False


class LocalServices:
    """
    The local services of one site, asked in registration order.

    L{match} runs for every request: it asks only the services whose prefixes could match the
    path's first segment (an index built once), not every service.
    """

    def __init__(self, services: Iterable[LocalService] = ()) -> None:
        self.services = list(services)
        self._index = None

    def add(self, service: LocalService) -> None:
        self.services.append(service)
        self._index = None

    def _build(self):
        """
        @return: C{(bySegment, always)}: the lower-case first path segment of a prefix ->
            C{[(position, service, heads)]}, and the services any path may match (a prefix of C{/}
            or without a leading slash).
        """
        bySegment: dict = {}
        always = []
        for position, service in enumerate(self.services):
            segments = set()
            for prefix in service.prefixes:
                p = prefix.encode("utf-8").lower()
                if not p.startswith(b"/") or p == b"/":
                    segments = None
                    break
                segments.add(p[1:].split(b"/", 1)[0])
            if segments is None:
                always.append((position, service, (b"",)))
                continue
            # The prefixes as a path starting with one must start (without a trailing /).
            heads = tuple(
                p.encode("utf-8").lower().rstrip(b"/") for p in service.prefixes
            )
            for segment in segments:
                bySegment.setdefault(segment, []).append((position, service, heads))
        self._index = (bySegment, always)
        return self._index

    def match(self, path: bytes) -> LocalService | None:
        bySegment, always = self._index or self._build()
        target = path.split(b"?", 1)[0]
        candidates = None
        if target[:1] == b"/":
            candidates = bySegment.get(target[1:].split(b"/", 1)[0].lower())
        if always:
            candidates = sorted((candidates or []) + always, key=_position)
        elif not candidates:
            return None
        lowered = target.lower()
        for _, service, heads in candidates:
            for head in heads:
                if lowered.startswith(head):
                    break
            else:
                continue  # cannot match: no need to ask
            if service.matches(path):
                return service
        return None


def _position(entry):
    return entry[0]


def loadProviders(context, section, site, providers=PROVIDERS) -> LocalServices:
    """
    Call every provider and collect their services.
    """
    found = LocalServices()
    for name in providers:
        for service in namedAny(name)(context, section, site):
            found.add(service)
    return found


# -- health pages ---------------------------------------------------------------------------


class HealthPage(Resource):
    """
    C{GET /<vdir>/healthcheck.htm}: C{200} with C{200 OK} and the server name while this node
    serves the vdir; C{503} while draining or when the vdir has no healthy backend (Exchange's
    load-balancer probe, one per vdir).

    @ivar check: C{callable() -> str | None}: C{None} when healthy, else the reason.
    """

    isLeaf = True

    def __init__(self, serverName: str, check) -> None:
        super().__init__()
        self.serverName = serverName
        self.check = check

    def render_GET(self, request):
        reason = self.check()
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        if reason is not None:
            request.setResponseCode(503)
            request.setHeader(b"Retry-After", b"10")
            return f"503 Service Unavailable\n{self.serverName}\n".encode("utf-8")
        return f"200 OK\n{self.serverName}\n".encode("utf-8")

    render_HEAD = render_GET


def healthServices(context, section, site):
    """
    The provider of one health page per vdir (and C{/healthcheck.htm} for the node).
    """
    name = context.config.server.hostname or socket.getfqdn()
    for vdir in site.vdirs.vdirs:
        yield LocalService(
            (f"{vdir.path}/healthcheck.htm",),
            HealthPage(name, lambda vdir=vdir: site.vdirHealth(vdir)),
            anonymousOnPlain=True,
            name=f"{vdir.name} health",
        )
    yield LocalService(
        ("/healthcheck.htm",),
        HealthPage(name, lambda: site.vdirHealth(None)),
        anonymousOnPlain=True,
        name="health",
    )
