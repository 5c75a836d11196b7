"""
IMAP4rev1 (RFC 3501): the pre-login grammar, the wording of the shared failures and the backend
login dialogue.  After login casd only relays bytes.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.internet import defer
from twisted.plugin import IPlugin

from casd.config import Setting
from casd.failures import (
    AuthenticationFailed,
    BackendUnavailable,
    DirectoryUnavailable,
    PolicyRefused,
    ProtocolViolation,
    Throttled,
)
from casd.session.dialogue import BackendDialogue
from casd.session.frontend import FrontendFactory, FrontendProtocol
from casd.session.frontend import renderFailure as _render
from casd.pool.health import HealthProbe
from casd.interfaces import ICASProtocol
from casd.auth.sasl import MECHANISMS, SASLRefusal, encodePlain, makeCredentials
from protocols.imapgrammar import (
    IMAPSyntaxError,
    capabilitiesIn,
    parseList,
    quote,
    splitTag,
    tokenizeParts,
)
from protocols.stringgrammar import LiteralFraming

#: Most literals one command may carry.
MAX_LITERALS = 8

#: How each failure of the shared vocabulary reads in IMAP (RFC 5530 response codes).
FAILURES = (
    (AuthenticationFailed, b"NO [AUTHENTICATIONFAILED] Authentication failed."),
    (DirectoryUnavailable, b"NO [UNAVAILABLE] Temporary authentication failure, try again later."),
    (BackendUnavailable, b"NO [UNAVAILABLE] Mailbox server unavailable, try again later."),
    (Throttled, b"NO [LIMIT] Too many connections or logins, try again later."),
    (PolicyRefused, b"NO [CONTACTADMIN] Access not allowed."),
)


INTERNAL_FAILURE = b"NO [UNAVAILABLE] Internal error, try again later."


def renderFailure(exc: BaseException) -> bytes:
    return _render(FAILURES, exc, INTERNAL_FAILURE)


class IMAPServer(LiteralFraming, FrontendProtocol):
    """
    The client side of an IMAP session before login.
    """

    failures = FAILURES
    internalFailure = INTERNAL_FAILURE
    maxLiterals = MAX_LITERALS

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.maxLiteral = self.section.max_literal_size
        self._tag = b""
        self.clientID: list | None = None

    # -- capabilities -----------------------------------------------------------------------

    def capabilities(self) -> bytes:
        caps = [b"IMAP4rev1", b"SASL-IR", b"LITERAL+", b"ID"]
        if self.tlsAvailable:
            caps.append(b"STARTTLS")
        if self.client.plaintextAllowed:
            caps.extend(b"AUTH=" + m.encode() for m in MECHANISMS)
        else:
            caps.append(b"LOGINDISABLED")
        return b" ".join(caps)

    def greet(self) -> None:
        self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] casd ready.\r\n")

    # -- reading commands -------------------------------------------------------------------

    def reply(self, tag: bytes, text: bytes) -> None:
        self.send(tag + b" " + text + b"\r\n")

    def bad(self, tag: bytes, text: bytes) -> None:
        if self.badCommand():
            self.send(b"* BYE Too many invalid IMAP commands.\r\n")
            self.close("too many errors")
            return
        self.reply(tag, b"BAD " + text)

    def lineTooLong(self) -> None:
        self.send(b"* BYE Too long argument.\r\n")
        self.close()

    def timedOut(self) -> None:
        self.send(b"* BYE Disconnected for inactivity.\r\n")
        self.close()

    def lineReceived(self, line: bytes) -> None:
        if self.saslInProgress:
            self.saslResponse(line)
            return
        if not self.inCommand:
            try:
                self._tag = splitTag(line)[0]
            except IMAPSyntaxError as e:
                tag = line.split(b" ", 1)[0] if line.strip() else b"*"
                if not tag or any(c in b"\x00+{" for c in tag):
                    tag = b"*"
                self.bad(tag, str(e).encode())
                return
        self.collectLine(line)

    def literalContinue(self) -> None:
        self.send(b"+ OK\r\n")

    def literalTooLarge(self, nonSync: bool) -> None:
        if nonSync:
            # The client sends the data regardless: resynchronising is not worth it.
            self.send(b"* BYE [TOOBIG] Literal too large.\r\n")
            self.close("literal too large")
        else:
            self.bad(self._tag, b"[TOOBIG] Literal too large.")

    def commandReceived(self, parts: list) -> None:
        try:
            tag, command, rest = splitTag(parts[0])
            parts = [rest] + parts[1:]
            handler = getattr(self, "do_" + command.decode("ascii"), None)
            if handler is None:
                self.bad(tag, b"Unknown command or not allowed before login.")
                return
            handler(tag, tokenizeParts(parts))
        except IMAPSyntaxError as e:
            self.bad(self._tag, b"Error in IMAP command: " + str(e).encode())

    # -- commands ---------------------------------------------------------------------------

    def _noArguments(self, tag: bytes, args: list) -> bool:
        if args:
            self.bad(tag, b"Unexpected arguments.")
            return False
        return True

    def do_CAPABILITY(self, tag, args):
        if self._noArguments(tag, args):
            self.send(b"* CAPABILITY " + self.capabilities() + b"\r\n")
            self.reply(tag, b"OK Pre-login capabilities listed, post-login capabilities have more.")

    def do_NOOP(self, tag, args):
        if self._noArguments(tag, args):
            self.reply(tag, b"OK NOOP completed.")

    def do_LOGOUT(self, tag, args):
        if self._noArguments(tag, args):
            self.send(b"* BYE Logging out\r\n")
            self.reply(tag, b"OK Logout completed.")
            self.close("logout")

    def do_ID(self, tag, args):
        items = parseList(args)
        if items is not None and (len(items) % 2 or any(k is None for k in items[::2])):
            raise IMAPSyntaxError("Invalid ID parameters")
        self.clientID = items
        if items and self.client.trusted:
            # A proxy in front (another casd, Dovecot) reports the real client and counts hops;
            # counting on stops proxy loops.  Only a trusted client may say so.
            fields = {
                key.lower(): value.decode("ascii", "replace")
                for key, value in zip(items[::2], items[1::2])
                if value is not None
            }
            ttl = fields.get(b"x-proxy-ttl", "")
            if ttl.isdigit():
                self.proxyTTL = int(ttl[:6])
            self.client = self.client.forwardedBy(
                fields.get(b"x-originating-ip"),
                fields.get(b"x-originating-port"),
                fields.get(b"x-session-id"),
            )
        self.send(b'* ID ("name" "casd")\r\n')
        self.reply(tag, b"OK ID completed.")

    def do_STARTTLS(self, tag, args):
        if not self._noArguments(tag, args):
            return
        if self.client.tls:
            self.bad(tag, b"TLS is already active.")
            return
        if not self.tlsAvailable:
            self.bad(tag, b"TLS support isn't enabled.")
            return
        self.reply(tag, b"OK Begin TLS negotiation now.")
        self.startTLS()

    def _privacyRequired(self, tag) -> bool:
        if self.client.plaintextAllowed:
            return False
        self.reply(
            tag,
            b"NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS)"
            b" connections.",
        )
        return True

    def do_LOGIN(self, tag, args):
        if len(args) != 2 or not all(isinstance(a, bytes) for a in args):
            self.bad(tag, b"Invalid arguments: LOGIN username password")
            return
        if self._privacyRequired(tag):
            return
        try:
            credentials = makeCredentials(args[0], args[1])
        except ProtocolViolation:
            self.reply(tag, self.renderFailure(AuthenticationFailed()))
            return
        self.login(tag, credentials)

    def do_AUTHENTICATE(self, tag, args):
        if not 1 <= len(args) <= 2 or not all(isinstance(a, bytes) for a in args):
            self.bad(tag, b"Invalid arguments: AUTHENTICATE mechanism [initial-response]")
            return
        self.startSASL(tag, args[0], args[1] if len(args) == 2 else None)

    def saslChallenge(self, tag, challenge: bytes) -> None:
        self.send(b"+ " + challenge + b"\r\n")

    def saslFailed(self, tag, refusal: SASLRefusal) -> None:
        if refusal is SASLRefusal.UNSUPPORTED:
            self.reply(tag, b"NO Unsupported authentication mechanism.")
        elif refusal is SASLRefusal.PRIVACY_REQUIRED:
            self._privacyRequired(tag)
        elif refusal is SASLRefusal.BAD_INITIAL:
            self.bad(tag, b"Invalid base64 data in initial response.")
        elif refusal is SASLRefusal.BAD_RESPONSE:
            self.bad(tag, b"Invalid base64 data in continued response.")
        elif refusal is SASLRefusal.CANCELLED:
            self.reply(tag, b"BAD Authentication aborted by client.")
        else:
            self.reply(tag, self.renderFailure(AuthenticationFailed()))

    # -- login ------------------------------------------------------------------------------

    def loginSucceeded(self, tag: bytes, dialogue) -> None:
        self.reply(tag, b"OK [CAPABILITY " + dialogue.capabilities + b"] Logged in")

    def loginFailed(self, tag: bytes, failure) -> None:
        self.reply(tag, self.renderFailure(failure))

    def makeDialogue(self, target, user, credentials):
        return IMAPBackend(target, self.client, user, credentials, self.context, self.clientID)


class IMAPBackend(BackendDialogue):
    """
    The login dialogue with an IMAP mailbox server: greeting, STARTTLS, ID with the client's
    address (Dovecot honours it from its C{login_trusted_networks}), AUTHENTICATE PLAIN with the
    user's credentials or as a master user, then the post-login capabilities.

    @ivar capabilities: the backend's post-login capability list, for the client's tagged OK.
    """

    capabilities = b""

    def __init__(self, target, client, user, credentials, context, clientID=None) -> None:
        super().__init__(target, client, user, credentials, context)
        self.clientID = clientID

    # The dialogue is driven by lines: each state is a method that gets the next line (no
    # Deferred or generator per reply: this is the hot path of every login).

    def _tagged(self, line: bytes, tag: bytes) -> bytes | None:
        """
        @return: the status (C{b"OK"}, C{b"NO"}, C{b"BAD"}) when C{line} is the tagged reply to
            C{tag}, C{None} for an untagged line.
        @raise BackendUnavailable: when the backend says BYE.
        """
        if line.startswith(tag) and line[len(tag) : len(tag) + 1] == b" ":
            return line[len(tag) + 1 :].split(b" ", 1)[0].upper()
        if line.startswith(b"* BYE"):
            raise self.fail("said BYE: " + line[:200].decode("utf-8", "replace"))
        return None

    def idCommand(self) -> bytes:
        c = self.client
        # Ports, the TTL and the session id (base64url) need no quoting; addresses are quoted
        # (a non-IP peer name could hold anything).
        ttl = b' "x-proxy-ttl" "%d"' % (self.proxyTTL,) if self.proxyTTL else b""
        return (
            b'I ID ("x-originating-ip" %s "x-originating-port" "%d"'
            b' "x-connected-ip" %s "x-connected-port" "%d"%s "x-session-id" "%s")'
        ) % (
            quote(c.peerHost),
            c.peerPort,
            quote(c.localHost),
            c.localPort,
            ttl,
            c.sessionId.encode("ascii"),
        )

    def dialogue(self):
        self.finished = defer.Deferred()
        self.expectLine(self._onGreeting)
        return self.finished

    def _onGreeting(self, line: bytes) -> None:
        if not line[:4].upper() == b"* OK":
            raise self.fail("unexpected greeting " + repr(line[:80]))
        if self.target.tls == "starttls":
            self.sendLine(b"S STARTTLS")
            self.expectLine(self._onStartTLS)
            return
        self._login(capabilitiesIn(line))

    def _onStartTLS(self, line: bytes) -> None:
        status = self._tagged(line, b"S")
        if status is None:
            self.expectLine()
            return
        if status != b"OK":
            raise self.fail("refused STARTTLS")
        self.lineHandler = None
        d = self.startTLS()
        # Capabilities seen before TLS are not to be trusted.
        d.addCallback(lambda _: self._login(None))
        d.addErrback(self.finished.errback)

    def _login(self, caps: bytes | None) -> None:
        authc, password, authz = self.loginIdentity()
        initial = encodePlain(authc, password, authz)
        if caps is None or b"SASL-IR" in caps.upper().split():
            # One round trip: ID and the login pipelined.
            self.send(self.idCommand() + b"\r\nA AUTHENTICATE PLAIN " + initial + b"\r\n")
            self.expectLine(self._onIDThenLogin)
        else:
            self._initial = initial
            self.sendLine(self.idCommand())
            self.expectLine(self._onIDThenContinue)

    def _onIDThenLogin(self, line: bytes) -> None:
        if self._tagged(line, b"I") is None:
            self.expectLine()  # the untagged * ID reply
            return
        self.expectLine(self._onLogin)

    def _onIDThenContinue(self, line: bytes) -> None:
        if self._tagged(line, b"I") is None:
            self.expectLine()
            return
        self.sendLine(b"A AUTHENTICATE PLAIN")
        self.expectLine(self._onContinuation)

    def _onContinuation(self, line: bytes) -> None:
        if not line.startswith(b"+"):
            raise self.fail("refused AUTHENTICATE PLAIN")
        initial, self._initial = self._initial, None
        self.sendLine(initial)
        self.expectLine(self._onLogin)

    def _onLogin(self, line: bytes) -> None:
        status = self._tagged(line, b"A")
        if status is None:
            self.expectLine()
            return
        if status != b"OK":
            temporary = b"[UNAVAILABLE]" in line.upper() or status == b"BAD"
            raise self.fail(
                "refused the login", authFailed=not temporary and not self.target.masterUser
            )
        caps = capabilitiesIn(line)
        if caps is None:
            self._caps = None
            self.sendLine(b"C CAPABILITY")
            self.expectLine(self._onCapability)
            return
        self._finish(caps)

    def _onCapability(self, line: bytes) -> None:
        if self._tagged(line, b"C") is None:
            if line[:13].upper() == b"* CAPABILITY ":
                self._caps = line[13:]
            self.expectLine()
            return
        if self._caps is None:
            raise self.fail("sent no capabilities")
        self._finish(self._caps)

    def _finish(self, caps: bytes) -> None:
        self.capabilities = caps
        self.lineHandler = None
        self.finished.callback(None)


@implementer(IPlugin, ICASProtocol)
class IMAPProtocol:
    """
    The descriptor of casd's IMAP proxy.
    """

    name = "imap"
    description = "IMAP4rev1 (RFC 3501) proxy: pre-login in casd, then relayed to the mailbox server"
    defaultListeners = ({"endpoint": "tcp:143", "tls": "starttls"},)
    defaultBackendPort = 143
    defaultBackendTLS = "starttls"
    healthProbe = HealthProbe(expect=b"* OK", quit=b"h LOGOUT\r\n")
    settings = (
        Setting(
            "max_literal_size",
            "int",
            8192,
            "Largest literal accepted before login (bytes).",
            minimum=1,
        ),
    )

    def buildFactory(self, context, section, listener):
        return FrontendFactory(IMAPServer, context, section, listener, self)

    renderFailure = staticmethod(renderFailure)


imap = IMAPProtocol()
