# -*- test-case-name: tests.test_relay -*-
"""
The relay: after login, a dumb splice of bytes both ways (Dovecot's C{login_proxy_detach()},
Twisted's C{portforward}).

Each direction costs one Python call per chunk the kernel hands over (a counter and a
C{write()}); no parsing, no copies.  Flow control is Twisted's producer/consumer: each transport
is registered as the streaming producer of the other, so a slow reader pauses reading from the
fast writer instead of making casd buffer without bound.

Writes go through L{writeThrough}: with nothing queued, a write is one C{send()} at once, as
nginx does, instead of Twisted's queue-then-wait-for-writable (two C{epoll_ctl} calls and one
more reactor iteration per write, which were a third of the cost of a proxied login).
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.internet import _newtls, abstract, main, tcp
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IHalfCloseableProtocol, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.protocols.tls import TLSMemoryBIOProtocol

from casd.pinned import sourceMatches
from casd.session import teardown
from casd.session.heldwrites import HOLD_BATCH, HOLD_LIMIT, flushHeld, sendHeld
from casd.session.tlsrelay import closeTLSNow, wholeChunks

try:
    from twisted.internet.endpoints import _WrappingProtocol
except ImportError:  # pragma: no cover - a Twisted without it: the bypass is skipped
    _WrappingProtocol = None

#: Largest read from a socket in one call once relaying; bigger chunks, fewer Python calls.
RELAY_READ_SIZE = 256 * 1024
#: While every read fills the buffer and the other side keeps up, a relayed plain TCP side's
#: reads double, up to this (L{_DirectRead}); a pause brings them back to L{RELAY_READ_SIZE}.
RELAY_MAX_READ = 2 * 1024 * 1024

#: SHA-256 of the sources of Twisted's C{tcp.Connection.doRead} and C{_dataReceived} (Twisted
#: 26.10.0), which L{_DirectRead} repeats.
READ_SHA256 = "cec22be7f7657ee37ba569c3b22ed126fd32ebff5ff5a0551dc60172721de8d9"

#: SHA-256 of the sources of Twisted's C{_newtls.ConnectionMixin.registerProducer} and
#: C{abstract.FileDescriptor.registerProducer} (Twisted 26.10.0), which L{Relay.start} does
#: inline for a plain TCP side.
FLOW_SHA256 = "808b03e67bda26c3f4bf762991088c4c9bcb8f9f732fee6e0c8de50a8bbc4ab0"


def readPathMatches() -> bool:
    """
    @return: whether Twisted's TCP read path is the one the relay's direct reads repeat.
    """
    return sourceMatches(READ_SHA256, lambda: (tcp.Connection.doRead, tcp.Connection._dataReceived))


def flowPathMatches() -> bool:
    """
    @return: whether Twisted's producer registration on a plain TCP transport is the one
        L{Relay.start} does inline.
    """
    return sourceMatches(
        FLOW_SHA256,
        lambda: (_newtls.ConnectionMixin.registerProducer, abstract.FileDescriptor.registerProducer),
    )


#: Whether relayed plain TCP transports read through the relay directly: L{readPathMatches},
#: asked on the first relay.
_DIRECT = None
#: Whether a plain TCP side's producer is set inline: L{flowPathMatches}, asked on the first
#: relay.
_FLOW = None
_TWISTED_DO_READ = tcp.Connection.doRead
_TWISTED_DATA_RECEIVED = tcp.Connection._dataReceived


def _writeNow(self, data: bytes) -> None:
    """
    L{tcp.Connection.write}, but with nothing queued (Twisted empties C{dataBuffer} once it has
    sent it all) the bytes go to the socket at once, or, when they are few and the reactor
    holds writes, at the end of the turn (L{casd.session.heldwrites}, with the bytes written
    after them in the same turn); what the kernel does not take is queued the
    usual way (and so is everything while a close is in progress, and everything after
    C{startTLS()}, which must go through the TLS layer), so ordering, flow control and error
    reporting stay Twisted's.
    """
    if self.casdHeldNow:
        # Bytes held for the end of this turn already (casd.session.heldwrites): these follow,
        # unless TLS started since (then they go through it, after the held bytes).
        if type(data) is bytes and self.connected and not self.TLS:
            size = len(data)
            if size < HOLD_LIMIT:
                self._tempDataBuffer.append(data)
                self._tempDataLen += size
                return
    elif (
        not self.TLS
        and not self.dataBuffer
        and not self._tempDataLen
        and self.connected
        and not self.disconnecting
        and not self._writeDisconnecting
        and type(data) is bytes
    ):
        size = len(data)
        if size < HOLD_LIMIT:
            try:
                held = self.reactor.casdHeld
            except AttributeError:
                held = None
            if held is not None:
                # Held until the end of the turn, sent with the turn's other writes.
                self._tempDataBuffer.append(data)
                self._tempDataLen = size
                self.casdHeldNow = True
                held.append(self)
                if len(held) >= HOLD_BATCH:
                    # A long turn: what it held so far goes now, so no write waits for more
                    # than a few dozen events' work.
                    flushHeld(held)
                return
        try:
            sent = self.socket.send(data)
        except OSError:
            # EAGAIN, or an error the queued write's doWrite reports as a lost connection.
            sent = 0
        if sent:
            if sent == size:
                return
            data = data[sent:]
    tcp.Connection.write(self, data)


def _readNow(self):
    """
    Twisted's C{tcp.Connection.doRead} with its C{_dataReceived} inline (one Python call fewer
    per read; L{READ_SHA256} pins both): the C{doRead} of casd's write-through transports.
    """
    try:
        data = self.socket.recv(self.bufferSize)
    except OSError as se:
        if se.args[0] == tcp.EWOULDBLOCK:
            return None
        return main.CONNECTION_LOST
    if not data:
        return main.CONNECTION_DONE
    self.protocol.dataReceived(data)
    return None


#: The C{doRead} of casd's plain TCP transports: L{_readNow}, or Twisted's own when its read
#: path is not the one L{_readNow} repeats.
PLAIN_READ = _readNow if readPathMatches() else _TWISTED_DO_READ
#: The C{doRead}s that L{_DirectRead} may stand in for.
_TWISTED_READS = (_TWISTED_DO_READ, _readNow)


class _WriteThroughServer(tcp.Server):
    write = _writeNow
    #: Whether bytes are held for the end of the turn (L{casd.session.heldwrites}).
    casdHeldNow = False
    doRead = PLAIN_READ
    # No shutdown() before close(): the socket is this process's alone (close-on-exec), so
    # close() ends the connection the same way, one system call less (Twisted's own comment
    # on shutdown(): "isn't really necessary"; it skips it for sockets it adopted).
    _shouldShutdown = False


class _WriteThroughClient(tcp.Client):
    write = _writeNow
    casdHeldNow = False
    doRead = PLAIN_READ
    _shouldShutdown = False


teardown.relayed(_WriteThroughServer, client=False)
teardown.relayed(_WriteThroughClient, client=True)


_WRITE_THROUGH = {tcp.Server: _WriteThroughServer, tcp.Client: _WriteThroughClient}
_TCP_TYPES = (tcp.Server, tcp.Client)
_PLAIN_TCP = set([*_WRITE_THROUGH, *_WRITE_THROUGH.values()])
#: The classes of an accepted plain TCP connection (Twisted's, and its write-through subclass).
PLAIN_TCP_SERVERS = frozenset([tcp.Server, _WriteThroughServer])


def writesThrough(cls):
    """
    Class decorator: C{cls}, a subclass of Twisted's TCP client or server whose C{write} is
    already L{_writeNow}, is plain TCP to L{writeThrough} (left as it is, in the fewest calls)
    and to L{_closeNow}.
    """
    if not (issubclass(cls, _TCP_TYPES) and cls.write is _writeNow):
        raise TypeError(f"{cls!r} is not a write-through TCP transport")
    if "casdHeldNow" not in cls.__dict__:
        cls.casdHeldNow = False
    _PLAIN_TCP.add(cls)
    return cls


def writeThrough(transport) -> None:
    """
    Make writes on C{transport} (a TCP transport, or TLS over one: then the TCP transport below,
    which carries the TLS records) try the socket at once.  Anything else is left alone.

    The class of the TCP transport is swapped for a subclass that only overrides C{write}: no
    per-connection closure and no reference cycle, unlike an instance attribute.  A TLS layer
    is switched to whole-chunk writes (L{wholeChunks}): one C{SSL_write} per write, nothing held
    for the next reactor iteration.
    """
    kind = type(transport)
    if kind in _PLAIN_TCP and not transport.TLS:
        # The common case first, in as few calls as possible: this runs 4 times per login.
        if kind in _WRITE_THROUGH:
            transport.__class__ = _WRITE_THROUGH[kind]
        return
    wholeChunks(transport)
    if isinstance(transport, TLSMemoryBIOProtocol):
        transport = transport.transport
    faster = _WRITE_THROUGH.get(type(transport))
    if faster is not None:
        transport.__class__ = faster


def _pending(transport) -> bool:
    """
    Whether C{transport} may still hold bytes to flush: C{True} unless it is a TCP transport
    whose buffers are empty.
    """
    if isinstance(transport, _TCP_TYPES):
        return bool(transport.dataBuffer or transport._tempDataLen)
    return True


#: The reason a transport closed by L{_closeNow} gives its protocol: one shared failure, as the
#: reactor shares its own for every connection it closes.
_CLOSED = Failure(ConnectionDone())
#: The same for a connection whose read failed (the reactor's C{CONNECTION_LOST}).
_LOST = Failure(ConnectionLost())


def _closeNow(transport) -> bool:
    """
    Close a plain TCP transport with nothing left to send at once, as the reactor would on its
    next iteration after C{loseConnection()} found nothing to flush: out of the reactor, the
    socket shut down and closed, the protocol's C{connectionLost} called, before this returns.
    That saves the reactor iteration and the C{epoll_ctl} calls of arming the transport for
    writing only to find the buffer empty.  A transport whose C{loseConnection()} was called
    already (Twisted calls it when the other side, of which it was the producer, was lost) is
    in that state too.

    @return: whether it did; anything else (TLS, bytes queued, a producer other than the
        relay's own registered, a half-close in progress, not a TCP transport) is left to the
        caller's C{loseConnection()}.
    """
    if getattr(transport, "casdHeldNow", False) and not transport.dataBuffer and transport.connected:
        # Bytes held for the end of the turn go now, as they would have without holding.
        sendHeld(transport)
    if (
        type(transport) not in _PLAIN_TCP
        or transport.TLS
        or not transport.connected
        or transport._writeDisconnecting
        or transport.dataBuffer
        or transport._tempDataLen
        or (transport.producer is not None and type(transport.producer) not in _FLOW_ONLY)
    ):
        return False
    # The reactor's and the transport's steps in one (casd.session.teardown), where it can.
    if teardown.dropNow(transport, _CLOSED):
        return True
    reactor = transport.reactor
    reactor.removeReader(transport)
    reactor.removeWriter(transport)
    transport.connectionLost(_CLOSED)
    return True


@teardown.quietProducer
@implementer(IPushProducer)
class _FlowOnly:
    """
    One side of the relay as the producer of the other side's transport, for flow control only:
    a consumer that cannot keep up pauses reading from it, and resumes it.  When the consumer's
    connection is lost, Twisted tells its producer to stop: the relay ends the session then
    (L{Relay._end} closes this side, at once when nothing is queued) instead of this side's
    transport starting a C{loseConnection()} on its own first (arming it for writing, two
    C{epoll_ctl} calls, only for the relay to close it).
    """

    __slots__ = ("transport",)

    def __init__(self, transport) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@teardown.quietProducer
class _DirectRead(_FlowOnly):
    """
    The C{doRead} of one side's plain TCP transport while relaying: Twisted's
    C{tcp.Connection.doRead} and C{_dataReceived} with L{Relay.fromClient} (or
    L{Relay.fromBackend}) inline, two Python calls fewer per chunk (L{READ_SHA256} pins what it
    repeats).

    When the peer closes and the protocol takes no half-close, the transport is ended here
    (L{teardown.dropNow}: what the reactor's C{_disconnectSelectable} and the transport's
    C{connectionLost} chain do, in one step) rather than by the reactor.

    It is also the other side's producer for flow control (a L{_FlowOnly} of the transport it
    reads, C{transport}).

    Its reads grow as an HTTP response body's do (L{protocols.http.proxy.growReads}): each read
    that fills the buffer doubles the next, up to L{RELAY_MAX_READ}, and a pause (the other
    side fell behind) brings them back to L{RELAY_READ_SIZE}.
    """

    __slots__ = ("relay", "sink", "inbound")

    def __init__(self, relay, source, sink, inbound: bool) -> None:
        self.relay = relay
        self.transport = source
        self.sink = sink
        self.inbound = inbound

    def doRead(self):
        source = self.transport
        try:
            data = source.socket.recv(source.bufferSize)
        except OSError as se:
            if se.args[0] == tcp.EWOULDBLOCK:
                return None
            if teardown.dropNow(source, _LOST, True):
                return None
            return main.CONNECTION_LOST
        if not data:
            if source.casdHeldNow:
                # What this turn wrote to the peer goes before the close, as it would have
                # without holding (casd.session.heldwrites).
                sendHeld(source)
            # Twisted's reactor gives a half-closeable protocol readConnectionLost() instead.
            if not IHalfCloseableProtocol.providedBy(source.protocol) and teardown.dropNow(
                source, _CLOSED, True
            ):
                return None
            return main.CONNECTION_DONE
        size = len(data)
        if self.inbound:
            self.relay.bytesIn += size
        else:
            self.relay.bytesOut += size
        if size == source.bufferSize and size < RELAY_MAX_READ:
            # A full read: more is waiting; the next read takes twice as much.
            source.bufferSize = size << 1
        self.sink.write(data)
        return None

    def pauseProducing(self) -> None:
        # The other side fell behind: reads shrink back (what waits in casd for it is its
        # transport's buffer and at most one read).
        source = self.transport
        source.bufferSize = RELAY_READ_SIZE
        source.pauseProducing()


#: The relay's own producers: L{_closeNow} may close a transport that has one registered.
_FLOW_ONLY = (_FlowOnly, _DirectRead)


def _closeWrite(transport) -> None:
    loseWrite = getattr(transport, "loseWriteConnection", None)
    if loseWrite is not None:
        try:
            loseWrite()
            return
        except (NotImplementedError, AttributeError):
            pass
    transport.loseConnection()


class Relay:
    """
    Splices a client protocol and a backend protocol.

    @ivar bytesIn: bytes relayed from the client to the backend.
    @ivar bytesOut: bytes relayed from the backend to the client.
    """

    log = Logger()

    #: Seconds a closing side may take to flush before it is aborted.
    closeGrace = 30.0

    def __init__(self, frontend, backend, clock, idleTimeout: float, onEnd) -> None:
        self.frontend = frontend
        self.backend = backend
        self.client = frontend.transport
        self.server = backend.transport
        self.clock = clock
        self.idleTimeout = idleTimeout
        self.onEnd = onEnd
        self.bytesIn = 0
        self.bytesOut = 0
        self._seen = (-1, -1)
        self._idle = None
        self._ended = False
        self._closedReads = set()
        self._lostSides = set()
        self._aborts = {}

    def start(self, fromClient: bytes = b"", fromBackend: bytes = b"", timer=None) -> None:
        """
        Begin relaying.  C{fromClient}/C{fromBackend} are bytes either side sent before the splice
        (pipelined behind the login), delivered first.

        @param timer: a pending L{DelayedCall} of the caller's that calls L{checkIdle} once the
            relay has started (the frontend's session timer), taken over for the first idle
            check: pushed later when it is due sooner than that check (arithmetic, where a new
            timer is a heap insertion and the old one's cancellation), else cancelled.
        """
        self.frontend.relay = self
        self.backend.relay = self
        # Bind the hot path directly: no per-chunk dispatch through the protocols' state.
        self.frontend.dataReceived = self.fromClient
        self.backend.dataReceived = self.fromBackend
        try:
            wrapper = self.server.protocol
        except AttributeError:
            wrapper = None
        if (
            wrapper is not None
            and wrapper is not self.backend
            and _WrappingProtocol is not None
            and isinstance(wrapper, _WrappingProtocol)
            and wrapper._wrappedProtocol is self.backend
        ):
            # The endpoint's wrapper only forwards: chunks reach the relay with one call less.
            wrapper.dataReceived = self.fromBackend
        global _DIRECT, _FLOW
        if _DIRECT is None:
            _DIRECT = readPathMatches()
            _FLOW = flowPathMatches()
        client, server = self.client, self.server
        # Each side's producer for flow control: the other side's reader (or a _FlowOnly).
        toServer = toClient = None
        for transport, other, inbound in ((client, server, True), (server, client, False)):
            kind = type(transport)
            if kind in _PLAIN_TCP and not transport.TLS:
                # Plain TCP: write-through (most are already), large reads, and each read
                # handed to the other side by the relay itself (L{_DirectRead}).
                if kind in _WRITE_THROUGH:
                    transport.__class__ = _WRITE_THROUGH[kind]
                transport.bufferSize = RELAY_READ_SIZE
                if (
                    _DIRECT
                    and kind.doRead in _TWISTED_READS
                    and kind._dataReceived is _TWISTED_DATA_RECEIVED
                    and "doRead" not in transport.__dict__
                ):
                    reader = _DirectRead(self, transport, other, inbound)
                    transport.doRead = reader.doRead
                    if inbound:
                        toServer = reader
                    else:
                        toClient = reader
                continue
            writeThrough(transport)
            # Large reads, below the TLS layer too (a TLS-wrapped transport's is underneath).
            if isinstance(transport, TLSMemoryBIOProtocol):
                transport = transport.transport
            if isinstance(transport, _TCP_TYPES):
                transport.bufferSize = RELAY_READ_SIZE
        for consumer, producer in (
            (server, toServer or _FlowOnly(client)),
            (client, toClient or _FlowOnly(server)),
        ):
            if (
                _FLOW
                and type(consumer) in _PLAIN_TCP
                and not consumer.TLS
                and consumer.producer is None
                and not consumer.disconnected
            ):
                # FileDescriptor.registerProducer(producer, True), inline.
                consumer.producer = producer
                consumer.streamingProducer = True
            else:
                consumer.registerProducer(producer, True)
        if fromBackend:
            self.fromBackend(fromBackend)
        if fromClient:
            self.fromClient(fromClient)
        self._armIdle(timer)

    def fromClient(self, data: bytes) -> None:
        self.bytesIn += len(data)
        self.server.write(data)

    def fromBackend(self, data: bytes) -> None:
        self.bytesOut += len(data)
        self.client.write(data)

    # -- idle timeout: counters compared a few times per period, nothing per chunk ------

    def _armIdle(self, timer=None) -> None:
        period = self.idleTimeout / 4.0
        if timer is not None:
            if timer.time <= self.clock.seconds() + period:
                timer.reset(period)
                self._idle = timer
                return
            # Moving a timer sooner searches the reactor's heap: a new one is cheaper.
            timer.cancel()
        self._idle = self.clock.callLater(period, self.checkIdle)

    def checkIdle(self) -> None:
        """
        One of the idle checks, a quarter of C{idleTimeout} apart: the relay ends after four in a
        row that saw no byte either way.
        """
        now = (self.bytesIn, self.bytesOut)
        if now == self._seen:
            self._quietChecks += 1
            if self._quietChecks >= 4:
                self._idle = None
                self.log.info("relay idle for {seconds}s, closing", seconds=self.idleTimeout)
                self._end("idle timeout")
                return
        else:
            self._seen = now
            self._quietChecks = 0
        self._armIdle()

    _quietChecks = 0

    # -- ends -----------------------------------------------------------------------------

    def clientReadClosed(self) -> None:
        if self._ended:
            return  # the backend went first: both sides are closing already
        self._closedReads.add("client")
        _closeWrite(self.server)
        if len(self._closedReads) == 2:
            self._end("closed")

    def backendReadClosed(self) -> None:
        if self._ended:
            return
        self._closedReads.add("backend")
        _closeWrite(self.client)
        if len(self._closedReads) == 2:
            self._end("closed")

    def clientLost(self, reason) -> None:
        if self._aborts or not self._ended:
            self._gone("client")
        else:  # nothing left to do but let go once both are gone
            self._forget("client")

    def backendLost(self, reason) -> None:
        if self._aborts or not self._ended:
            self._gone("backend")
        else:
            self._forget("backend")

    def _gone(self, side: str) -> None:
        if self._aborts:
            timer = self._aborts.pop(side, None)
            if timer is not None and timer.active():
                timer.cancel()
        self._end(f"{side} closed", lost=side)
        self._forget(side)

    def _forget(self, side: str) -> None:
        lost = self._lostSides
        lost.add(side)
        if len(lost) == 2:
            self._release()

    def _release(self) -> None:
        """
        Both connections are gone: drop the references that tie the session's objects into
        cycles (the protocols' and transports' bound hot paths, the relay's own references), so
        that reference counting frees them at once.  Left in cycles, every session's objects wait
        for the garbage collector, whose passes then cost about a twentieth of a login's CPU.
        """
        for side in (self.frontend, self.backend, self.client, self.server):
            attributes = getattr(side, "__dict__", None)
            if attributes is not None:
                # The relay's bound methods (dataReceived, _DirectRead's doRead), set in start().
                attributes.pop("dataReceived", None)
                attributes.pop("doRead", None)
        wrapper = getattr(self.server, "protocol", None)
        if wrapper is not None and getattr(wrapper, "__dict__", {}).get("dataReceived") is not None:
            wrapper.__dict__.pop("dataReceived", None)
        self.frontend = self.backend = self.client = self.server = self.onEnd = None

    def _end(self, why: str, lost: str = "") -> None:
        if self._ended:
            return
        self._ended = True
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None
        # First: closing a side below may end its protocol at once, which logs the session.
        self.onEnd(why)
        for side, transport in (("client", self.client), ("backend", self.server)):
            if side != lost:
                # A plain TCP transport with nothing queued closes at once (its producer, the
                # relay's own, told to stop: it does nothing).
                if _closeNow(transport):
                    continue
                # A TLS transport (a STARTTLS client) does not close while a producer is
                # registered with it: the other side, gone or going, is one no longer.
                try:
                    transport.unregisterProducer()
                except RuntimeError:
                    pass  # none registered (a test transport says so)
                # A TLS client's closes at once too (closeTLSNow).  Otherwise flush what is
                # pending, but never wait for a peer that stopped reading.
                if closeTLSNow(transport, _closeNow):
                    continue
                pending = _pending(transport)
                transport.loseConnection()
                if pending:
                    self._aborts[side] = self.clock.callLater(
                        self.closeGrace, transport.abortConnection
                    )
