# -*- test-case-name: tests.test_leanaccept -*-
"""
A leaner accept and set-up of a client connection for casd's TCP listeners.

For each connection it accepts, Twisted's L{tcp.Port.doRead} opens a log-buffering context
(C{_BuffersLogs}, two fresh C{Logger}s from a descriptor), resumes the C{_accept} generator
twice (the second time for the C{EAGAIN} that ends the loop), calls C{socket.accept()} (whose
C{family} and C{type} properties convert the listener's ints to enums, a handful of Python
calls each time), builds the peer's L{IPv4Address} (an C{attrs} C{__init__} and its validator),
and builds the transport through C{Server.__init__}, C{Connection.__init__},
C{FileDescriptor.__init__}, C{_getLogPrefix}, C{startReading}, C{addReader} and C{_add}, then
calls C{makeConnection}: about 35 Python calls per accepted connection, a tenth of a login.

L{LeanPort.doRead} does the same with the accept loop inline: C{socket._accept()} with the
listener's family, type and protocol as plain ints (read once per port), the address made
without C{attrs}' C{__init__} (the same three attributes, the validator's only allowed value),
the L{tcp.Server} built without its C{__init__} chain (the same attributes, compared attribute
for attribute with Twisted's in the tests), registered for reading in the epoll reactor directly
(as C{EPollReactor.addReader} does: L{casd.service.leanpoll.fdSetMatches}), and C{makeConnection}
inline when the protocol keeps L{BaseProtocol}'s.  What is rare is Twisted's, line for line: the
errors of C{accept()} (C{EPERM} retried; C{EMFILE} answered by releasing the reserved file
descriptor and closing what can then be accepted; C{ENFILE}, C{ENOBUFS}, C{ENOMEM},
C{ECONNABORTED} logged, through the same buffering logger, and the loop ended; anything else
logged by C{log.deferr()}), a factory that refuses (C{None}), the adaptation of
C{numberAccepts}, IPv6 peers (their scope id), other transport classes, reactors and protocols.

It is used only where the Twisted code it stands in for is the code it was written against (the
hash of its source, L{ACCEPT_SHA256}); on any other Twisted the listeners are Twisted's own
L{tcp.Port}, and the tests fail so that the copy is looked at again.
"""

from __future__ import annotations

import _socket
import socket
import types
from errno import EAGAIN, EMFILE, EPERM, EWOULDBLOCK, errorcode
from select import EPOLLIN, EPOLLOUT

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import BaseProtocol, Protocol
from twisted.protocols.policies import ProtocolWrapper, _wrappedLogPrefix
from twisted.python import log as legacyLog

from casd.pinned import sourceMatches
from casd.service.leanpoll import fdSetMatches

#: SHA-256 of the Twisted (26.10.0) and Python (3.11) code L{LeanPort.doRead} repeats:
#: C{Port.doRead}, C{_accept}, C{Server.__init__}, C{Connection.__init__},
#: C{FileDescriptor.__init__}, C{FileDescriptor.startReading}, C{EPollReactor.addReader},
#: C{BaseProtocol.makeConnection}, C{Protocol.logPrefix}, C{ProtocolWrapper.logPrefix} (with
#: C{_wrappedLogPrefix}), C{socket.socket.accept} and C{socket.socket.__init__}.
ACCEPT_SHA256 = "685c6c3c245dc77f0db547b9a741a64ff1ce8fda7d7d9cdf8eb732b17f70d085"


def _pinned() -> list:
    return [
        tcp.Port.doRead,
        tcp._accept,
        tcp.Server.__init__,
        tcp.Connection.__init__,
        FileDescriptor.__init__,
        FileDescriptor.startReading,
        EPollReactor.addReader,
        BaseProtocol.makeConnection,
        Protocol.logPrefix,
        ProtocolWrapper.logPrefix,
        _wrappedLogPrefix,
        socket.socket.accept,
        socket.socket.__init__,
    ]


def acceptMatches() -> bool:
    """
    @return: whether the code L{LeanPort.doRead} stands in for is the code it was written
        against, and the address and transport classes are as it expects.
    """
    return (
        sourceMatches(ACCEPT_SHA256, _pinned)
        and fdSetMatches()
        and not hasattr(IPv4Address, "__slots__")
        and IPv4Address.__setattr__ is object.__setattr__
        and [f.name for f in IPv4Address.__attrs_attrs__] == ["type", "host", "port"]
    )


_known: list[bool] = []


def _matches() -> bool:
    if not _known:
        _known.append(acceptMatches())
    return _known[0]


_newObject = object.__new__
_Socket = socket.socket
_newSocket = socket.socket.__new__
_initSocket = _socket.socket.__init__
_makeConnection = BaseProtocol.makeConnection
_logPrefix = Protocol.logPrefix
_Server = tcp.Server
_wrapperLogPrefix = ProtocolWrapper.logPrefix
#: The instance dictionary of an object without one (never written to).
_NO_ATTRIBUTES: dict = {}


def _prefixOf(protocol, own):
    """
    C{_getLogPrefix(protocol)} without its calls when it is made of class names: C{protocol} is
    a L{ProtocolWrapper} (TLS, PROXY) keeping its C{logPrefix} around a protocol that keeps
    C{Protocol.logPrefix} (or keeps C{Protocol.logPrefix} itself).

    @param own: C{protocol}'s instance dictionary.
    @return: the prefix, or C{None} for Twisted's C{_getLogPrefix} to find.
    """
    method = getattr(type(protocol), "logPrefix", None)
    if "logPrefix" in own:
        return None
    if method is _logPrefix:
        return protocol.__class__.__name__
    if method is _wrapperLogPrefix:
        try:
            wrapped = own["wrappedProtocol"]
            inner = wrapped.__dict__
        except (KeyError, AttributeError):
            return None
        if getattr(type(wrapped), "logPrefix", None) is _logPrefix and "logPrefix" not in inner:
            return f"{wrapped.__class__.__name__} ({protocol.__class__.__name__})"
    return None


class LeanPort(tcp.Port):
    """
    A L{tcp.Port} whose C{doRead} accepts and sets up connections in fewer Python calls, with
    the same results (see the module's docstring).
    """

    #: The listener's C{(family, type, proto)} as ints, read on the first accept.
    _kinds = None

    def doRead(self):
        try:
            kinds = self._kinds
            listener = self.socket
            if kinds is None:
                kinds = self._kinds = (int(listener.family), int(listener.type), listener.proto)
            family, kind, proto = kinds
            factory = self.factory
            reactor = self.reactor
            plain = self.transport is _Server
            epoll = plain and type(reactor) is EPollReactor and (_known[0] if _known else _matches())
            numAccepts = self.numberAccepts
            accepted = 0
            tries = 0
            while tries < numAccepts:
                tries += 1
                try:
                    fd, addr = listener._accept()
                except OSError as e:
                    code = e.args[0]
                    if code == EAGAIN or code == EWOULDBLOCK:
                        break  # no more clients
                    if code == EPERM:
                        continue  # netfilter may have refused it: accept the next one
                    self._acceptFailed(e, numAccepts)
                    break
                # socket.accept(), with the listener's kinds as ints: the same socket, its
                # socket.socket.__init__ inline.
                skt = _newSocket(_Socket)
                _initSocket(skt, family, kind, proto, fd)
                skt._io_refs = 0
                skt._closed = False
                accepted += 1
                if len(addr) == 4:
                    # IPv6, with its scope id: Twisted's code, and its classes.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = tuple([host[0]] + list(addr[1:]))
                    protocol = factory.buildProtocol(self._buildAddr(addr))
                    if protocol is None:
                        skt.close()
                        continue
                    s = self.sessionno
                    self.sessionno = s + 1
                    protocol.makeConnection(self.transport(skt, protocol, addr, self, s, reactor))
                    continue
                if self._addressType is IPv4Address:
                    # IPv4Address("TCP", host, port), without attrs' __init__ and validator.
                    peer = _newObject(IPv4Address)
                    peer.type = "TCP"
                    peer.host = addr[0]
                    peer.port = addr[1]
                else:
                    peer = self._buildAddr(addr)
                protocol = factory.buildProtocol(peer)
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                if not plain:
                    protocol.makeConnection(self.transport(skt, protocol, addr, self, s, reactor))
                    continue
                # tcp.Server(skt, protocol, addr, self, s, reactor), attribute for attribute.
                transport = _newObject(_Server)
                transport.reactor = reactor
                transport._tempDataBuffer = []
                transport._tempDataLen = 0
                transport.socket = skt
                skt.setblocking(False)
                transport.fileno = skt.fileno
                transport.protocol = protocol
                transport.server = self
                transport.client = addr
                transport.sessionno = s
                transport.hostname = host = addr[0]
                name = protocol.__class__.__name__
                try:
                    own = protocol.__dict__  # methods set on the instance are Twisted's to call
                except AttributeError:
                    own = _NO_ATTRIBUTES
                # (A protocol may have no logPrefix at all: twisted.web's HTTP channel.)
                if getattr(type(protocol), "logPrefix", None) is _logPrefix and "logPrefix" not in own:
                    transport.logstr = f"{name},{s},{host}"
                else:
                    prefix = _prefixOf(protocol, own)
                    if prefix is None:
                        prefix = transport._getLogPrefix(protocol)
                    transport.logstr = f"{prefix},{s},{host}"
                transport.repstr = f"<{name} #{s} on {self._realPortNumber}>"
                if epoll:
                    # reactor.addReader(transport): EPollReactor._add, inline.
                    reads = reactor._reads
                    if fd not in reads:
                        try:
                            if fd in reactor._writes:
                                reactor._poller.modify(fd, EPOLLIN | EPOLLOUT)
                            else:
                                reactor._poller.register(fd, EPOLLIN)
                        except OSError:
                            # EPERM (continuous polling) and the rest: Twisted's own answer.
                            transport.startReading()
                        else:
                            reads.add(fd)
                            reactor._selectables[fd] = transport
                else:
                    transport.startReading()
                transport.connected = 1
                if type(protocol).makeConnection is _makeConnection and "makeConnection" not in own:
                    protocol.connected = 1
                    protocol.transport = transport
                    protocol.connectionMade()
                else:
                    protocol.makeConnection(transport)
            # Twisted's adaptation of how many to accept at the next wake-up.
            if accepted == self.numberAccepts:
                self.numberAccepts += 20
            else:
                self.numberAccepts = accepted if accepted > 1 else 1
        except BaseException:
            legacyLog.deferr()

    def _acceptFailed(self, error: OSError, numAccepts: int) -> None:
        """
        C{accept()} failed with C{error}, neither C{EAGAIN} nor C{EPERM}: what Twisted's
        C{_accept} does then, with its buffering logger.  Raises the error it does not handle.
        """
        code = error.args[0]
        with tcp._BuffersLogs(self._logger.namespace, self._logger.observer) as logger:
            reservedFD = tcp._reservedFD
            if code == EMFILE and reservedFD.available():
                logger.info("EMFILE encountered;" " releasing reserved file descriptor.")
                with reservedFD:
                    clientsToClose = tcp._accept(logger, range(numAccepts), self.socket, reservedFD)
                    for clientToClose, closedAddress in clientsToClose:
                        clientToClose.close()
                        logger.info("EMFILE recovery:" " Closed socket from {address}", address=closedAddress)
                    logger.info("Re-reserving EMFILE recovery file descriptor.")
                return
            if code in tcp._ACCEPT_ERRORS:
                logger.info("Could not accept new connection ({acceptError})", acceptError=errorcode[code])
                return
        raise error


def leanPortClass(reactor):
    """
    @return: L{LeanPort} if C{reactor} is Twisted's epoll reactor and the code it stands in for
        is the one it knows, else L{tcp.Port}.
    """
    if type(reactor) is EPollReactor and _matches():
        return LeanPort
    return tcp.Port


class _LeanListening:
    """
    A reactor for C{serverFromString} whose C{listenTCP} makes a L{LeanPort}; everything else
    is the real reactor's.
    """

    def __init__(self, reactor) -> None:
        self._reactor = reactor

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        p = LeanPort(port, factory, backlog, interface, self._reactor)
        p.startListening()
        return p


def _listenTCP(self, port, factory, backlog=50, interface=""):
    p = LeanPort(port, factory, backlog, interface, self)
    p.startListening()
    return p


def _adoptStreamPort(self, fileDescriptor, addressFamily, factory):
    if addressFamily in (socket.AF_INET, socket.AF_INET6):
        p = LeanPort._fromListeningDescriptor(self, fileDescriptor, addressFamily, factory)
        p.startListening()
        return p
    return type(self).adoptStreamPort(self, fileDescriptor, addressFamily, factory)


def leanAccept(reactor) -> bool:
    """
    Make every TCP listening port of C{reactor} (C{listenTCP}, and C{adoptStreamPort} for a
    TCP socket) a L{LeanPort}, where it applies.  casd's own listeners get it without this
    (L{leanListening}, L{adoptStreamPort}); this is for a whole process's reactor.

    @return: whether it was installed.
    """
    if leanPortClass(reactor) is not LeanPort:
        return False
    reactor.listenTCP = types.MethodType(_listenTCP, reactor)
    reactor.adoptStreamPort = types.MethodType(_adoptStreamPort, reactor)
    return True


def leanListening(reactor):
    """
    @return: C{reactor}, or where L{LeanPort} applies, a stand-in whose C{listenTCP} listens
        with it (for C{serverFromString}: C{tcp:}, C{tcp6:}, C{haproxy:tcp:...}).
    """
    if leanPortClass(reactor) is LeanPort:
        return _LeanListening(reactor)
    return reactor


def adoptStreamPort(reactor, fd: int, family: int, factory):
    """
    C{reactor.adoptStreamPort(fd, family, factory)}, with a L{LeanPort} for a TCP socket where
    it applies (C{PosixReactorBase.adoptStreamPort}'s steps).
    """
    cls = leanPortClass(reactor)
    if cls is tcp.Port or family not in (socket.AF_INET, socket.AF_INET6):
        return reactor.adoptStreamPort(fd, family, factory)
    p = cls._fromListeningDescriptor(reactor, fd, family, factory)
    p.startListening()
    return p
