"""
The SMTP backend session: the login dialogue (greeting, EHLO, STARTTLS, XCLIENT or XFORWARD, and
for submission the user passed on) and then the transaction phase that casd drives itself: MAIL
and RCPT replayed, DATA streamed, every reply read within a bound.  Unlike IMAP there is no
detaching to the dumb relay: casd must see each reply to keep its promise that a C{250} to a
message means exactly one message accepted by this backend.
"""

from __future__ import annotations

import ipaddress

from twisted.internet import defer
from twisted.logger import Logger

from casd.session.dialogue import BackendDialogue
from casd.failures import BackendUnavailable
from casd.auth.sasl import encodePlain
from protocols.smtpgrammar import (
    Reply,
    ReplyParser,
    ReplySyntaxError,
    ehloKeywords,
    xtext,
)

#: XCLIENT/XFORWARD value for an attribute casd does not know (Postfix's spelling).
UNAVAILABLE = "[UNAVAILABLE]"


class UnexpectedReply(Exception):
    """
    The backend answered with a code that has no place at this step; the transaction is lost.
    """

    def __init__(self, step: str, reply: Reply) -> None:
        super().__init__(f"unexpected reply {reply.code} to {step}")
        self.reply = reply


def clientAddress(host: str) -> str:
    """
    The client's address as XCLIENT and XFORWARD spell it: C{IPV6:} before an IPv6 address, an
    IPv4-mapped one as plain IPv4.
    """
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return UNAVAILABLE
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return "IPV6:" + str(ip)
    return str(ip)


class SMTPBackend(BackendDialogue):
    """
    One SMTP session with a backend (a mailbox server's SMTP service).

    @ivar helo: the client's EHLO/HELO name, passed on after XCLIENT and as XFORWARD HELO.
    @ivar esmtp: whether the client said EHLO (PROTO=ESMTP) rather than HELO.
    @ivar submission: whether the authenticated user is passed on (port 587/465).
    @ivar requireLogin: whether a backend that cannot be told who the user is, is unusable.
    @ivar extensions: the backend's EHLO keywords once the dialogue is done.
    @ivar passedLogin: how the user reached the backend: C{"xclient"}, C{"master"} or C{""}.
    @ivar lost: whether the connection is gone (L{whenLost} tells when).
    @ivar group: the route group this session serves.
    """

    log = Logger()
    group = ""

    def __init__(
        self,
        target,
        client,
        user,
        context,
        helo: bytes,
        esmtp: bool,
        submission: bool,
        requireLogin: bool = True,
    ) -> None:
        super().__init__(target, client, user, None, context)
        self.helo = helo
        self.esmtp = esmtp
        self.submission = submission
        self.requireLogin = submission and requireLogin
        self.hostname = context.config.hostname.encode("idna")
        self.extensions: dict[str, tuple[bytes, ...]] = {}
        self.passedLogin = ""
        self.xforward: bytes | None = None
        self.transactions = 0
        self.lost = False

    # -- replies ------------------------------------------------------------------------------

    def _readLineWithin(self, timeout: float | None):
        if timeout is None:
            return self.readLine()
        saved, self.replyTimeout = self.replyTimeout, timeout
        try:
            return self.readLine()
        finally:
            self.replyTimeout = saved

    @defer.inlineCallbacks
    def readReply(self, timeout: float | None = None):
        """
        @param timeout: seconds for each line, instead of the backend reply timeout.
        @return: a L{Deferred} firing with the next L{Reply}, or failing with
            L{casd.failures.BackendUnavailable} (timeout, closed, garbage).
        """
        parser = ReplyParser()
        while True:
            line = yield self._readLineWithin(timeout)
            try:
                reply = parser.feed(line)
            except ReplySyntaxError as e:
                raise self.fail(str(e))
            if reply is not None:
                return reply

    def command(self, line: bytes, timeout: float | None = None):
        """
        Send one command line and read its reply.
        """
        self.sendLine(line)
        return self.readReply(timeout)

    @defer.inlineCallbacks
    def pipeline(self, lines):
        """
        Send commands together when the backend has PIPELINING (RFC 2920), one by one otherwise.

        @return: their L{Reply}s, in order.
        """
        if "PIPELINING" in self.extensions:
            self.send(b"".join(line + b"\r\n" for line in lines))
            replies = []
            for _ in lines:
                replies.append((yield self.readReply()))
            return replies
        replies = []
        for line in lines:
            replies.append((yield self.command(line)))
        return replies

    # -- the login dialogue -----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _ehlo(self, name: bytes):
        reply = yield self.command(b"EHLO " + name)
        if reply.code != 250:
            raise self.fail(f"refused EHLO ({reply.code})")
        return ehloKeywords(reply)

    @defer.inlineCallbacks
    def dialogue(self):
        greeting = yield self.readReply()
        if greeting.code != 220:
            raise self.fail(f"greeted with {greeting.code}")
        extensions = yield self._ehlo(self.hostname)
        if self.target.tls == "starttls":
            if "STARTTLS" not in extensions:
                raise self.fail("offers no STARTTLS")
            reply = yield self.command(b"STARTTLS")
            if reply.code != 220:
                raise self.fail(f"refused STARTTLS ({reply.code})")
            yield self.startTLS()
            # What was advertised before TLS is not to be trusted.
            extensions = yield self._ehlo(self.hostname)
        if "XCLIENT" in extensions:
            offered = {a.decode("ascii", "replace").upper() for a in extensions["XCLIENT"]}
            reply = yield self.command(self.xclientLine(offered))
            if reply.code == 220:
                # XCLIENT starts a new session (Postfix, Dovecot): EHLO again, as the client.
                extensions = yield self._ehlo(self.helo or self.hostname)
            elif reply.code != 250:
                raise self.fail(f"refused XCLIENT ({reply.code}): allow casd's address for XCLIENT")
            if "LOGIN" in offered and self.submission:
                self.passedLogin = "xclient"
        elif "XFORWARD" in extensions:
            offered = {a.decode("ascii", "replace").upper() for a in extensions["XFORWARD"]}
            self.xforward = self.xforwardLine(offered)
        if self.submission and not self.passedLogin:
            if self.target.masterUser:
                yield self._masterLogin(extensions)
            elif self.requireLogin:
                raise self.fail(
                    "cannot be told who the user is: it offers no XCLIENT LOGIN and no master_user"
                    " is configured"
                )
        self.extensions = extensions

    def _attributes(self) -> list[tuple[str, str | bytes]]:
        c = self.client
        return [
            ("ADDR", clientAddress(c.peerHost)),
            ("PORT", str(c.peerPort) if c.peerPort else UNAVAILABLE),
            # casd does not look the client's name up: the backend is told it is unknown
            # rather than left with casd's own name.
            ("NAME", UNAVAILABLE),
            ("HELO", self.helo or UNAVAILABLE),
            ("PROTO", "ESMTP" if self.esmtp else "SMTP"),
        ]

    def xclientLine(self, offered) -> bytes:
        """
        The XCLIENT command with the attributes the backend offered (Postfix's XCLIENT_README).
        """
        attributes = self._attributes()
        if self.submission and self.user is not None:
            attributes.append(("LOGIN", self.user.loginForBackend))
        c = self.client
        attributes += [("DESTADDR", clientAddress(c.localHost)), ("DESTPORT", str(c.localPort))]
        words = [
            name.encode("ascii") + b"=" + xtext(value)
            for name, value in attributes
            if name in offered
        ]
        return b"XCLIENT " + b" ".join(words)

    def xforwardLine(self, offered) -> bytes | None:
        """
        The XFORWARD command (sent before each transaction: backends forget it after one).
        """
        attributes = self._attributes() + [("IDENT", self.client.sessionId), ("SOURCE", "REMOTE")]
        words = [
            name.encode("ascii") + b"=" + xtext(value)
            for name, value in attributes
            if name in offered
        ]
        return b"XFORWARD " + b" ".join(words) if words else None

    @defer.inlineCallbacks
    def _masterLogin(self, extensions):
        mechanisms = {m.upper() for m in extensions.get("AUTH", ())}
        if b"PLAIN" not in mechanisms:
            raise self.fail("offers no AUTH PLAIN for the master user")
        initial = encodePlain(
            self.target.masterUser, self.target.masterPassword, self.user.loginForBackend
        )
        reply = yield self.command(b"AUTH PLAIN " + initial)
        if reply.code != 235:
            raise self.fail(f"refused the master user ({reply.code})")
        self.passedLogin = "master"

    # -- the transaction phase -------------------------------------------------------------------

    @property
    def usable(self) -> bool:
        """
        Whether a new transaction may start on this session: connected, and nothing unasked
        for waiting in it (a backend that timed us out says C{421} before it closes).
        """
        return not self.lost and self.transport is not None and not self._lines and not self._buffer

    @defer.inlineCallbacks
    def begin(self, mailLine: bytes, rcptLine: bytes):
        """
        Start a transaction: RSET when the session served one before, XFORWARD when that is how
        the client's identity travels, MAIL and the first RCPT, pipelined where possible.

        @return: C{(MAIL reply, RCPT reply)}.
        @raise UnexpectedReply: when RSET or XFORWARD is refused, or a code is out of place.
        """
        lines = []
        if self.transactions:
            lines.append(b"RSET")
        if self.xforward is not None:
            lines.append(self.xforward)
        lines += [mailLine, rcptLine]
        self.transactions += 1
        replies = yield self.pipeline(lines)
        for step, reply in zip(lines[:-2], replies[:-2]):
            if reply.code != 250:
                raise UnexpectedReply(step.split(b" ", 1)[0].decode("ascii"), reply)
        mail, rcpt = replies[-2:]
        checkFinal("MAIL", mail)
        checkFinal("RCPT", rcpt)
        return mail, rcpt

    @defer.inlineCallbacks
    def rcpt(self, rcptLine: bytes):
        reply = yield self.command(rcptLine)
        checkFinal("RCPT", reply)
        return reply

    @defer.inlineCallbacks
    def data(self):
        """
        @return: the reply to DATA: C{354}, or a refusal passed on to the client.
        """
        reply = yield self.command(b"DATA")
        if reply.code != 354 and not 400 <= reply.code < 600:
            raise UnexpectedReply("DATA", reply)
        return reply

    def write(self, data: bytes) -> None:
        if not self.lost:
            self.transport.write(data)

    @defer.inlineCallbacks
    def endOfData(self, timeout: float):
        """
        Read the reply to the end of data (the final C{.} was part of what L{write} sent).
        """
        reply = yield self.readReply(timeout)
        checkFinal("end of data", reply)
        return reply

    def quit(self) -> None:
        """
        End the session politely, without waiting for the goodbye.
        """
        if not self.lost and self.transport is not None:
            self.sendLine(b"QUIT")
            self.transport.loseConnection()
        self.lost = True

    def drop(self) -> None:
        """
        Drop the session at once: a transaction in progress is lost at the backend, which never
        saw its end of data, so nothing is stored.
        """
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()
        self.lost = True

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        # Once logged in, the base reads one line per call (the rest would be the relay's);
        # an SMTP session reads on: pipelined replies come in one segment.
        while self._done and not self.lost and b"\n" in self._buffer:
            super().dataReceived(b"")

    def connectionLost(self, reason) -> None:
        self.lost = True
        super().connectionLost(reason)
        # After the login the base leaves a reader waiting (and its timer cancelled): SMTP's
        # transaction phase must hear that the backend is gone.
        d, self._waiting = self._waiting, None
        if d is not None:
            d.errback(BackendUnavailable(f"backend {self.target.describe()} closed the connection"))


def checkFinal(step: str, reply: Reply) -> None:
    """
    @raise UnexpectedReply: unless C{reply} is a positive, transient or permanent completion.
    """
    if not (200 <= reply.code < 300 or 400 <= reply.code < 600):
        raise UnexpectedReply(step, reply)
