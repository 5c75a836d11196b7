# -*- test-case-name: tests.test_teardown -*-
"""
The end of a relayed plain TCP connection in one step: what Twisted's reactor and transport do
between a closed connection and its protocol's C{connectionLost}, without the chain of calls
they take for it.

Twisted ends a TCP connection through C{_disconnectSelectable} (or C{removeReader},
C{removeWriter} and C{connectionLost} from the caller), then C{tcp.Connection.connectionLost},
C{abstract.FileDescriptor.connectionLost}, C{stopReading} and C{stopWriting} (each again through
the reactor's C{removeReader}/C{removeWriter}, C{isReading}/C{isWriting} and C{_remove}),
C{_closeSocket} (C{Failure.check} of the reason, then the socket module's C{close} and
C{_real_close}), and for a client connection C{BaseClient.connectionLost} and its connector's:
about 35 Python calls per side of a relayed session.  L{dropNow} does the same work, in the
same order, in a few: the descriptor is taken out of the epoll reactor's sets and its poller
at once (one C{EPOLL_CTL_DEL}, as before), the transport marked disconnected, its producer
told to stop, its socket closed (no C{shutdown()}: the write-through transports have
C{_shouldShutdown} off), then the protocol's C{connectionLost} and, for a client connection,
the connector's.

It is used only on Twisted's epoll reactor, for the transport classes L{relayed} names, and
only when the sources it stands in for are the ones it was written against (L{matches}, a
SHA-256 of their source); anything else goes Twisted's way.
"""

from __future__ import annotations

import _socket

from twisted.internet import abstract, tcp
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.posixbase import _DisconnectSelectableMixin

from casd.pinned import sourceMatches

#: SHA-256 of the sources L{dropNow} stands in for, in Twisted 26.10.0.
TEARDOWN_SHA256 = "218a6ac3412bae47e32c692a0bd2e2289876a50936e84acb37224b82afbe6740"


def matches() -> bool:
    """
    @return: whether Twisted's teardown of a TCP connection is the one L{dropNow} repeats.
    """
    return sourceMatches(
        TEARDOWN_SHA256,
        lambda: (
            _DisconnectSelectableMixin._disconnectSelectable,
            EPollReactor._remove,
            EPollReactor.removeReader,
            EPollReactor.removeWriter,
            tcp.Connection.readConnectionLost,
            tcp.Connection.connectionLost,
            tcp._BaseBaseClient.connectionLost,
            tcp._SocketCloser._closeSocket,
            abstract.FileDescriptor.connectionLost,
            abstract.FileDescriptor.stopReading,
            abstract.FileDescriptor.stopWriting,
        ),
    )


#: The transport classes L{dropNow} ends, each mapped to whether it is a client connection
#: (whose connector hears of the end too); filled by L{relayed}.
_KINDS: dict[type, bool] = {}
#: L{matches}, asked on the first use.
_KNOWN: list[bool] = []
#: Producer classes whose C{stopProducing} does nothing (the relay's own): not called.
_QUIET: set[type] = set()

_realClose = _socket.socket.close


def relayed(cls, client: bool) -> None:
    """
    Let L{dropNow} end connections of C{cls}: a subclass of Twisted's C{tcp.Server} (C{client}
    false) or C{tcp.Client} (C{client} true) with no C{shutdown()} before C{close()}, whose
    C{connectionLost} is Twisted's (or, for a client, ends in it when connected).
    """
    if not issubclass(cls, tcp.Client if client else tcp.Server) or cls._shouldShutdown:
        raise TypeError(f"{cls!r} cannot be dropped at once")
    _KINDS[cls] = client


def quietProducer(cls):
    """
    Class decorator: C{cls}'s C{stopProducing} does nothing, so L{dropNow} need not call it.
    """
    _QUIET.add(cls)
    return cls


def dropNow(transport, reason, inRead: bool = False) -> bool:
    """
    End C{transport}, a connected plain TCP transport whose peer closed or which its owner
    closes with nothing left to send, as the reactor and Twisted's transport would: out of the
    reactor, disconnected, its producer stopped, its socket closed, then its protocol's
    C{connectionLost(reason)} (and a client connector's).

    @param reason: a L{Failure} of C{ConnectionDone} or C{ConnectionLost} (never
        C{ConnectionAborted}: an abort resets the connection, which Twisted's own path does).
    @param inRead: called from the transport's C{doRead}: a transport registered for writing
        too is left to the reactor (which, for the same event, would otherwise call its
        C{doWrite} next, on a transport no longer there).
    @return: whether it did; C{False} (nothing done) for a transport or reactor it does not
        know, or a Twisted whose teardown differs.
    """
    kind = type(transport)
    if kind not in _KINDS or not transport.connected:
        return False
    client = _KINDS[kind]
    reactor = transport.reactor
    if type(reactor) is not EPollReactor:
        return False
    if not _KNOWN:
        _KNOWN.append(matches())
    if not _KNOWN[0]:
        return False
    skt = transport.socket
    fd = skt.fileno()
    if fd == -1:
        return False
    # EPollReactor.removeReader then removeWriter: both sets, one unregister.
    reads = reactor._reads
    writes = reactor._writes
    reading = fd in reads
    if inRead and fd in writes:
        return False
    if reading or fd in writes:
        if reading:
            reads.remove(fd)
        if fd in writes:
            writes.remove(fd)
        del reactor._selectables[fd]
        reactor._poller.unregister(fd)
    # abstract.FileDescriptor.connectionLost.
    transport.disconnected = 1
    transport.connected = 0
    producer = transport.producer
    if producer is not None:
        if type(producer) not in _QUIET:
            producer.stopProducing()
        transport.producer = None
    # tcp._SocketCloser._closeSocket(orderly=True) with _shouldShutdown off: socket.close().
    skt._closed = True
    if skt._io_refs <= 0:
        try:
            _realClose(skt)
        except OSError:
            pass
    # tcp.Connection.connectionLost.
    protocol = transport.protocol
    del transport.protocol
    del transport.socket
    del transport.fileno
    protocol.connectionLost(reason)
    if client:
        # tcp.BaseClient.connectionLost, connected.
        transport.connector.connectionLost(reason)
    return True
