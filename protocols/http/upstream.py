# -*- test-case-name: tests.test_http_upstream,tests.test_http_site -*-
"""
casd's own pooled HTTP/1.1 client for the backend side of the HTTP proxy.

Per backend member, persistent connections: idle ones are reused (most recently used first),
at most C{maxIdle} kept and each for at most C{idleTimeout} seconds; at most C{maxConnections}
open or opening at once (more requests wait for one).  A connection is closed instead of reused
when the backend says C{Connection: close} (or answers HTTP/1.0 without C{keep-alive}), when
the response was framed by the end of the connection, and on any framing doubt (bytes after the
response, a malformed head or chunk, conflicting lengths).

A request's head is serialised once from the already filtered header list and written at once.
A response's head is parsed in one go (the head found whole, checked by one regular expression,
its fields read by another), hop-by-hop fields removed; the rest goes to the request's sink (an
L{IResponseSink}) as C{(name, value)} pairs, which re-serialises them.  Bodies go through as
they come: C{Content-Length} bodies as the received pieces, chunked ones decoded, close-delimited
ones until the end; C{HEAD}, 1xx, 204 and 304 answers have none.  No L{Deferred} on a request's
path over a pooled connection: the connection calls the sink's methods.

Failures: a connection that cannot be opened is reported to the sink (L{IResponseSink.connectFailed}:
nothing was sent, another member may be tried); a reused idle connection that turns out closed by
the backend (its keep-alive timeout raced casd's) is retried once on a new connection when the
request is idempotent and has no body; anything else ends in L{IResponseSink.failed}.

Why not L{twisted.web.client.Agent}: see C{docs/architecture.md}, "The HTTP proxy's backend
client".
"""

from __future__ import annotations

import re

from zope.interface import Interface

from twisted.internet import error
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocols.http.headers import HOP_BY_HOP
from protocols.http.proxy import IDEMPOTENT, directSocket, largerBuffers, writeThrough

#: The largest response head casd reads from a backend.
MAX_HEAD = 65536

#: A whole response head: status line and fields, CRLF line ends only, no obs-fold, no NUL.
_HEAD = re.compile(
    rb"HTTP/1\.[01] [0-9]{3}(?: [^\r\n\x00]*)?\r\n"
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*\r\n)*\r\n"
)
#: One field of a head that L{_HEAD} accepted.
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")
#: A chunk-size line (RFC 9112 7.1), extensions ignored.
_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[^\r\n\x00]*)?\r\n")

#: Methods that carry a body by definition: sent with C{Content-Length: 0} when the client's had none.
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))

#: C{Connection} options that name no field.
_CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b""))

# Parser states of a connection.
_IDLE, _HEAD_STATE, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = range(6)


class UpstreamError(Exception):
    """
    A backend's response could not be read: a malformed head or body framing.
    """


class IResponseSink(Interface):
    """
    What a request sent with L{UpstreamPool.request} tells its caller.  Exactly one of
    C{connectFailed}, C{failed} and C{responseEnded} ends it (none after L{Exchange.cancel}).
    """

    def connectFailed(reason):
        """
        No connection to the member could be opened: nothing was sent.
        """

    def failed(reason):
        """
        The request failed after it was (perhaps partly) sent and before a response head.
        """

    def responseStarted(exchange, code, phrase, headers):
        """
        The response head: C{headers} is a list of C{(name, value)} pairs without hop-by-hop
        fields (C{Content-Length} kept when the backend framed the body with it).
        """

    def responseData(data):
        """
        A piece of the response body.
        """

    def responseEnded(complete):
        """
        The response is over: C{complete} is false when its body was cut short.
        """


class Exchange:
    """
    One request to one member, from L{UpstreamPool.request} to the end of its response.

    @ivar sink: the L{IResponseSink}, C{None} once cancelled or over.
    @ivar connection: the L{UpstreamConnection} carrying it, once it has one.
    """

    __slots__ = ("method", "head", "body", "sink", "connection", "connecting", "backend",
                 "retried", "noBody")

    def __init__(self, backend, method: bytes, head: bytes, body, sink) -> None:
        self.backend = backend
        self.method = method
        self.head = head
        self.body = body
        self.sink = sink
        self.connection = None
        self.connecting = None
        self.retried = False
        self.noBody = method == b"HEAD"

    def retryable(self) -> bool:
        """
        Whether this request may be sent again on another connection: idempotent, no body, and
        not already sent twice.
        """
        return not self.retried and self.body is None and self.method in IDEMPOTENT

    def pauseResponse(self) -> None:
        """
        Stop reading the response for now.
        """
        connection = self.connection
        if connection is not None and not connection.paused:
            connection.paused = True
            connection.transport.pauseProducing()

    def resumeResponse(self) -> None:
        """
        Read the response again.
        """
        connection = self.connection
        if connection is not None and connection.paused:
            connection.paused = False
            connection.transport.resumeProducing()

    def cancel(self) -> None:
        """
        Give the request up: its connection (if any) is closed, its sink told nothing more.
        """
        self.sink = None
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abandon()
            return
        connecting, self.connecting = self.connecting, None
        if connecting is not None:
            connecting.cancel()
            return
        waiting = self.backend.waiting
        if self in waiting:
            waiting.remove(self)


class UpstreamConnection(Protocol):
    """
    One persistent connection to a backend member, carrying one exchange at a time.

    @ivar reused: whether it carried a request before the current one.
    """

    log = Logger()

    exchange = None
    _direct = None
    reused = False
    idleSince = 0.0
    counted = True
    #: Whether reading is paused (the client is slow): undone before the connection is reused.
    paused = False

    def __init__(self, pool, backend) -> None:
        self.pool = pool
        self.backend = backend
        self._state = _IDLE
        self._buffer = b""
        self._remaining = 0
        self._keepAlive = False
        self._bodySent = True
        self._trailer = False

    def connectionMade(self) -> None:
        # A request goes out in one write; Nagle's algorithm would hold the next one back
        # until the backend's delayed ACK.
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        largerBuffers(self.transport)
        self._direct = directSocket(self.transport)

    # -- sending ----------------------------------------------------------------------------

    def send(self, exchange: Exchange) -> None:
        """
        Write C{exchange}'s head (and start its body).
        """
        self.exchange = exchange
        exchange.connection = self
        self._state = _HEAD_STATE
        self._buffer = b""
        direct = self._direct
        if direct is not None:
            writeThrough(direct, exchange.head)
        else:
            self.transport.write(exchange.head)
        body = exchange.body
        if body is None:
            self._bodySent = True
            return
        self._bodySent = False
        self._chunkedBody = body.length is None
        # The backend pushing back pauses the client.
        self.transport.registerProducer(body, True)
        body.startSending(self)

    def bodyData(self, data: bytes) -> None:
        """
        A piece of the request body (from the L{protocols.http.proxy.BodyPipe}).
        """
        if self._chunkedBody:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        elif self._direct is not None:
            writeThrough(self._direct, data)
        else:
            self.transport.write(data)

    def bodyEnd(self) -> None:
        """
        The request body is complete.
        """
        if self._chunkedBody:
            self.transport.write(b"0\r\n\r\n")
        self._bodySent = True
        self.transport.unregisterProducer()
        if self._state == _DONE:
            self._finish()

    def bodyFailed(self, reason) -> None:
        """
        The request body will not complete (the client went): the request is given up.
        """
        self.transport.unregisterProducer()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.connection = None
            self.abandon()
            if exchange.sink is not None:
                sink, exchange.sink = exchange.sink, None
                sink.failed(reason)

    def abandon(self) -> None:
        """
        Close this connection (its exchange was given up).
        """
        self.exchange = None
        self._state = _DONE
        self._keepAlive = False
        transport = self.transport
        # On a TCP transport (and through TLS) this closes the connection; it also stops
        # reading at once.
        transport.stopProducing()
        transport.loseConnection()

    # -- receiving --------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _LENGTH:
            remaining = self._remaining
            if len(data) < remaining:
                self._remaining = remaining - len(data)
                self.exchange.sink.responseData(data)
                return
            self._remaining = 0
            rest = data[remaining:]
            exchange = self.exchange
            exchange.sink.responseData(data[:remaining] if rest else data)
            if self.exchange is exchange:
                self._complete(rest)
        elif state == _HEAD_STATE:
            self._buffer += data
            self._readHead()
        elif state == _CHUNKED:
            self._readChunks(data)
        elif state == _UNTIL_CLOSE:
            self.exchange.sink.responseData(data)
        elif state == _DONE:
            return  # given up, closing
        else:
            # Bytes nobody asked for (an idle connection, or after a response): not reused.
            self._doubt("unexpected bytes from the backend")

    def _readHead(self) -> None:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                self._malformed("response head too large")
            return
        end += 4
        head = buffer[:end]
        if _HEAD.fullmatch(head) is None:
            self._malformed("malformed response head")
            return
        code = int(head[9:12])
        rest = buffer[end:]
        self._buffer = b""
        if code < 200:
            if code == 101:
                self._malformed("an unrequested protocol switch")
                return
            # Informational (100 Continue, 103 Early Hints): the final answer follows.
            if rest:
                self._buffer = rest
                self._readHead()
            return
        exchange = self.exchange
        keepAlive = head[7:8] == b"1"
        length = None
        chunked = False
        delimited = False
        headers = []
        hop = HOP_BY_HOP
        named = None
        for name, value in _FIELD.findall(head):
            lower = name.lower()
            if lower in hop:
                if lower == b"connection":
                    tokens = {t.strip() for t in value.lower().split(b",")}
                    named = tokens if named is None else named | tokens
                elif lower == b"transfer-encoding":
                    # Only a final "chunked" frames a body; any other coding runs to the close.
                    chunked = value.lower().rstrip().endswith(b"chunked")
                    delimited = not chunked
                continue
            if lower == b"content-length":
                if not value.isdigit() or (length is not None and int(value) != length):
                    self._malformed("invalid Content-Length")
                    return
                length = int(value)
            headers.append((name, value))
        if named is not None:
            if b"close" in named:
                keepAlive = False
            elif b"keep-alive" in named:
                keepAlive = True
            if not named <= _CONNECTION_OPTIONS:
                # Fields the backend named hop-by-hop.
                headers = [(n, v) for n, v in headers if n.lower() not in named]
        if chunked or delimited:
            if length is not None:
                # Both: the coding wins, and the connection is not trusted afterwards
                # (RFC 9112 6.3).
                keepAlive = False
                headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
                length = None
        self._keepAlive = keepAlive
        if code in (204, 304) or exchange.noBody:
            self._state = _DONE
        elif chunked:
            self._state = _CHUNKED
            self._remaining = -1
        elif length is not None:
            self._state = _LENGTH
            self._remaining = length
        else:
            self._state = _UNTIL_CLOSE
            self._keepAlive = False
        exchange.sink.responseStarted(exchange, code, head[13:head.find(b"\r\n")], headers)
        if self.exchange is not exchange:
            return  # given up by the sink
        state = self._state
        if state == _LENGTH:
            remaining = self._remaining
            if remaining and rest:
                if len(rest) < remaining:
                    self._remaining = remaining - len(rest)
                    exchange.sink.responseData(rest)
                    return
                self._remaining = 0
                exchange.sink.responseData(rest[:remaining])
                if self.exchange is not exchange:
                    return
                rest = rest[remaining:]
            if not self._remaining:
                self._complete(rest)
        elif state == _DONE:
            self._complete(rest)
        elif rest:
            self.dataReceived(rest)

    def _readChunks(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        position = 0
        size = len(buffer)
        exchange = self.exchange
        while position < size:
            remaining = self._remaining
            if remaining > 0:
                take = buffer[position:position + remaining]
                position += len(take)
                self._remaining = remaining - len(take)
                exchange.sink.responseData(take)
                if self.exchange is not exchange:
                    return
                if self._remaining:
                    return
                self._remaining = -2
                continue
            if remaining == -2:
                # The CRLF after a chunk's data.
                if size - position < 2:
                    self._buffer = buffer[position:]
                    return
                if buffer[position:position + 2] != b"\r\n":
                    self._malformed("malformed chunk")
                    return
                position += 2
                self._remaining = -1
                continue
            if self._trailer:
                # Trailer fields, dropped (as Twisted's own client does), up to the empty line.
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    if size - position > MAX_HEAD:
                        self._malformed("trailer too large")
                        return
                    self._buffer = buffer[position:]
                    return
                if end == position:
                    self._trailer = False
                    self._complete(buffer[end + 2:])
                    return
                position = end + 2
                continue
            match = _CHUNK.match(buffer, position)
            if match is None:
                if buffer.find(b"\r\n", position) >= 0 or size - position > 1024:
                    self._malformed("malformed chunk size")
                    return
                self._buffer = buffer[position:]
                return
            position = match.end()
            chunk = int(match.group(1), 16)
            if chunk == 0:
                self._trailer = True
                continue
            self._remaining = chunk

    def _complete(self, rest: bytes) -> None:
        """
        The response is complete; C{rest} is what followed it.
        """
        self._state = _DONE
        if rest:
            # Pipelining is never used: bytes after a response mean the framing is not
            # understood alike on both sides.
            self._keepAlive = False
        if self._bodySent:
            self._finish()
        else:
            # The backend answered before the whole request body was sent: the rest of the
            # body is not sent, and the connection not reused.
            body = self.exchange.body
            self.transport.unregisterProducer()
            body.stopProducing()
            self._bodySent = True
            self._keepAlive = False
            self._finish()

    def _finish(self) -> None:
        exchange = self.exchange
        self.exchange = None
        self._state = _IDLE
        exchange.connection = None
        if self.paused:
            # The response ended while the client was slow: the next one must be read.
            self.paused = False
            self.transport.resumeProducing()
        sink = exchange.sink
        exchange.sink = None
        self.pool._release(self, self._keepAlive)
        if sink is not None:
            sink.responseEnded(True)

    def _malformed(self, why: str) -> None:
        exchange = self.exchange
        self.exchange = None
        self._state = _DONE
        self._keepAlive = False
        self.transport.loseConnection()
        if exchange is None:
            return
        exchange.connection = None
        sink, exchange.sink = exchange.sink, None
        if sink is not None:
            sink.failed(Failure(UpstreamError(why)))

    def _doubt(self, why: str) -> None:
        self.log.info("{backend}: {why}; connection closed", backend=self.backend.name, why=why)
        self._keepAlive = False
        self._state = _DONE
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.pool._closed(self)
        exchange = self.exchange
        if exchange is None:
            return
        self.exchange = None
        exchange.connection = None
        state = self._state
        self._state = _DONE
        if not self._bodySent and exchange.body is not None:
            exchange.body.stopProducing()
        sink = exchange.sink
        if sink is None:
            return
        if state == _HEAD_STATE:
            if not self._buffer and self.reused and exchange.retryable():
                # The keep-alive race: the backend closed the idle connection as the request
                # went out.  Once more, on a new connection.
                exchange.retried = True
                self.pool._connect(exchange.backend, exchange)
                return
            exchange.sink = None
            sink.failed(reason if reason is not None else Failure(error.ConnectionDone()))
            return
        exchange.sink = None
        sink.responseEnded(state == _UNTIL_CLOSE)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(self, pool, backend) -> None:
        self.pool = pool
        self.backend = backend

    def buildProtocol(self, addr):
        return UpstreamConnection(self.pool, self.backend)


class _Backend:
    """
    One member's connections.

    @ivar idle: idle connections, the most recently used last.
    @ivar open: connections open or being opened.
    @ivar waiting: exchanges waiting for a connection.
    """

    def __init__(self, target, host: bytes) -> None:
        self.target = target
        self.name = target.describe()
        self.host = host
        self.idle: list[UpstreamConnection] = []
        self.open = 0
        self.waiting: list[Exchange] = []
        self.sweep = None


def hostHeader(target) -> bytes:
    """
    The C{Host} a request to C{target} carries: the member's address, its port unless the
    scheme's default.
    """
    host = f"[{target.host}]" if ":" in target.host else target.host
    default = 443 if target.tls == "implicit" else 80
    if target.port != default:
        host = f"{host}:{target.port}"
    return host.encode("idna")


class UpstreamPool:
    """
    The backend connections of every member, shared by every HTTP listener of a process.

    @ivar maxConnections: the most connections open (or opening) to one member; more requests
        wait for one.
    @ivar maxIdle: the most idle connections kept per member.
    @ivar idleTimeout: seconds an idle connection is kept.
    """

    log = Logger()

    def __init__(self, reactor, connector, maxConnections: int = 256, maxIdle: int = 32,
                 idleTimeout: float = 60.0) -> None:
        """
        @param connector: the L{casd.pool.connector.BackendConnector} (endpoints, TLS verified
            with service_identity, connect timeouts).
        """
        self.reactor = reactor
        self.connector = connector
        self.maxConnections = maxConnections
        self.maxIdle = maxIdle
        self.idleTimeout = idleTimeout
        self._backends: dict = {}

    def backendFor(self, target) -> _Backend:
        key = (target.key, target.tls, target.tlsName)
        backend = self._backends.get(key)
        if backend is None:
            backend = self._backends[key] = _Backend(target, hostHeader(target))
        return backend

    def request(self, target, method: bytes, path: bytes, headers, body, sink) -> Exchange:
        """
        Send a request to C{target}: on an idle connection, a new one, or once one is free.

        @param headers: the request's fields, C{(name, value)} pairs, already filtered (no
            C{Host}, no framing fields).
        @param body: a L{protocols.http.proxy.BodyPipe}, or C{None}.
        @param sink: the L{IResponseSink}.
        """
        backend = self.backendFor(target)
        head = [method, b" ", path, b" HTTP/1.1\r\nHost: ", backend.host, b"\r\n"]
        for name, value in headers:
            if b"\r" in value or b"\n" in value:
                value = b" ".join(value.splitlines())
            head += (name, b": ", value, b"\r\n")
        if body is not None:
            if body.length is None:
                head.append(b"Transfer-Encoding: chunked\r\n\r\n")
            else:
                head.append(b"Content-Length: %d\r\n\r\n" % body.length)
        elif method in _BODY_METHODS:
            head.append(b"Content-Length: 0\r\n\r\n")
        else:
            head.append(b"\r\n")
        exchange = Exchange(backend, method, b"".join(head), body, sink)
        idle = backend.idle
        if idle:
            connection = idle.pop()
            connection.reused = True
            connection.send(exchange)
        elif backend.open < self.maxConnections:
            self._connect(backend, exchange)
        else:
            backend.waiting.append(exchange)
        return exchange

    def _connect(self, backend: _Backend, exchange: Exchange) -> None:
        backend.open += 1
        endpoint = self.connector.endpointFor(backend.target)
        d = endpoint.connect(_ConnectionFactory(self, backend))
        exchange.connecting = d

        def connected(connection):
            exchange.connecting = None
            if exchange.sink is None:
                connection.transport.loseConnection()
                return
            connection.send(exchange)

        def failed(reason):
            exchange.connecting = None
            backend.open -= 1
            sink, exchange.sink = exchange.sink, None
            if sink is not None:
                if reason.check(error.ConnectingCancelledError):
                    return
                sink.connectFailed(reason)
            self._next(backend)

        d.addCallbacks(connected, failed)

    def _release(self, connection: UpstreamConnection, reusable: bool) -> None:
        """
        C{connection}'s exchange is over: give it to the next waiting request, keep it idle, or
        close it.
        """
        backend = connection.backend
        waiting = backend.waiting
        if reusable and waiting:
            connection.reused = True
            connection.send(waiting.pop(0))
            return
        if reusable and len(backend.idle) < self.maxIdle:
            connection.idleSince = self.reactor.seconds()
            backend.idle.append(connection)
            if backend.sweep is None:
                backend.sweep = self.reactor.callLater(self.idleTimeout, self._sweep, backend)
            return
        connection.transport.loseConnection()

    def _closed(self, connection: UpstreamConnection) -> None:
        """
        C{connection} is gone.
        """
        backend = connection.backend
        if connection.counted:
            connection.counted = False
            backend.open -= 1
        try:
            backend.idle.remove(connection)
        except ValueError:
            pass
        self._next(backend)

    def _next(self, backend: _Backend) -> None:
        while backend.waiting and backend.open < self.maxConnections:
            self._connect(backend, backend.waiting.pop(0))

    def _sweep(self, backend: _Backend) -> None:
        backend.sweep = None
        now = self.reactor.seconds()
        idle = backend.idle
        while idle and now - idle[0].idleSince >= self.idleTimeout:
            idle.pop(0).transport.loseConnection()
        if idle:
            backend.sweep = self.reactor.callLater(
                idle[0].idleSince + self.idleTimeout - now, self._sweep, backend
            )

    def closeIdle(self) -> None:
        """
        Close every idle connection (at stop).
        """
        for backend in self._backends.values():
            idle, backend.idle = backend.idle, []
            for connection in idle:
                connection.transport.loseConnection()
            if backend.sweep is not None and backend.sweep.active():
                backend.sweep.cancel()
            backend.sweep = None


__all__ = ["UpstreamPool", "Exchange", "IResponseSink", "UpstreamConnection", "UpstreamError"]
