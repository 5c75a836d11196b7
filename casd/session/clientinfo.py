# -*- test-case-name: tests.test_auth -*-
"""
What casd knows about a client connection, carried through the whole session.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from typing import Iterable

import attr
from attrs import frozen

from twisted.internet.address import IPv4Address, IPv6Address

from casd.net import parseAddress


def newSessionId() -> str:
    """
    A short random session identifier, shown in logs and passed to the backend (C{x-session-id}).
    """
    return base64.urlsafe_b64encode(os.urandom(9)).decode("ascii")


def _hostPort(address) -> tuple[str, int]:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    return str(getattr(address, "name", "") or address), 0


_trustCache: dict = {}

#: What a forwarded session id may look like (casd's and Dovecot's are base64).
_SESSION_ID = re.compile(r"[A-Za-z0-9+/_=-]{1,64}")


def isTrusted(host: str, networks: Iterable[ipaddress._BaseNetwork]) -> bool:
    """
    @return: whether C{host} lies in one of C{networks}.
    """
    if not networks:
        return False
    key = (host, networks)
    known = _trustCache.get(key)
    if known is None:
        if len(_trustCache) > 4096:
            _trustCache.clear()
        known = _trustCache[key] = _isTrusted(host, networks)
    return known


def _isTrusted(host: str, networks) -> bool:
    ip = parseAddress(host)
    return ip is not None and any(ip in net for net in networks)


@frozen
class ClientInfo:
    """
    One client connection.

    @ivar peerHost: the client's address; behind a C{haproxy:} listener, the real client's address
        read from the PROXY protocol header, not the load balancer's.
    @ivar localHost: the address the client connected to.
    @ivar tls: whether the connection is encrypted now (implicit TLS or after STARTTLS).
    @ivar trusted: whether the client is trusted (its listener or its network).
    """

    sessionId: str
    protocol: str
    listener: str
    peerHost: str
    peerPort: int
    localHost: str
    localPort: int
    tls: bool
    trusted: bool

    @classmethod
    def fromTransport(cls, transport, protocol, listener, trustedNetworks, tls=False) -> ClientInfo:
        """
        @param listener: the L{casd.config.ListenerConfig} the client came in through.
        """
        peerHost, peerPort = _hostPort(transport.getPeer())
        localHost, localPort = _hostPort(transport.getHost())
        return cls(
            sessionId=newSessionId(),
            protocol=protocol,
            listener=listener.name,
            peerHost=peerHost,
            peerPort=peerPort,
            localHost=localHost,
            localPort=localPort,
            tls=tls,
            trusted=listener.trusted or isTrusted(peerHost, trustedNetworks),
        )

    def withTLS(self) -> ClientInfo:
        return attr.evolve(self, tls=True)

    def forwardedBy(self, host: str | None, port: str | None, sessionId: str | None) -> ClientInfo:
        """
        The client as a trusted proxy in front of this node (another casd, Dovecot, a load
        balancer speaking IMAP ID or XCLIENT) reports it: its address and port, and the session id
        it gave the session, so that logs on both nodes name the same session.  Values that do
        not parse are ignored; the caller checks that the proxy is trusted.
        """
        changes = {}
        ip = parseAddress(host) if host is not None else None
        if ip is not None:
            changes["peerHost"] = ip.compressed
        if port is not None and port.isdigit() and 0 < int(port) < 65536:
            changes["peerPort"] = int(port)
        if sessionId is not None and _SESSION_ID.fullmatch(sessionId):
            changes["sessionId"] = sessionId
        return attr.evolve(self, **changes) if changes else self

    @property
    def plaintextAllowed(self) -> bool:
        """
        Whether a password may be sent on this connection now.
        """
        return self.tls or self.trusted
