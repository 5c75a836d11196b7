# -*- test-case-name: tests.test_http_smuggling,tests.test_http_site -*-
"""
The client connection of the HTTP front end: Twisted's HTTP/1.1 parser, made stricter where a
front end must be (obs-fold and bare LF refused, a deadline for the header section, 100-continue
only once a request may proceed), and what a connection learns from a trusted balancer.
"""

from __future__ import annotations

import re

import attr

from twisted.web import http

from casd.session.clientinfo import ClientInfo
from protocols.http.proxy import largerBuffers
from protocols.http.status import HTTPError

#: A bare LF: a line end that is not CRLF (request smuggling between parsers that disagree).
_BARE_LF = re.compile(rb"(?<!\r)\n")

class ProxyChannel(http.HTTPChannel):
    """
    One client connection (HTTP/1.1 only: h2 is never negotiated, see
    C{docs/protocols/http.md}).  Stricter than Twisted's own parser where a front end must be:
    obs-fold and bare LF line ends are refused with 400, a request's headers must arrive within
    C{header_timeout}.

    @ivar client: the L{ClientInfo} of the connection.
    """

    # Big enough for Kerberos tokens and forms cookies.
    totalHeadersSize = 65536
    maxHeaders = 200

    _headerTimer = None
    client = None

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
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        if self.line_mode and not self._handlingRequest and data:
            if self._headerTimer is None:
                self._headerTimer = self.callLater(self.site.headerTimeout, self._headersTooSlow)
            if self._bareLF(data):
                self._badRequest()
                return
        super().dataReceived(data)

    def _bareLF(self, data: bytes) -> bool:
        """
        Whether the header bytes in C{data} hold an LF not preceded by CR.  Only the bytes up
        to the end of the headers are looked at (a body may hold anything).
        """
        seen = self._tail + data
        end = seen.find(b"\r\n\r\n")
        head = seen if end < 0 else seen[: end + 4]
        start = len(self._tail)
        self._tail = seen[-3:] if end < 0 else b""
        # The lookbehind sees the kept tail: only the new bytes are searched.
        return _BARE_LF.search(head, start) is not None

    _tail = b""

    def lineReceived(self, line: bytes) -> None:
        # obs-fold (RFC 9112 5.2): a server must reject it or replace it; a proxy that joins
        # lines differently from its backend invites smuggling.
        if line[:1] in (b" ", b"\t"):
            self._badRequest()
            return
        super().lineReceived(line)

    def allHeadersReceived(self) -> None:
        self._cancelHeaderTimer()
        super().allHeadersReceived()

    def _cancelHeaderTimer(self) -> None:
        if self._headerTimer is not None:
            if self._headerTimer.active():
                self._headerTimer.cancel()
            self._headerTimer = None

    def requestDone(self, request) -> None:
        self._cancelHeaderTimer()
        super().requestDone(request)

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

    def _badRequest(self) -> None:
        self._cancelHeaderTimer()
        self.dataReceived = self.lineReceived = lambda *a: None
        self._respondToBadRequestAndDisconnect()

    def connectionLost(self, reason) -> None:
        self._cancelHeaderTimer()
        super().connectionLost(reason)


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
    values = headers.getRawHeaders(b"X-Forwarded-For")
    if values:
        last = values[-1].split(b",")[-1].strip().decode("ascii", "replace")
        client = client.forwardedBy(last, None, None)
    proto = headers.getRawHeaders(b"X-Forwarded-Proto")
    if proto and proto[-1].strip().lower() == b"https" and not client.tls:
        client = attr.evolve(client, tls=True)
    return client
