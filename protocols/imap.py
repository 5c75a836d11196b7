# -*- test-case-name: tests.test_imap,tests.test_imapbackend -*-
"""
IMAP4rev1 (RFC 3501): the pre-login grammar, the wording of the shared failures and the backend
login dialogue.  After login casd only relays bytes.
"""

from __future__ import annotations

import re
from functools import lru_cache

from casd.plugin import (
    MECHANISMS,
    AuthenticationFailed,
    BackendDialogue,
    BackendUnavailable,
    DirectoryUnavailable,
    FrontendProtocol,
    HealthProbe,
    PolicyRefused,
    PrivacyRequired,
    ProtocolDescriptor,
    Setting,
    Throttled,
    Wording,
    encodePlain,
)
from protocols.imapgrammar import IMAPSyntaxError, capabilitiesIn, parseList, simpleCommand, splitTag
from protocols.stringgrammar import LiteralFraming, quote, tokenizeParts

#: Most literals one command may carry.
MAX_LITERALS = 8

#: How each failure of the shared vocabulary reads in IMAP (RFC 5530 response codes).
FAILURES = (
    (AuthenticationFailed, b"NO [AUTHENTICATIONFAILED] Authentication failed."),
    (DirectoryUnavailable, b"NO [UNAVAILABLE] Temporary authentication failure, try again later."),
    (BackendUnavailable, b"NO [UNAVAILABLE] Mailbox server unavailable, try again later."),
    (Throttled, b"NO [LIMIT] Too many connections or logins, try again later."),
    (PolicyRefused, b"NO [CONTACTADMIN] Access not allowed."),
    (
        PrivacyRequired,
        b"NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS)"
        b" connections.",
    ),
)

INTERNAL_FAILURE = b"NO [UNAVAILABLE] Internal error, try again later."

#: A backend greeting's capability list: its group 1 matched when it lists SASL-IR.
_GREETING_SASL_IR = re.compile(
    rb"\[CAPABILITY (?:[^\]]* )?(SASL-IR)[ \]]|\[CAPABILITY [^\]]*\]", re.IGNORECASE
)


def _capabilities(tlsAvailable: bool, plaintextAllowed: bool) -> bytes:
    caps = [b"IMAP4rev1", b"SASL-IR", b"LITERAL+", b"ID"]
    if tlsAvailable:
        caps.append(b"STARTTLS")
    if plaintextAllowed:
        caps.extend(b"AUTH=" + m.encode() for m in MECHANISMS)
    else:
        caps.append(b"LOGINDISABLED")
    return b" ".join(caps)


#: The pre-login capability list, by whether STARTTLS is offered and plaintext logins allowed:
#: rendered once, not in every greeting.
_CAPABILITIES = {(tls, plain): _capabilities(tls, plain) for tls in (False, True) for plain in (False, True)}


class IMAPServer(LiteralFraming, FrontendProtocol):
    """
    The client side of an IMAP session before login.
    """

    failures = FAILURES
    internalFailure = INTERNAL_FAILURE
    wording = Wording(
        unknownCommand=b"Unknown command or not allowed before login.",
        tooManyErrors=b"Too many invalid IMAP commands.",
        lineTooLong=b"Too long argument.",
    )
    maxLiterals = MAX_LITERALS
    _tag = b""

    @property
    def maxLiteral(self) -> int:
        # Read when a literal comes (rarely), not for every session.
        return self.section.max_literal_size

    def capabilities(self) -> bytes:
        # (As booleans: the key of the table.)
        client = self.client  # plaintextAllowed, without a property call
        return _CAPABILITIES[not not self.tlsAvailable, not not (client.tls or client.trusted)]

    def greet(self) -> None:
        self.send(b"* OK [CAPABILITY " + self.capabilities() + b"] casd ready.\r\n")

    # -- framing ----------------------------------------------------------------------------

    def replyOk(self, tag: bytes, text: bytes) -> None:
        self.send(tag + b" OK " + text + b"\r\n")

    def replyNo(self, tag: bytes, text: bytes) -> None:
        self.send(tag + b" NO " + text + b"\r\n")

    def replyBad(self, tag: bytes, text: bytes) -> None:
        self.send(tag + b" BAD " + text + b"\r\n")

    def replyBye(self, text: bytes) -> None:
        self.send(b"* BYE " + text + b"\r\n")

    def replyFailure(self, tag: bytes, words: bytes) -> None:
        self.send(tag + b" " + words + b"\r\n")

    def saslChallenge(self, tag, challenge: bytes) -> None:
        self.send(b"+ " + challenge + b"\r\n")

    # -- reading commands -------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        if self.saslInProgress:
            self.saslResponse(line)
            return
        if not self.inCommand:
            simple = simpleCommand(line)
            if simple is not None:
                # The common login commands, without the full grammar (same result).
                tag, command, args = simple
                self._tag = tag
                try:
                    self.dispatch(command, tag, args, token=tag)
                except IMAPSyntaxError as e:
                    self.invalidCommand(tag, b"Error in IMAP command: " + str(e).encode())
                return
            try:
                self._tag = splitTag(line)[0]
            except IMAPSyntaxError as e:
                tag = line.split(b" ", 1)[0] if line.strip() else b"*"
                if not tag or any(c in b"\x00+{" for c in tag):
                    tag = b"*"
                self.invalidCommand(tag, str(e).encode())
                return
        self.collectLine(line)

    def literalContinue(self) -> None:
        self.send(b"+ OK\r\n")

    def literalTooLarge(self, nonSync: bool) -> None:
        if nonSync:
            # The client sends the data regardless: resynchronising is not worth it.
            self.replyBye(b"[TOOBIG] Literal too large.")
            self.close("literal too large")
        else:
            self.invalidCommand(self._tag, b"[TOOBIG] Literal too large.")

    def commandReceived(self, parts: list) -> None:
        try:
            tag, command, rest = splitTag(parts[0])
            self.dispatch(command, tag, tokenizeParts([rest] + parts[1:]), token=tag)
        except IMAPSyntaxError as e:
            self.invalidCommand(self._tag, b"Error in IMAP command: " + str(e).encode())

    # -- commands ---------------------------------------------------------------------------

    def unauth_CAPABILITY(self, tag, args):
        if self.noArguments(tag, args):
            self.send(b"* CAPABILITY " + self.capabilities() + b"\r\n")
            self.replyOk(tag, b"Pre-login capabilities listed, post-login capabilities have more.")

    def unauth_NOOP(self, tag, args):
        if self.noArguments(tag, args):
            self.replyOk(tag, b"NOOP completed.")

    def unauth_LOGOUT(self, tag, args):
        if self.noArguments(tag, args):
            self.replyBye(b"Logging out")
            self.replyOk(tag, b"Logout completed.")
            self.close("logout")

    def unauth_ID(self, tag, args):
        items = parseList(args)
        if items is not None and (len(items) % 2 or any(k is None for k in items[::2])):
            raise IMAPSyntaxError("Invalid ID parameters")
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
        self.replyOk(tag, b"ID completed.")

    def unauth_STARTTLS(self, tag, args):
        if self.noArguments(tag, args):
            self.startTLSCommand(tag)

    def unauth_LOGIN(self, tag, args):
        # Arguments are strings, or the parentheses' markers (not bytes).
        if len(args) != 2 or not (isinstance(args[0], bytes) and isinstance(args[1], bytes)):
            self.invalidCommand(tag, b"Invalid arguments: LOGIN username password")
        else:
            self.passwordLogin(tag, args[0], args[1])

    def unauth_AUTHENTICATE(self, tag, args):
        if not 1 <= len(args) <= 2 or not all(isinstance(a, bytes) for a in args):
            self.invalidCommand(tag, b"Invalid arguments: AUTHENTICATE mechanism [initial-response]")
        else:
            self.startSASL(tag, args[0], args[1] if len(args) == 2 else None)

    # -- login ------------------------------------------------------------------------------

    def loginSucceeded(self, tag: bytes, dialogue) -> None:
        self.replyOk(tag, b"[CAPABILITY " + dialogue.capabilities + b"] Logged in")

    def makeDialogue(self, target, user, credentials):
        return IMAPBackend(target, self.client, user, credentials, self.context)


@lru_cache(maxsize=4096)
def _quotedHost(host: str) -> bytes:
    """
    An address as a quoted string for C{ID}, rendered once per address.
    """
    return quote(host)


class IMAPBackend(BackendDialogue):
    """
    The login dialogue with an IMAP mailbox server: greeting, STARTTLS, ID with the client's
    address (Dovecot honours it from its C{login_trusted_networks}), AUTHENTICATE PLAIN with the
    user's credentials or as a master user, then the post-login capabilities.

    @ivar capabilities: the backend's post-login capability list, for the client's tagged OK.
    """

    capabilities = b""

    def _tagged(self, line: bytes, tag: bytes) -> bytes | None:
        """
        @param tag: casd's tag (one letter) and the space after it, e.g. C{b"A "}.
        @return: the status (C{b"OK"}, C{b"NO"}, C{b"BAD"}) when C{line} is the tagged reply to
            C{tag}, C{None} for an untagged line.
        @raise BackendUnavailable: when the backend says BYE.
        """
        if line[:2] == tag:
            return line[2:].split(b" ", 1)[0].upper()
        if line[:5] == b"* BYE":
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
            _quotedHost(c.peerHost),
            c.peerPort,
            _quotedHost(c.localHost),
            c.localPort,
            ttl,
            c.sessionId.encode("ascii"),
        )

    def dialogue(self):
        self.expectLine(self._onGreeting)

    def _onGreeting(self, line: bytes) -> None:
        if not line[:4].upper() == b"* OK":
            raise self.fail("unexpected greeting " + repr(line[:80]))
        if self.target.tls == "starttls":
            self.command(b"S STARTTLS", self._onStartTLS)
            return
        # Pipelined unless the greeting lists capabilities without SASL-IR.
        m = _GREETING_SASL_IR.search(line)
        self._login(m is None or m.lastindex is not None)

    def _onStartTLS(self, line: bytes) -> None:
        status = self._tagged(line, b"S ")
        if status is None:
            self.expectLine()
            return
        if status != b"OK":
            raise self.fail("refused STARTTLS")
        # Capabilities seen before TLS are not to be trusted.
        self.startTLS(lambda: self._login(True))

    def _login(self, saslIR: bool) -> None:
        """
        @param saslIR: whether to send the initial response with C{AUTHENTICATE} (SASL-IR,
            RFC 4959), pipelined behind C{ID}; else wait for C{ID}'s reply and the
            continuation.
        """
        authc, password, authz = self.loginIdentity()
        initial = encodePlain(authc, password, authz)
        if saslIR:
            # One round trip: ID and the login pipelined.
            self.send(self.idCommand() + b"\r\nA AUTHENTICATE PLAIN " + initial + b"\r\n")
            self.expectLine(self._onIDThenLogin)
        else:
            self._initial = initial
            self.command(self.idCommand(), self._onIDThenContinue)

    def _onIDThenLogin(self, line: bytes) -> None:
        # The tagged reply told by its tag inline (one call less); others as _tagged() says.
        if line[:2] != b"I " and self._tagged(line, b"I ") is None:
            self.expectLine()  # the untagged * ID reply
            return
        self.expectLine(self._onLogin)

    def _onIDThenContinue(self, line: bytes) -> None:
        if self._tagged(line, b"I ") is None:
            self.expectLine()
            return
        self.command(b"A AUTHENTICATE PLAIN", self._onContinuation)

    def _onContinuation(self, line: bytes) -> None:
        if not line.startswith(b"+"):
            raise self.fail("refused AUTHENTICATE PLAIN")
        initial, self._initial = self._initial, None
        self.command(initial, self._onLogin)

    def _onLogin(self, line: bytes) -> None:
        status = b"OK" if line[:5] == b"A OK " else self._tagged(line, b"A ")
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
            self.command(b"C CAPABILITY", self._onCapability)
            return
        self._finish(caps)

    def _onCapability(self, line: bytes) -> None:
        if self._tagged(line, b"C ") is None:
            if line[:13].upper() == b"* CAPABILITY ":
                self._caps = line[13:]
            self.expectLine()
            return
        if self._caps is None:
            raise self.fail("sent no capabilities")
        self._finish(self._caps)

    def _finish(self, caps: bytes) -> None:
        self.capabilities = caps
        self.succeed()


imap = ProtocolDescriptor(
    name="imap",
    description="IMAP4rev1 (RFC 3501) proxy: pre-login in casd, then relayed to the mailbox server",
    server=IMAPServer,
    defaultListeners=({"endpoint": "tcp:143", "tls": "starttls"},),
    defaultBackendPort=143,
    defaultBackendTLS="starttls",
    alpnProtocols=("imap",),
    healthProbe=HealthProbe(expect=b"* OK", quit=b"h LOGOUT\r\n"),
    settings=(
        Setting(
            "max_literal_size", "int", 8192, "Largest literal accepted before login (bytes).", minimum=1
        ),
    ),
)
