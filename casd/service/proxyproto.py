# -*- test-case-name: tests.integration.test_tap,tests.test_fuzz -*-
"""
PROXY protocol (v1 and v2) listeners, on Twisted's own parser.

Twisted's C{haproxy:} endpoint starts the wrapped protocol as soon as the TCP connection opens,
before the header has been read, so a protocol that speaks first (IMAP, POP3, SMTP greet) would
take the load balancer's address for the client's.  This wrapper starts the protocol only once
the header is parsed, and bounds the wait for it.
"""

from __future__ import annotations

from zope.interface import directlyProvides, providedBy

from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Protocol
from twisted.protocols.haproxy._wrapper import HAProxyProtocolWrapper, HAProxyWrappingFactory

#: Seconds a connection may take to send its PROXY header.
HEADER_TIMEOUT = 10.0


class _StartAfterHeader(HAProxyProtocolWrapper):
    _started = False
    _timer = None

    def makeConnection(self, transport) -> None:
        # ProtocolWrapper.makeConnection would connect the wrapped protocol right away.
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._noHeader)

    def _noHeader(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            return self.wrappedProtocol.dataReceived(data)
        before = self._proxyInfo
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
    Wraps a factory so that its protocols start once the PROXY header is read.
    """

    protocol = _StartAfterHeader
    noisy = False

    def __init__(self, wrappedFactory, clock) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock


def listenerEndpoint(reactor, description: str, factory):
    """
    @return: C{(endpoint, factory)} for an endpoint string; a C{haproxy:} prefix becomes the
        wrapping factory above around the inner endpoint.
    """
    if description.startswith("haproxy:"):
        return serverFromString(reactor, description[len("haproxy:") :]), ProxyProtocolFactory(
            factory, reactor
        )
    return serverFromString(reactor, description), factory
