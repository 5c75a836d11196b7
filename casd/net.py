# -*- test-case-name: tests.test_net -*-
"""
The network helpers the core shares: how a peer's address is read, and how casd connects to a
server (mailbox servers, LDAP servers).
"""

from __future__ import annotations

import functools
import ipaddress

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)

from casd.tlslayer import wrapClientTLS


def parseAddress(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    The IP address of a peer as casd compares, counts and reports it: a zone index
    (C{fe80::1%eth0}) dropped, an IPv4-mapped IPv6 address (C{::ffff:192.0.2.7}) as the IPv4
    address it is.

    @return: the address, or C{None} when C{host} is not one (a UNIX socket's name).
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@functools.lru_cache(maxsize=4096)
def addressFamily(host: str) -> int:
    """
    Whether C{host} is an IP address literal, and of which version; parsed once per host (a
    backend's address is looked at on every connect).

    @return: 4 or 6, or 0 for a name.
    """
    try:
        return ipaddress.ip_address(host).version
    except ValueError:
        return 0


def clientEndpoint(reactor, host: str, port: int, timeout: float, tlsOptions=None):
    """
    The client endpoint for C{host:port}: an IP address is connected to as it is, a name through
    L{HostnameEndpoint} (every address it resolves to, both families, RFC 8305).

    @param tlsOptions: when given, TLS from the first byte (implicit TLS) with these options.
    """
    version = addressFamily(host)
    if not version:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    else:
        kind = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
        endpoint = kind(reactor, host, port, timeout=timeout)
    if tlsOptions is not None:
        endpoint = wrapClientTLS(tlsOptions, endpoint)
    return endpoint
