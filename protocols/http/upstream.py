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

The connection itself (writing, framing) is L{protocols.http.backendconn}.  Failures: a
connection that cannot be opened is reported to the sink (L{IResponseSink.connectFailed}:
nothing was sent, another member may be tried); a reused idle connection that turns out closed by
the backend (its keep-alive timeout raced casd's) is retried once on a new connection when the
request is idempotent and has no body; anything else ends in L{IResponseSink.failed}.

Why not L{twisted.web.client.Agent}: see C{docs/architecture.md}, "The HTTP proxy's backend
client".
"""

from __future__ import annotations

from zope.interface import Interface

from twisted.internet import error
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from protocols.http.backendconn import UpstreamConnection, UpstreamError
from protocols.http.proxy import IDEMPOTENT

#: Methods that carry a body by definition: sent with C{Content-Length: 0} when the client's had none.
_BODY_METHODS = frozenset((b"POST", b"PUT", b"PATCH"))


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
                 "retried", "noBody", "length")

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
        #: The response body's length, when the backend gave one (set with its head).
        self.length = None

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
            # A slow client: the reads that grew while it kept up shrink again.
            connection.smallReads()

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

    #: The last target asked for and its connections (the same target comes again).
    _lastTarget = None
    _lastBackend = None

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
        if target is self._lastTarget:
            backend = self._lastBackend
        else:
            backend = self._lastBackend = self.backendFor(target)
            self._lastTarget = target
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
