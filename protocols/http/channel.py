# -*- test-case-name: tests.test_http_smuggling,tests.test_http_site -*-
"""
The client connection of the HTTP front end: Twisted's HTTP/1.1 parser, made stricter where a
front end must be (obs-fold and bare LF refused, a deadline for the header section, 100-continue
only once a request may proceed), and what a connection learns from a trusted balancer.
"""

from __future__ import annotations


import attr

from twisted.python.reflect import namedAny
from twisted.web import http
from twisted.web.http import _parseRequestLine
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder

from casd.pinned import sourceMatches
from casd.session.clientinfo import ClientInfo
from casd.session.relay import writeThrough
from protocols.http.proxy import largerBuffers
from protocols.http.status import HTTPError

#: The names of the Twisted sources the head parser repeats or relies on, and the SHA-256 of
#: each in Twisted 26.10.0: L{twistedSourcesChanged} lists those that differ (a test fails then).
TWISTED_SOURCES = {
    "twisted.web.http.HTTPChannel.lineReceived":
        "b77ec6f21116e82766439c07df79063430a8e963b4d1cfe8460ceb1ddc7b2c37",
    "twisted.web.http.HTTPChannel.headerReceived":
        "c5cb8e0dd2fe0b44868a7108763f627e84cb4410ed6143283842ec12ddd27b19",
    "twisted.web.http.HTTPChannel._maybeChooseTransferDecoder":
        "3b92d266a3c7bd2cfc596313888c2496b6d6982516e90022f372a348986089cd",
    "twisted.web.http.HTTPChannel.allContentReceived":
        "9f7c990696871a9291cba3443c5a590dfc7e5a9a0904278e04ad26508b907d06",
    "twisted.web.http.HTTPChannel.allHeadersReceived":
        "979a9a8410f41ad93bf8490700f9893dcf43bf8fb91af01b6bd5770910c28ebe",
    "twisted.web.http.HTTPChannel.rawDataReceived":
        "e31f4ed81196fab0be7df4550db442ca3401dd703193d16b53622b37cea637ab",
    "twisted.web.http.HTTPChannel.requestDone":
        "a75a186c66f7d38d33256f146bc512e938c00b2753f8caf50c441cc9ce5af1b0",
    "twisted.web.http.HTTPChannel.timeoutConnection":
        "f08552855cd242e0c24a317b043230e93f095f820c8a80bee586f5401dfc2418",
    "twisted.protocols.policies.TimeoutMixin.setTimeout":
        "a994d95c2c1644a4fdf4af960b738160097f5bf21787dbccf0af3a207f7b2367",
    "twisted.protocols.basic.LineReceiver.setRawMode":
        "324d250b6df085148661e83b5cc66f8b2c5199a9bb1f6ee7cd82d6dbe0aa6926",
    "twisted.protocols.basic.LineReceiver.setLineMode":
        "39bd840f096fadf9076d9ed30eee9838e0d7bd57d8ec2891ddd81f22f1fd6fb3",
    "twisted.web.http_headers.Headers.addRawHeader":
        "c4fe96cc1a6e79509711874cf34babaaa8a5f876c15605fe37d66906814c9f94",
    "twisted.web.http_headers._NameEncoder.encode":
        "7b453627217624ac01c3378e00a48d5a8b0868c6324ab46b9441939f1e4eef0a",
    "twisted.web.http_headers.Headers.getAllRawHeaders":
        "8568de7067b330b8ccf2bbb8488396f57d5d0fbb7bb4e58031c7d67f66f2ff2c",
    "twisted.web.http.HTTPChannel.checkPersistence":
        "3f0cb5b5a40e1109f49adc13d37dfa4b3036ddbd7160ca26d9347ab9aea22ed7",
    "twisted.web.http.Request.parseCookies":
        "742266180dff1f1c3babd5284ad5c96d4762a65e152d5238ebc38a729844074a",
    "twisted.web.http.HTTPChannel.writeHeaders":
        "3521e56c0fe24bc25143c5b06e06174682a3ada2a5a0f8caaf1d396b2719c6a1",
}


def twistedSourcesChanged() -> list[str]:
    """
    @return: the names in L{TWISTED_SOURCES} whose source is not the one the head parser was
        written against (empty when all match).
    """
    return sourcesChanged(TWISTED_SOURCES)


def sourcesChanged(sources: dict) -> list[str]:
    """
    @param sources: dotted name -> SHA-256 of its source as it was when casd was written
        against it.
    @return: the names whose source differs now (empty when all match).
    """
    changed = []
    for name, digest in sources.items():
        try:
            found = namedAny(name)
        except (AttributeError, ValueError):
            changed.append(name)
            continue
        if not sourceMatches(digest, lambda: (found,)):
            changed.append(name)
    return changed


_CONTENT_LENGTH = b"Content-Length"
_TRANSFER_ENCODING = b"Transfer-Encoding"

#: Header names as sent -> their canonical spelling (bounded: a client may invent names).
_canonical: dict = {}
_CANONICAL_MAX = 2000

#: Whole header lines seen before (C{User-Agent: ...}, C{Host: ...}), with the name and value
#: they were parsed into: bounded in number and length, and only of fields that carry no secret
#: (credentials, cookies, a Referer's query) and do not frame the body (checked every time).
_LINES: dict = {}
_LINES_MAX = 2000
_LINE_MAX = 256
_REMEMBERED = frozenset(
    (
        b"Host",
        b"User-Agent",
        b"Accept",
        b"Accept-Language",
        b"Accept-Encoding",
        b"Accept-Charset",
        b"Cache-Control",
        b"Pragma",
        b"Connection",
        b"Keep-Alive",
        b"Content-Type",
        b"DNT",
        b"Upgrade-Insecure-Requests",
        b"X-Requested-With",
        b"Sec-Fetch-Dest",
        b"Sec-Fetch-Mode",
        b"Sec-Fetch-Site",
        b"Sec-Fetch-User",
        b"Depth",
        b"Ms-Asprotocolversion",
    )
)


class ProxyChannel(http.HTTPChannel):
    """
    One client connection (HTTP/1.1 only: h2 is never negotiated, see
    C{docs/protocols/http.md}).  Stricter than Twisted's own parser where a front end must be:
    obs-fold and bare LF line ends are refused with 400, a request's headers must arrive within
    C{header_timeout}.

    The request head (request line and header section) is parsed at once, when the buffer holds
    its end, instead of line by line through L{twisted.protocols.basic.LineReceiver}: one split,
    one pass over the header lines, the values stored straight into the request's
    L{twisted.web.http_headers.Headers} (their canonical names, values checked for CR, LF and
    NUL).  What follows the head (a body, the next request) takes Twisted's own path: its
    transfer decoders and the buffering of pipelined requests.  L{TWISTED_SOURCES} names what
    this repeats of Twisted.

    @ivar client: the L{ClientInfo} of the connection.
    """

    # Big enough for Kerberos tokens and forms cookies.
    totalHeadersSize = 65536
    maxHeaders = 200

    _headerTimer = None
    #: The proxy's silence timer (L{protocols.http.relay.Relay}), kept between requests, and
    #: the relay it fires for (L{None}: no exchange in progress).
    _silence = None
    _silenceOwner = None
    #: The last request target's match (L{protocols.http.site.HTTPSite.begin}).
    _targetMemo = None
    #: The last proxied target and its backend path (L{protocols.http.site.HTTPSite._attempt}).
    _pathMemo = None
    #: The last request's own route (L{protocols.http.routing.RequestRouter.routeNow}).
    _routeMemo = None
    #: The last request's header section (the bytes between the request line and the empty
    #: line) and its parsed table, when it had no framing field (L{_headReceived}).
    _sectionMemo = None
    #: The header fields sent to the backend for the last proxied request, with what they were
    #: made from (L{protocols.http.site.HTTPSite._attempt}).
    _fieldsMemo = None
    #: The last Basic login's header and memo (L{protocols.http.auth.BasicCredentials}).
    basicMemo = None
    #: The connection's client and the real client a trusted balancer's headers named in the
    #: last header section (L{protocols.http.site.HTTPSite.begin}).
    _forwardedMemo = None
    #: The last route's members (L{protocols.http.site.HTTPSite._availableFor}).
    _membersMemo = None
    #: The last request line and its parse (L{_requestLine}), the last target's path.
    _lineMemo = None
    targetPath = b""
    #: The last backend target and its name in the access line.
    _describedMemo = None
    #: Whether a response relay made the client's transport write through (once is enough).
    writingThrough = False
    client = None
    #: The start of a request head whose end has not arrived yet.
    _head = b""
    #: Whether the empty line some clients send after a body was skipped for this request.
    _skippedBlank = False
    #: Inside L{dataReceived} (bytes given meanwhile wait in L{_pending}).
    _receiving = False
    _pending = b""
    #: How many requests were answered (L{requestDone}).
    _requestsDone = 0

    def connectionMade(self) -> None:
        site = self.site
        self.client = ClientInfo.fromTransport(
            self.transport,
            site.descriptor.name,
            site.listener,
            site.context.config.server.trusted_networks,
            tls=site.listener.tls == "implicit",
        )
        largerBuffers(self.transport)
        # A response goes to the socket as it is written, not at the next reactor iteration
        # (two epoll_ctl calls and a pass of the reactor saved per write).
        writeThrough(self.transport)
        super().connectionMade()
        # Reading from the client paused and resumed through one switch that knows whether it
        # is paused: the end of each request need not resume a transport that reads.
        self._networkProducer = ReadSwitch(self._networkProducer)

    def dataReceived(self, data: bytes) -> None:
        if self._receiving:
            # Twisted hands back buffered bytes from inside a call (requestDone -> setLineMode),
            # which restarted the idle timer.
            self._pending += data
            return
        self._receiving = True
        done = self._requestsDone
        try:
            while data:
                if not self.line_mode or self._handlingRequest:
                    # A body (Twisted's transfer decoders), or the next request's bytes while
                    # this one is answered (Twisted buffers them).
                    self.rawDataReceived(data)
                    data = b""
                else:
                    data = self._headReceived(data)
                if self._pending:
                    data, self._pending = data + self._pending, b""
        finally:
            self._receiving = False
        # The idle timer restarts with the client's bytes (Twisted's dataReceived: before
        # reading them), unless they made a request that is being answered (the timer does not
        # close a connection then: L{timeoutConnection}) or that was answered meanwhile
        # (L{requestDone} restarted it): no reset per request.
        if not self._handlingRequest and self._requestsDone == done:
            self.resetTimeout()

    def _headReceived(self, data: bytes) -> bytes:
        """
        Bytes of a request head: parse it if its end is in, else keep them.

        @return: the bytes after the head (a body, the next request), or C{b""}.
        """
        head = self._head + data if self._head else data
        if not self.persistent:
            # Bytes after the last request of a closing connection: ignored.
            self.dataReceived = lambda data: None
            return b""
        if head[:2] == b"\r\n" and not self._skippedBlank:
            # IE sends an extra CRLF after a POST body: skipped once (as Twisted does).
            head = head[2:]
            self._skippedBlank = True
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if b"\n" in head and head.count(b"\n") != head.count(b"\r\n"):
                self._badRequest()
            elif len(head) > self.totalHeadersSize + 2 * self.maxHeaders + 8:
                self._badRequest()
            else:
                self._head = head
                if self._headerTimer is None:
                    self._headerTimer = self.callLater(self.site.headerTimeout, self._headersTooSlow)
            return b""
        self._head = b""
        self._skippedBlank = False
        lineEnd = head.find(b"\r\n")
        memo = self._sectionMemo
        if memo is not None and lineEnd < end and memo[0] == head[lineEnd + 2 : end]:
            # The same header section as this connection's last request (a keep-alive client
            # asking again): checked and parsed then, and free of framing fields; only the
            # request line is new.
            first = head[:lineEnd]
            if b"\n" in first or b"\r" in first or b"\0" in first:
                self._badRequest()
                return b""
            return self._sameSection(head, end, first, memo)
        lines = head[:end].split(b"\r\n")
        breaks = len(lines) - 1
        if (
            # a bare LF or CR (obs line ends; CR or LF inside a value)
            head.count(b"\n", 0, end) != breaks
            or head.count(b"\r", 0, end) != breaks
            or head.find(b"\0", 0, end) >= 0
            or breaks > self.maxHeaders
            or end - 2 * breaks > self.totalHeadersSize
        ):
            self._badRequest()
            return b""
        # (ProxyRequest ignores Twisted's deprecated "queued" argument.)
        request = self.requestFactory(self, 0)
        self.requests.append(request)
        first = lines[0]
        if not self._requestLine(first):
            self._badRequest()
            return b""
        raw = request.requestHeaders._rawHeaders
        canonical = _canonical
        memo = _LINES
        framed = False
        for line in lines[1:]:
            known = memo.get(line)
            if known is not None:
                # A line seen before (no secret, no framing): its name and value as parsed then.
                key, value = known
                values = raw.get(key)
                if values is None:
                    raw[key] = [value]
                else:
                    values.append(value)
                continue
            name, colon, value = line.partition(b":")
            # obs-fold (RFC 9112 5.2): a server must reject it or replace it; a proxy that
            # joins lines differently from its backend invites smuggling.
            if not colon or line[0] in (32, 9):
                self._badRequest()
                return b""
            key = canonical.get(name)
            if key is None:
                try:
                    key = _nameEncoder.encode(name)
                except InvalidHeaderName:
                    self._badRequest()
                    return b""
                if len(canonical) < _CANONICAL_MAX:
                    canonical[name] = key
            value = value.strip(b" \t")
            if key == _CONTENT_LENGTH or key == _TRANSFER_ENCODING:
                framed = True
                if not self._maybeChooseTransferDecoder(key, value):
                    # CL+TE, two lengths, a bad length or coding: Twisted has answered 400.
                    self._badRequest(answered=True)
                    return b""
            if key in _REMEMBERED and len(memo) < _LINES_MAX and len(line) <= _LINE_MAX:
                memo[line] = (key, value)
            values = raw.get(key)
            if values is None:
                raw[key] = [value]
            else:
                values.append(value)
        if framed or breaks == 0:
            self._sectionMemo = None
        else:
            # Remembered for the connection's next request (values shared, never changed:
            # L{_sameSection} gives each request its own table).
            self._sectionMemo = request.section = (head[len(first) + 2 : end], raw.copy())
        return self._headParsed(head, end)

    def _sameSection(self, head: bytes, end: int, first: bytes, memo) -> bytes:
        """
        A request whose header section is the one of C{memo} (bytes, parsed table): its
        request line parsed, its headers a copy of the table.
        """
        request = self.requestFactory(self, 0)
        self.requests.append(request)
        if not self._requestLine(first):
            self._badRequest()
            return b""
        request.requestHeaders._rawHeaders = memo[1].copy()
        request.section = memo
        return self._headParsed(head, end)

    def _requestLine(self, first: bytes) -> bool:
        """
        Parse a request line into C{_command}, C{_path} (the target) and C{_version}, and the
        target's path into C{targetPath}; the connection's last line is remembered with its
        parse (the same line comes again on a keep-alive connection).

        @return: whether the line is valid.
        """
        memo = self._lineMemo
        if memo is not None and memo[0] == first:
            self._command, self._path, self._version, self.targetPath = memo[1]
            return True
        try:
            if first[:1] in (b" ", b"\t"):
                raise ValueError(first)
            command, target, version = _parseRequestLine(first)
        except ValueError:
            return False
        parsed = (command, target, version, target.split(b"?", 1)[0])
        self._lineMemo = (first, parsed)
        self._command, self._path, self._version, self.targetPath = parsed
        return True

    def _headParsed(self, head: bytes, end: int) -> bytes:
        """
        The head of the last request is parsed: hand it over, and return what follows it.
        """
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()
        if self.transport.disconnecting:
            return b""
        return head[end + 4 :]

    def allHeadersReceived(self) -> None:
        # Twisted's allHeadersReceived (TWISTED_SOURCES), with the headers read from the
        # dictionary the head parser filled: cookies parsed and persistence checked only when
        # there is something to look at.
        if self._headerTimer is not None:
            self._cancelHeaderTimer()
        request = self.requests[-1]
        raw = request.requestHeaders._rawHeaders
        if b"Cookie" in raw:
            request.parseCookies()
        version = self._version
        if b"Connection" in raw or version != b"HTTP/1.1":
            self.persistent = self.checkPersistence(request, version)
        else:
            self.persistent = True
        request.gotLength(self.length)
        expect = raw[b"Expect"] if b"Expect" in raw else None
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self._send100Continue()

    def allContentReceived(self) -> None:
        # Twisted's allContentReceived (TWISTED_SOURCES), except that the idle timer is not
        # cancelled while the request is answered (to be armed anew in requestDone, a timer
        # per request): it keeps running, L{timeoutConnection} does not close a connection
        # whose request is being answered, and requestDone restarts it.
        command, path, version = self._command, self._path, self._version
        self.length = 0
        self._transferDecoder = None
        del self._command, self._path, self._version
        if self.timeOut:
            self._savedTimeOut = self.timeOut
        self._handlingRequest = True
        self.line_mode = 0
        self.requests[-1].requestReceived(command, path, version)

    def timeoutConnection(self) -> None:
        if self._handlingRequest:
            # Answering a request (its backend's own timers bound it): idle only once done.
            self.setTimeout(self.timeOut)
            return
        super().timeoutConnection()

    def _cancelHeaderTimer(self) -> None:
        if self._headerTimer is not None:
            if self._headerTimer.active():
                self._headerTimer.cancel()
            self._headerTimer = None

    def requestDone(self, request) -> None:
        # Twisted's requestDone (TWISTED_SOURCES), with the request compared by identity (what
        # its Request.__eq__ does, in two calls), the line mode set without a call and the
        # buffer of pipelined bytes joined only when there is one.
        if self._headerTimer is not None:
            self._cancelHeaderTimer()
        requests = self.requests
        if request is not requests[0]:
            raise TypeError
        del requests[0]
        self._requestsDone += 1
        if not self._waitingForTransport:
            # Twisted resumes the transport here, whether it was paused or not.
            producer = self._networkProducer
            if producer.__class__ is not ReadSwitch or producer.paused:
                producer.resumeProducing()
        if self.persistent:
            self._handlingRequest = False
            if self._savedTimeOut:
                self.setTimeout(self._savedTimeOut)
            buffered = self._dataBuffer
            self.line_mode = 1
            if buffered:
                self._dataBuffer = []
                self.dataReceived(b"".join(buffered))
        else:
            self.loseConnection()

    def _headersTooSlow(self) -> None:
        self._headerTimer = None
        if self.transport.disconnecting:
            return  # already answered (Twisted's own 400) and closing
        self.site.logger.info("client {client}: request headers too slow", client=self.client.peerHost)
        self._respondToBadRequestAndDisconnect()

    def _send100Continue(self) -> None:
        # A proxied request's "100 Continue" waits until it is authenticated and routed, so
        # that a client with wrong credentials does not send its body for nothing.
        request = self.requests[-1] if self.requests else None
        if request is not None and getattr(request, "mode", None) == "proxy":
            if request.pendingError is not None:
                # Already refused (the directory answered at once): no body is wanted.
                request.answerNow(request.pendingError)
                return
            if not request.mayContinue:
                request.continueWanted = True
                return
        super()._send100Continue()

    def writeHeaders(self, version, code, reason, headers) -> None:
        """
        Twisted's C{writeHeaders}, written as one string: one transport write instead of a
        sequence of four pieces a header.  The values were cleaned of line breaks when they were
        set (L{twisted.web.http_headers.Headers}).
        """
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers._rawHeaders.items():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts += (b"\r\n",)
        if self._holdHead:
            # Sent with the body's first bytes (L{write}, L{writeSequence}): one send.
            self._heldHead = b"".join(parts)
        else:
            self.transport.write(b"".join(parts))

    #: Whether L{writeHeaders} keeps the head for the next write (set by the request while it
    #: writes its first bytes), and the head kept.
    _holdHead = False
    _heldHead = None

    def write(self, data: bytes) -> None:
        head = self._heldHead
        if head is not None:
            self._heldHead = None
            data = head + data
        self.transport.write(data)

    def writeSequence(self, iovec) -> None:
        # One write (not the transport's writeSequence: a TLS layer switched to whole-chunk
        # writes would still queue a sequence in Twisted's aggregator, behind later writes).
        head = self._heldHead
        if head is not None:
            self._heldHead = None
            self.transport.write(b"".join([head, *iovec]))
        else:
            self.transport.write(b"".join(iovec))

    def flushHead(self) -> None:
        """
        Write the head L{writeHeaders} kept, if no body bytes took it along.
        """
        self._holdHead = False
        head = self._heldHead
        if head is not None:
            self._heldHead = None
            self.transport.write(head)

    def _badRequest(self, answered: bool = False) -> None:
        self._cancelHeaderTimer()
        self.dataReceived = self.lineReceived = lambda *a: None
        if not answered:
            self._respondToBadRequestAndDisconnect()

    def _silenceFired(self) -> None:
        self._silence = None
        owner, self._silenceOwner = self._silenceOwner, None
        if owner is not None:
            owner._silent()

    def connectionLost(self, reason) -> None:
        self._cancelHeaderTimer()
        timer, self._silence = self._silence, None
        if timer is not None:
            timer.cancel()
        super().connectionLost(reason)


class ReadSwitch:
    """
    The client connection's network producer (C{HTTPChannel._networkProducer}: its transport)
    as every pause and resume of reading by the HTTP front end goes through it (Twisted's
    channel, a request body's L{protocols.http.proxy.BodyPipe}), with whether it is paused.

    @ivar paused: whether the last call was a pause.
    """

    __slots__ = ("producer", "paused")

    def __init__(self, producer) -> None:
        self.producer = producer
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()

    def registerProducer(self, producer, streaming) -> None:
        self.producer.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.producer.unregisterProducer()


def canonicalName(name: bytes) -> bytes:
    """
    A header name in the spelling L{Headers} stores it under (C{X-AnchorMailbox} ->
    C{X-Anchormailbox}), for L{headerValues}.
    """
    return _nameEncoder.encode(name)


def headerValues(headers, name: bytes):
    """
    The values of a header of C{headers} (a L{Headers}) by its canonical name
    (L{canonicalName}): a look-up in its table, without the name encoding of each
    C{getRawHeaders} call (L{TWISTED_SOURCES}).

    @return: the list of values, or C{None}.
    """
    return headers._rawHeaders.get(name) or None


def rawResponse(error: HTTPError) -> bytes:
    """
    C{error} as the bytes of a complete response that closes the connection.
    """
    reason = error.reason or http.RESPONSES.get(error.code, b"Unknown Status")
    lines = [b"HTTP/1.1 %d %s" % (error.code, reason)]
    names = set()
    for name, value in error.headers:
        names.add(name.lower())
        lines.append(name + b": " + value)
    lines.append(b"Content-Length: %d" % len(error.body))
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + error.body


def forwardedClient(client, headers):
    """
    The real client as a trusted proxy in front of casd reports it: the last address of
    C{X-Forwarded-For} (the one the proxy added) and C{X-Forwarded-Proto}.  Only for trusted
    clients (a load balancer that terminated TLS); others' forwarding headers are ignored.
    """
    raw = headers._rawHeaders  # canonical names (TWISTED_SOURCES): no name encoding a look-up
    values = raw.get(b"X-Forwarded-For")
    if values:
        last = values[-1].split(b",")[-1].strip().decode("ascii", "replace")
        client = client.forwardedBy(last, None, None)
    proto = raw.get(b"X-Forwarded-Proto")
    if proto and proto[-1].strip().lower() == b"https" and not client.tls:
        client = attr.evolve(client, tls=True)
    return client
