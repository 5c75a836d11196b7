# -*- test-case-name: tests.integration.test_tap,tests.test_fuzz -*-
"""
PROXY protocol (v1 and v2) listeners, on Twisted's own parser.

Twisted's C{haproxy:} endpoint starts the wrapped protocol as soon as the TCP connection opens,
before the header has been read, so a protocol that speaks first (IMAP, POP3, SMTP greet) would
take the load balancer's address for the client's.  This wrapper starts the protocol only once
the header is parsed, and bounds the wait for it.

It also believes a header only from the listener's trusted senders (C{proxy_trusted}, like
Dovecot's C{haproxy_trusted_networks} and nginx's C{set_real_ip_from}): anyone else could claim
an address inside C{[server] trusted_networks} and be treated as trusted.  A connection from
another peer is closed at once, or, with C{proxy_untrusted = "ignore"}, its header is read and
thrown away and the peer's own address is used.  Each such peer is logged once (the memory of
who was logged is bounded).

The set-up is lighter than Twisted's where it can be with the same result: the common version 1
header (C{PROXY TCP4|TCP6 src dst sport dport}, nothing else on the line) is read by one regular
expression, and a version 2 header of the C{PROXY} command over TCP by one C{struct} unpacking,
into the same L{ProxyInfo} Twisted's parsers give (anything else goes to Twisted's parsers,
which cost about 70 (version 1) and 115 (version 2) Python calls per header), and the
wrapper's interface declaration (C{directlyProvides(self, providedBy(transport))}) is looked up in
a table by the transport's declaration instead of being normalised again per connection.
"""

from __future__ import annotations

import re
import struct
from collections import OrderedDict

from zope.interface import providedBy
from zope.interface.declarations import Provides, _normalizeargs

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.haproxy._info import ProxyInfo
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

from casd.service.leanaccept import leanListening
from casd.session.clientinfo import isTrusted

#: Seconds a connection may take to send its PROXY header.
HEADER_TIMEOUT = 10.0
#: How many untrusted peers are remembered as already logged.
LOGGED_PEERS = 1024

log = Logger()

#: A version 1 header as load balancers send it, whole, in the first read: what Twisted's
#: C{V1Parser} splits into the same five fields (its checks: C{PROXY}, the protocol, four
#: fields, ports C{int()}, addresses decoded).  Anything else goes to Twisted's parser.
_V1 = re.compile(
    rb"PROXY (?:TCP4 ([0-9.]{7,15}) ([0-9.]{7,15})|TCP6 ([0-9A-Fa-f:.]{2,45}) ([0-9A-Fa-f:.]{2,45}))"
    rb" ([0-9]{1,5}) ([0-9]{1,5})\r\n"
)

_newObject = object.__new__

#: (wrapper class, transport's declaration) -> the wrapper's declaration, as
#: C{directlyProvides(wrapper, providedBy(transport))} makes it; held here, since zope.interface
#: keeps its own cache of them only while an object uses one.  Bounded: cleared when full.
_DECLARATIONS: dict = {}


def _declarationFor(cls, spec):
    key = (cls, spec)
    found = _DECLARATIONS.get(key)
    if found is None:
        if len(_DECLARATIONS) >= 256:
            _DECLARATIONS.clear()
        found = _DECLARATIONS[key] = Provides(cls, *_normalizeargs((spec,)))
    return found


def _v1Info(data: bytes):
    """
    @return: C{(ProxyInfo, bytes after the header)} for a common version 1 header at the start
        of C{data}, as Twisted's C{V1Parser} would give them, or C{None}.
    """
    match = _V1.match(data)
    if match is None:
        return None
    src4, dst4, src6, dst6, sport, dport = match.groups()
    end = match.end()
    if src4 is not None:
        # IPv4Address("TCP", host, port), without attrs' __init__ and its validator.
        source = _newObject(IPv4Address)
        source.type, source.host, source.port = "TCP", src4.decode(), int(sport)
        destination = _newObject(IPv4Address)
        destination.type, destination.host, destination.port = "TCP", dst4.decode(), int(dport)
    else:
        source = IPv6Address("TCP", src6.decode(), int(sport))
        destination = IPv6Address("TCP", dst6.decode(), int(dport))
    return ProxyInfo(data[: end - 2], source, destination), data[end:]


#: A version 2 header's fixed start: the signature, then version 2 with the PROXY command.
_V2_PROXY = V2Parser.PREFIX + b"\x21"
_V2_TCP4 = struct.Struct("!4B4BHH")
_V2_TCP6 = struct.Struct("!8H8HHH")


def _v2Info(data: bytes):
    """
    @return: C{(ProxyInfo, bytes after the header)} for a version 2 header of the PROXY command
        over TCP (IPv4 or IPv6), whole at the start of C{data}, as Twisted's C{V2Parser} would
        give them (its address texts: dotted quads; eight uncompressed hexadecimal groups), or
        C{None} for anything else (C{LOCAL}, UDP, UNIX, a header in pieces), which Twisted's
        parser reads.
    """
    if data[:13] != _V2_PROXY or len(data) < 16:
        return None
    familyProtocol = data[13]
    size = 16 + ((data[14] << 8) | data[15])
    if len(data) < size:
        return None
    if familyProtocol == 0x11 and size >= 28:
        a, b, c, d, e, f, g, h, sport, dport = _V2_TCP4.unpack_from(data, 16)
        source = _newObject(IPv4Address)
        source.type, source.host, source.port = "TCP", "%d.%d.%d.%d" % (a, b, c, d), sport
        destination = _newObject(IPv4Address)
        destination.type, destination.host, destination.port = "TCP", "%d.%d.%d.%d" % (e, f, g, h), dport
    elif familyProtocol == 0x21 and size >= 52:
        groups = _V2_TCP6.unpack_from(data, 16)
        source = IPv6Address("TCP", "%x:%x:%x:%x:%x:%x:%x:%x" % groups[:8], groups[16])
        destination = IPv6Address("TCP", "%x:%x:%x:%x:%x:%x:%x:%x" % groups[8:16], groups[17])
    else:
        return None
    return ProxyInfo(data[:size], source, destination), data[size:]


class _StartAfterHeader(HAProxyProtocolWrapper):
    _started = False
    _timer = None

    #: Whether the peer may send a header that is believed.
    _believed = False

    def makeConnection(self, transport) -> None:
        # ProtocolWrapper.makeConnection would connect the wrapped protocol right away.
        # directlyProvides(self, providedBy(transport)), from the table:
        self.__provides__ = _declarationFor(self.__class__, providedBy(transport))
        self.connected = 1  # Protocol.makeConnection, without its connectionMade (a no-op)
        self.transport = transport
        self.factory.registerProtocol(self)
        self._believed = self.factory.believes(transport.getPeer())
        if not self._believed and self.factory.untrusted == "close":
            self.transport.abortConnection()
            return
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._noHeader)

    def getPeer(self):
        if self._believed:
            return super().getPeer()
        return self.transport.getPeer()

    def getHost(self):
        if self._believed:
            return super().getHost()
        return self.transport.getHost()

    def _noHeader(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            return self.wrappedProtocol.dataReceived(data)
        if self._timer is None:
            return  # refused (untrusted, closing) or timed out: nothing more is read
        before = self._proxyInfo
        if before is None and self._parser is None:
            parsed = _v2Info(data) if data[:1] == b"\r" else _v1Info(data)
            if parsed is not None:
                self._proxyInfo, rest = parsed
                self._start([rest] if rest else [])
                return
        # The parent parses the header and hands any bytes after it to the wrapped protocol,
        # which must be connected first: intercept that hand-over.
        pending = []
        wrapped, self.wrappedProtocol = self.wrappedProtocol, _Collect(pending)
        try:
            super().dataReceived(data)
        except ValueError:
            # Twisted's v1 parser decodes the addresses and ports without checking them (a
            # UnicodeDecodeError, int()'s ValueError): an invalid header like any other.
            self.transport.abortConnection()
            return
        finally:
            self.wrappedProtocol = wrapped
        if self._proxyInfo is not None and before is None:
            self._start(pending)

    def _start(self, pending: list) -> None:
        """
        The header is read: connect the wrapped protocol and hand it what followed.
        """
        self._started = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.wrappedProtocol.makeConnection(self)
        for chunk in pending:
            self.wrappedProtocol.dataReceived(chunk)

    def connectionLost(self, reason) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._started:
            super().connectionLost(reason)
        else:
            self.factory.unregisterProtocol(self)


class _Collect:
    def __init__(self, into: list) -> None:
        self.into = into

    def dataReceived(self, data: bytes) -> None:
        self.into.append(data)


class ProxyProtocolFactory(HAProxyWrappingFactory):
    """
    Wraps a factory so that its protocols start once the PROXY header is read, and believe it
    only from C{trusted} senders.

    @ivar trusted: the networks whose headers are believed.
    @ivar untrusted: C{"close"} or C{"ignore"}: what happens to a connection from another peer.
    """

    protocol = _StartAfterHeader
    noisy = False

    def __init__(self, wrappedFactory, clock, trusted, untrusted: str = "close", name: str = "") -> None:
        super().__init__(wrappedFactory)
        if untrusted not in ("close", "ignore"):
            raise ValueError(f"untrusted must be 'close' or 'ignore', not {untrusted!r}")
        self.clock = clock
        self.trusted = tuple(trusted)
        self.untrusted = untrusted
        self.name = name
        self._logged: OrderedDict[str, None] = OrderedDict()

    def believes(self, peer) -> bool:
        """
        @return: whether a PROXY header from C{peer} (the TCP peer) is believed; logs a peer
            that is not, once.
        """
        host = getattr(peer, "host", None)
        if host is not None and isTrusted(host, self.trusted):
            return True
        key = str(host)
        if key in self._logged:
            self._logged.move_to_end(key)
        else:
            self._logged[key] = None
            if len(self._logged) > LOGGED_PEERS:
                self._logged.popitem(last=False)
            log.warn(
                "PROXY listener {listener}: {peer} is not in proxy_trusted: {action}"
                " (logged once per peer)",
                listener=self.name,
                peer=key,
                action="connection closed" if self.untrusted == "close" else "header ignored, peer address used",
            )
        return False


def listenerEndpoint(reactor, listener, factory):
    """
    @param listener: the L{casd.config.ListenerConfig}.
    @return: C{(endpoint, factory)} for the listener; a C{haproxy:} endpoint gets the wrapping
        factory above, with the listener's trusted PROXY senders, around the inner endpoint.
        TCP endpoints listen with L{casd.service.leanaccept.LeanPort} where it applies.
    """
    description = listener.endpoint
    reactor = leanListening(reactor)
    if listener.proxyProtocol:
        if not listener.proxyTrusted:
            raise ValueError(f"listener {listener.name}: a haproxy: endpoint needs proxy_trusted")
        wrapped = ProxyProtocolFactory(
            factory, reactor, listener.proxyTrusted, listener.proxyUntrusted, listener.name
        )
        return serverFromString(reactor, description[len("haproxy:") :]), wrapped
    return serverFromString(reactor, description), factory
