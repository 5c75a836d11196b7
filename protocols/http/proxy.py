"""
The backend side of the HTTP proxy: one L{twisted.web.client.Agent} and
L{twisted.web.client.HTTPConnectionPool} per backend member, bodies streamed both ways.

Never a cookie jar, never a redirect followed: a backend's C{Set-Cookie} and C{Location} go to
the client that caused them, and nothing of one user's exchange is replayed for another's.
"""

from __future__ import annotations

from attrs import define
from zope.interface import implementer

from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import (
    Agent,
    HTTP11ClientProtocol,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer

#: Request methods that may be sent again after a connection failed before any byte went out.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PROPFIND", b"REPORT"))

#: Connection failures that happen before any byte of the request was sent.
CONNECT_ERRORS = (
    error.ConnectError,
    error.ConnectionRefusedError,
    error.TimeoutError,
    error.DNSLookupError,
    error.ConnectingCancelledError,
)


@implementer(IAgentEndpointFactory)
class _TargetEndpoints:
    """
    The endpoint of one backend member, as the mail protocols reach it
    (L{casd.pool.connector.BackendConnector.endpointFor}): TLS verified against the member's
    C{tls_name} with service_identity when its mode is C{implicit}, and its connect timeout.
    """

    def __init__(self, connector, target) -> None:
        self.connector = connector
        self.target = target

    def endpointForURI(self, uri):
        return self.connector.endpointFor(self.target)


#: Bytes read from a socket at once, and written to it before its producer is paused: Twisted's
#: 64 KiB made a large body cost a pause and a resume of the other side every 64 KiB.
BUFFER_SIZE = 256 * 1024


def largerBuffers(transport) -> None:
    """
    Use L{BUFFER_SIZE} on C{transport}, or on the TCP connection under a TLS one.
    """
    while transport is not None:
        if hasattr(transport, "bufferSize") and hasattr(transport, "socket"):
            transport.bufferSize = BUFFER_SIZE
            return
        transport = getattr(transport, "transport", None)


class _BackendConnection(HTTP11ClientProtocol):
    def connectionMade(self) -> None:
        # Requests go out in one write; Nagle's algorithm would hold the next one back until
        # the backend's delayed ACK (40 ms a request on a persistent connection).
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            setNoDelay(True)
        largerBuffers(self.transport)
        super().connectionMade()

    def _finishResponse_WAITING(self, rest):
        # Twisted pools a connection unless the response says "Connection: close"; an HTTP/1.0
        # response without "keep-alive" means the server closes it too.  Pooled, the next
        # request on it would fail (a 502) when the server's close arrives.
        parser = self._parser
        response = getattr(parser, "response", None)
        if response is not None and response.version[1:] == (1, 0):
            tokens = b",".join(parser.connHeaders.getRawHeaders(b"Connection", ())).lower()
            if b"keep-alive" not in tokens:
                parser.connHeaders.addRawHeader(b"Connection", b"close")
        return super()._finishResponse_WAITING(rest)

    _finishResponse_TRANSMITTING = _finishResponse_WAITING


class _QuietClientFactory(_HTTP11ClientFactory):
    # One "Starting factory" and "Stopping factory" line per backend connection is noise.
    noisy = False

    def buildProtocol(self, addr):
        return _BackendConnection(self._quiescentCallback)


class _Pool(HTTPConnectionPool):
    """
    Twisted's pool with a quiet connection factory (C{_factory} is private: covered by
    C{tests.test_http_smuggling.TwistedPrivatesTests}).
    """

    _factory = _QuietClientFactory


@define
class _Backend:
    agent: Agent
    pool: HTTPConnectionPool
    slots: defer.DeferredSemaphore
    scheme: bytes
    netloc: bytes


class BackendAgents:
    """
    The per-member agents, pools and concurrency caps.

    @ivar maxConnections: the most concurrent requests (so connections) to one member; more
        wait for a slot.
    """

    def __init__(self, reactor, connector, maxConnections: int = 256, maxIdle: int = 32,
                 idleTimeout: float = 60.0) -> None:
        """
        @param connector: the L{casd.pool.connector.BackendConnector} (endpoints, TLS, timeouts).
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
            pool = _Pool(self.reactor, persistent=True)
            pool.maxPersistentPerHost = self.maxIdle
            pool.cachedConnectionTimeout = self.idleTimeout
            # A request without a body whose cached connection turns out closed by the backend
            # (its keep-alive timeout raced ours) is sent again on a new connection: Twisted's
            # rule, which never resends a request with a body.
            pool.retryAutomatically = True
            agent = Agent.usingEndpointFactory(
                self.reactor, _TargetEndpoints(self.connector, target), pool=pool
            )
            host = f"[{target.host}]" if ":" in target.host else target.host
            backend = self._backends[key] = _Backend(
                agent,
                pool,
                defer.DeferredSemaphore(self.maxConnections),
                b"https" if target.tls == "implicit" else b"http",
                f"{host}:{target.port}".encode("ascii"),
            )
        return backend

    def url(self, target, path: bytes) -> bytes:
        backend = self.backendFor(target)
        return backend.scheme + b"://" + backend.netloc + path

    def request(self, target, method: bytes, path: bytes, headers, body):
        """
        Send one request to C{target} once a connection slot is free.

        @return: a L{Deferred} firing with C{(response, release)}: call C{release()} when the
            response body is done (the slot is then free again).
        """
        backend = self.backendFor(target)
        released = []

        def release():
            if not released:
                released.append(True)
                backend.slots.release()

        def send(_):
            d = backend.agent.request(method, self.url(target, path), headers, body)
            d.addCallback(lambda response: (response, release))

            def failed(f):
                release()
                return f

            d.addErrback(failed)
            return d

        return backend.slots.acquire().addCallback(send)

    def closeIdle(self):
        """
        Close every cached idle backend connection (at stop).
        """
        return defer.DeferredList(
            [b.pool.closeCachedConnections() for b in self._backends.values()]
        )


@implementer(IBodyProducer)
class BodyPipe:
    """
    The client's request body, handed to the backend request as it arrives.

    Bytes that arrive before the backend connection takes them wait here, up to
    C{highWater}; past that the client connection is paused.  When the backend connection pushes
    back, the client connection is paused too; so memory stays bounded whatever the body's size.

    @ivar length: the client's C{Content-Length}, or L{UNKNOWN_LENGTH} (chunked).
    @ivar received: bytes received so far.
    @ivar started: whether a backend consumer took the body (a request whose body started is
        never sent again).
    """

    highWater = 256 * 1024

    def __init__(self, length, pauseClient, resumeClient) -> None:
        """
        @param pauseClient: C{callable()} that stops reading from the client.
        @param resumeClient: C{callable()} that reads from the client again.
        """
        self.length = UNKNOWN_LENGTH if length is None else length
        self._pauseClient = pauseClient
        self._resumeClient = resumeClient
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._consumer = None
        self._done = False
        self._finished = None
        self._clientPaused = False
        self._backendPaused = False
        self._stopped = False
        self.received = 0
        self.started = False

    def write(self, data: bytes) -> None:
        """
        More of the body from the client.
        """
        self.received += len(data)
        if self._stopped:
            return
        if self._consumer is not None and not self._buffer:
            self._consumer.write(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered > self.highWater:
            self._pause()

    def finish(self) -> None:
        """
        The client's body is complete.
        """
        self._done = True
        if self._consumer is not None and not self._buffer and self._finished is not None:
            d, self._finished = self._finished, None
            d.callback(None)

    def fail(self, reason) -> None:
        """
        The client's body will not complete (the client went, or sent a malformed body): the
        backend request is abandoned.
        """
        self._stopped = True
        self._buffer = []
        if self._finished is not None:
            d, self._finished = self._finished, None
            d.errback(reason)

    def _pause(self) -> None:
        if not self._clientPaused:
            self._clientPaused = True
            self._pauseClient()

    def _resume(self) -> None:
        if self._clientPaused:
            self._clientPaused = False
            self._resumeClient()

    def _flush(self) -> None:
        while self._buffer and not self._backendPaused and self._consumer is not None:
            data = self._buffer.pop(0)
            self._buffered -= len(data)
            self._consumer.write(data)
        if not self._buffer and not self._backendPaused:
            self._resume()
            if self._done:
                self.finish()

    # -- IBodyProducer ----------------------------------------------------------------------

    def startProducing(self, consumer):
        self.started = True
        self._consumer = consumer
        self._finished = defer.Deferred()
        d = self._finished
        if self._stopped:
            self._finished = None
            d.errback(error.ConnectionLost("the client went before its body was complete"))
            return d
        self._flush()
        return d

    def pauseProducing(self) -> None:
        self._backendPaused = True
        self._pause()

    def resumeProducing(self) -> None:
        self._backendPaused = False
        self._flush()

    def stopProducing(self) -> None:
        self._stopped = True
        self._buffer = []
        self._consumer = None
        self._resume()


@implementer(IPushProducer)
class _ProgressProducer:
    """
    The backend connection as the client's producer, noting each time the client asks for more.
    """

    def __init__(self, producer, onProgress) -> None:
        self.producer = producer
        self.onProgress = onProgress

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if self.onProgress is not None:
            self.onProgress()
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()


class ResponseRelay(Protocol):
    """
    Streams a backend response body to the client's request, with flow control: the backend
    connection is registered as the client's producer, so a client that stops reading pauses
    the backend.

    @ivar done: a L{Deferred} firing with C{True} when the whole body went through, C{False}
        when it was cut (the client connection is then closed: a truncated body must not look
        complete).
    """

    log = Logger()

    def __init__(self, request, onData=None) -> None:
        """
        @param onData: called on progress either way: a piece of the body from the backend, or
            the client taking more (so an idle limit cuts a stalled exchange, not a slow one).
        """
        self.request = request
        self.onData = onData
        self.done = defer.Deferred()
        self.bytes = 0
        self._clientGone = False

    def connectionMade(self) -> None:
        self.request.registerProducer(_ProgressProducer(self.transport, self.onData), True)

    def dataReceived(self, data: bytes) -> None:
        if self._clientGone:
            return
        self.bytes += len(data)
        if self.onData is not None:
            self.onData()
        self.request.write(data)

    def clientGone(self) -> None:
        """
        The client went: stop the backend.
        """
        self._clientGone = True
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason) -> None:
        complete = reason.check(ResponseDone, PotentialDataLoss) is not None
        if not self._clientGone:
            try:
                self.request.unregisterProducer()
            except Exception:
                pass
        self.done.callback(complete and not self._clientGone)
