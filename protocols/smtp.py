# -*- test-case-name: tests.test_smtp -*-
"""
SMTP (RFC 5321): the transaction core that casd's two SMTP services share, as Exchange's Front
End Transport service is.  L{protocols.smtpmx} serves port 25 (mail from other servers,
filtered, routed by recipient); L{protocols.submission} serves ports 587 and 465 (RFC 6409,
RFC 8314: authenticated users, routed by the user).  Each is its own server class and
descriptor, with its own settings, on the L{SMTPServer} and L{SMTPDescriptor} here.

casd never queues mail.  It checks each command itself, opens the backend session when the first
recipient is accepted (the route the service finds for it, L{SMTPServer.routeRecipient}),
replays the envelope there and streams DATA through with flow control.  The promise: every
C{250} casd says to a message is the backend's own reply to it, so it means exactly one message
accepted by a backend; anything else the sender gets as a reply it retries (4xx) or bounces
(5xx).
"""

from __future__ import annotations

import weakref

from attrs import field, frozen

from twisted.internet import defer

from casd.plugin import (
    AuthenticationFailed,
    BackendUnavailable,
    CASFailure,
    DirectoryUnavailable,
    FrontendFactory,
    FrontendProtocol,
    HealthProbe,
    PolicyRefused,
    PrivacyRequired,
    ProtocolDescriptor,
    Throttled,
    Wording,
)
from protocols.smtpbackend import SMTPBackend, UnexpectedReply
from protocols.smtpdata import BACKEND_LOST, DataPhase, ClientPump
from protocols.smtpfilters import ConnectionFilter, Verdict, senderBlocked
from protocols.smtpgrammar import (
    DataStream,
    Reply,
    SMTPSyntaxError,
    parsePathArgument,
    renderParameters,
    splitCommand,
    validHeloName,
)

#: How each failure of the shared vocabulary reads in SMTP (RFC 4954 for AUTH).
FAILURES = (
    (AuthenticationFailed, b"535 5.7.8 Authentication credentials invalid"),
    (DirectoryUnavailable, b"454 4.7.0 Temporary authentication failure, try again later"),
    (Throttled, b"454 4.7.0 Too many failed logins, try again later"),
    (PolicyRefused, b"535 5.7.1 Access denied"),
    (PrivacyRequired, b"530 5.7.0 Must issue a STARTTLS command first"),
    (BackendUnavailable, b"451 4.4.1 Mailbox server unavailable, try again later"),
)
INTERNAL_FAILURE = b"451 4.3.0 Internal error, try again later"

#: What the core says in SMTP's name (L{FrontendProtocol.dispatch}, SASL, STARTTLS); each
#: carries its reply code, except the last words after C{421 4.7.0 host} (L{SMTPServer.replyBye}).
WORDING = Wording(
    unknownCommand=b"500 5.5.2 Error: command not recognized",
    tooManyErrors=b"Error: too many errors",
    tlsActive=b"503 5.5.1 Error: TLS already active",
    tlsUnavailable=b"502 5.5.1 Error: command not implemented",
    tlsGoAhead=b"220 2.0.0 Ready to start TLS",
    saslUnsupported=b"504 5.5.4 Unrecognized authentication type",
    saslBadInitial=b"501 5.5.2 Cannot decode response",
    saslBadResponse=b"501 5.5.2 Cannot decode response",
    saslCancelled=b"501 5.7.0 Authentication aborted",
)


class Transaction:
    """
    One mail transaction, from MAIL to the end of data.

    @ivar session: the L{SMTPBackend} the transaction is bound to, once MAIL was replayed there.
    @ivar group: the route group of C{session}: every recipient must share it.
    @ivar recipients: the recipients the backend accepted.
    @ivar failed: the reply every further command of the transaction gets, once it is lost.
    @ivar failedGroups: groups whose backend could not be reached in this transaction.
    @ivar refusal: casd's own refusal of the message being streamed (too big, bare line ends).
    """

    def __init__(self, sender, params) -> None:
        self.sender = sender
        self.params = params
        self.utf8 = any(key == "SMTPUTF8" for key, _ in params)
        self.recipients: list = []
        self.session: SMTPBackend | None = None
        self.group: str | None = None
        self.failed: bytes | None = None
        self.failedGroups: set = set()
        self.stream: DataStream | None = None
        self.pump: ClientPump | None = None
        self.tooBig = False
        self.refusal: bytes | None = None

    def mailLine(self, extensions) -> bytes:
        # SIZE is dropped for a backend without it; BODY and SMTPUTF8 go on, for the backend
        # to refuse if it must (its reply reaches the client).
        params = [(k, v) for k, v in self.params if k != "SIZE" or "SIZE" in extensions]
        return b"MAIL FROM:" + self.sender.path() + renderParameters(params)


class SMTPServer(DataPhase, FrontendProtocol):
    """
    The client side of an SMTP session, for the whole session: casd parses every command and
    drives the backend transaction itself (see the module docstring).  A service subclasses it
    and implements L{routeRecipient}; its other hooks have neutral defaults.

    @ivar helo: the client's EHLO/HELO name, once given.
    @ivar transaction: the L{Transaction} in progress, or C{None}.
    @ivar session: the backend session kept for the next transaction of the same group.
    @ivar messages: how many messages a backend accepted in this session.
    """

    failures = FAILURES
    internalFailure = INTERNAL_FAILURE
    wording = WORDING
    #: Every command is one of C{smtp_NAME} (L{FrontendProtocol.dispatch}).
    state = "smtp"
    #: Whether the authenticated user is passed on to the backend (XCLIENT LOGIN or master).
    passUser = False
    #: ESMTP parameters of MAIL accepted and not passed on (RFC 4954 AUTH on submission).
    droppedMailParameters: frozenset = frozenset()

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.hostname = self.context.config.hostname.encode("idna")
        self.helo: bytes | None = None
        self.esmtp = False
        self.transaction: Transaction | None = None
        self.session: SMTPBackend | None = None
        self.messages = 0
        #: NOOP, RSET, VRFY and HELP since the last accepted message (Postfix's junk commands).
        self.junk = 0
        self.greeted = False
        self._talkedEarly = False
        self._admitted: str | None = None

    @property
    def shared(self):
        return self.factory.shared

    # -- the service's hooks --------------------------------------------------------------------

    def connectionChecks(self, host: str, verdict: str):
        """
        Checks before the greeting (port 25: pregreet, DNSBL).

        @return: C{None}, or a L{Deferred} firing with C{(reply, reason)} to refuse the client
            with, or C{None} to greet it.
        """
        return None

    def mailRefusal(self) -> bytes | None:
        """
        @return: the error reply to MAIL before it is parsed (e.g. authentication required).
        """
        return None

    def senderRefusal(self, sender) -> tuple[bytes, bool] | None:
        """
        @return: C{(reply, counts as an error)} refusing the sender at MAIL, or C{None}.
        """
        return None

    def recipientLimit(self) -> int:
        return self.section.max_recipients

    def routeRecipient(self, rcpt) -> defer.Deferred:
        """
        @return: a L{Deferred} firing with the L{casd.routing.router.Route} for C{rcpt}, or with
            C{(reply, counts as an error)} refusing it.
        """
        raise NotImplementedError()

    def messageAccepted(self, tx: Transaction) -> None:
        """
        A backend accepted the message of C{tx}.
        """

    def requireBackendLogin(self) -> bool:
        """
        Whether a backend that cannot be told who the user is, is unusable.
        """
        return False

    # -- replies ------------------------------------------------------------------------------

    def reply(self, line: bytes) -> None:
        self.send(line + b"\r\n")

    def replyOk(self, token, text: bytes) -> None:
        self.reply(text)

    replyNo = replyBad = replyOk

    def replyBye(self, text: bytes) -> None:
        self.reply(b"421 4.7.0 " + self.hostname + b" " + text)

    def error(self, line: bytes) -> None:
        """
        Reply with an error that counts towards C{max_bad_commands} (unknown commands, syntax,
        sequence, refused recipients: a harvester's tools).
        """
        self.invalidCommand(None, line)

    def lineTooLong(self) -> None:
        self.reply(b"500 5.5.2 Error: line too long")
        self.close()

    def timedOut(self) -> None:
        self.reply(b"421 4.4.2 " + self.hostname + b" Error: timeout exceeded")
        self.close()

    # -- connection and greeting ---------------------------------------------------------------

    def greet(self) -> None:
        self.resetTimeout(self.section.command_timeout)
        host = self.client.peerHost
        verdict = self.shared.filter.admit(host)
        if verdict == Verdict.DENY:
            self.reply(b"554 5.7.1 Access denied")
            self.close("denied")
            return
        if verdict == Verdict.THROTTLE:
            self.reply(
                b"421 4.7.0 "
                + self.hostname
                + b" Too many connections from your address, try again later"
            )
            self.close("throttled")
            return
        self._admitted = host
        d = self.connectionChecks(host, verdict)
        if d is None:
            self._sayHello()
            return
        d.addCallbacks(self._checked, self._checkFailed)

    def _checked(self, refusal) -> None:
        if self._closing:
            return
        if refusal is None:
            self._sayHello()
            return
        reply, reason = refusal
        self.reply(reply)
        self.close(reason)

    def _checkFailed(self, failure) -> None:
        self.log.failure("SMTP connection checks failed", failure)
        if not self._closing:
            self._sayHello()

    def _sayHello(self) -> None:
        self.greeted = True
        self.reply(b"220 " + self.hostname + b" ESMTP ready")

    def dataReceived(self, data: bytes) -> None:
        if not self.greeted:
            # Talking before the greeting: remembered, never executed.
            self._talkedEarly = True
            return
        super().dataReceived(data)

    def close(self, result: str | None = None) -> None:
        self._releaseBackend()
        super().close(result)

    def _releaseBackend(self) -> None:
        tx, self.transaction = self.transaction, None
        if tx is not None and tx.session is not None and tx.stream is not None:
            # The client leaves in the middle of its data: the backend never sees an end.
            tx.session.drop()
        if self.session is not None:
            self.session.quit()
            self.session = None

    def connectionLost(self, reason) -> None:
        self._releaseBackend()
        if self._admitted is not None:
            self.shared.filter.closed(self._admitted)
            self._admitted = None
        if self.messages:
            self.result = f"{self.result}, {self.messages} message(s)"
        super().connectionLost(reason)

    # -- commands -----------------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.resetTimeout(self.section.command_timeout)
        if self.saslInProgress:
            self.saslResponse(line)
            return
        verb, args = splitCommand(line)
        self.dispatch(verb, args)

    def extensions(self) -> list[bytes]:
        limit = self.section.message_size_limit
        lines = [b"PIPELINING", b"SIZE %d" % limit if limit else b"SIZE", b"8BITMIME"]
        if self.section.smtputf8:
            lines.append(b"SMTPUTF8")
        lines.append(b"ENHANCEDSTATUSCODES")
        if self.tlsAvailable:
            lines.append(b"STARTTLS")
        return lines

    def _hello(self, args: bytes, esmtp: bool) -> None:
        name = args.strip(b" ")
        if not validHeloName(name):
            self.error(b"501 5.5.4 Syntax: " + (b"EHLO" if esmtp else b"HELO") + b" hostname")
            return
        self._endTransaction()
        if self.session is not None and self.helo != name:
            # The backend was told the old name: the next transaction opens a new session.
            self.session.quit()
            self.session = None
        self.helo, self.esmtp = name, esmtp
        if esmtp:
            self.send(Reply(250, (self.hostname,) + tuple(self.extensions())).render())
        else:
            self.reply(b"250 " + self.hostname)

    def smtp_EHLO(self, args: bytes) -> None:
        self._hello(args, True)

    def smtp_HELO(self, args: bytes) -> None:
        self._hello(args, False)

    def junkCommand(self) -> bool:
        """
        Count a command that moves no mail (NOOP, RSET, VRFY, HELP): a client may hold a session
        open with them for ever, so past C{junk_command_limit} of them since its last accepted
        message (Postfix's C{smtpd_junk_command_limit}) it is told C{421} and closed.

        @return: whether the session goes on.
        """
        self.junk += 1
        limit = self.section.junk_command_limit
        if limit and self.junk > limit:
            self.reply(b"421 4.7.0 Too many commands that move no mail, closing the connection")
            self.close("too many junk commands")
            return False
        return True

    def smtp_NOOP(self, args: bytes) -> None:
        if self.junkCommand():
            self.reply(b"250 2.0.0 Ok")

    def smtp_RSET(self, args: bytes) -> None:
        if not self.junkCommand():
            return
        if args.strip():
            self.error(b"501 5.5.4 Syntax: RSET")
            return
        self._endTransaction()
        self.reply(b"250 2.0.0 Ok")

    def smtp_QUIT(self, args: bytes) -> None:
        self.reply(b"221 2.0.0 Bye")
        self.close("quit")

    def smtp_HELP(self, args: bytes) -> None:
        if self.junkCommand():
            self.reply(b"214 2.0.0 See RFC 5321")

    def smtp_VRFY(self, args: bytes) -> None:
        if self.junkCommand():
            self.reply(b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def _notImplemented(self, args: bytes) -> None:
        self.error(b"502 5.5.1 Error: command not implemented")

    smtp_EXPN = smtp_ETRN = smtp_TURN = smtp_BDAT = _notImplemented

    def smtp_AUTH(self, args: bytes) -> None:
        self.error(b"503 5.5.1 Error: authentication not enabled")

    def smtp_STARTTLS(self, args: bytes) -> None:
        if args.strip():
            self.error(b"501 5.5.4 Syntax: STARTTLS")
        elif self.transaction is not None and self.tlsAvailable:
            self.error(b"503 5.5.1 Error: MAIL transaction in progress")
        elif self.startTLSCommand(None):
            # RFC 3207 4.2: everything learnt before TLS is forgotten.
            self.helo, self.esmtp = None, False
            if self.session is not None:
                self.session.quit()
                self.session = None

    def makeDialogue(self, target, user=None, credentials=None):
        return SMTPBackend(
            target,
            self.client,
            self.user,
            self.context,
            self.helo,
            self.esmtp,
            self.passUser,
            self.requireBackendLogin(),
        )

    # -- MAIL -------------------------------------------------------------------------------------

    def smtp_MAIL(self, args: bytes) -> None:
        if self.helo is None:
            self.error(b"503 5.5.1 Error: send HELO/EHLO first")
            return
        refusal = self.mailRefusal()
        if refusal is not None:
            self.error(refusal)
            return
        if self.transaction is not None:
            self.error(b"503 5.5.1 Error: nested MAIL command")
            return
        try:
            sender, params = parsePathArgument(
                args, b"FROM:", self.section.smtputf8, True, b"501 5.1.7 Bad sender address syntax"
            )
        except SMTPSyntaxError as e:
            self.error(e.reply)
            return
        refusal = self._checkMailParameters(sender, params)
        if refusal is not None:
            self.error(refusal)
            return
        if senderBlocked(sender.address, self.section.blocked_senders):
            self.error(b"550 5.7.1 " + sender.path() + b": Sender address rejected: Access denied")
            return
        refused = self.senderRefusal(sender)
        if refused is not None:
            line, isError = refused
            (self.error if isError else self.reply)(line)
            return
        kept = tuple((k, v) for k, v in params if k not in self.droppedMailParameters)
        self.transaction = Transaction(sender, kept)
        self.reply(b"250 2.1.0 Ok")

    def _checkMailParameters(self, sender, params) -> bytes | None:
        if params and not self.esmtp:
            return b"555 5.5.4 Unsupported option: " + params[0][0].encode("ascii")
        keys = {k for k, _ in params}
        if not sender.raw.isascii() and "SMTPUTF8" not in keys:
            return b"553 5.6.7 Non-ASCII address requires SMTPUTF8"
        for key, value in params:
            if key == "SIZE":
                if value is None or not value.isdigit():
                    return b"501 5.5.4 Bad SIZE parameter"
                limit = self.section.message_size_limit
                if limit and int(value) > limit:
                    return b"552 5.3.4 Message size exceeds fixed limit"
            elif key == "BODY":
                if value is None or value.upper() not in (b"7BIT", b"8BITMIME"):
                    return b"501 5.5.4 Bad BODY parameter"
            elif key == "SMTPUTF8" and self.section.smtputf8 and value is None:
                pass
            elif key not in self.droppedMailParameters:
                return b"555 5.5.4 Unsupported option: " + key.encode("ascii")
        return None

    def _endTransaction(self) -> None:
        tx, self.transaction = self.transaction, None
        if tx is not None and tx.pump is not None:
            tx.pump.resumeProducing()

    # -- RCPT -------------------------------------------------------------------------------------

    def smtp_RCPT(self, args: bytes) -> None:
        tx = self.transaction
        if tx is None:
            self.error(b"503 5.5.1 Error: need MAIL command")
            return
        try:
            rcpt, params = parsePathArgument(
                args, b"TO:", tx.utf8, False, b"501 5.1.3 Bad recipient address syntax"
            )
        except SMTPSyntaxError as e:
            self.error(e.reply)
            return
        if params:
            self.error(b"555 5.5.4 Unsupported option: " + params[0][0].encode("ascii"))
            return
        if tx.failed is not None:
            self.reply(tx.failed)
            return
        if len(tx.recipients) >= self.recipientLimit():
            self.reply(b"452 4.5.3 Error: too many recipients")
            return
        d = self._recipient(tx, rcpt)
        d.addCallbacks(self._recipientDone, self._recipientFailed, errbackArgs=(tx, rcpt))
        self.wait(d)

    @defer.inlineCallbacks
    def _recipient(self, tx: Transaction, rcpt):
        """
        @return: C{(reply, counts as an error)}.
        """
        where = rcpt.path()
        try:
            route = yield self.routeRecipient(rcpt)
        except CASFailure as e:
            self.log.warn("no route for {rcpt}: {reason}", rcpt=rcpt.address, reason=str(e))
            return b"451 4.4.0 " + where + b": No mailbox server available, try again later", False
        if isinstance(route, tuple):
            return route
        group = route.group or (route.targets[0].describe() if route.targets else "")
        rcptLine = b"RCPT TO:" + where
        unavailable = b"451 4.4.1 " + where + b": Mailbox server unavailable, try again later"
        if tx.session is not None and tx.group == group:
            reply = yield tx.session.rcpt(rcptLine)
        elif tx.recipients:
            # The first accepted recipient fixed the backend; this one lives elsewhere and comes
            # back in a transaction of its own (RFC 5321 4.5.3.1.10).
            return (
                b"452 4.5.3 " + where + b": Recipient on another mailbox server, send it in a new"
                b" transaction",
                False,
            )
        else:
            if group in tx.failedGroups:
                return unavailable, False
            try:
                session = yield self._sessionFor(route, group)
            except CASFailure as e:
                self.log.warn(
                    "backend for {rcpt} unavailable: {reason}", rcpt=rcpt.address, reason=str(e)
                )
                tx.failedGroups.add(group)
                return unavailable, False
            tx.session, tx.group = session, group
            mail, reply = yield session.begin(tx.mailLine(session.extensions), rcptLine)
            if not mail.positive:
                # The backend refused the sender: the transaction stays unbound, this recipient
                # gets its reason.
                tx.session = tx.group = None
                return mail.sanitised().render(), mail.permanent
        if reply.positive:
            tx.recipients.append(rcpt)
        return reply.sanitised().render(), reply.permanent

    @defer.inlineCallbacks
    def _sessionFor(self, route, group: str):
        session = self.session
        if session is not None and session.group == group and session.usable:
            return session
        if session is not None:
            session.quit()
            self.session = None
        session = yield self.connectRoute(route)
        if session.leftover:
            session.drop()
            raise BackendUnavailable(f"backend {session.target.describe()} sent unasked-for data")
        session.group = group
        session.whenLost(lambda: self._backendLost(session))
        self._checkSize(session)
        self.session = session
        return session

    def _checkSize(self, session) -> None:
        size = session.extensions.get("SIZE", ())
        limit = self.section.message_size_limit
        if size and size[0].isdigit() and 0 < int(size[0]) < (limit or float("inf")):
            # The client was promised more than this backend takes: its refusals will come
            # after the data instead of at MAIL.
            self.log.warn(
                "backend {backend} takes messages up to {size} bytes, message_size_limit is"
                " {limit}: set it to the backends' limit",
                backend=session.target.describe(),
                size=int(size[0]),
                limit=limit,
            )

    def _backendLost(self, session) -> None:
        if self.session is session:
            self.session = None
        tx = self.transaction
        if tx is not None and tx.session is session:
            tx.session = None
            if tx.recipients or tx.stream is not None:
                tx.failed = BACKEND_LOST
            else:
                tx.group = None

    def _recipientDone(self, result) -> None:
        reply, isError = result
        if self._closing:
            return
        if isError:
            self.error(reply.rstrip(b"\r\n"))
        else:
            self.send(reply if reply.endswith(b"\r\n") else reply + b"\r\n")

    def _recipientFailed(self, failure, tx: Transaction, rcpt) -> None:
        self._sessionBroken(tx, failure)
        if not self._closing:
            self.reply(BACKEND_LOST)

    def _sessionBroken(self, tx: Transaction, failure) -> None:
        """
        A backend session failed mid-transaction (timeout, closed, garbage, an unexpected
        reply): it is dropped, and the transaction with it once it holds recipients.
        """
        if failure.check(UnexpectedReply, CASFailure):
            self.log.warn("SMTP backend failed: {reason}", reason=str(failure.value))
        else:
            self.log.failure("SMTP backend transaction failed unexpectedly", failure)
        session, group = tx.session, tx.group
        if session is not None:
            session.drop()
            self._backendLost(session)
        if group is not None and not tx.recipients:
            tx.failedGroups.add(group)
        if tx.recipients and tx.failed is None:
            tx.failed = BACKEND_LOST
        tx.session = None
        if not tx.recipients:
            tx.group = None

class SMTPFactory(FrontendFactory):
    """
    @ivar shared: the filters' state shared by every listener of the service.
    """

    def __init__(self, protocolClass, context, section, listener, descriptor, shared) -> None:
        super().__init__(protocolClass, context, section, listener, descriptor)
        self.shared = shared


class SharedState:
    """
    What every listener of one service's section shares: the connection filter, and what the
    service adds (L{SMTPDescriptor.makeShared}).
    """

    def __init__(self, section, context, resolverFactory=None) -> None:
        self.filter = ConnectionFilter(
            section, context.reactor, resolverFactory, shared=getattr(context, "state", None)
        )


@frozen(eq=False)
class SMTPDescriptor(ProtocolDescriptor):
    """
    The descriptor of one of casd's SMTP services: L{ProtocolDescriptor}, with the filters'
    state shared by all listeners of a section (L{makeShared}).
    """

    defaultBackendTLS: str = "starttls"
    alpnProtocols: tuple = ("smtp",)
    healthProbe: HealthProbe | None = HealthProbe(expect=b"220", quit=b"QUIT\r\n")
    _shared: dict = field(factory=dict, init=False, repr=False)

    def makeShared(self, section, context) -> SharedState:
        return SharedState(section, context)

    def sharedState(self, section, context) -> SharedState:
        """
        The filters' state for C{section}, one for all of its listeners.
        """
        for key in [k for k, (ref, _) in self._shared.items() if ref() is None]:
            del self._shared[key]
        entry = self._shared.get(id(section))
        if entry is None or entry[0]() is not section:
            if section.preauth_timeout:
                SMTPServer.log.warn(
                    "[{name}] preauth_timeout is not used by SMTP: command_timeout bounds a"
                    " client's silence",
                    name=self.name,
                )
            entry = (weakref.ref(section), self.makeShared(section, context))
            self._shared[id(section)] = entry
        return entry[1]

    def buildFactory(self, context, section, listener):
        shared = self.sharedState(section, context)
        return SMTPFactory(self.server, context, section, listener, self, shared)
