# -*- test-case-name: tests.test_http_site,tests.test_http_upstream -*-
"""
The proxy's side of one backend exchange (L{Relay}): what the backend client
(L{protocols.http.upstream}) reports, turned into the client's response, with flow control both
ways and one silence timer.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES as _NO_BODY_CODES, RESPONSES as _RESPONSES
from twisted.web.http_headers import _nameEncoder

from casd.session.relay import writeThrough

from protocols.http.headers import copyResponseHeaders
from protocols.http.status import BackendTimedOut, BadGateway
from protocols.http.upstream import IResponseSink

#: Twisted's spelling of response field names (its L{Headers} keys), as backends send them.
_SPELLING: dict = {}


def _spell(name: bytes) -> bytes:
    key = _nameEncoder.encode(name)
    if len(_SPELLING) < 4096:
        _SPELLING[name] = key
    return key


@implementer(IResponseSink)
class Relay:
    """
    One proxied request's backend exchange, and its response relayed to the client.

    The response is streamed with flow control: the relay is the client's producer and pauses
    the backend connection, so a client that stops reading pauses the backend.  One timer bounds
    the exchange's silence (C{vdir.timeout}): before the response head it answers 504; later it
    cuts the exchange (the client connection is closed: a truncated body must not look
    complete).  Progress either way (a piece of the response, the client taking more, more of
    the client's body) is a timestamp or a count, not a timer reset per piece.
    """

    exchange = None
    #: The client connection (L{protocols.http.channel.ProxyChannel}), which keeps the timer.
    channel = None
    #: The client's transport, once the response started.
    transport = None
    #: How much of the client's body the silence timer saw last.
    seenIn = 0
    #: The response head L{_start} wrote, until the first body bytes take it along.
    headBytes = None

    def __init__(self, site, request, vdir, decision, targets, index) -> None:
        self.site = site
        self.request = request
        self.vdir = vdir
        self.decision = decision
        self.targets = targets
        self.index = index
        self.started = False
        self.held = None
        self.ended = None
        self.head = None
        clock = self.clock = site.clock
        now = self.active = clock.seconds()
        # The client connection's silence timer, kept between its requests.  One due before
        # this exchange's deadline is left alone (when it fires, L{_silent} sees the exchange
        # active since C{self.active} and sets it for the rest); one due later is moved
        # earlier.  Not a timer scheduled and cancelled, nor moved, per request.  (C{time} and
        # C{delayed_time}: what L{DelayedCall.getTime} adds, read without a call.)
        timeout = request.vdirTimeout or vdir.timeout
        channel = self.channel = request.channel
        channel._silenceOwner = self
        timer = channel._silence
        if timer is None:
            channel._silence = clock.callLater(timeout, channel._silenceFired)
        elif timer.time + timer.delayed_time > now + timeout:
            timer.reset(timeout)

    # -- the timer --------------------------------------------------------------------------

    def _silent(self) -> None:
        timeout = self.vdir.timeout
        now = self.clock.seconds()
        pipe = self.request._pipe
        if pipe is not None and pipe.received != self.seenIn:
            # The client's body came on meanwhile (checked here, not per piece).
            self.seenIn = pipe.received
            self.active = now
        quiet = now - self.active
        if quiet < timeout:
            channel = self.channel
            channel._silenceOwner = self
            channel._silence = self.clock.callLater(timeout - quiet, channel._silenceFired)
            return
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.cancel()
        request = self.request
        if not self.started:
            target = self.targets[self.index]
            request._relay = None
            self.site._failed(
                Failure(BackendTimedOut(f"{target.describe()} did not answer within {timeout:g} s")),
                request,
            )
            return
        if not request._gone:
            request.channel.transport.loseConnection()

    def _stopTimer(self) -> None:
        # The timer stays with the connection for its next request; it fires for nobody (and
        # is dropped) if none comes in time, and goes with the connection.
        channel = self.channel
        if channel._silenceOwner is self:
            channel._silenceOwner = None

    # -- IResponseSink ----------------------------------------------------------------------

    def connectFailed(self, reason) -> None:
        self._stopTimer()
        self.exchange = None
        site, request = self.site, self.request
        target = self.targets[self.index]
        site.memberFor(self.channel, target).connectFailed(
            str(reason.value) or type(reason.value).__name__
        )
        pipe = request._pipe
        canRetry = pipe is None or not pipe.started
        if canRetry and self.index + 1 < len(self.targets) and not request._gone:
            site.logger.info(
                "{backend}: connect failed ({reason}); trying the next member",
                backend=target.describe(),
                reason=str(reason.value),
            )
            site._attempt(request, self.vdir, self.decision, self.targets, self.index + 1)
            return
        request._relay = None
        site._failed(
            Failure(BadGateway(f"connect to {target.describe()} failed: {reason.value}")), request
        )

    def failed(self, reason) -> None:
        if self.started:
            # The head went out already (a malformed chunk, say): the body is cut short.
            self.responseEnded(False)
            return
        self._stopTimer()
        self.exchange = None
        target = self.targets[self.index]
        self.request._relay = None
        self.site._failed(
            Failure(BadGateway(f"{target.describe()}: {reason.getErrorMessage()}")), self.request
        )

    def responseStarted(self, exchange, code, phrase, headers) -> None:
        self.started = True
        request = self.request
        self.site.memberFor(self.channel, self.targets[self.index]).connectSucceeded()
        if request._gone:
            self.clientGone()
            return
        self.head = (code, phrase, headers)
        if request.bodyRead:
            self._start()
            return
        # The client's body is still coming: the response waits for it (Twisted's channel reads
        # the next request from the same buffer), the backend connection paused meanwhile.
        self.held = []
        exchange.pauseResponse()
        request.afterBody(self._release)

    def _release(self) -> None:
        held, self.held = self.held, None
        if self.request._gone:
            return
        self._start()
        for data in held:
            self.responseData(data)
        if self.ended is not None:
            self.responseEnded(self.ended)
        elif self.exchange is not None:
            self.exchange.resumeResponse()

    def _start(self) -> None:
        request = self.request
        code, phrase, headers = self.head
        out = request.responseHeaders
        raw = out._rawHeaders
        if (
            not raw
            and self.decision.cookie is None
            and code not in _NO_BODY_CODES
            and request.method != b"HEAD"
            and not request.cookies
            and request.lastModified is None
            and request.etag is None
        ):
            # The usual response: its head written here from the backend's fields in one pass
            # (their order and spelling kept), sent with the first body bytes; what Twisted's
            # Request.write would frame otherwise (chunked for HTTP/1.1 without a length).
            request.code = code
            message = request.code_message = phrase or _RESPONSES.get(code, b"Unknown Status")
            version = request.clientproto
            parts = [version, b" %d " % code, message, b"\r\n"]
            for name, value in headers:
                parts += (name, b": ", value, b"\r\n")
            if self.exchange.length is None and version == b"HTTP/1.1":
                parts.append(b"Transfer-Encoding: chunked\r\n\r\n")
                request.chunked = 1
            else:
                parts.append(b"\r\n")
            request.startedWriting = 1
            self.headBytes = b"".join(parts)
            request.relayFrom(self)
            channel = self.channel
            self.transport = channel.transport
            if not channel.writingThrough:
                channel.writingThrough = True
                writeThrough(self.transport)
            return
        request.setResponseCode(code, phrase or None)
        if raw:
            # casd set some already (a refreshed forms session's cookie): merged.
            copyResponseHeaders(headers, out)
        else:
            # The fields are tokens (the head was checked), the values free of line ends:
            # straight into Twisted's table, under Twisted's spelling of each name.
            spelling = _SPELLING
            for name, value in headers:
                key = spelling.get(name)
                if key is None:
                    key = _spell(name)
                if key in raw:
                    raw[key].append(value)
                else:
                    raw[key] = [value]
        if self.decision.cookie is not None:
            out.addRawHeader(b"Set-Cookie", self.decision.cookie)
        self._producing()

    def _producing(self) -> None:
        """
        The relay becomes the client's producer; the client's transport writes through.
        """
        request = self.request
        request.relayFrom(self)
        # The client's writes try the socket at once (the core's, as the mail relay's): the
        # head and the body pieces go out without a reactor turn each.
        channel = self.channel
        transport = self.transport = channel.transport
        if not channel.writingThrough:
            channel.writingThrough = True
            writeThrough(transport)

    def responseData(self, data: bytes) -> None:
        if self.held is not None:
            self.held.append(data)
            return
        self.active = self.clock.seconds()
        request = self.request
        head = self.headBytes
        if head is not None:
            # The first bytes, with the head L{_start} wrote.
            if not data:
                return
            self.headBytes = None
            request.sentLength += len(data)
            if request.chunked:
                self.transport.write(b"%s%x\r\n%s\r\n" % (head, len(data), data))
            else:
                self.transport.write(head + data)
            return
        if request.startedWriting and not request.chunked:
            # The head is out and the body needs no framing: to the client's transport.
            request.sentLength += len(data)
            self.transport.write(data)
            return
        request.write(data)

    def responseEnded(self, complete: bool) -> None:
        if self.held is not None:
            self.ended = complete
            return
        channel = self.channel
        if channel._silenceOwner is self:
            channel._silenceOwner = None  # (L{_stopTimer}, without the call)
        self.exchange = None
        request = self.request
        if request._gone:
            return
        head = self.headBytes
        if head is not None:
            # No body bytes came: the head alone for an empty body, nothing for a cut one.
            self.headBytes = None
            if complete:
                self.transport.write(head)
        if complete:
            request.finishRelayed()
            # The exchange is over: the request and its relay refer to each other no more (a
            # cycle would leave both to the garbage collector: casd/service/gctune.py).
            request._relay = None
        else:
            request.unregisterProducer()
            # A body cut short must not look complete: close the connection.
            request.channel.transport.loseConnection()

    # -- the client's producer (IPushProducer) ----------------------------------------------

    def pauseProducing(self) -> None:
        if self.exchange is not None:
            self.exchange.pauseResponse()

    def resumeProducing(self) -> None:
        # The client took more: progress, for the silence timer.
        self.active = self.clock.seconds()
        if self.exchange is not None:
            self.exchange.resumeResponse()

    def stopProducing(self) -> None:
        self.clientGone()

    def clientGone(self) -> None:
        """
        The client went: the backend exchange is given up.
        """
        self._stopTimer()
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.cancel()


__all__ = ["Relay"]
