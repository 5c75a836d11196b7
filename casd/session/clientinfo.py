# -*- test-case-name: tests.test_auth,tests.test_clientinfo -*-
"""
What casd knows about a client connection, carried through the whole session.
"""

from __future__ import annotations

import binascii
import ipaddress
import os
import re
from typing import Iterable

import attr
from attrs import frozen

from twisted.internet.address import IPv4Address, IPv6Address

from casd.net import parseAddress
from casd.session.relay import PLAIN_TCP_SERVERS
from casd.session.tlsrelay import TLS_LAYERS


#: Bytes of randomness per session id, and how many ids one read of the kernel's random pool
#: serves (one C{getrandom} per 128 sessions rather than one each).
_ID_BYTES = 9
_IDS_PER_READ = 128
_random = [b"", 0]
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def newSessionId() -> str:
    """
    A short random session identifier, shown in logs and passed to the backend (C{x-session-id}):
    9 random bytes in URL-safe base64 (12 characters).
    """
    pool, offset = _random
    if offset + _ID_BYTES > len(pool):
        pool, offset = os.urandom(_ID_BYTES * _IDS_PER_READ), 0
        _random[0] = pool
    _random[1] = offset + _ID_BYTES
    return binascii.b2a_base64(pool[offset : offset + _ID_BYTES], newline=False).translate(_URLSAFE).decode("ascii")


def _hostPort(address) -> tuple[str, int]:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return address.host, address.port
    return str(getattr(address, "name", "") or address), 0


_trustCache: dict = {}
_trustByValue: dict = {}

#: What a forwarded session id may look like (casd's and Dovecot's are base64).
_SESSION_ID = re.compile(r"[A-Za-z0-9+/_=-]{1,64}")


def isTrusted(host: str, networks: Iterable[ipaddress._BaseNetwork]) -> bool:
    """
    @return: whether C{host} lies in one of C{networks}.
    """
    if not networks:
        return False
    # Keyed by the networks' identity (hashing the tuple hashes each network in Python), the
    # tuple kept in the entry so that the id is not reused while it lives.
    key = (host, id(networks))
    known = _trustCache.get(key)
    if known is not None and known[0] is networks:
        return known[1]
    if len(_trustCache) > 4096:
        _trustCache.clear()
        _trustByValue.clear()
    # A caller that builds its tuple each time still finds the answer by value.
    trusted = _trustByValue.get((host, networks))
    if trusted is None:
        trusted = _trustByValue[host, networks] = _isTrusted(host, networks)
    _trustCache[key] = (networks, trusted)
    return trusted


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
        # casd's TLS layer gives its TCP connection's addresses (ProtocolWrapper.getPeer/getHost).
        below = transport.transport if type(transport) in TLS_LAYERS else transport
        if type(below) in PLAIN_TCP_SERVERS and len(below.client) == 2:
            # A plain IPv4 connection: the addresses getPeer() and getHost() would wrap.
            peerHost, peerPort = below.client
            localHost, localPort = below.socket.getsockname()
        else:
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
