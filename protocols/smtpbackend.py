# -*- test-case-name: tests.test_smtpbackend -*-
"""
The SMTP backend session: the login dialogue (greeting, EHLO, STARTTLS, XCLIENT or XFORWARD, and
for submission the user passed on) and then the transaction phase that casd drives itself: MAIL
and RCPT replayed, DATA streamed, every reply read within a bound.  Unlike IMAP there is no
detaching to the dumb relay: casd must see each reply to keep its promise that a C{250} to a
message means exactly one message accepted by this backend.

Both phases are driven by lines, in the style of every backend dialogue (C{expectLine}
callbacks, no generator per reply).  After the login, every reply is matched, in order, to a
command this session sent: a line the backend sends unasked breaks the session, so a reply can
never be taken for the answer to another command, and body bytes go only to a session that has
itself answered C{354} to its own C{DATA} (L{SMTPBackend.write}).
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from casd.net import parseAddress
from casd.plugin import BackendDialogue, BackendUnavailable, encodePlain
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


class NotInData(BackendUnavailable):
    """
    Body bytes were offered to a session that has not answered C{354} to its own C{DATA}.
    """


def clientAddress(host: str) -> str:
    """
    The client's address as XCLIENT and XFORWARD spell it: C{IPV6:} before an IPv6 address, an
    IPv4-mapped one as plain IPv4.
    """
    ip = parseAddress(host)
    if ip is None:
        return UNAVAILABLE
    return ("IPV6:" if ip.version == 6 else "") + str(ip)


class _Waiter:
    """
    One reply the transaction phase waits for.
    """

    __slots__ = ("deferred", "parser", "timeout", "step")

    def __init__(self, step: str, timeout: float) -> None:
        self.deferred: defer.Deferred = defer.Deferred()
        self.parser = ReplyParser()
        self.timeout = timeout
        self.step = step


class SMTPBackend(BackendDialogue):
    """
    One SMTP session with a backend (a mailbox server's SMTP service).

    @ivar helo: the client's EHLO/HELO name, passed on after XCLIENT and as XFORWARD HELO.
    @ivar esmtp: whether the client said EHLO (PROTO=ESMTP) rather than HELO.
    @ivar passUser: whether the authenticated user is passed on (submission).
    @ivar requireLogin: whether a backend that cannot be told who the user is, is unusable.
    @ivar extensions: the backend's EHLO keywords once the dialogue is done.
    @ivar passedLogin: how the user reached the backend: C{"xclient"}, C{"master"} or C{""}.
    @ivar lost: whether the connection is gone (L{whenLost} tells when).
    @ivar inData: whether this session answered C{354} to its C{DATA} and has not been sent the
        end of the data yet: only then does L{write} pass bytes on.
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
        passUser: bool = False,
        requireLogin: bool = True,
    ) -> None:
        super().__init__(target, client, user, None, context)
        self.helo = helo
        self.esmtp = esmtp
        self.passUser = passUser
        self.requireLogin = passUser and requireLogin
        self.hostname = context.config.hostname.encode("idna")
        self.extensions: dict[str, tuple[bytes, ...]] = {}
        self.passedLogin = ""
        self.xforward: bytes | None = None
        self.transactions = 0
        self.lost = False
        self.inData = False
        self._pending: deque[_Waiter] = deque()

    # -- the login dialogue: one method per reply ----------------------------------------------

    def _expectReply(self, handler) -> None:
        """
        The next whole reply (one or more lines) of the login dialogue goes to C{handler}.
        """
        parser = ReplyParser()

        def onLine(line: bytes) -> None:
            try:
                reply = parser.feed(line)
            except ReplySyntaxError as e:
                raise self.fail(str(e))
            if reply is None:
                self.expectLine()
            else:
                handler(reply)

        self.expectLine(onLine)

    def _command(self, line: bytes, handler) -> None:
        self.sendLine(line)
        self._expectReply(handler)

    def dialogue(self) -> None:
        self._expectReply(self._onGreeting)

    def _onGreeting(self, greeting: Reply) -> None:
        if greeting.code != 220:
            raise self.fail(f"greeted with {greeting.code}")
        self._ehlo(self.hostname, self._onFirstEhlo)

    def _ehlo(self, name: bytes, then) -> None:
        def onReply(reply: Reply) -> None:
            if reply.code != 250:
                raise self.fail(f"refused EHLO ({reply.code})")
            then(ehloKeywords(reply))

        self._command(b"EHLO " + name, onReply)

    def _onFirstEhlo(self, extensions) -> None:
        if self.target.tls != "starttls":
            self._identify(extensions)
            return
        if "STARTTLS" not in extensions:
            raise self.fail("offers no STARTTLS")
        self._command(b"STARTTLS", self._onStartTLS)

    def _onStartTLS(self, reply: Reply) -> None:
        if reply.code != 220:
            raise self.fail(f"refused STARTTLS ({reply.code})")
        # What was advertised before TLS is not to be trusted.
        self.startTLS(lambda: self._ehlo(self.hostname, self._identify))

    def _identify(self, extensions) -> None:
        """
        Tell the backend who the client is: XCLIENT (then EHLO again, as the client), or
        XFORWARD before each transaction.
        """
        if "XCLIENT" in extensions:
            offered = {a.decode("ascii", "replace").upper() for a in extensions["XCLIENT"]}
            if "LOGIN" in offered and self.passUser:
                self.passedLogin = "xclient"

            def onXclient(reply: Reply) -> None:
                if reply.code == 220:
                    # XCLIENT starts a new session (Postfix, Dovecot): EHLO again.
                    self._ehlo(self.helo or self.hostname, self._passUser)
                elif reply.code == 250:
                    self._passUser(extensions)
                else:
                    raise self.fail(
                        f"refused XCLIENT ({reply.code}): allow casd's address for XCLIENT"
                    )

            self._command(self.xclientLine(offered), onXclient)
            return
        if "XFORWARD" in extensions:
            offered = {a.decode("ascii", "replace").upper() for a in extensions["XFORWARD"]}
            self.xforward = self.xforwardLine(offered)
        self._passUser(extensions)

    def _passUser(self, extensions) -> None:
        if not self.passUser or self.passedLogin:
            self._loggedIn(extensions)
        elif self.target.masterUser:
            self._masterLogin(extensions)
        elif self.requireLogin:
            raise self.fail(
                "cannot be told who the user is: it offers no XCLIENT LOGIN and no master_user"
                " is configured"
            )
        else:
            self._loggedIn(extensions)

    def _masterLogin(self, extensions) -> None:
        mechanisms = {m.upper() for m in extensions.get("AUTH", ())}
        if b"PLAIN" not in mechanisms:
            raise self.fail("offers no AUTH PLAIN for the master user")
        initial = encodePlain(
            self.target.masterUser, self.target.masterPassword, self.user.loginForBackend
        )

        def onAuth(reply: Reply) -> None:
            if reply.code != 235:
                raise self.fail(f"refused the master user ({reply.code})")
            self.passedLogin = "master"
            self._loggedIn(extensions)

        self._command(b"AUTH PLAIN " + initial, onAuth)

    def _loggedIn(self, extensions) -> None:
        self.extensions = extensions
        self.succeed()

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
        if self.passUser and self.user is not None:
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

    # -- the transaction phase: replies matched in order to the commands sent -------------------

    @property
    def usable(self) -> bool:
        """
        Whether a new transaction may start on this session: connected, and nothing unasked
        for waiting in it (a backend that timed us out says C{421} before it closes).
        """
        return not self.lost and self.transport is not None and not self._buffer

    def readReply(self, step: str, timeout: float | None = None) -> defer.Deferred:
        """
        Wait for the reply to the next command sent (in order, after those already waited for).

        @param step: what the reply answers, for the logs.
        @param timeout: seconds for the reply, instead of the backend reply timeout.
        @return: a L{Deferred} firing with the L{Reply}, or failing with
            L{casd.failures.BackendUnavailable} (timeout, closed, garbage).
        """
        waiter = _Waiter(step, self.replyTimeout if timeout is None else timeout)
        if self.lost:
            waiter.deferred.errback(self._lostFailure())
            return waiter.deferred
        self._pending.append(waiter)
        if len(self._pending) == 1:
            self._arm(waiter.timeout, f"reply to {step}")
        return waiter.deferred

    def commands(self, lines) -> defer.Deferred:
        """
        Send commands together when the backend has PIPELINING (RFC 2920), else each after the
        reply to the one before.

        @return: a L{Deferred} firing with their L{Reply}s, in order.
        """
        if "PIPELINING" in self.extensions:
            self.send(b"".join(line + b"\r\n" for line in lines))
            d = defer.gatherResults([self.readReply(_stepOf(line)) for line in lines], True)
            return d.addErrback(lambda f: f.value.subFailure)
        replies: list[Reply] = []
        d = defer.succeed(None)
        for line in lines:
            d.addCallback(lambda _, line=line: self.request(line))
            d.addCallback(replies.append)
        return d.addCallback(lambda _: replies)

    def request(self, line: bytes) -> defer.Deferred:
        """
        Send one command and wait for its reply.
        """
        if self.lost:
            return defer.fail(self._lostFailure())
        self.sendLine(line)
        return self.readReply(_stepOf(line))

    def begin(self, mailLine: bytes, rcptLine: bytes) -> defer.Deferred:
        """
        Start a transaction: RSET when the session served one before, XFORWARD when that is how
        the client's identity travels, MAIL and the first RCPT, pipelined where possible.

        @return: a L{Deferred} firing with C{(MAIL reply, RCPT reply)}, failing with
            L{UnexpectedReply} when RSET or XFORWARD is refused, or a code is out of place.
        """
        lines = []
        if self.transactions:
            lines.append(b"RSET")
        if self.xforward is not None:
            lines.append(self.xforward)
        lines += [mailLine, rcptLine]
        self.transactions += 1
        return self.commands(lines).addCallback(_checkBegin, lines)

    def rcpt(self, rcptLine: bytes) -> defer.Deferred:
        return self.request(rcptLine).addCallback(checkFinal, "RCPT")

    def data(self) -> defer.Deferred:
        """
        @return: a L{Deferred} firing with the reply to DATA: C{354} (then this session takes
            the body through L{write}), or a refusal passed on to the client.
        """
        return self.request(b"DATA").addCallback(self._dataReply)

    def _dataReply(self, reply: Reply) -> Reply:
        if reply.code == 354:
            self.inData = True
        elif not 400 <= reply.code < 600:
            raise UnexpectedReply("DATA", reply)
        return reply

    def write(self, data: bytes) -> None:
        """
        Pass body bytes on, only while this session is in its own DATA (see L{inData}).

        @raise NotInData: otherwise: the session is dropped, and the bytes with it.
        """
        if not self.inData:
            self.drop()
            raise NotInData(f"backend {self.target.describe()}: body bytes outside DATA")
        if not self.lost:
            self.transport.write(data)

    def endOfData(self, timeout: float) -> defer.Deferred:
        """
        Read the reply to the end of data (the final C{.} was part of what L{write} sent).
        """
        self.inData = False
        return self.readReply("end of data", timeout).addCallback(checkFinal, "end of data")

    def quit(self) -> None:
        """
        End the session politely, without waiting for the goodbye.
        """
        if not self.lost and self.transport is not None:
            self.sendLine(b"QUIT")
            self.transport.loseConnection()
        self.inData = False
        self.lost = True

    def drop(self) -> None:
        """
        Drop the session at once: a transaction in progress is lost at the backend, which never
        saw its end of data, so nothing is stored.
        """
        if not self.lost and self.transport is not None:
            self.transport.abortConnection()
        self.inData = False
        self.lost = True

    def dataReceived(self, data: bytes) -> None:
        if not self._done:
            # The login dialogue; what follows its last reply is left over, unasked for.
            super().dataReceived(data)
            return
        self._buffer += data
        while self._buffer and not self.lost:
            i = self._buffer.find(b"\n")
            if i < 0:
                if len(self._buffer) > self.maxLineLength:
                    self._broken("line too long")
                return
            line, self._buffer = self._buffer[:i], self._buffer[i + 1 :]
            self._replyLine(line[:-1] if line.endswith(b"\r") else line)

    def _replyLine(self, line: bytes) -> None:
        if not self._pending:
            # Nothing was asked: a 421 before closing, or a backend out of step.  Never kept
            # for the next command to read as its reply.
            self._broken("sent unasked-for data: " + repr(line[:80]))
            return
        waiter = self._pending[0]
        try:
            reply = waiter.parser.feed(line)
        except ReplySyntaxError as e:
            self._broken(str(e))
            return
        if reply is None:
            return
        self._pending.popleft()
        if self._pending:
            self._arm(self._pending[0].timeout, f"reply to {self._pending[0].step}")
        else:
            self._cancelTimer()
        waiter.deferred.callback(reply)

    def _fire(self, exc: Exception | None, failure: Failure | None = None) -> None:
        if not self._done:
            super()._fire(exc, failure)
            return
        # A reply timer after the login: the session is broken.
        self._failPending(failure or Failure(exc))
        self.drop()

    def _broken(self, reason: str) -> None:
        self._failPending(Failure(self.fail(reason)))
        self.drop()

    def _lostFailure(self) -> Failure:
        return Failure(BackendUnavailable(f"backend {self.target.describe()} closed the connection"))

    def _failPending(self, failure: Failure) -> None:
        self._cancelTimer()
        pending, self._pending = self._pending, deque()
        for waiter in pending:
            waiter.deferred.errback(failure)

    def connectionLost(self, reason) -> None:
        self.lost = True
        self.inData = False
        super().connectionLost(reason)
        if self._done:
            self._failPending(self._lostFailure())


def _stepOf(line: bytes) -> str:
    return line.split(b" ", 1)[0].split(b":", 1)[0].decode("ascii", "replace").upper()


def _checkBegin(replies, lines):
    for step, reply in zip(lines[:-2], replies[:-2]):
        if reply.code != 250:
            raise UnexpectedReply(_stepOf(step), reply)
    mail, rcpt = replies[-2:]
    checkFinal(mail, "MAIL")
    checkFinal(rcpt, "RCPT")
    return mail, rcpt


def checkFinal(reply: Reply, step: str) -> Reply:
    """
    @raise UnexpectedReply: unless C{reply} is a positive, transient or permanent completion.
    @return: C{reply}.
    """
    if not (200 <= reply.code < 300 or 400 <= reply.code < 600):
        raise UnexpectedReply(step, reply)
    return reply
