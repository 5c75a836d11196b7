# -*- test-case-name: tests.integration.test_operations -*-
"""
The admin listener (C{[admin] listen}): C{/metrics} (Prometheus), C{/health} (for a load balancer
or Kubernetes), C{/status} (JSON) and a dashboard page built from C{/status}.

Off by default.  C{/health} is always anonymous; with C{[admin] users}, every other page asks for
HTTP Basic credentials, checked through the same portal, cache and penalty as every protocol.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import Interface, implementer

import casd
from casd.auth.sasl import Credentials
from casd.failures import AuthenticationFailed, CASFailure, Throttled
from casd.service.nodemetrics import familiesOf
from casd.session.clientinfo import ClientInfo, newSessionId

_DASHBOARD = os.path.join(os.path.dirname(__file__), "dashboard.html")


class AdminSite(server.Site):
    """
    The admin listener's site: no access log of its own (scrapes every few seconds would drown
    the session log), and no traceback is ever rendered.
    """

    displayTracebacks = False

    def log(self, request) -> None:
        pass


def healthVerdict(context, node) -> tuple[bool, str]:
    """
    @return: C{(healthy, why)}: unhealthy while draining, or when no backend member this node
        knows is UP (it could proxy nothing).
    """
    if node.draining:
        return False, f"draining ({node.reason})"
    members = list(context.connector.members.values())
    if members and not any(m.up for m in members):
        return False, "no backend member is UP"
    return True, "OK"


def statusOf(context, node, metrics, listeners) -> dict:
    """
    The node's status, as C{/status} serves it and the dashboard shows it.
    """
    now = time.time()
    backends = []
    for member in sorted(context.connector.members.values(), key=lambda m: m.name):
        last = member.lastCheck
        backends.append(
            {
                "backend": member.target.server,
                "address": f"{member.target.host}:{member.target.port}",
                "state": "UP" if member.up else "DOWN",
                "reason": member.reason,
                "sessions": len(member.sessions),
                "activelyChecked": member.activelyChecked,
                "lastCheck": None
                if last is None
                else {"ago": round(context.reactor.seconds() - last[0], 1), "ok": last[1], "reason": last[2]},
            }
        )
    healthy, why = healthVerdict(context, node)
    stats = getattr(getattr(context, "state", None), "stats", None)
    return {
        "node": context.config.hostname,
        "version": casd.__version__,
        "uptime": round(now - metrics.startedAt, 1),
        "healthy": healthy,
        "health": why,
        "draining": node.draining,
        "listeners": listeners,
        "sessions": metrics.activeSessions(),
        "logins": metrics.loginRate(),
        "backends": backends,
        "state": stats.asDict() if stats is not None else {"backend": "local"},
    }


class IAdminView(Interface):
    """
    What the admin pages show: this process's figures (L{LocalView}), or the node's, gathered
    from its worker processes (L{casd.service.nodeadmin.NodeView}).  Each method returns its
    value or a L{Deferred} that fires with it (and never fails).
    """

    def health():
        """
        @return: C{(healthy, why)}.
        """

    def metrics():
        """
        @return: the Prometheus exposition (bytes).
        """

    def status():
        """
        @return: the status C{/status} serves (a JSON-able dict).
        """


@implementer(IAdminView)
class LocalView:
    """
    The figures of this process: a single-process node, or one worker of C{--workers N} (which
    sends them to its parent: L{casd.service.control}).
    """

    def __init__(self, context, node, metrics, listeners) -> None:
        self.context = context
        self.node = node
        self._metrics = metrics
        self.listeners = listeners

    def health(self) -> tuple[bool, str]:
        return healthVerdict(self.context, self.node)

    def hasMetrics(self) -> bool:
        """
        @return: whether this process keeps metrics (C{[admin] listen} is set).
        """
        return self._metrics is not None

    def metrics(self) -> bytes:
        return generate_latest(self._metrics.registry)

    def families(self) -> list:
        """
        @return: this process's metric families, as its parent merges them
            (L{casd.service.nodemetrics.familiesOf}); none without metrics.
        """
        return familiesOf(self._metrics.registry) if self._metrics is not None else []

    def status(self) -> dict:
        return statusOf(self.context, self.node, self._metrics, self.listeners)


class _Page(resource.Resource):
    isLeaf = True

    def __init__(self, admin) -> None:
        super().__init__()
        self.admin = admin

    def render_HEAD(self, request):
        # Request.write sends no body for a HEAD.
        return self.render_GET(request)


class HealthPage(_Page):
    def render_GET(self, request):
        d = defer.maybeDeferred(self.admin.view.health)
        return d.addCallback(self._page, request)

    def _page(self, verdict, request):
        healthy, why = verdict
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        if not healthy:
            request.setResponseCode(503)
        return f"{'OK' if healthy else 'UNAVAILABLE'} {self.admin.config.hostname}: {why}\n".encode()


class MetricsPage(_Page):
    def render_GET(self, request):
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return defer.maybeDeferred(self.admin.view.metrics)


class StatusPage(_Page):
    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return defer.maybeDeferred(self.admin.view.status).addCallback(lambda s: json.dumps(s, indent=1).encode())


class DashboardPage(_Page):
    def render_GET(self, request):
        with open(_DASHBOARD, encoding="utf-8") as f:
            page = f.read()
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'",
        )
        return page.replace("{{refresh}}", str(self.admin.config.admin.refresh)).encode()


class AdminRoot(resource.Resource):
    """
    Dispatches the admin pages, asking for credentials where C{[admin] users} says so.  A page
    renders its bytes, or a L{Deferred} of them (the node's figures gathered from its workers).
    """

    log = Logger()

    def __init__(self, config, authenticator, view: IAdminView) -> None:
        super().__init__()
        self.config = config
        self.authenticator = authenticator
        self.view = view
        self.pages = {
            b"": DashboardPage(self),
            b"metrics": MetricsPage(self),
            b"status": StatusPage(self),
            b"health": HealthPage(self),
        }

    def getChild(self, path, request):
        return self

    def render(self, request):
        path = request.path.rstrip(b"/").lstrip(b"/") if request.path != b"/" else b""
        page = self.pages.get(path)
        if page is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"not found\n"
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b""
        if page is self.pages[b"health"] or not self.config.admin.users:
            d = defer.maybeDeferred(page.render, request)
        else:
            d = self._authenticate(request)
            d.addCallback(lambda _: page.render(request))
        d.addCallbacks(self._write, self._refuse, callbackArgs=(request,), errbackArgs=(request,))
        return server.NOT_DONE_YET

    def _authenticate(self, request):
        header = request.getHeader(b"authorization") or b""
        scheme, _, blob = header.partition(b" ")
        if scheme.lower() != b"basic":
            return defer.fail(AuthenticationFailed("no credentials"))
        try:
            user, sep, password = base64.b64decode(blob.strip(), validate=True).partition(b":")
            username = user.decode("utf-8")
        except (binascii.Error, ValueError):
            return defer.fail(AuthenticationFailed("malformed credentials"))
        if not sep:
            return defer.fail(AuthenticationFailed("malformed credentials"))
        peer = request.getClientAddress()
        client = ClientInfo(
            sessionId=newSessionId(),
            protocol="admin",
            listener="admin",
            peerHost=getattr(peer, "host", ""),
            peerPort=getattr(peer, "port", 0),
            localHost="",
            localPort=0,
            tls=request.isSecure(),
            trusted=False,
        )
        # Through the portal even for a name not in the list: guessing costs the same penalty.
        d = self.authenticator.login(Credentials(username, password), client)

        def allowed(avatar):
            if username not in self.config.admin.users and avatar.login not in self.config.admin.users:
                raise AuthenticationFailed("not an admin user")
            return avatar

        return d.addCallback(allowed)

    def _write(self, body, request):
        if not request.finished and not request._disconnected:
            request.write(body)
            request.finish()

    def _refuse(self, failure, request):
        if request.finished or request._disconnected:
            return
        if failure.check(AuthenticationFailed):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm="casd admin", charset="UTF-8"')
            body = b"authentication required\n"
        elif failure.check(Throttled):
            request.setResponseCode(429)
            body = b"too many attempts\n"
        else:
            if not failure.check(CASFailure):
                self.log.failure("admin request failed", failure)
            request.setResponseCode(503)
            request.setHeader(b"retry-after", b"10")
            body = b"temporarily unavailable\n"
        request.setHeader(b"content-type", b"text/plain")
        request.write(body)
        request.finish()


def buildAdminSite(config, authenticator, view: IAdminView) -> AdminSite:
    """
    @param config: the L{casd.config.CASConfig} (C{[admin]}, the node's host name).
    @param authenticator: the login path C{[admin] users} log in through.
    """
    site = AdminSite(AdminRoot(config, authenticator, view))
    site.timeout = 30
    return site
