# -*- test-case-name: tests.test_http_site,tests.test_http_front -*-
"""
Where an authenticated HTTP request goes, in Exchange's order:

    1. an explicit logon path (C{/owa/user@example.com/...}, C{/dav/user@example.com/...});
    2. the C{X-AnchorMailbox} header;
    3. casd's HMAC-signed routing cookie (a cache of 1 or 2's directory look-up, never an
       authorisation: it is only honoured for the same user and anchor it was issued for);
    4. the router (directory attribute, map, hash, default, sites) and the pool's health.

An anchor (1 or 2) is used only for a mailbox the authenticated user may open: their own login
or address, or one listed in their C{mailbox_access} policy attribute (comma-separated addresses,
or C{@domain} for a whole domain); any other anchor is ignored, as if absent.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from base64 import urlsafe_b64decode, urlsafe_b64encode
from urllib.parse import unquote

import attr
from attrs import frozen

from twisted.internet import defer

from casd.failures import BackendUnavailable
from casd.routing.router import Redirected, routeTo
from protocols.http.channel import canonicalName, headerValues
from protocols.http.headers import PROXY_TTL
from protocols.http.status import SiteRedirect

_PROXY_TTL = canonicalName(PROXY_TTL)
_ANCHOR = canonicalName(b"X-AnchorMailbox")

#: The routing cookie's name (never forwarded to a backend).
ROUTE_COOKIE = b"casd-route"


@frozen
class RoutingDecision:
    """
    @ivar route: the L{casd.routing.router.Route}.
    @ivar anchor: the mailbox routed for (lower case), C{""} for the user's own.
    @ivar how: which step decided: C{path}, C{anchor}, C{cookie} or C{router}.
    @ivar cookie: a C{Set-Cookie} value to send, or C{None}.
    """

    route: object
    anchor: str = ""
    how: str = "router"
    cookie: bytes | None = None


def explicitMailbox(vdir, path: bytes) -> str:
    """
    The mailbox an explicit logon path names: the first segment after the vdir's prefix when it
    looks like an address (C{/owa/user@example.com/} -> C{user@example.com}), else C{""}.
    """
    rest = path.split(b"?", 1)[0][len(vdir.path) :].lstrip(b"/")
    segment = rest.split(b"/", 1)[0]
    if b"@" not in segment and b"%" not in segment:
        return ""  # no address, even once unquoted (the common case: no look at it)
    try:
        text = unquote(segment.decode("utf-8"), errors="strict")
    except UnicodeDecodeError:
        return ""
    if "@" in text and 3 <= len(text) <= 254 and not any(c in text for c in " \t\r\n/\\"):
        return text.lower()
    return ""


def incomingTTL(request):
    """
    The proxy TTL another casd node sent (C{X-Casd-Proxy-TTL}), believed from trusted clients
    only; else C{None} (this node starts the count).
    """
    client = getattr(request, "client", None)
    if client is None or not client.trusted:
        return None
    values = headerValues(request.requestHeaders, _PROXY_TTL)
    if not values or len(values) != 1 or not values[0].isdigit() or len(values[0]) > 3:
        return None
    return int(values[0])


def anchorHeader(request) -> str:
    values = headerValues(request.requestHeaders, _ANCHOR)
    if not values or len(values) != 1:
        return ""
    try:
        text = values[0].decode("utf-8").strip()
    except UnicodeDecodeError:
        return ""
    # Exchange also takes "SMTP:user@example.com" and "UPN:...".
    if ":" in text:
        text = text.split(":", 1)[1]
    if "@" not in text or len(text) > 254:
        return ""
    return text.lower()


def mayOpen(user, mailbox: str) -> bool:
    """
    Whether C{user} (an L{casd.interfaces.IMailboxUser}) may open C{mailbox}.
    """
    mailbox = mailbox.lower()
    own = {user.login.lower(), (user.address or "").lower(), (getattr(user, "backendLogin", "") or "").lower()}
    if mailbox in own:
        return True
    policy = dict(user.policy) if not isinstance(user.policy, dict) else user.policy
    grants = [g.strip().lower() for g in policy.get("mailbox_access", "").split(",") if g.strip()]
    domain = "@" + mailbox.rsplit("@", 1)[-1]
    return mailbox in grants or domain in grants


def isOwn(user, mailbox: str) -> bool:
    mailbox = mailbox.lower()
    return mailbox in (user.login.lower(), (user.address or "").lower())


class RouteCookies:
    """
    Seals and opens the routing cookie: C{anchor|server|expiry} with an HMAC-SHA256 over the
    user, the anchor, the server and the expiry.

    @ivar keys: the HMAC keys; the first signs, all verify.
    """

    def __init__(self, keys=(), lifetime: float = 3600.0, clock=time.time) -> None:
        self.keys = tuple(keys) or (os.urandom(32),)
        self.lifetime = lifetime
        self.clock = clock

    def _mac(self, key: bytes, user: str, payload: bytes) -> bytes:
        return hmac.new(key, user.lower().encode("utf-8") + b"\0" + payload, hashlib.sha256).digest()[:16]

    def seal(self, user: str, anchor: str, server: str) -> bytes:
        expiry = int(self.clock() + self.lifetime)
        payload = f"{anchor}|{server}|{expiry}".encode("utf-8")
        mac = self._mac(self.keys[0], user, payload)
        return urlsafe_b64encode(payload).rstrip(b"=") + b"." + urlsafe_b64encode(mac).rstrip(b"=")

    def open(self, user: str, value: bytes):
        """
        @return: C{(anchor, server)} from a valid cookie issued for C{user}, else C{None}.
        """
        try:
            payload64, mac64 = value.split(b".", 1)
            payload = urlsafe_b64decode(payload64 + b"=" * (-len(payload64) % 4))
            mac = urlsafe_b64decode(mac64 + b"=" * (-len(mac64) % 4))
            anchor, server, expiry = payload.decode("utf-8").split("|")
            expiry = int(expiry)
        except (ValueError, UnicodeDecodeError):
            return None
        if not any(hmac.compare_digest(mac, self._mac(k, user, payload)) for k in self.keys):
            return None
        if expiry < self.clock():
            return None
        return anchor, server


class RequestRouter:
    """
    Applies the routing order for one site.

    @ivar context: the L{casd.service.context.CASContext}.
    @ivar descriptor: the HTTP L{casd.interfaces.ICASProtocol}.
    @ivar cookies: the L{RouteCookies}.
    """

    def __init__(self, context, descriptor, cookies: RouteCookies) -> None:
        self.context = context
        self.descriptor = descriptor
        self.cookies = cookies
        self.clock = context.reactor
        self._cache: dict = {}

    def anchorFor(self, request, vdir, user) -> tuple[str, str]:
        """
        @return: C{(mailbox, how)}: the anchor the user may open, by path then header, or
            C{("", "router")}.
        """
        for mailbox, how in (
            (explicitMailbox(vdir, request.uri or b""), "path"),
            (anchorHeader(request), "anchor"),
        ):
            if mailbox and mayOpen(user, mailbox):
                return ("" if isOwn(user, mailbox) else mailbox), how
        return "", "router"

    #: Seconds a user's own route is remembered (health is applied per request, after).
    cacheTTL = 30.0
    cacheSize = 50000

    def routeNow(self, request, vdir, user):
        """
        The decision of the connection's last request when this one asks the same (the same
        user, vdir, target, C{X-AnchorMailbox} and proxy TTL, from as trusted a client, the
        same router configuration) and the user's own route it took is still remembered
        (L{cacheTTL}); else C{None} (ask L{route}).
        """
        memo = request.channel._routeMemo
        if memo is None or memo[0] is not user or memo[1] is not vdir or memo[2] != request.uri:
            return None
        raw = request.requestHeaders._rawHeaders
        if (
            memo[3] == raw.get(_ANCHOR)
            and memo[4] == raw.get(_PROXY_TTL)
            and memo[5] == request.client.trusted
            and memo[6] is self.context.router.config
            and memo[7] > self.clock.seconds()
        ):
            return memo[8]
        return None

    def _rememberForConnection(self, request, vdir, user, expiry, decision) -> None:
        raw = request.requestHeaders._rawHeaders
        channel = getattr(request, "channel", None)
        if channel is not None:
            channel._routeMemo = (
                user, vdir, request.uri, raw.get(_ANCHOR), raw.get(_PROXY_TTL),
                request.client.trusted, self.context.router.config, expiry, decision,
            )

    def route(self, request, vdir, user, path: bytes):
        """
        @param path: the request target (for the explicit logon path and site redirects).
        @return: a L{Deferred} firing with a L{RoutingDecision}, or failing with
            L{BackendUnavailable} or L{SiteRedirect}.
        """
        config = self.context.config
        if user is None:
            return defer.succeed(
                RoutingDecision(routeTo(config, vdir.backend, _Anonymous(), self.descriptor, "vdir backend"))
            )
        anchor, how = self.anchorFor(request, vdir, user)
        if anchor:
            return self._route(request, vdir, user, path, anchor, how)
        # A user's own route depends only on their directory entry, the vdir and the
        # configuration: remembered for a while, as the credential cache remembers the entry.
        ttl = incomingTTL(request)
        key = (user.login, user.mailHost, user.site, getattr(user, "backendLogin", ""),
               vdir.path, id(self.context.router.config), ttl)
        now = self.clock.seconds()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            self._rememberForConnection(request, vdir, user, hit[0], hit[1])
            return defer.succeed(hit[1])
        d = self._route(request, vdir, user, path, "", how)

        def remember(decision):
            if len(self._cache) >= self.cacheSize:
                self._cache.clear()
            self._cache[key] = (now + self.cacheTTL, decision)
            self._rememberForConnection(request, vdir, user, now + self.cacheTTL, decision)
            return decision

        return d.addCallback(remember)

    @defer.inlineCallbacks
    def _route(self, request, vdir, user, path, anchor, how):
        config = self.context.config
        target = user
        cookie = None
        if anchor:
            sealed = request.received_cookies.get(ROUTE_COOKIE)
            opened = self.cookies.open(user.login, sealed) if sealed else None
            if opened is not None and opened[0] == anchor and opened[1] in config.backends:
                route = routeTo(config, opened[1], user, self.descriptor, f"routing cookie for {anchor}")
                return RoutingDecision(route, anchor, "cookie")
            directory = self.context.directory
            record = (yield directory.lookup(anchor)) if directory is not None else None
            if record is None:
                anchor, how = "", "router"
            else:
                target = record
        try:
            route = yield self.context.router.locate(target, self.descriptor, incomingTTL(request))
        except Redirected as e:
            raise self._redirect(vdir, e, path) from None
        if route.kind == "backend" and vdir.backend:
            route = attr.evolve(
                routeTo(config, vdir.backend, target, self.descriptor, f"vdir {vdir.name} backend"),
                site=route.site,
            )
        if anchor and route.targets:
            cookie = ROUTE_COOKIE + b"=" + self.cookies.seal(user.login, anchor, route.targets[0].server)
            cookie += b"; Path=" + (vdir.path or "/").encode("utf-8") + b"; Secure; HttpOnly; SameSite=Lax"
        return RoutingDecision(route, anchor, how, cookie)

    def _redirect(self, vdir, redirected: Redirected, path: bytes):
        if vdir.siteRedirect == "none" or not redirected.url:
            return BackendUnavailable(str(redirected))
        base = redirected.url.rstrip("/")
        if vdir.siteRedirect == "451":
            return SiteRedirect(451, base + vdir.path)
        return SiteRedirect(302, base + path.decode("utf-8", "replace"))


@frozen
class _Anonymous:
    login: str = ""
    address: str = ""
    backendLogin: str = ""
    mailHost: str = ""
    site: str = ""
    policy: tuple = ()
