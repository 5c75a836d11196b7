# -*- test-case-name: tests.test_leanaccept -*-
"""
A leaner accept for Twisted's TCP listening ports.

For each connection, Twisted's C{tcp.Port.doRead} enters a log-buffering context (a
C{_BuffersLogs} and a new C{Logger}, two more from the class's C{Logger} descriptor), runs the
C{_accept} generator, whose C{socket.accept()} turns the listener's family and type into enums
for the new socket object, and builds a C{tcp.Server}: three C{__init__}s, the log prefix asked
of the protocol through C{ILoggingContext}, and C{startReading()} through the reactor's
C{addReader} and C{_add}.  About 45 Python calls per accepted connection, and as many again for
the wake-up that finds no more (C{EAGAIN}) in part.

L{LeanPort.doRead} accepts with the socket's own C{_accept()} and makes the socket object from
the listener's family, type and protocol as numbers (what C{socket.accept()} does, without the
enums; the listener is non-blocking, so C{accept()} would not make the new socket blocking
either), and builds a plain C{tcp.Server} with the work of its C{__init__} done inline: the
same attributes, the same log prefix (the protocol's class name when its class keeps
C{Protocol.logPrefix}, else Twisted's C{_getLogPrefix}), the same registration for reading on
the epoll reactor (one C{epoll_ctl} as before).  Any accept error other than C{EAGAIN}
(C{EMFILE}, C{ENOBUFS}, C{ECONNABORTED}, ...) hands the wake-up to Twisted's own C{doRead},
which handles them as always; a port whose transport is not C{tcp.Server}, or a reactor other
than Twisted's epoll one, builds its transport Twisted's way.

L{leanAccept} makes a reactor's C{listenTCP} and C{adoptStreamPort} (a worker's listeners)
return L{LeanPort}s, and only when the sources this stands in for are the ones it was written
against (L{ACCEPT_SHA256}); the tests fail on a Twisted where they changed.
"""

from __future__ import annotations

import socket
import types
from errno import EAGAIN, EWOULDBLOCK
from select import EPOLLIN, EPOLLOUT

from twisted.internet import abstract, address, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Protocol
from twisted.python import log as legacyLog

from casd.pinned import sourceMatches

#: SHA-256 of the sources L{LeanPort.doRead} stands in for, in Twisted 26.10.0.
ACCEPT_SHA256 = "689733298d4a96f2868b0efa332c69da3592e6f19305be5a3e53b36cac2c7815"


def acceptMatches() -> bool:
    """
    @return: whether Twisted's accept path is the one L{LeanPort} repeats.
    """
    return sourceMatches(
        ACCEPT_SHA256,
        lambda: (
            tcp.Port.doRead,
            tcp._accept,
            tcp.Server.__init__,
            tcp.Connection.__init__,
            abstract.FileDescriptor.__init__,
            abstract._LogOwner._getLogPrefix,
            abstract.FileDescriptor.startReading,
            Protocol.logPrefix,
            Protocol.makeConnection,
            EPollReactor.addReader,
            EPollReactor._add,
            PosixReactorBase.listenTCP,
            PosixReactorBase.adoptStreamPort,
        ),
    )


_NO_MORE = (EWOULDBLOCK, EAGAIN)
_PROTOCOL_PREFIX = Protocol.logPrefix
_MAKE_CONNECTION = Protocol.makeConnection
_Server = tcp.Server
_newSocket = socket.socket


def _newServer(skt, protocol, client, port, sessionno, reactor, ipv6):
    """
    C{tcp.Server(skt, protocol, client, port, sessionno, reactor)} on Twisted's epoll reactor,
    its C{__init__}s inline.

    @param ipv6: whether C{client} is an IPv6 address (four items), as C{len(client) != 2}.
    """
    transport = _Server.__new__(_Server)
    # abstract.FileDescriptor.__init__
    transport.reactor = reactor
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    # tcp.Connection.__init__
    transport.socket = skt
    skt.setblocking(False)
    transport.fileno = fileno = skt.fileno
    transport.protocol = protocol
    # tcp.Server.__init__
    if ipv6:
        transport._addressType = address.IPv6Address
    transport.server = port
    transport.client = client
    transport.sessionno = sessionno
    transport.hostname = hostname = client[0]
    kind = protocol.__class__
    try:
        simple = kind.logPrefix is _PROTOCOL_PREFIX and "logPrefix" not in protocol.__dict__
    except AttributeError:
        # No logPrefix at all (twisted.web's HTTP channel proxy), or no instance dictionary.
        simple = False
    if simple:
        prefix = kind.__name__  # what _getLogPrefix gets from Protocol.logPrefix
    else:
        prefix = transport._getLogPrefix(protocol)
    transport.logstr = f"{prefix},{sessionno},{hostname}"
    transport.repstr = f"<{kind.__name__} #{sessionno} on {port._realPortNumber}>"
    # startReading(): EPollReactor.addReader and _add.
    fd = fileno()
    reads = reactor._reads
    if fd not in reads:
        writes = reactor._writes
        if fd in writes:
            reactor._poller.modify(fd, EPOLLIN | EPOLLOUT)
        else:
            reactor._poller.register(fd, EPOLLIN)
        reads.add(fd)
        reactor._selectables[fd] = transport
    transport.connected = 1
    return transport


class LeanPort(tcp.Port):
    """
    A TCP listening port that accepts with fewer Python calls (see the module's docstring).
    """

    #: The listener's family, type and protocol as numbers, for the accepted sockets.
    _socketArgs = None

    def doRead(self):
        try:
            listener = self.socket
            args = self._socketArgs
            if args is None:
                args = self._socketArgs = (
                    int(listener.family),
                    int(listener.type),
                    listener.proto,
                )
            family, kind, proto = args
            # An AF_INET6 listener's accept() gives 4-tuples, an AF_INET one's 2-tuples.
            ipv6 = family == socket.AF_INET6
            accept = listener._accept
            reactor = self.reactor
            factory = self.factory
            inline = self.transport is _Server and type(reactor) is EPollReactor
            numAccepts = self.numberAccepts
            accepted = 0
            while accepted < numAccepts:
                try:
                    fd, addr = accept()
                except OSError as e:
                    if e.args[0] in _NO_MORE:
                        break
                    # EMFILE and the other accept errors: Twisted's loop knows what to do.
                    tcp.Port.doRead(self)
                    return
                skt = _newSocket(family, kind, proto, fd)
                accepted += 1
                if ipv6:
                    # IPv6, make sure we get the scopeID if it exists
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = tuple([host[0]] + list(addr[1:]))
                protocol = factory.buildProtocol(self._buildAddr(addr))
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                if inline:
                    transport = _newServer(skt, protocol, addr, self, s, reactor, ipv6)
                else:
                    transport = self.transport(skt, protocol, addr, self, s, reactor)
                if protocol.__class__.makeConnection is _MAKE_CONNECTION:
                    # Protocol.makeConnection, inline.
                    protocol.connected = 1
                    protocol.transport = transport
                    protocol.connectionMade()
                else:
                    protocol.makeConnection(transport)
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = accepted if accepted > 1 else 1
        except BaseException:
            legacyLog.deferr()


def _listenTCP(self, port, factory, backlog=50, interface=""):
    p = LeanPort(port, factory, backlog, interface, self)
    p.startListening()
    return p


def _adoptStreamPort(self, fileDescriptor, addressFamily, factory):
    if addressFamily in (socket.AF_INET, socket.AF_INET6):
        p = LeanPort._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
        p.startListening()
        return p
    return PosixReactorBase.adoptStreamPort(self, fileDescriptor, addressFamily, factory)


def leanAccept(reactor) -> bool:
    """
    Make C{reactor}'s TCP listening ports L{LeanPort}s, if it is Twisted's epoll reactor and
    its accept path the one this module knows.  Call it before listening.

    @return: whether it was installed.
    """
    if type(reactor) is not EPollReactor or not acceptMatches():
        return False
    reactor.listenTCP = types.MethodType(_listenTCP, reactor)
    reactor.adoptStreamPort = types.MethodType(_adoptStreamPort, reactor)
    return True
