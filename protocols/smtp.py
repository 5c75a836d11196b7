"""
SMTP (RFC 5321): casd's front door for mail, as Exchange's Front End Transport service is.
Two descriptors share one server: C{smtp} (port 25: mail from other servers, filtered, routed by
recipient) and C{submission} (ports 587 and 465, RFC 6409 and RFC 8314: authenticated users,
routed by the user).

casd never queues mail.  It checks each command itself, opens the backend session when the first
recipient is accepted (the recipient's mailbox server, or the user's for submission), replays the
envelope there and streams DATA through with flow control.  The promise: every C{250} casd says
to a message is the backend's own reply to it, so it means exactly one message accepted by a
backend; anything else the sender gets as a reply it retries (4xx) or bounces (5xx).
"""

from __future__ import annotations

import weakref

from zope.interface import implementer

from twisted.internet import defer, task
from twisted.internet.interfaces import IPushProducer
from twisted.plugin import IPlugin

from casd.failures import (
    AuthenticationFailed,
    BackendUnavailable,
    CASFailure,
    DirectoryUnavailable,
    PolicyRefused,
    PrivacyRequired,
    Throttled,
)
from casd.session.frontend import FrontendFactory, FrontendProtocol, renderFailure
from casd.pool.health import HealthProbe
from casd.interfaces import ICASProtocol
from casd.auth.sasl import MECHANISMS, SASLRefusal
from protocols.smtpbackend import SMTPBackend, UnexpectedReply
from protocols.smtpfilters import ConnectionFilter, SendingLimits, Verdict, policyInt, senderBlocked
from protocols.smtpgrammar import (
    DataStream,
    Reply,
    SMTPSyntaxError,
    parsePathArgument,
    renderParameters,
    splitCommand,
    validHeloName,
)
from protocols.smtpsettings import (
    COMMON_SETTINGS,
    MX_ONLY,
    MX_SETTINGS,
    SUBMISSION_ONLY,
    SUBMISSION_SETTINGS,
    SectionView,
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

#: Replies to a transaction whose backend went away: never a made-up 250.
BACKEND_LOST = b"451 4.4.2 Connection to the mailbox server lost, try again later"
NOT_CONFIRMED = b"451 4.4.2 The mailbox server did not confirm the message, try again later"


@implementer(IPushProducer)
class _ClientPump:
    """
    The client's transport as producer of DATA for the backend's transport: a backend that
    reads slowly pauses reading from the client, so casd never holds more than the transports'
    buffers of a message.
    """

    def __init__(self, transport) -> None:
        self.transport = transport
        self.paused = False

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        # The backend is gone: the client's data is still read, up to its end, and refused.
        self.resumeProducing()


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
        self.pump: _ClientPump | None = None
        self.tooBig = False
        self.refusal: bytes | None = None

    def mailLine(self, extensions) -> bytes:
        # SIZE is dropped for a backend without it; BODY and SMTPUTF8 go on, for the backend
        # to refuse if it must (its reply reaches the client).
        params = [(k, v) for k, v in self.params if k != "SIZE" or "SIZE" in extensions]
        return b"MAIL FROM:" + self.sender.path() + renderParameters(params)


class SMTPServer(FrontendProtocol):
    """
    The client side of an SMTP session, for the whole session: casd parses every command and
    drives the backend transaction itself (see the module docstring).

    @ivar helo: the client's EHLO/HELO name, once given.
    @ivar transaction: the L{Transaction} in progress, or C{None}.
    @ivar session: the backend session kept for the next transaction of the same group.
    @ivar messages: how many messages a backend accepted in this session.
    """

    failures = FAILURES
    internalFailure = INTERNAL_FAILURE

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.submission = self.descriptor.submission
        self.hostname = self.context.config.hostname.encode("idna")
        self.helo: bytes | None = None
        self.esmtp = False
        self.transaction: Transaction | None = None
        self.session: SMTPBackend | None = None
        self.messages = 0
        self.greeted = False
        self._talkedEarly = False
        self._admitted: str | None = None

    @property
    def shared(self):
        return self.factory.shared

    # -- replies ------------------------------------------------------------------------------

    def reply(self, line: bytes) -> None:
        self.send(line + b"\r\n")

    def error(self, line: bytes) -> None:
        """
        Reply with an error that counts towards C{max_bad_commands} (unknown commands, syntax,
        sequence, refused recipients: a harvester's tools).
        """
        if self.badCommand():
            self.reply(b"421 4.7.0 " + self.hostname + b" Error: too many errors")
            self.close("too many errors")
            return
        self.reply(line)

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
        checks = []
        if verdict == Verdict.ACCEPT and not self.submission:
            if self.section.pregreet_delay:
                # A partial greeting, as Postfix's postscreen sends: a client that speaks before
                # the last line is a bot that does not wait for its turn.
                self.send(b"220-" + self.hostname + b" ESMTP\r\n")
                checks.append(
                    task.deferLater(self.clock, self.section.pregreet_delay, lambda: None)
                )
            if self.section.dnsbl_zones:
                checks.append(self.shared.filter.listed(host))
        if not checks:
            self._sayHello()
            return
        d = defer.gatherResults(checks)
        d.addCallback(self._checked)
        d.addErrback(self._checkFailed)

    def _checked(self, results) -> None:
        if self._closing:
            return
        zone = next((r for r in results if r), None)
        if self._talkedEarly:
            self.reply(b"554 5.5.1 Error: SMTP protocol synchronization")
            self.close("pregreet")
        elif zone is not None:
            self.reply(
                b"554 5.7.1 Service unavailable; client ["
                + self.client.peerHost.encode("ascii")
                + b"] blocked using "
                + zone.encode("ascii", "replace")
            )
            self.close(f"dnsbl {zone}")
        else:
            self._sayHello()

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
        handler = getattr(self, "do_" + verb, None) if verb else None
        if handler is None:
            self.error(b"500 5.5.2 Error: command not recognized")
            return
        handler(args)

    def extensions(self) -> list[bytes]:
        limit = self.section.message_size_limit
        lines = [b"PIPELINING", b"SIZE %d" % limit if limit else b"SIZE", b"8BITMIME"]
        if self.section.smtputf8:
            lines.append(b"SMTPUTF8")
        lines.append(b"ENHANCEDSTATUSCODES")
        if self.tlsAvailable:
            lines.append(b"STARTTLS")
        if self.submission and self.user is None and self.client.plaintextAllowed:
            lines.append(b"AUTH " + b" ".join(m.encode("ascii") for m in MECHANISMS))
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

    def do_EHLO(self, args: bytes) -> None:
        self._hello(args, True)

    def do_HELO(self, args: bytes) -> None:
        self._hello(args, False)

    def do_NOOP(self, args: bytes) -> None:
        self.reply(b"250 2.0.0 Ok")

    def do_RSET(self, args: bytes) -> None:
        if args.strip():
            self.error(b"501 5.5.4 Syntax: RSET")
            return
        self._endTransaction()
        self.reply(b"250 2.0.0 Ok")

    def do_QUIT(self, args: bytes) -> None:
        self.reply(b"221 2.0.0 Bye")
        self.close("quit")

    def do_HELP(self, args: bytes) -> None:
        self.reply(b"214 2.0.0 See RFC 5321")

    def do_VRFY(self, args: bytes) -> None:
        self.reply(b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    def _notImplemented(self, args: bytes) -> None:
        self.error(b"502 5.5.1 Error: command not implemented")

    do_EXPN = do_ETRN = do_TURN = do_BDAT = _notImplemented

    def do_STARTTLS(self, args: bytes) -> None:
        if args.strip():
            self.error(b"501 5.5.4 Syntax: STARTTLS")
        elif self.client.tls:
            self.error(b"503 5.5.1 Error: TLS already active")
        elif not self.tlsAvailable:
            self.error(b"502 5.5.1 Error: command not implemented")
        elif self.transaction is not None:
            self.error(b"503 5.5.1 Error: MAIL transaction in progress")
        else:
            self.reply(b"220 2.0.0 Ready to start TLS")
            self.startTLS()
            # RFC 3207 4.2: everything learnt before TLS is forgotten.
            self.helo, self.esmtp = None, False
            if self.session is not None:
                self.session.quit()
                self.session = None

    # -- AUTH (submission) ----------------------------------------------------------------------

    def do_AUTH(self, args: bytes) -> None:
        if not self.submission:
            self.error(b"503 5.5.1 Error: authentication not enabled")
            return
        if self.helo is None or not self.esmtp:
            self.error(b"503 5.5.1 Error: send EHLO first")
            return
        if self.user is not None:
            self.error(b"503 5.5.1 Error: already authenticated")
            return
        if self.transaction is not None:
            self.error(b"503 5.5.1 Error: MAIL transaction in progress")
            return
        words = args.split()
        if not 1 <= len(words) <= 2:
            self.error(b"501 5.5.4 Syntax: AUTH mechanism [initial-response]")
            return
        self.startSASL(None, words[0], words[1] if len(words) == 2 else None)

    def saslChallenge(self, token, challenge: bytes) -> None:
        self.reply(b"334 " + challenge)

    def saslFailed(self, token, refusal: SASLRefusal) -> None:
        if refusal is SASLRefusal.UNSUPPORTED:
            self.error(b"504 5.5.4 Unrecognized authentication type")
        elif refusal is SASLRefusal.PRIVACY_REQUIRED:
            self.reply(self.renderFailure(PrivacyRequired()))
        elif refusal in (SASLRefusal.BAD_INITIAL, SASLRefusal.BAD_RESPONSE):
            self.error(b"501 5.5.2 Cannot decode response")
        elif refusal is SASLRefusal.CANCELLED:
            self.reply(b"501 5.7.0 Authentication aborted")
        else:
            self.reply(self.renderFailure(AuthenticationFailed()))

    def login(self, token, credentials) -> defer.Deferred:
        """
        Authenticate only: SMTP opens no backend session at login (see L{do_RCPT}).
        """
        d = self.context.authenticator.login(credentials, self.client)
        d.addCallbacks(self._authenticated, self._authFailed)
        return self.wait(d)

    def _authenticated(self, user) -> None:
        if self._closing:
            return
        self.user = user
        self.reply(b"235 2.7.0 Authentication successful")

    def _authFailed(self, failure) -> None:
        if self._closing:
            return
        if not failure.check(CASFailure):
            self.log.failure("SMTP authentication failed unexpectedly", failure)
        self.result = type(failure.value).__name__
        self.reply(self.renderFailure(failure.value))

    def makeDialogue(self, target, user=None, credentials=None):
        return SMTPBackend(
            target,
            self.client,
            self.user,
            self.context,
            self.helo,
            self.esmtp,
            self.submission,
            self.section.backend_login_required,
        )

    # -- MAIL -------------------------------------------------------------------------------------

    def do_MAIL(self, args: bytes) -> None:
        if self.helo is None:
            self.error(b"503 5.5.1 Error: send HELO/EHLO first")
            return
        if self.submission and self.user is None:
            self.error(b"530 5.7.0 Authentication required")
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
        if self.submission and self.section.enforce_sender and not _owns(self.user, sender):
            self.error(
                b"553 5.7.1 " + sender.path() + b": Sender address rejected: not owned by user"
            )
            return
        if self.submission and not self.shared.limits.mayStart(self.user):
            self.reply(b"450 4.7.1 Error: too many messages sent, try again later")
            return
        self.transaction = Transaction(sender, tuple((k, v) for k, v in params if k != "AUTH"))
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
            elif key == "AUTH" and self.submission:
                pass  # RFC 4954 5: the backend learns the sender's identity from casd instead
            else:
                return b"555 5.5.4 Unsupported option: " + key.encode("ascii")
        return None

    def _endTransaction(self) -> None:
        tx, self.transaction = self.transaction, None
        if tx is not None and tx.pump is not None:
            tx.pump.resumeProducing()

    # -- RCPT -------------------------------------------------------------------------------------

    def recipientLimit(self) -> int:
        limit = self.section.max_recipients
        return policyInt(self.user, "smtp_max_recipients", limit) or limit if self.user else limit

    def do_RCPT(self, args: bytes) -> None:
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
        if self.submission:
            user = self.user
        else:
            user = yield self._localRecipient(rcpt)
            if isinstance(user, tuple):
                return user
        try:
            route = yield self.context.router.locate(user, self.descriptor)
        except CASFailure as e:
            self.log.warn("no route for {rcpt}: {reason}", rcpt=rcpt.address, reason=str(e))
            return b"451 4.4.0 " + where + b": No mailbox server available, try again later", False
        group = route.group or (route.targets[0].describe() if route.targets else "")
        rcptLine = b"RCPT TO:" + where
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
                return (
                    b"451 4.4.1 " + where + b": Mailbox server unavailable, try again later",
                    False,
                )
            try:
                session = yield self._sessionFor(route, group)
            except CASFailure as e:
                self.log.warn(
                    "backend for {rcpt} unavailable: {reason}", rcpt=rcpt.address, reason=str(e)
                )
                tx.failedGroups.add(group)
                return (
                    b"451 4.4.1 " + where + b": Mailbox server unavailable, try again later",
                    False,
                )
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
    def _localRecipient(self, rcpt):
        """
        Recipient filtering on port 25: an accepted domain, then the directory.

        @return: the recipient's L{casd.interfaces.IMailboxUser}, or C{(reply, is an error)}.
        """
        where = rcpt.path()
        domains = self.section.accepted_domains
        address = rcpt.address
        if not rcpt.domain and domains:
            address = f"{rcpt.local}@{domains[0]}"  # <Postmaster> without a domain
        elif not _accepted(rcpt.domain, domains):
            # casd is never an open relay.
            return b"554 5.7.1 " + where + b": Relay access denied", True
        directory = self.context.directory
        if directory is None:
            self.log.error("no directory to look recipients up in: every recipient is deferred")
            return b"451 4.3.0 " + where + b": Temporary lookup failure, try again later", False
        try:
            user = yield directory.lookup(address)
            delimiter = self.section.recipient_delimiter
            if user is None and delimiter:
                local, _, domain = address.rpartition("@")
                base = local.split(delimiter, 1)[0]
                if base and base != local:
                    user = yield directory.lookup(f"{base}@{domain}")
        except DirectoryUnavailable:
            return b"451 4.3.0 " + where + b": Temporary lookup failure, try again later", False
        except Exception:
            self.log.failure("recipient look-up of {rcpt} failed", rcpt=address)
            return b"451 4.3.0 " + where + b": Temporary lookup failure, try again later", False
        if user is None:
            return b"550 5.1.1 " + where + b": Recipient address rejected: User unknown", True
        return user

    @defer.inlineCallbacks
    def _sessionFor(self, route, group: str):
        session = self.session
        if session is not None and session.group == group and session.usable:
            return session
        if session is not None:
            session.quit()
            self.session = None
        session = yield self.context.connector.connect(route, self.makeDialogue)
        if self._closing or not self.connected:
            session.quit()
            raise BackendUnavailable("the client left")
        if session.leftover:
            session.drop()
            raise BackendUnavailable(f"backend {session.target.describe()} sent unasked-for data")
        session.group = group
        session.whenLost(lambda: self._backendLost(session))
        self._checkSize(session)
        self.session = session
        self.backend = session.target.describe()
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

    # -- DATA -------------------------------------------------------------------------------------

    def do_DATA(self, args: bytes) -> None:
        tx = self.transaction
        if args.strip():
            self.error(b"501 5.5.4 Syntax: DATA")
            return
        if tx is None:
            self.error(b"503 5.5.1 Error: need RCPT command")
            return
        if tx.failed is not None:
            self.transaction = None
            self.reply(tx.failed)
            return
        if not tx.recipients or tx.session is None:
            self.transaction = None
            self.reply(b"554 5.5.1 Error: no valid recipients")
            return
        d = tx.session.data()
        d.addCallbacks(self._dataReply, self._dataFailed, callbackArgs=(tx,), errbackArgs=(tx,))
        self.wait(d)

    def _dataReply(self, reply: Reply, tx: Transaction) -> None:
        if self._closing:
            return
        if reply.code != 354:
            self.transaction = None
            self.send(reply.sanitised().render())
            return
        self.reply(b"354 End data with <CR><LF>.<CR><LF>")
        tx.stream = DataStream(normalise=self.section.bare_line_endings == "normalise")
        tx.pump = _ClientPump(self.transport)
        tx.session.transport.registerProducer(tx.pump, True)
        self.setStreamMode(lambda data: self._dataChunk(tx, data))

    def _dataFailed(self, failure, tx: Transaction) -> None:
        self._sessionBroken(tx, failure)
        self.transaction = None
        if not self._closing:
            self.reply(BACKEND_LOST)

    def _dataChunk(self, tx: Transaction, data: bytes):
        self.resetTimeout(self.section.command_timeout)
        stream = tx.stream
        out, rest = stream.feed(data)
        limit = self.section.message_size_limit
        if limit and stream.size > limit:
            tx.tooBig = True
        session = tx.session
        if session is not None and tx.failed is None and tx.refusal is None:
            if tx.tooBig:
                tx.refusal = b"552 5.3.4 Message size exceeds fixed limit"
            elif stream.bare and not stream.normalise:
                tx.refusal = (
                    b"554 5.6.0 Message refused: bare CR or LF in its data, use CRLF line endings"
                )
            if tx.refusal is None:
                session.write(out)
            else:
                # The backend must not get this message: it never sees an end of data.
                session.drop()
                self._backendLost(session)
        if rest is None:
            return None
        self._endOfData(tx)
        return rest

    def _endOfData(self, tx: Transaction) -> None:
        session = tx.session
        if session is not None and not session.lost:
            session.transport.unregisterProducer()
        tx.pump.resumeProducing()
        tx.stream, tx.pump = None, None
        refusal = tx.refusal or tx.failed
        if refusal is not None or session is None:
            self.transaction = None
            self.reply(refusal or BACKEND_LOST)
        else:
            # The backend's reply to the end of data is the one the client gets.
            self.resetTimeout(self.section.data_timeout + self.section.command_timeout)
            d = session.endOfData(self.section.data_timeout)
            d.addCallbacks(
                self._finalReply, self._finalFailed, callbackArgs=(tx,), errbackArgs=(tx,)
            )
            self.wait(d)

    def _finalReply(self, reply: Reply, tx: Transaction) -> None:
        self.transaction = None
        if reply.positive:
            self.messages += 1
            if self.submission:
                self.shared.limits.sent(self.user)
            self.log.info(
                "message from {sender} for {count} recipient(s) accepted by {backend}: {reply}",
                sender=tx.sender.address or "<>",
                count=len(tx.recipients),
                backend=tx.session.target.describe(),
                reply=reply.text[:200].decode("ascii", "replace"),
            )
        self.resetTimeout(self.section.command_timeout)
        if not self._closing:
            self.send(reply.sanitised().render())

    def _finalFailed(self, failure, tx: Transaction) -> None:
        self._sessionBroken(tx, failure)
        self.transaction = None
        self.resetTimeout(self.section.command_timeout)
        if not self._closing:
            self.reply(NOT_CONFIRMED)


def _owns(user, sender) -> bool:
    """
    Whether C{sender} is C{user}'s own address (C{enforce_sender}).
    """
    own = user.address or (user.login if "@" in user.login else "")
    return bool(own) and sender.address.lower() == own.lower()


def _accepted(domain: str, domains) -> bool:
    """
    Whether C{domain} is one casd accepts mail for: listed, or below a listed C{.domain}.
    """
    for entry in domains:
        entry = entry.lower()
        if domain == entry or entry.startswith(".") and domain.endswith(entry):
            return True
    return False


class SMTPFactory(FrontendFactory):
    """
    @ivar shared: the filters' state shared by every listener of the protocol.
    """

    def __init__(self, protocolClass, context, section, listener, descriptor, shared) -> None:
        super().__init__(protocolClass, context, section, listener, descriptor)
        self.shared = shared


class _Shared:
    def __init__(self, section, context) -> None:
        def resolver():
            from twisted.names import client

            servers = [_hostPort(s) for s in section.dnsbl_servers]
            if servers:
                return client.Resolver(servers=servers, reactor=context.reactor)
            return client.Resolver(resolv="/etc/resolv.conf", reactor=context.reactor)

        self.filter = ConnectionFilter(
            section, context.reactor, resolver, shared=getattr(context, "state", None)
        )
        self.limits = SendingLimits(section, context.reactor)


def _hostPort(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host:
        return text, 53
    return host.strip("[]"), int(port)


# -- the descriptors ---------------------------------------------------------------------------


@implementer(IPlugin, ICASProtocol)
class SMTPProtocol:
    """
    The descriptor of one of casd's SMTP services.

    @ivar submission: C{True} for submission (AUTH, routed by the user), C{False} for port 25
        (filtered, routed by recipient).
    """

    defaultBackendTLS = "starttls"
    healthProbe = HealthProbe(expect=b"220", quit=b"QUIT\r\n")

    def __init__(
        self, name, description, defaultListeners, defaultBackendPort, settings, submission
    ):
        self.name = name
        self.description = description
        self.defaultListeners = defaultListeners
        self.defaultBackendPort = defaultBackendPort
        self.settings = settings
        self.submission = submission
        self._shared: dict[int, tuple] = {}

    def view(self, section) -> SectionView:
        """
        C{section} with the other service's keys at fixed values, for the one server class.
        """
        return SectionView(section, MX_ONLY if self.submission else SUBMISSION_ONLY)

    def sharedState(self, section, context) -> _Shared:
        """
        The filters' state for C{section}, one for all of its listeners.
        """
        for key in [k for k, (ref, _) in self._shared.items() if ref() is None]:
            del self._shared[key]
        entry = self._shared.get(id(section))
        if entry is None or entry[0]() is not section:
            entry = (weakref.ref(section), _Shared(self.view(section), context))
            self._shared[id(section)] = entry
        return entry[1]

    def buildFactory(self, context, section, listener):
        shared = self.sharedState(section, context)
        return SMTPFactory(SMTPServer, context, self.view(section), listener, self, shared)

    @staticmethod
    def renderFailure(exc: BaseException) -> bytes:
        return renderFailure(FAILURES, exc, INTERNAL_FAILURE)


smtp = SMTPProtocol(
    "smtp",
    "SMTP (RFC 5321) on port 25: mail from other servers, filtered and routed by recipient to the"
    " mailbox servers' SMTP, never queued",
    ({"endpoint": "tcp:25", "tls": "starttls"},),
    25,
    COMMON_SETTINGS + MX_SETTINGS,
    submission=False,
)

submission = SMTPProtocol(
    "submission",
    "Message submission (RFC 6409, RFC 8314) on ports 587 and 465: authenticated users, passed"
    " on to their mailbox server's submission service",
    ({"endpoint": "tcp:587", "tls": "starttls"}, {"endpoint": "tcp:465", "tls": "implicit"}),
    587,
    COMMON_SETTINGS + SUBMISSION_SETTINGS,
    submission=True,
)
