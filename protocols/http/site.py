# -*- test-case-name: tests.test_http_site,tests.test_http_front -*-
"""
The HTTP front end's server side: a L{twisted.web.server.Site} whose requests start their backend
request as soon as the headers are in, and stream the body both ways.

Stock C{twisted.web} reads a whole request body before rendering (twisted#4688, #5511).
L{ProxyRequest} instead acts in C{gotLength} (all headers parsed): it matches the vdir,
authenticates, routes and starts the backend request (L{protocols.http.upstream}) with a
L{protocols.http.proxy.BodyPipe} as its body, which C{handleContentChunk} feeds.  That relies
on private attributes of L{twisted.web.http.HTTPChannel}: C{_command}, C{_path} and C{_version}
(the request line, which L{twisted.web.http.Request} only learns in C{requestReceived}) and
C{_savedTimeOut}; the response relay (L{protocols.http.relay}) fills L{Headers} through
C{_rawHeaders} and C{_nameEncoder}; L{resultNow} reads fired L{Deferred}s' results.
C{tests.test_http_smuggling.TwistedPrivatesTests} fails if a Twisted upgrade moves them;
Twisted is pinned below 28 in C{setup.cfg} for this reason.

A response can only be written once the request body has been read (Twisted's channel
parses the next request from the same buffer), so every answer waits for C{requestReceived}: a
401, 404 or 503 decided early discards the rest of the body; a body over C{max_body_size} is
refused at once with 413 and the connection closed.
"""

from __future__ import annotations

import io
import re

import attr

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.http_headers import Headers

from casd.failures import BackendUnavailable, CASFailure
from casd.service.logs import LineLog
from casd.routing.router import routeTo
from protocols.http.headers import PROXY_TTL, backendRequestHeaders
from protocols.http.channel import ProxyChannel, forwardedClient
from protocols.http.proxy import IDEMPOTENT, BodyPipe
from protocols.http.relay import Relay
from protocols.http.routing import ROUTE_COOKIE
from protocols.http.request import LEAN_INIT_SOURCES, ProxyRequest, leanInitSourcesChanged
from protocols.http.status import HTTPError, NotFound

#: The access log: one line per request (namespace C{casd.http.access}), rendered once
#: (L{casd.service.logs.LineLog}).
ACCESS_LOG = LineLog("casd.http.access")


_PENDING = object()


def resultNow(d):
    """
    The success result of a L{Deferred} that already has one (fired, not paused: its callbacks
    ran), else C{_PENDING} (a failure stays in C{d} for its errbacks).  Relies on the
    L{Deferred} attributes C{called}, C{paused} and C{result}
    (C{tests.test_http_smuggling.TwistedPrivatesTests}).
    """
    if d.called and not d.paused:
        result = d.result
        # Not paused: the result is no Deferred (one returned by a callback pauses C{d} until
        # it fires).  The class compared first: C{isinstance} against L{Deferred} (an ABC's
        # subclass) costs an C{__instancecheck__}.
        cls = result.__class__
        if cls is not Failure and cls is not defer.Deferred and not isinstance(result, Failure):
            return result
    return _PENDING


class HTTPSite(server.Site):
    """
    The factory of one HTTP listener.

    @ivar context: the shared L{casd.service.context.CASContext}.
    @ivar section: the C{[http]} L{casd.config.ProtocolSection}.
    @ivar listener: the L{casd.config.ListenerConfig}.
    @ivar descriptor: the HTTP L{casd.interfaces.ICASProtocol}.
    @ivar vdirs: the L{protocols.http.vdir.VdirTable}.
    @ivar authenticator: the L{protocols.http.auth.HTTPAuthenticator}.
    @ivar upstream: the L{protocols.http.upstream.UpstreamPool} (shared by every listener).
    @ivar router: the L{protocols.http.routing.RequestRouter}.
    @ivar local: the L{protocols.http.local.LocalServices}.
    @ivar redirectToHTTPS: a plain listener that answers everything but health pages with 301.
    """

    protocol = ProxyChannel
    requestFactory = ProxyRequest
    displayTracebacks = False
    logger = Logger(namespace="casd.http")

    def __init__(self, context, section, listener, descriptor, vdirs, authenticator, upstream,
                 router, redirectToHTTPS=False) -> None:
        from twisted.web.resource import NoResource

        super().__init__(NoResource(), timeout=section.keepalive_timeout, reactor=context.reactor)
        self.context = context
        self.section = section
        self.listener = listener
        self.descriptor = descriptor
        self.vdirs = vdirs
        self.authenticator = authenticator
        self.upstream = upstream
        self.router = router
        self.redirectToHTTPS = redirectToHTTPS
        self.headerTimeout = section.header_timeout
        self.clock = context.reactor
        self.local = None

    def stopFactory(self) -> None:
        # The listener stops: close the idle backend connections (the pool is shared by every
        # listener; closing idle ones is harmless to the others).
        self.upstream.closeIdle()
        super().stopFactory()

    def _openLogFile(self, path):
        return None

    def log(self, request) -> None:
        pass

    # -- dispatch -----------------------------------------------------------------------

    def begin(self, request, length) -> None:
        """
        The request's headers are in: decide what serves it.
        """
        path = request.path
        channel = request.channel
        client = request.client
        if client.trusted:
            # The same header section from the same connection names the same real client.
            memo = channel._forwardedMemo
            section = request.section
            if memo is not None and section is not None and memo[0] is section and memo[1] is client:
                request.client = memo[2]
            else:
                request.client = forwardedClient(client, request.requestHeaders)
                channel._forwardedMemo = (section, client, request.client) if section is not None else None
        # The connection's last request target and what matched it (a keep-alive client asks
        # the same target again: EWS, ActiveSync, MAPI), valid while the site's tables are the
        # same objects.
        local = self.local
        index = local._index if local is not None else None
        memo = channel._targetMemo
        if memo is not None and memo[0] == path and memo[1] is index and memo[2] is self.vdirs:
            service, matched = memo[3], memo[4]
        else:
            service = local.match(path) if local is not None else None
            matched = self.vdirs.match(path) if service is None else None
            channel._targetMemo = (
                path, local._index if local is not None else None, self.vdirs, service, matched
            )
        if self.redirectToHTTPS and (service is None or not service.anonymousOnPlain):
            request._limit = 64 * 1024
            request.answer(self.httpsRedirect(request))
            return
        if service is not None:
            request.mode = "local"
            request.service = service
            request.content = io.BytesIO()
            request._limit = service.maxBodySize
            if length is not None and length > request._limit:
                request.refuseTooLarge()
            return
        vdir = matched
        if vdir is None:
            request._limit = 64 * 1024
            request.fail(NotFound(path))
            return
        request.vdir = vdir
        request.mode = "proxy"
        request._limit = vdir.maxBodySize
        if length is not None and vdir.maxBodySize and length > vdir.maxBodySize:
            request.refuseTooLarge()
            return
        if length != 0:
            # Through the channel's read switch (L{protocols.http.channel.ReadSwitch}).
            reading = channel._networkProducer
            request._pipe = BodyPipe(length, reading.pauseProducing, reading.resumeProducing)
        # While the body comes in, the client's silence is bounded by the vdir's timeout (the
        # same timeout was just restarted by the bytes of this head).
        timeout = request.vdirTimeout = vdir.timeout
        if channel.timeOut != timeout:
            channel.setTimeout(timeout)
        self.proxy(request, vdir)

    @staticmethod
    def channel(request):
        return request.channel

    def httpsRedirect(self, request) -> HTTPError:
        hosts = request.requestHeaders.getRawHeaders(b"Host") or [b""]
        host = hosts[0].split(b":")[0] if not hosts[0].startswith(b"[") else hosts[0].split(b"]")[0] + b"]"
        if not host or not re.fullmatch(rb"[A-Za-z0-9.\-\[\]:]+", host):
            host = self.context.config.hostname.encode("idna")
        port = self.section.https_port
        netloc = host if port == 443 else host + b":" + str(port).encode("ascii")
        return HTTPError(
            301,
            ((b"Location", b"https://" + netloc + request.uri), (b"Content-Type", b"text/plain")),
            b"",
        )

    def processLocal(self, request, command, path, version) -> None:
        service = request.service
        if not service.needsAuth:
            request.runLocal(command, path, version)
            return
        request.method, request.uri, request.clientproto = command, path, version
        vdir = service.authVdir or _defaultLocalVdir()
        d = self.authenticator.authenticate(request, vdir, request.client)

        def authenticated(user):
            request.user = user
            request.runLocal(command, path, version)

        def failed(f):
            request._bodyFinished()
            request.fail(f)

        d.addCallbacks(authenticated, failed)

    def getResourceFor(self, request):
        """
        A local service's resource, with C{prepath} and C{postpath} split around its prefix.
        """
        service = request.service
        if service is None:
            return self.resource
        segments = request.path[1:].split(b"/")
        lowered = request.path.lower()
        for prefix in service.prefixes:
            p = prefix.encode("utf-8").lower().rstrip(b"/")
            if lowered.startswith(p):
                n = len([s for s in p[1:].split(b"/")])
                request.prepath, request.postpath = segments[:n], segments[n:]
                break
        return service.resource

    # -- proxying -----------------------------------------------------------------------

    def proxy(self, request, vdir) -> None:
        authenticator = self.authenticator
        user = authenticator.authenticatedAgain(request, vdir, request.client)
        if user is None:
            d = authenticator.authenticate(request, vdir, request.client)
            user = resultNow(d)
        if user is not _PENDING:
            # The credential cache answered at once (the usual case): no callback chain.
            request.user = user
            # The connection's last route when this request asks the same, else the router's.
            decision = self.router.routeNow(request, vdir, user)
            if decision is None:
                d = self.router.route(request, vdir, user, request.uri)
                decision = resultNow(d)
            if decision is not _PENDING:
                try:
                    self._send(decision, request, vdir)
                except Exception:
                    self._failed(Failure(), request)
                return
        else:
            def authenticated(user):
                request.user = user
                return self.router.route(request, vdir, user, request.uri)

            d.addCallback(authenticated)
        d.addCallback(self._send, request, vdir)
        d.addErrback(self._failed, request)

    def _send(self, decision, request, vdir):
        if request._gone:
            return None
        targets = self._availableFor(request.channel, decision.route)
        if not targets:
            raise _noBackend(decision.route)
        if request.continueWanted:
            request.sendContinue()
        else:
            request.mayContinue = True  # (what sendContinue does when no 100 is wanted)
        return self._attempt(request, vdir, decision, targets, 0)

    def _available(self, route):
        connector = self.context.connector
        return [
            t for t in route.targets
            if t.server not in connector.draining and connector.member(t).available()
        ]

    def _availableFor(self, channel, route):
        """
        L{_available}, with the route's members remembered by the client connection while it
        asks the same route (the pool keeps a member for good once it made it): no member
        look-up per request; each member's health is asked every time.
        """
        connector = self.context.connector
        memo = channel._membersMemo
        if memo is not None and memo[0] is route and memo[1] is connector:
            pairs = memo[2]
            for target, member in pairs:
                # What connector.member() does to a member it finds.
                member.target = target
        else:
            pairs = tuple([(t, connector.member(t)) for t in route.targets])
            channel._membersMemo = (route, connector, pairs)
        draining = connector.draining
        return [t for t, member in pairs if t.server not in draining and member.available()]

    def memberFor(self, channel, target):
        """
        The pool's member for C{target} (L{casd.pool.connector.BackendConnector.member}),
        from the connection's memo of its route's members when it holds it.
        """
        memo = channel._membersMemo
        if memo is not None:
            for known, member in memo[2]:
                if known is target:
                    member.target = target
                    return member
        return self.context.connector.member(target)

    def _attempt(self, request, vdir, decision, targets, index):
        target = targets[index]
        channel = request.channel
        described = channel._describedMemo
        if described is not None and described[0] is target:
            request.backendName = described[1]
        else:
            request.backendName = target.describe()
            channel._describedMemo = (target, request.backendName)
        strip = self._strip
        if strip is None:
            strip = set()
            for source in self.authenticator.sources.values():
                strip.update(getattr(source, "stripHeaders", ()))
            strip.add(b"host")
            strip = self._strip = frozenset(strip)
        toCAS = decision.route.kind == "cas"
        # The fields of the connection's last proxied request, when this one has the same
        # header section (the same parsed table) for the same vdir, user, client and filters.
        section = request.section
        memo = channel._fieldsMemo
        client = request.client
        user = request.user
        private = self.privateCookies
        if (
            memo is not None
            and section is not None
            and memo[0] is section
            and memo[1] is vdir
            and memo[2] is user
            and memo[3] is client
            and memo[4] is strip
            and memo[5] is private
            and not toCAS
        ):
            headers = memo[6]
        else:
            headers = backendRequestHeaders(
                request.requestHeaders,
                # Another site's casd authenticates the request again: it gets the client's
                # own credentials and path, not this vdir's backend identity and backend path.
                attr.evolve(vdir, identity="passthrough") if toCAS else vdir,
                client,
                (request.requestHeaders._rawHeaders.get(b"Host") or (b"",))[0],
                user,
                strip=strip,
                cookieFilter=self.cookieFilter,
            )
            if toCAS:
                # It counts the hops down, and refuses a loop.
                headers.append((PROXY_TTL, str(decision.route.proxyTTL).encode("ascii")))
                channel._fieldsMemo = None
            elif section is not None:
                # Never changed after this (L{protocols.http.upstream} only reads it).
                channel._fieldsMemo = (section, vdir, user, client, strip, private, headers)
        # The backend's path for the target, remembered by the connection for its next
        # request (the same target again, usually).
        uri = request.uri
        memo = channel._pathMemo
        if memo is not None and memo[0] == uri and memo[1] is vdir and memo[2] is toCAS:
            path = memo[3]
        else:
            path = self.vdirs.clientPath(vdir, uri)
            if not toCAS:
                path = vdir.backendPathFor(path)
            channel._pathMemo = (uri, vdir, toCAS, path)
        relay = request._relay = Relay(self, request, vdir, decision, targets, index)
        relay.exchange = self.upstream.request(
            target, request.method, path, headers, request._pipe, relay
        )

    def cookieFilter(self, name: bytes) -> bool:
        return name != ROUTE_COOKIE and name not in self.privateCookies

    #: Cookies that are casd's own and never reach a backend (forms sessions add theirs).
    privateCookies: frozenset = frozenset()

    #: The header names the credential sources strip (and C{Host}), once known.
    _strip = None

    def _failed(self, f, request) -> None:
        if request._gone:
            return
        if not f.check(CASFailure):
            self.logger.failure("request {method} {path} failed", f, method=request.method, path=request.path)
        else:
            self.logger.info(
                "{method} {path} from {client}: {reason}",
                method=request.method.decode("ascii", "replace"),
                path=request.path.decode("utf-8", "replace"),
                client=request.client.peerHost,
                reason=str(f.value),
            )
        request.fail(f)

    # -- health and logging ---------------------------------------------------------------

    def vdirHealth(self, vdir):
        """
        @return: C{None} when C{vdir} (or the node, for C{None}) can serve, else the reason.
        """
        node = self.context.node
        if node.draining:
            return f"draining ({node.reason})"
        if vdir is None:
            return None
        config = self.context.config
        names = [vdir.backend or config.routing.hash_group or config.routing.default_backend]
        if not names[0]:
            # The router decides per user: any server configured for HTTP will do.
            names = [s.name for s in config.backends.values() if self.descriptor.name in s.protocols]
        for name in names:
            try:
                route = routeTo(config, name, _HealthUser(), self.descriptor, "health")
            except KeyError:
                continue
            if self._available(route):
                return None
        return "no healthy backend"

    def accessLog(self, request) -> None:
        client = request.client
        host = client.peerHost
        if ":" in host:
            host = f"[{host}]"
        user = request.user
        vdir = request.vdir
        service = request.service
        method = request.method
        # Never a header, a cookie or a query string: they may hold secrets.
        fields = {
            "session": client.sessionId,
            # (vdir.name, without the property's call)
            "vdir": (vdir.path or "/") if vdir is not None else (service.name if service is not None else "-"),
            "client": f"{host}:{client.peerPort}",
            "user": user.login if user is not None else "-",
            "backend": request.backendName or "-",
            "method": _METHOD_TEXT[method] if method in _METHOD_TEXT else (method or b"-").decode("ascii", "replace"),
            "path": (request.path or b"-").decode("utf-8", "replace")[:200],
            "status": request.code,
            "bytesIn": request.bytesIn,
            "bytesOut": request.sentLength,
            "duration": self.clock.seconds() - request.startedAt,
        }
        ACCESS_LOG.emit(
            f"http session={fields['session']} vdir={fields['vdir']} client={fields['client']}"
            f" user={fields['user']} backend={fields['backend']} method={fields['method']}"
            f" path={fields['path']} status={fields['status']} in={fields['bytesIn']}"
            f" out={fields['bytesOut']} duration={fields['duration']:.3f}",
            fields,
        )


#: The usual methods as the access line writes them.
_METHOD_TEXT = {
    m: m.decode("ascii") for m in (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH",
                                   b"PROPFIND", b"PROPPATCH", b"REPORT", b"MKCOL", b"MOVE", b"COPY")
}


class _HealthUser:
    login = "healthcheck"
    address = ""
    backendLogin = "healthcheck"
    mailHost = ""
    site = ""
    policy = ()


def _noBackend(route):
    return BackendUnavailable(f"no healthy member of {route.group or 'the route'}")


def _defaultLocalVdir():
    from protocols.http.vdir import VirtualDirectory

    return VirtualDirectory(path="", auth=("basic",))


__all__ = [
    "HTTPSite", "ProxyChannel", "ProxyRequest", "Headers", "IDEMPOTENT", "LEAN_INIT_SOURCES",
    "leanInitSourcesChanged",
]
