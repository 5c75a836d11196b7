# -*- test-case-name: tests.test_http_site,tests.test_http_channel,tests.test_http_responsehead -*-
"""
One request of the HTTP front end (L{ProxyRequest}): a local service's, a vdir's (proxied) or an
error, made by L{protocols.http.site.HTTPSite} and its L{protocols.http.channel.ProxyChannel}.
It sets itself up without Twisted's C{Request.__init__} chain, streams a proxied body as it
comes, and ends a relayed response in one step; the Twisted sources it repeats are hashed in
L{LEAN_INIT_SOURCES}.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers

from casd.failures import CASFailure
from protocols.http.channel import rawResponse, sourcesChanged
from protocols.http.status import HTTPError, httpError, render

#: The Twisted sources whose attributes L{ProxyRequest.__init__} sets itself, with the SHA-256
#: of each in Twisted 26.10.0 (a test fails when one changes: see L{leanInitSourcesChanged}).
LEAN_INIT_SOURCES = {
    "twisted.web.server.Request.__init__":
        "f79aac5ec350503e5367940d865a8b57b43088425ed0f82f6eb3388dbdcb7eb9",
    "twisted.web.http.Request.__init__":
        "2d3f7dbd28d0ce02f4b8f99942bd6e2f62165fc512304e8f366b361444278e29",
    "twisted.python.components.Componentized.__init__":
        "31cb3de9ee79eae252d7b1c13acb318b0a6c673829c19925e156b409fe0dcf4e",
    "twisted.web.http.Request._cleanup":
        "3e4358e4df9cc52d46752cf89bd03f1cee86b3e7d364485a18283f3cddabde2a",
    "twisted.web.server.Request.write":
        "e0629de84fb9e31d508fcda0a564c768705add8a095b140c03a9a62e8326b523",
    "twisted.web.http.Request.connectionLost":
        "e874acaf9f19205d5b7ed2a52b73a8327013a0c3df87a724eab07caabe5e4ba4",
    # ProxyRequest.relayFrom and finishRelayed:
    "twisted.web.http.Request.finish":
        "4590c5f7e2207ef0e035118592a49d0e94da0dd941a1530d34f0c49db1dd1926",
    "twisted.web.server.Request.finish":
        "2d92e6905246806d9f2b2ead9c198a90b9a6d778fb49baddc41857a1dd6a1d7e",
    "twisted.web.http.Request.registerProducer":
        "2be6d77997f6ae8e04be921e7d3d281c7d39f13747c791f98c645be467bd4d45",
    "twisted.web.http.Request.unregisterProducer":
        "c0a13b6c3993e12cdd0d308af386e00433561696fd158e2c3ef4ba7021b84f1f",
    "twisted.web.http.HTTPChannel.registerProducer":
        "b154c18c3e856edd1847aad840bdd3453ed1b50047e4553c1a8fc9e81832fcbe",
    "twisted.web.http.HTTPChannel.unregisterProducer":
        "75c8f2e997375c17da2e40dad60e4cab30311e78081412c4e0d9dcf43cad902c",
}


def leanInitSourcesChanged() -> list[str]:
    """
    @return: the names in L{LEAN_INIT_SOURCES} whose source changed (empty when none did).
    """
    return sourcesChanged(LEAN_INIT_SOURCES)


_httpWrite = http.Request.write
_NO_BODY_CODES = http.NO_BODY_CODES




class ProxyRequest(server.Request):
    """
    One request: a local service's, a vdir's (proxied) or an error.

    @ivar mode: C{"local"}, C{"proxy"} or C{"error"}.
    @ivar vdir: the matched vdir, or C{None}.
    @ivar user: the authenticated user, once known.
    @ivar bodyRead: whether the whole body was read (L{afterBody} runs what waits for it).
    """

    defaultContentType = None

    def __init__(self, channel, *args, **kw) -> None:
        # What twisted.web's Request.__init__ chain sets (L{server.Request}, L{http.Request},
        # L{Componentized}: see L{LEAN_INIT_SOURCES}), without asking the transport for its
        # addresses: C{client} is the connection's L{ClientInfo}, C{host} is looked up if
        # asked for.
        self.notifications = []
        self.channel = channel
        self.requestHeaders = Headers()
        self.received_cookies = {}
        self.responseHeaders = Headers()
        self.cookies = []
        self.transport = channel.transport
        self.queued = False
        self._parsePOSTFormSubmission = channel.site._parsePOSTFormSubmission
        self._adapterCache = {}
        self.mode = "error"
        self.vdir = None
        self.user = None
        self.backendName = ""
        self.bytesIn = 0
        self.service = None
        self._limit = 0
        self._pipe = None
        self._relay = None
        self._gone = False
        self._logged = False
        self.site = channel.site
        self.client = channel.client
        self.startedAt = self.site.clock.seconds()

    @property
    def host(self):
        """
        The address of the listener (L{twisted.web.http.Request.getHost}), looked up when
        asked for.
        """
        host = self.__dict__.get("_host")
        if host is None:
            host = self._host = self.transport.getHost()
        return host

    @host.setter
    def host(self, value) -> None:
        self._host = value

    # -- reading ------------------------------------------------------------------------

    def gotLength(self, length) -> None:
        channel = self.channel
        # The request line, known to the channel but given to the request only at the end.
        self.method = channel._command
        self.uri = channel._path
        self.clientproto = channel._version
        self.path = channel.targetPath
        # The body is read only for a local service (begin); a proxied one streams through.
        self.content = None
        channel.site.begin(self, length)

    def write(self, data: bytes) -> None:
        if self._encoder is None and not self._inFakeHead and self.defaultContentType is None:
            # twisted.web.server.Request.write would only look for headers it never sets.
            if self.startedWriting or not data:
                _httpWrite(self, data)
                return
            # The first bytes: the head goes out with them, in one write.
            if (
                self.lastModified is None
                and self.etag is None
                and not self.cookies
                and self.method != b"HEAD"
                and self.code not in _NO_BODY_CODES
                and not self.finished
                and not self._disconnected
            ):
                self._firstWrite(data)
                return
            channel = self.channel
            channel._holdHead = True
            try:
                _httpWrite(self, data)
            finally:
                channel.flushHead()
        else:
            server.Request.write(self, data)

    def _firstWrite(self, data: bytes) -> None:
        """
        What C{http.Request.write} does for the first bytes of a response with a body and no
        C{lastModified}, C{etag} or C{cookies} (chunked framing when HTTP/1.1 has no length),
        with the head and the bytes written as one string (C{ProxyChannel.writeHeaders}'s head).
        """
        self.startedWriting = 1
        raw = self.responseHeaders._rawHeaders
        version = self.clientproto
        if version == b"HTTP/1.1" and b"Content-Length" not in raw:
            raw[b"Transfer-Encoding"] = [b"chunked"]
            self.chunked = 1
        parts = [version, b" %d " % self.code, self.code_message, b"\r\n"]
        for name, values in raw.items():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        self.sentLength += len(data)
        if self.chunked:
            parts += (b"\r\n", *http.toChunk(data))
        else:
            parts += (b"\r\n", data)
        self.channel.transport.write(b"".join(parts))

    def refuseTooLarge(self) -> None:
        """
        Answer 413 at once and close: the client is still sending a body nobody will read.
        """
        self.answerNow(HTTPError(413, reason=b"Payload Too Large"))

    def answerNow(self, error: HTTPError) -> None:
        """
        Answer before the body is read, and close the connection (the only way to skip a body
        in HTTP/1.1).
        """
        self._gone = True
        if self._pipe is not None:
            self._pipe.fail(Failure(CASFailure(f"answered {error.code} before the body")))
        transport = self.channel.transport
        transport.write(rawResponse(error))
        self.channel._cancelHeaderTimer()
        self.channel.dataReceived = lambda data: None
        self.setResponseCode(error.code)
        self._writeAccessLog()
        transport.loseConnection()

    def sendContinue(self) -> None:
        """
        The request may proceed: send the C{100 Continue} the client asked for, if it did.
        """
        self.mayContinue = True
        if self.continueWanted and not self._gone and not self.bodyRead:
            self.continueWanted = False
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    #: Whether the client sent C{Expect: 100-continue} and still waits for it.
    continueWanted = False
    #: Whether the request was authenticated and routed (a 100 may be sent).
    mayContinue = False
    #: The answer decided before the body was read, if any.
    pendingError = None
    #: The connection's memo of this request's header section (bytes, parsed table), when it
    #: had no framing field (L{ProxyChannel._headReceived}): requests with the same one share
    #: it.
    section = None
    #: The matched vdir's timeout (L{protocols.http.vdir.VirtualDirectory.timeout}), read once.
    vdirTimeout = None

    def handleContentChunk(self, data: bytes) -> None:
        self.bytesIn += len(data)
        if self._limit and self.bytesIn > self._limit:
            if not self._gone:
                self.refuseTooLarge()
            return
        if self.mode == "proxy" and self._pipe is not None:
            self._pipe.write(data)
        elif self.mode == "local":
            self.content.write(data)

    def requestReceived(self, command, path, version) -> None:
        if self._gone:
            return
        if self._pipe is not None:
            self._pipe.finish()
        if self.mode == "local":
            self.channel.site.processLocal(self, command, path, version)
            return
        self.method, self.uri, self.clientproto = command, path, version
        if self.vdir is not None:
            # The channel restores this timeout once the response is done; the vdir's timeout
            # was for this request only.
            self.channel._savedTimeOut = self.site.timeOut
        if self._afterBody is None:
            self.bodyRead = True  # nothing waits for it
        else:
            self._bodyFinished()

    #: Whether the whole body was read, and what waits for it (L{afterBody}).
    bodyRead = False
    _afterBody = None

    def afterBody(self, f) -> None:
        """
        Call C{f()} once the whole request body is read: now if it is.
        """
        if self.bodyRead:
            f()
        elif self._afterBody is None:
            self._afterBody = [f]
        else:
            self._afterBody.append(f)

    def _bodyFinished(self) -> None:
        self.bodyRead = True
        waiting, self._afterBody = self._afterBody, None
        if waiting:
            for f in waiting:
                try:
                    f()
                except Exception:
                    self.site.logger.failure("after the body of {path}", path=self.path)

    def runLocal(self, command, path, version) -> None:
        """
        Process a local service's request (Twisted's own path: args, resources).
        """
        server.Request.requestReceived(self, command, path, version)

    # -- answering ----------------------------------------------------------------------

    def fail(self, exc) -> None:
        """
        Answer with the response for C{exc} (once the body is read).
        """
        if isinstance(exc, Failure):
            exc = exc.value
        self.answer(httpError(exc))

    def answer(self, error: HTTPError) -> None:
        self.pendingError = error
        if self.continueWanted and not self.bodyRead and not self._gone:
            # The client holds its body back until told to continue: answer now, and close.
            self.answerNow(error)
            return

        def send():
            if not self._gone and not self.finished:
                if self._relay is None:
                    render(self, error)
        self.afterBody(send)

    def connectionLost(self, reason) -> None:
        self._gone = True
        if self._pipe is not None:
            self._pipe.fail(reason)
        if self._relay is not None:
            self._relay.clientGone()
        super().connectionLost(reason)
        self._writeAccessLog()

    def relayFrom(self, producer) -> None:
        """
        Twisted's C{registerProducer} of the request and of its channel for a streaming
        C{producer} (the response relay), in one call (L{LEAN_INIT_SOURCES}).
        """
        channel = self.channel
        if self.producer or channel._requestProducer is not None:
            raise ValueError(f"registering producer {producer} before the previous one ended")
        self.streamingProducer = True
        self.producer = producer
        channel._requestProducer = producer
        channel._requestProducerStreaming = True

    def finishRelayed(self) -> None:
        """
        The relayed response is complete: Twisted's C{unregisterProducer}, C{finish} and
        C{_cleanup} in one call (L{LEAN_INIT_SOURCES}; the site's C{log} does nothing), for a
        response whose head went out without an encoder; anything else takes Twisted's path.
        """
        channel = self.channel
        if channel._requestProducer is not None and not channel._requestProducerStreaming:
            channel._requestProducer.stopStreaming()
        channel._requestProducer = None
        channel._requestProducerStreaming = None
        self.producer = None
        if (
            self._disconnected
            or self.finished
            or self._encoder is not None
            or not self.startedWriting
            or self.queued
            or self.content is not None
        ):
            self.finish()
            return
        if self.chunked:
            channel.write(b"0\r\n\r\n")
        self.finished = 1
        channel.requestDone(self)
        del self.channel
        notifications = self.notifications
        if notifications:
            self.notifications = []
            for d in notifications:
                d.callback(None)
        self._writeAccessLog()

    def _cleanup(self) -> None:
        # The response is complete (what notifyFinish() reports, without a Deferred of ours).
        super()._cleanup()
        self._writeAccessLog()

    def _writeAccessLog(self) -> None:
        if self._logged:
            return
        self._logged = True
        self.site.accessLog(self)


__all__ = ["ProxyRequest", "LEAN_INIT_SOURCES", "leanInitSourcesChanged"]
