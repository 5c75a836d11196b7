# -*- test-case-name: tests.test_tcpclient,tests.integration.test_tcpclient -*-
"""
The backend side of a session: a TCP client connection to an IPv4 address, with fewer system
calls and Python calls than Twisted's C{connectTCP}.

Twisted's L{twisted.internet.tcp.Client} connects on the reactor's next iteration (a timer and
a L{Deferred} for the address it needs no resolution for), registers for reading and writing
while connecting, then on success asks C{SO_ERROR}, calls C{connect} a second time, unregisters
both directions and registers for reading again (five C{epoll_ctl}, two C{connect}, two
C{getsockopt}), and calls C{shutdown} before C{close}.  L{LeanClient} makes its socket
non-blocking in C{socket()} (no C{ioctl}), connects at once,
waits for writability alone, asks C{SO_ERROR} once, switches to reading (three C{epoll_ctl},
one C{connect}, one C{getsockopt}) and closes without C{shutdown} (the socket is close-on-exec:
no other process holds it, as Twisted's own comment on C{shutdown} says).

Its connector (L{LeanConnector}) is the least the transport and the pool use: no state machine,
no factory start and stop, no timer (the pool bounds each attempt with a timer of its own).

It relies on L{twisted.internet.tcp.Client}'s internals: L{twistedMatches} checks their source
against the Twisted version this was written for, and L{connectBackend} falls back to
C{connectTCP} when they differ (a test fails loudly then).
"""

from __future__ import annotations

import socket
from errno import EALREADY, EINPROGRESS, EISCONN, EWOULDBLOCK
from os import strerror

from twisted.internet import abstract, error, tcp
from twisted.internet.address import IPv4Address
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Protocol

from casd.pinned import sourceMatches
from casd.service.leanpoll import readInsteadOfWriting
from casd.session import teardown
from casd.session.relay import PLAIN_READ, _writeNow, writesThrough

#: SHA-256 of the sources L{LeanClient} stands in for, in Twisted 26.10.0.
TWISTED_SHA256 = "13916e1f1a01ea5ce8bb1c2df7ca9347a64f8bce3b1db2b78891422c1ec7555e"


def twistedMatches() -> bool:
    """
    @return: whether Twisted's TCP client is the one L{LeanClient} was written against.
    """
    return sourceMatches(
        TWISTED_SHA256,
        lambda: (
            tcp._BaseTCPClient.__init__,
            tcp._BaseBaseClient._finishInit,
            tcp._BaseBaseClient.failIfNotConnected,
            tcp._BaseBaseClient.connectionLost,
            tcp.BaseClient.doConnect,
            tcp.BaseClient._connectDone,
            tcp.Connection.__init__,
            tcp.Connection.logPrefix,
            tcp._SocketCloser._closeSocket,
        ),
    )


#: Whether L{LeanClient} is used: L{twistedMatches}, asked on the first connect.
_LEAN = None


@writesThrough
class LeanClient(tcp.Client):
    """
    A client connection to an IPv4 address literal (see the module's docstring).
    """

    #: The socket is close-on-exec and never shared: C{close} alone ends the connection.
    _shouldShutdown = False

    #: Writes try the socket at once (L{casd.session.relay.writeThrough}), from the first.
    write = _writeNow
    #: Reads hand the bytes to the protocol in one call (L{casd.session.relay._readNow}).
    doRead = PLAIN_READ

    def __init__(self, host: str, port: int, connector, reactor) -> None:
        self.connector = connector
        self.addr = self.realAddress = (host, port)
        self._requiresResolution = False
        try:
            skt = self.createInternetSocket()
        except OSError as e:
            self._finishInit(None, None, error.ConnectBindError(e.args[0], e.args[1]), reactor)
            return
        # tcp.Connection.__init__ without its setblocking(False) (one ioctl): the socket was
        # made non-blocking.
        abstract.FileDescriptor.__init__(self, reactor=reactor)
        self.socket = skt
        self.fileno = skt.fileno
        self.protocol = None
        self.doWrite = self.doRead = self._connecting
        try:
            result = skt.connect_ex(self.realAddress)
        except OSError as e:
            result = e.args[0]
        if result in (0, EINPROGRESS, EWOULDBLOCK, EALREADY, EISCONN):
            # Writable once connected (or failed): one registration, for writing alone.
            self.startWriting()
        else:
            # Reported on the next iteration, as Twisted does: the connector is not set up yet.
            reactor.callLater(
                0, self.failIfNotConnected, error.getConnectError((result, strerror(result)))
            )

    def createInternetSocket(self):
        """
        A non-blocking socket made so by C{socket()} itself: no C{ioctl} after it.
        """
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)

    def _connecting(self):
        """
        C{doWrite} (and C{doRead}) until connected: the connect finished, one way or the other.
        """
        if "connector" not in self.__dict__:  # hasattr(self, "connector"), without a call
            return None
        err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.failIfNotConnected(error.getConnectError((err, strerror(err))))
            return None
        del self.doWrite
        del self.doRead
        readInsteadOfWriting(self)  # one epoll_ctl MOD on the epoll reactor
        # tcp.BaseClient._connectDone, but the log prefix is made when it is asked for.
        self.protocol = self.connector.buildProtocol(self.getPeer())
        self.connected = 1
        if self.protocol is None:
            self.protocol = Protocol()
            self.loseConnection()
        else:
            self.protocol.makeConnection(self)
        return None

    def logPrefix(self) -> str:
        return "%s,client" % self._getLogPrefix(self.protocol)

    def connectionLost(self, reason) -> None:
        if not self.connected and hasattr(self, "connector") and hasattr(self, "socket"):
            # Registered for writing alone, a refused connect reaches epoll's reactor as a
            # hang-up, not an event to read: name the socket's own error, as Twisted does.
            err = self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.failIfNotConnected(error.getConnectError((err, strerror(err))))
                return
        super().connectionLost(reason)


# Connected, its connectionLost is Twisted's client's (the override above only names a failed
# connect): casd.session.teardown may end it in one step.
teardown.relayed(LeanClient, client=True)


class LeanConnector:
    """
    The part of L{twisted.internet.interfaces.IConnector} that a L{LeanClient} and the pool
    use, for one attempt: no state machine, no factory start and stop, no timer (the pool
    bounds the attempt).

    @ivar transport: the L{LeanClient}.
    """

    def __init__(self, host: str, port: int, factory) -> None:
        self.host = host
        self.port = port
        self.factory = factory
        self.transport = None

    def connect(self, reactor) -> None:
        self.transport = LeanClient(self.host, self.port, self, reactor)

    # -- what the transport calls -----------------------------------------------------------

    def buildProtocol(self, addr):
        return self.factory.buildProtocol(addr)

    def connectionFailed(self, reason) -> None:
        self.transport = None
        self.factory.clientConnectionFailed(self, reason)

    def connectionLost(self, reason) -> None:
        # The transport and the factory (which holds the protocol) refer back to this connector:
        # kept, they would form cycles that only the garbage collector frees.
        factory, self.factory, self.transport = self.factory, None, None
        factory.clientConnectionLost(self, reason)

    # -- IConnector -------------------------------------------------------------------------

    def stopConnecting(self) -> None:
        """
        Give up the connection attempt: the factory hears C{UserError} at once.
        """
        transport = self.transport
        if transport is None or transport.connected:
            raise error.NotConnectingError("not connecting")
        transport.failIfNotConnected(error.UserError())

    def disconnect(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if transport.connected:
            transport.loseConnection()
        elif not transport.disconnected:
            transport.failIfNotConnected(error.UserError())

    def getDestination(self) -> IPv4Address:
        return IPv4Address("TCP", self.host, self.port)


def connectBackend(reactor, host: str, port: int, factory, version: int):
    """
    Connect to C{host:port} (an IP address literal of C{version}) with C{factory}, with no
    timeout of the connector's own (the caller bounds the attempt).

    @return: the L{twisted.internet.interfaces.IConnector}.
    """
    global _LEAN
    if _LEAN is None:
        _LEAN = twistedMatches()
    if version == 4 and _LEAN and isinstance(reactor, PosixReactorBase):
        connector = LeanConnector(host, port, factory)
        connector.connect(reactor)
        return connector
    return reactor.connectTCP(host, port, factory, timeout=None)
