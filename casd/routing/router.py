# -*- test-case-name: tests.test_router -*-
"""
Mailbox location: a chain of small locators, each answering "here" (a L{Route}), "not mine"
(C{None}) or "unavailable" (L{casd.failures.BackendUnavailable}), tried in order like
L{twisted.names.resolve.ResolverChain}; then the site policy (another site's users are proxied to
that site's casd, refused or redirected), the proxy TTL and the check that a route does not point
back at this node.

The locators, in their default order (C{[routing] locators}):
    - C{mailhost}: the directory's mailbox attribute, naming a group, a server or a bare host;
    - C{map}: the static map file, user or domain -> group or server;
    - C{hash}: rendezvous hashing over C{[routing] hash_group};
    - C{default}: C{[routing] default_backend}.

A route lists its targets in preference order; the connector (L{casd.pool.connector}) skips members that
are DOWN or draining and fails over along the list.
"""

from __future__ import annotations

import ipaddress
import math
import socket
from hashlib import blake2b
from typing import Iterable, Sequence

import attr
from attrs import field, frozen
from zope.interface import implementer

from twisted.internet import defer
from twisted.logger import Logger

from casd.config import BackendProtocol, BackendServer, CASConfig
from casd.failures import BackendUnavailable
from casd.interfaces import ILocator


@frozen
class BackendTarget:
    """
    One backend server as one protocol reaches it.

    @ivar tlsName: the name verified in its certificate.
    @ivar masterPassword: never logged, never in C{repr}.
    @ivar site: the site the server is in, when configured.
    @ivar timeouts: C{(key, seconds)} pairs overriding the C{[backend]} timeouts.
    """

    server: str
    host: str
    port: int
    tls: str
    tlsName: str
    masterUser: str = ""
    masterPassword: bytes = field(default=b"", repr=False)
    site: str = ""
    timeouts: tuple[tuple[str, float], ...] = ()
    #: The identity of this member in the pool: one C{host:port} is one member, whatever
    #: server name or group reached it.  Computed once (a login reads it, and L{label}).
    key: tuple[str, int] = field(init=False, eq=False, repr=False)
    #: L{describe}'s text, computed once.
    label: str = field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "key", (self.host.lower(), self.port))
        host = f"[{self.host}]" if ":" in self.host else self.host
        label = f"{self.server}({host}:{self.port})" if self.server != self.host else f"{host}:{self.port}"
        object.__setattr__(self, "label", label)

    @property
    def isAddress(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def describe(self) -> str:
        """
        @return: C{server(host:port)}, or C{host:port} when the server is named by its host.
        """
        return self.label


@frozen
class Route:
    """
    Where a session goes: proxied to the first available of C{targets}.

    @ivar reason: which locator decided and why, for C{casd locate} and the logs.
    @ivar group: the name of the backend group (or server) chosen: two recipients of one SMTP
        transaction must share it.
    @ivar site: the site of the mailbox, when known.
    @ivar kind: C{"backend"} (mailbox servers) or C{"cas"} (another site's casd).
    @ivar proxyTTL: the TTL to send with the session (IMAP ID C{x-proxy-ttl}); 0 when unset.
    """

    targets: tuple[BackendTarget, ...]
    reason: str
    group: str = ""
    site: str = ""
    kind: str = "backend"
    proxyTTL: int = 0


class Redirected(BackendUnavailable):
    """
    The user's site says "redirect": a protocol that can send the client elsewhere (IMAP
    C{[REFERRAL]}, HTTP 302) renders C{url}; any other renders a temporary failure.

    @ivar url: where to go.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(reason)
        self.url = url


def targetFor(server: BackendServer, protocol) -> BackendTarget:
    """
    The target of C{server} for C{protocol} (an L{casd.interfaces.ICASProtocol}).
    """
    spec = server.protocols.get(protocol.name) or BackendProtocol(
        protocol.defaultBackendPort, protocol.defaultBackendTLS
    )
    return BackendTarget(
        server=server.name,
        host=server.host,
        port=spec.port,
        tls=spec.tls,
        tlsName=server.tlsName,
        masterUser=spec.masterUser,
        masterPassword=spec.masterPassword,
        site=server.site,
        timeouts=tuple(sorted(server.timeouts.items())),
    )


# -- rendezvous hashing -------------------------------------------------------------------


def _score(member: str, weight: int, key: str) -> float:
    digest = blake2b(f"{member}\0{key}".encode("utf-8"), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 0.5) / 2.0**64
    # Weighted rendezvous (the logarithmic method): a member of weight w wins a share w/sum(w).
    return weight / -math.log(unit)


def rendezvousOrder(key: str, members: Iterable[tuple[str, int]]) -> list[str]:
    """
    Highest-random-weight order of C{members} for C{key}.

    Each member's score depends only on the member and the key, so adding or removing a member
    moves only the keys that rank it first; every other key keeps its first choice.  And a
    key's second choice is where it goes while its first is down, then it comes back.

    @param members: C{(name, weight)} pairs.
    @return: the names, best first.
    """
    return [name for _, name in sorted(((-_score(n, w, key), n) for n, w in members))]


def hashKey(user) -> str:
    """
    What a user is hashed by: the mailbox's identity at the backend, so that every protocol
    puts one mailbox on the same member.
    """
    return (getattr(user, "backendLogin", "") or user.login).lower()


def routeTo(config: CASConfig, name: str, user, protocol, reason: str, hashed: bool = False) -> Route:
    """
    The route to a configured server or group called C{name}.

    @param hashed: order a group by rendezvous hashing whatever its C{balance}.
    """
    group = config.groups.get(name)
    if group is None:
        server = config.backends[name]
        if not server.servesProtocol(protocol.name):
            raise _servesNone(f"server {name}", protocol, reason)
        return Route((targetFor(server, protocol),), f"{reason}: server {name}", name, server.site)
    members = [config.backends[m] for m in group.members]
    members = [s for s in members if s.servesProtocol(protocol.name)]
    if not members:
        raise _servesNone(f"group {name}", protocol, reason)
    if hashed or group.balance == "hash":
        order = rendezvousOrder(hashKey(user), [(s.name, s.weight) for s in members])
        how = "rendezvous hashing"
    else:
        order = [s.name for s in members]
        how = "preference order"
    targets = tuple(targetFor(config.backends[n], protocol) for n in order)
    return Route(targets, f"{reason}: group {name} ({how})", name, group.site)


_log = Logger()
_servesNoneWarned: set = set()


def _servesNone(what: str, protocol, reason: str) -> BackendUnavailable:
    """
    The failure of a route to servers none of which serves C{protocol} (C{[backends.NAME]
    protocols}), logged once per route and protocol: a configuration problem.
    """
    message = f"{what} ({reason}) has no member that serves {protocol.name}"
    if (what, protocol.name) not in _servesNoneWarned:
        _servesNoneWarned.add((what, protocol.name))
        _log.warn(
            "{problem}: its {protocol} sessions get a temporary failure (see [backends.NAME] protocols)",
            problem=message,
            protocol=protocol.name,
        )
    return BackendUnavailable(message)


# -- locators ------------------------------------------------------------------------------

#: How many routes a locator keeps at hand (beyond it, routes are built for each session).
ROUTE_CACHE_SIZE = 4096


class _RouteCache:
    """
    The routes a locator hands out, kept per configured name, protocol and reason: a route to
    a server or to a group in preference order is the same for every user (and immutable), so
    it is built once per configuration (a locator is rebuilt on each reload).  Groups balanced
    by hashing are ordered per user: never kept.
    """

    def __init__(self, config: CASConfig) -> None:
        self.config = config
        self._routes: dict = {}

    def _routeTo(self, name: str, user, protocol, reason: str) -> Route:
        key = (name, protocol.name, reason)
        route = self._routes.get(key)
        if route is None:
            route = routeTo(self.config, name, user, protocol, reason)
            group = self.config.groups.get(name)
            if (group is None or group.balance != "hash") and len(self._routes) < ROUTE_CACHE_SIZE:
                self._routes[key] = route
        return route



@implementer(ILocator)
class MailHostLocator(_RouteCache):
    """
    The directory's mailbox attribute: a configured C{[groups.NAME]} or C{[backends.NAME]}, or
    else a host name reached with the protocol's default port and TLS mode.
    """

    def locate(self, user, protocol):
        name = user.mailHost
        if not name:
            return None
        if name in self.config.groups or name in self.config.backends:
            return self._routeTo(name, user, protocol, "mailhost attribute")
        server = BackendServer(name, name, name)
        return Route((targetFor(server, protocol),), f"mailhost attribute: host {name}", name)


@implementer(ILocator)
class StaticMapLocator(_RouteCache):
    """
    The static map file (C{[routing] map_file}): the user's login, then their address, then
    the domain of either, mapped to a server or group.
    """

    def keysFor(self, user) -> list[str]:
        names = [user.login.lower()]
        address = (getattr(user, "address", "") or "").lower()
        if address and address not in names:
            names.append(address)
        for name in list(names):
            if "@" in name:
                domain = name.rsplit("@", 1)[1]
                if domain not in names:
                    names.append(domain)
        return names

    @staticmethod
    def answers(config: CASConfig) -> bool:
        return bool(config.routeMap)

    def locate(self, user, protocol):
        for key in self.keysFor(user):
            name = self.config.routeMap.get(key)
            if name is not None:
                return self._routeTo(name, user, protocol, f"map file entry {key!r}")
        return None


@implementer(ILocator)
class HashLocator:
    """
    Spreads users over C{[routing] hash_group} by rendezvous hashing, so each user stays on
    one member while it is healthy (what Dovecot's director did, without its shared state).
    """

    def __init__(self, config: CASConfig) -> None:
        self.config = config

    @staticmethod
    def answers(config: CASConfig) -> bool:
        return bool(config.routing.hash_group)

    def locate(self, user, protocol):
        name = self.config.routing.hash_group
        if not name:
            return None
        return routeTo(self.config, name, user, protocol, "hash_group", hashed=True)


@implementer(ILocator)
class DefaultBackendLocator(_RouteCache):
    """
    The configured default server or group, for users nothing else placed.
    """

    @staticmethod
    def answers(config: CASConfig) -> bool:
        return bool(config.routing.default_backend)

    def locate(self, user, protocol):
        name = self.config.routing.default_backend
        if not name:
            return None
        return self._routeTo(name, user, protocol, "default backend")


LOCATORS = {
    "mailhost": MailHostLocator,
    "map": StaticMapLocator,
    "hash": HashLocator,
    "default": DefaultBackendLocator,
}


def locatorsFor(config: CASConfig) -> list:
    """
    The chain C{[routing] locators} names, without the locators that cannot answer under
    C{config} (no map, no hash group, no default): they would only say "not mine".
    """
    chain = [LOCATORS[name] for name in config.routing.locators]
    return [kind(config) for kind in chain if getattr(kind, "answers", None) is None or kind.answers(config)]


# -- this node's own addresses --------------------------------------------------------------


def _splitEndpoint(description: str) -> list[str]:
    parts, current, escaped = [], [], False
    for ch in description:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def listenerAddress(description: str) -> tuple[str, int] | None:
    """
    The C{(interface, port)} of a C{tcp:}, C{tcp6:}, C{ssl:} or C{haproxy:} listener endpoint
    string; C{interface} is C{""} when it listens on every address.  C{None} for others.
    """
    parts = _splitEndpoint(description)
    if parts[0] == "haproxy":
        parts = parts[1:]
    if not parts or parts[0] not in ("tcp", "tcp6", "ssl"):
        return None
    positional = [p for p in parts[1:] if "=" not in p]
    options = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
    try:
        port = int(options.get("port") or positional[0])
    except (IndexError, ValueError):
        return None
    interface = options.get("interface", "")
    if interface in ("0.0.0.0", "::"):
        interface = ""
    return interface, port


def isLocalAddress(host: str) -> bool:
    """
    Whether C{host} (an address, or C{localhost}) is one of this machine's: it is loopback or a
    socket can be bound to it.  Never resolves a name.
    """
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


# -- the router ------------------------------------------------------------------------------


class Router:
    """
    Asks each locator in turn, then applies the site policy, the proxy TTL and the self check.

    @ivar config: the configuration the locators were built from; without one (a bare chain)
        only the locators are asked.
    """

    log = Logger()

    def __init__(self, locators: Sequence, config: CASConfig | None = None) -> None:
        self.locators = tuple(locators)
        self.config = config
        self._localHosts: dict[str, bool] = {}
        self._own: dict[str, list] = {}
        self._warned: set = set()
        self._finished: dict = {}

    def reconfigure(self, config: CASConfig) -> None:
        """
        Route by C{config} from now on (the reload of C{[routing]}, C{[backends]}, C{[groups]},
        C{[sites]} and the map file).
        """
        self.locators = tuple(locatorsFor(config))
        self.config = config
        self._own.clear()
        self._warned.clear()
        self._finished.clear()

    def locate(self, user, protocol, ttl: int | None = None) -> defer.Deferred:
        """
        @param protocol: the L{casd.interfaces.ICASProtocol}.
        @param ttl: the proxy TTL a trusted client sent (IMAP ID C{x-proxy-ttl}), else C{None}.
        @return: a L{Deferred} firing with a L{Route}, or failing with L{BackendUnavailable}
            (L{Redirected} when the user's site redirects).  When every locator answers at
            once (a map, a hash, the directory attribute already read) it has fired already:
            no generator and no chain of L{Deferred}s.
        """
        try:
            route = self.locateNow(user, protocol, ttl)
        except Exception:
            return defer.fail()
        if isinstance(route, Route):
            return defer.succeed(route)
        return route

    def locateNow(self, user, protocol, ttl: int | None = None):
        """
        L{locate} without a L{Deferred} when the locators answer at once (the login path's).

        @return: the L{Route} when every locator asked answered at once, else a L{Deferred}
            firing with it (a locator that answers later): tell them by C{isinstance(r, Route)}.
        @raise BackendUnavailable: no route (L{Redirected} when the user's site redirects); any
            other exception of a locator or of the checks is raised too.
        """
        config = self.config
        if ttl is None and config is not None and config.routing.proxy_ttl > 1:
            outgoing = config.routing.proxy_ttl - 1  # outgoingTTL(None), without the call
        else:
            outgoing = self.outgoingTTL(ttl)
        local = config.server.site if config is not None else ""
        if local and user.site and user.site != local:
            # A user the directory places in another site is that site's business: its own
            # locators (and servers this node may not even know) decide there.
            return self._finish(user, protocol, None, outgoing)
        locators = self.locators
        for index, locator in enumerate(locators):
            route = locator.locate(user, protocol)
            if route is None:
                continue
            # Told from a Deferred by the Route class: isinstance() of Deferred, an ABC, is a
            # Python call.
            if not isinstance(route, Route):
                return route.addCallback(self._answered, locators, index, user, protocol, outgoing)
            break
        else:
            route = None
        return self._finish(user, protocol, route, outgoing)

    def _answered(self, route, locators, index, user, protocol, outgoing):
        """
        The rest of L{locate} once C{locators[index]} answered later, with C{route}.
        """
        if route is None:
            for later in range(index + 1, len(locators)):
                route = locators[later].locate(user, protocol)
                if isinstance(route, defer.Deferred):
                    return route.addCallback(
                        self._answered, locators, later, user, protocol, outgoing
                    )
                if route is not None:
                    break
        return self._finish(user, protocol, route, outgoing)

    def _finish(self, user, protocol, route, outgoing: int):
        """
        The site policy, the self check and the proxy TTL, applied to what the locators said.
        """
        if self.config is None:
            if route is None:
                raise BackendUnavailable(f"no route for {user.login!r}")
            return route
        if user.site or route is None:
            return self._checked(user, protocol, route, outgoing)
        # The same route (a locator's, kept at hand) comes out the same for every user the
        # directory places in no site: checked once.  The entry holds the route, so its id is
        # not reused while the entry lives.
        key = (id(route), protocol.name, outgoing)
        entry = self._finished.get(key)
        if entry is not None and entry[0] is route:
            return entry[1]
        checked = self._checked(user, protocol, route, outgoing)
        if len(self._finished) >= ROUTE_CACHE_SIZE:
            self._finished.clear()
        self._finished[key] = (route, checked)
        return checked

    def _checked(self, user, protocol, route, outgoing: int):
        route = self._applySite(user, protocol, route)
        route = self._notSelf(user, route, protocol)
        # Built directly: cheaper than attr.evolve, which inspects the class's fields each time.
        return Route(route.targets, route.reason, route.group, route.site, route.kind, outgoing)

    def outgoingTTL(self, incoming: int | None) -> int:
        """
        The TTL to pass on, as Dovecot's proxies count it.

        @raise BackendUnavailable: when it is spent: proxies appear to be looping.
        """
        ttl = incoming if incoming is not None else (
            self.config.routing.proxy_ttl if self.config is not None else 5
        )
        if ttl <= 1:
            reason = f"proxy TTL {ttl} reached: proxies appear to be looping"
            # A loop is a configuration problem between nodes: the operator must hear of it.
            self.log.warn("session refused: {reason} (check the [sites] of every node)", reason=reason)
            raise BackendUnavailable(reason)
        return ttl - 1

    def _applySite(self, user, protocol, route):
        config = self.config
        local = config.server.site
        site = user.site or (route.site if route is not None else "")
        if not local or not site or site == local:
            if route is None:
                raise BackendUnavailable(f"no route for {user.login!r}")
            return route
        why = f"directory site {site!r}" if user.site else f"{route.reason}, in site {site!r}"
        policy = config.sites.get(site)
        if policy is None:
            raise BackendUnavailable(
                f"{user.login!r}: {why}, for which this node (site {local!r}) has no [sites.{site}]"
            )
        if policy.action == "refuse":
            raise BackendUnavailable(f"{user.login!r}: {why}, refused by [sites.{site}]")
        if policy.action == "redirect":
            raise Redirected(policy.redirectURL, f"{user.login!r}: {why}, redirected to {policy.redirectURL}")
        cas = routeTo(config, policy.cas, user, protocol, f"{why}: proxied to that site's casd")
        return attr.evolve(cas, site=site, kind="cas")

    def _isSelf(self, target, own) -> bool:
        host = target.host.lower()
        if host == "localhost":
            host = "127.0.0.1"
        for interface, port in own:
            if port != target.port:
                continue
            if interface:
                try:
                    if ipaddress.ip_address(interface) == ipaddress.ip_address(host):
                        return True
                except ValueError:
                    if interface.lower() == host:
                        return True
                continue
            if host == self.config.server.hostname.lower():
                return True
            if host not in self._localHosts:
                self._localHosts[host] = isLocalAddress(host)
            if self._localHosts[host]:
                return True
        return False

    def ownAddresses(self, protocol) -> list:
        """
        The C{(interface, port)} pairs this node listens on for C{protocol}.
        """
        own = self._own.get(protocol.name)
        if own is None:
            section = self.config.protocols.get(protocol.name)
            listeners = section.listeners if section is not None else ()
            own = self._own[protocol.name] = [
                a for a in (listenerAddress(l.endpoint) for l in listeners) if a is not None
            ]
        return own

    def _notSelf(self, user, route, protocol):
        own = self.ownAddresses(protocol)
        if not own:
            return route
        mine = [t for t in route.targets if self._isSelf(t, own)]
        if not mine:
            return route
        kept = tuple(t for t in route.targets if t not in mine)
        if not kept:
            reason = f"route for {user.login!r} ({route.reason}) points back at this node"
            self.log.warn("session refused: {reason}", reason=reason)
            raise BackendUnavailable(reason)
        warning = (route.group, tuple(t.key for t in mine))
        if warning not in self._warned:
            self._warned.add(warning)
            self.log.warn(
                "{group}: {members} point back at this node; skipped",
                group=route.group,
                members=", ".join(t.describe() for t in mine),
            )
        skipped = ", ".join(t.describe() for t in mine)
        return attr.evolve(route, targets=kept, reason=f"{route.reason}; {skipped} skipped: this node")


def defaultRouter(config: CASConfig) -> Router:
    return Router(locatorsFor(config), config)
