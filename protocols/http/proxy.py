# -*- test-case-name: tests.test_http_site,tests.test_http_upstream -*-
"""
What the two sides of the HTTP proxy share: the client's request body on its way to the
backend (L{BodyPipe}), the socket buffer sizes, which requests may be sent again.

The backend side itself is L{protocols.http.upstream}.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer

#: Request methods that may be sent again after a connection failed before any byte went out.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PROPFIND", b"REPORT"))

#: Connection failures that happen before any byte of the request was sent.
CONNECT_ERRORS = (
    error.ConnectError,
    error.ConnectionRefusedError,
    error.TimeoutError,
    error.DNSLookupError,
    error.ConnectingCancelledError,
    defer.CancelledError,
)

#: Bytes read from a socket at once, and written to it before its producer is paused: Twisted's
#: 64 KiB made a large body cost a pause and a resume of the other side every 64 KiB.
BUFFER_SIZE = 256 * 1024

#: The largest read from a backend while a response body streams and the client keeps up
#: (L{growReads}): each read that fills the buffer doubles the next, up to this.
MAX_READ_SIZE = 2 * 1024 * 1024


def largerBuffers(transport, size: int = BUFFER_SIZE) -> None:
    """
    Use C{size} (L{BUFFER_SIZE}) on C{transport}, or on the TCP connection under a TLS one.
    """
    while transport is not None:
        if hasattr(transport, "bufferSize") and hasattr(transport, "socket"):
            transport.bufferSize = size
            return
        transport = getattr(transport, "transport", None)


def growReads(transport, size: int) -> int:
    """
    A read of C{size} bytes (the whole buffer) came from C{transport}, a plain TCP transport
    that a response body streams from: read twice as much next time, up to L{MAX_READ_SIZE}.

    A large download then costs fewer reads, fewer wake-ups of the reactor and of the backend,
    and fewer Python calls per megabyte (nginx reads a proxied body into many buffers with one
    C{readv}, much the same).  The size grows only while each read fills the buffer; when the
    client falls behind, its connection pauses the backend's and the size goes back to
    L{BUFFER_SIZE} (C{UpstreamConnection.smallReads}), as at the end of each response.  So
    what waits in casd for a slow client is its transport's buffer and at most one read.

    @return: the new size.
    """
    if size < MAX_READ_SIZE:
        size <<= 1
        transport.bufferSize = size
    return size


@implementer(IPushProducer)
class BodyPipe:
    """
    The client's request body, handed to the backend connection as it arrives.

    Bytes that arrive before a backend connection takes them wait here, up to C{highWater};
    past that the client connection is paused.  The pipe is the backend transport's producer
    while the body goes out: when the backend connection pushes back, the client connection is
    paused too; so memory stays bounded whatever the body's size.

    @ivar length: the client's C{Content-Length}, or C{None} (chunked).
    @ivar received: bytes received so far.
    @ivar started: whether a backend connection took the body (a request whose body started
        is never sent again).
    """

    highWater = 256 * 1024

    def __init__(self, length, pauseClient, resumeClient) -> None:
        """
        @param pauseClient: C{callable()} that stops reading from the client.
        @param resumeClient: C{callable()} that reads from the client again.
        """
        self.length = length
        self._pauseClient = pauseClient
        self._resumeClient = resumeClient
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._consumer = None
        self._done = False
        self._ended = False
        self._clientPaused = False
        self._backendPaused = False
        self._stopped = False
        self._failure = None
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
            self._consumer.bodyData(data)
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
        if self._consumer is not None and not self._buffer and not self._ended:
            self._ended = True
            self._consumer.bodyEnd()

    def fail(self, reason) -> None:
        """
        The client's body will not complete (the client went, or sent a malformed body): the
        backend request is abandoned.
        """
        if self._stopped:
            return
        self._stopped = True
        self._buffer = []
        self._failure = reason
        consumer, self._consumer = self._consumer, None
        if consumer is not None and not self._ended:
            self._ended = True
            consumer.bodyFailed(reason)

    def startSending(self, consumer) -> None:
        """
        A backend connection takes the body: C{consumer.bodyData(data)} for each piece, then
        C{consumer.bodyEnd()}, or C{consumer.bodyFailed(reason)}.
        """
        self.started = True
        if self._stopped:
            self._ended = True
            consumer.bodyFailed(
                self._failure or error.ConnectionLost("the client went before its body was complete")
            )
            return
        self._consumer = consumer
        self._flush()

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
            self._consumer.bodyData(data)
        if not self._buffer and not self._backendPaused:
            self._resume()
            if self._done:
                self.finish()

    # -- IPushProducer (the backend transport's) --------------------------------------------

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
