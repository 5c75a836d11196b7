# -*- test-case-name: tests.test_http_upstream,tests.test_http_site -*-
"""
One persistent connection to an HTTP backend member (L{UpstreamConnection}), for
L{protocols.http.upstream.UpstreamPool}: it writes a request's head and body and reads the
response's framing.

The response head is found whole and checked by one regular expression (CRLF line ends only, no
obs-fold, field names that are tokens), its fields read by another; hop-by-hop fields are
removed, the rest handed to the exchange's sink as C{(name, value)} pairs.  Bodies go to the
sink as they come: C{Content-Length} ones as the received pieces, chunked ones decoded,
close-delimited ones until the end; C{HEAD}, 1xx, 204 and 304 answers have none.  Any framing
doubt closes the connection instead of reusing it.
"""

from __future__ import annotations

import re

from twisted.internet import error
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from protocols.http.headers import HOP_BY_HOP
from casd.session.relay import writeThrough
from protocols.http.proxy import BUFFER_SIZE, growReads, largerBuffers

#: The largest response head casd reads from a backend.
MAX_HEAD = 65536

#: A whole response head: status line and fields, CRLF line ends only, no obs-fold, no NUL.
_HEAD = re.compile(
    rb"HTTP/1\.[01] [0-9]{3}(?: [^\r\n\x00]*)?\r\n"
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\r\n\x00]*\r\n)*\r\n"
)
#: One field of a head that L{_HEAD} accepted.
_FIELD = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*?)[ \t]*\r\n")
#: The same for a head without white space at a line's end (the usual case): a greedy value,
#: found in about half the time.
_FIELD_TRIMMED = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*([^\r\n]*)\r\n")
#: A chunk-size line (RFC 9112 7.1), extensions ignored.
_CHUNK = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[^\r\n\x00]*)?\r\n")

#: C{Connection} options that name no field.
_CONNECTION_OPTIONS = frozenset((b"close", b"keep-alive", b""))

#: The usual C{Connection} values, as the tokens they name.
_CONNECTION_VALUES = {
    value: frozenset((token,))
    for token in (b"keep-alive", b"close")
    for value in (token, token.title(), token.upper())
}

#: The usual spellings of the response fields L{_PLAIN} never holds, and their lower case.
_LOWER = {
    spelling: name
    for name in (b"content-length", b"connection", b"keep-alive", b"transfer-encoding")
    for spelling in (name, name.title())
}

#: Response field names as backends spell them that need no look at their lower case (not
#: hop-by-hop, not C{Content-Length}): a bounded set, the same few names come back.
_PLAIN: set = set()
_PLAIN_MAX = 1024

#: A C{_readSize} no read reaches: reads that never grow.
_NEVER = 1 << 62

# Parser states of a connection.
_IDLE, _HEAD_STATE, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE = range(6)


class UpstreamError(Exception):
    """
    A backend's response could not be read: a malformed head or body framing.
    """


class UpstreamConnection(Protocol):
    """
    One persistent connection to a backend member, carrying one exchange at a time.

    @ivar reused: whether it carried a request before the current one.
    """

    log = Logger()

    exchange = None
    reused = False
    idleSince = 0.0
    counted = True
    #: Whether reading is paused (the client is slow): undone before the connection is reused.
    paused = False
    #: The size of the next read when a body streams over plain TCP (L{growReads}); through
    #: TLS, whose chunks are the TLS layer's, reads never grow.
    _readSize = BUFFER_SIZE

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
        if not hasattr(self.transport, "socket"):
            self._readSize = _NEVER
        # Writes try the socket at once (the core's, as the mail relay's): no write
        # registration with the reactor and no later turn to flush a request head.
        writeThrough(self.transport)

    # -- sending ----------------------------------------------------------------------------

    def send(self, exchange: Exchange) -> None:
        """
        Write C{exchange}'s head (and start its body).
        """
        self.exchange = exchange
        exchange.connection = self
        self._state = _HEAD_STATE
        self._buffer = b""
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
            self.transport.write(b"%x\r\n%s\r\n" % (len(data), data))
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
            size = len(data)
            if size < remaining:
                self._remaining = remaining - size
                if size >= self._readSize:
                    self._readSize = growReads(self.transport, size)
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
            if len(data) >= self._readSize:
                self._readSize = growReads(self.transport, len(data))
            self._readChunks(data)
        elif state == _UNTIL_CLOSE:
            if len(data) >= self._readSize:
                self._readSize = growReads(self.transport, len(data))
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
        hop = HOP_BY_HOP
        named = None
        plain = _PLAIN
        # The fields in the backend's order, less the hop-by-hop ones (filtered once at the end).
        if b" \r\n" in head or b"\t\r\n" in head:
            headers = _FIELD.findall(head)
        else:
            headers = _FIELD_TRIMMED.findall(head)
        dropped = ()
        for name, value in headers:
            if name in plain:
                # A name seen before, neither hop-by-hop nor Content-Length in any spelling.
                continue
            lower = _LOWER[name] if name in _LOWER else name.lower()
            if lower in hop:
                dropped += (name,)
                if lower == b"connection":
                    tokens = _CONNECTION_VALUES.get(value)
                    if tokens is None:
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
            elif len(plain) < _PLAIN_MAX:
                plain.add(name)
        if dropped:
            headers = [field for field in headers if field[0] not in dropped]
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
        exchange.length = length
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
        if self._readSize != BUFFER_SIZE:
            self.smallReads()
        sink = exchange.sink
        exchange.sink = None
        self.pool._release(self, self._keepAlive)
        if sink is not None:
            sink.responseEnded(True)

    def smallReads(self) -> None:
        """
        Reads of L{BUFFER_SIZE} again (the client is slow, or the response ended), unless they
        never grow on this connection.
        """
        if self._readSize != _NEVER:
            self._readSize = BUFFER_SIZE
            self.transport.bufferSize = BUFFER_SIZE

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
        idle = self.backend.idle
        if self in idle:
            idle.remove(self)
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


__all__ = ["UpstreamConnection", "UpstreamError", "MAX_HEAD"]
