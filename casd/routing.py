"""
Mailbox location: a chain of small locators, each answering "here" (a L{Route}), "not mine"
(C{None}) or "unavailable" (L{casd.failures.BackendUnavailable}), tried in order like
L{twisted.names.resolve.ResolverChain}.
"""

from __future__ import annotations

import ipaddress
from typing import Sequence

from attrs import field, frozen
from zope.interface import implementer

from twisted.internet import defer

from casd.config import BackendProtocol, BackendServer, CASConfig
from casd.failures import BackendUnavailable
from casd.interfaces import ILocator


@frozen
class BackendTarget:
    """
    One backend server as one protocol reaches it.

    @ivar tlsName: the name verified in its certificate.
    @ivar masterPassword: never logged, never in C{repr}.
    """

    server: str
    host: str
    port: int
    tls: str
    tlsName: str
    masterUser: str = ""
    masterPassword: bytes = field(default=b"", repr=False)

    @property
    def isAddress(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def describe(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.server}({host}:{self.port})" if self.server != self.host else f"{host}:{self.port}"


@frozen
class Route:
    """
    Where a session goes: proxied to the first reachable of C{targets}.

    @ivar reason: which locator decided, for C{casd locate} and the logs.
    @ivar group: the name of the backend group (or server) chosen: two recipients of one SMTP
        transaction must share it.
    """

    targets: tuple[BackendTarget, ...]
    reason: str
    group: str = ""


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
    )


@implementer(ILocator)
class MailHostLocator:
    """
    The directory's mailbox server attribute: a configured C{[backends.NAME]}, or else a host name
    reached with the protocol's default port and TLS mode.
    """

    def __init__(self, config: CASConfig) -> None:
        self.config = config

    def locate(self, user, protocol):
        if not user.mailHost:
            return None
        server = self.config.backends.get(user.mailHost)
        if server is None:
            server = BackendServer(user.mailHost, user.mailHost, user.mailHost)
            return Route((targetFor(server, protocol),), "mailhost attribute (host)", server.name)
        return Route((targetFor(server, protocol),), "mailhost attribute", server.name)


@implementer(ILocator)
class DefaultBackendLocator:
    """
    The configured default backend, for users the directory places nowhere.
    """

    def __init__(self, config: CASConfig) -> None:
        self.config = config

    def locate(self, user, protocol):
        name = self.config.routing.default_backend
        if not name:
            return None
        return Route((targetFor(self.config.backends[name], protocol),), "default backend", name)


class Router:
    """
    Asks each locator in turn.
    """

    def __init__(self, locators: Sequence) -> None:
        self.locators = tuple(locators)

    @defer.inlineCallbacks
    def locate(self, user, protocol):
        """
        @return: a L{Deferred} firing with a L{Route}, or failing with L{BackendUnavailable}.
        """
        for locator in self.locators:
            route = yield locator.locate(user, protocol)
            if route is not None:
                return route
        raise BackendUnavailable(f"no route for {user.login!r}")


def defaultRouter(config: CASConfig) -> Router:
    return Router([MailHostLocator(config), DefaultBackendLocator(config)])
