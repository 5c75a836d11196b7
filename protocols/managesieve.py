# -*- test-case-name: tests.test_managesieve -*-
"""
ManageSieve (RFC 5804): the pre-login grammar, the wording of the shared failures and the backend
login dialogue.  After login casd only relays bytes, so script uploads, checks and activation
are the backend's business.

ManageSieve's strings are IMAP's (quoted strings and literals), so the tokenizer and the literal
framing come from L{protocols.stringgrammar}.
"""

from __future__ import annotations

from casd.plugin import (
    MECHANISMS,
    AuthenticationFailed,
    BackendDialogue,
    BackendUnavailable,
    ConfigError,
    DirectoryUnavailable,
    FrontendProtocol,
    HealthProbe,
    PolicyRefused,
    PrivacyRequired,
    ProtocolDescriptor,
    SASLRefusal,
    Setting,
    Throttled,
    encodePlain,
)
from protocols.stringgrammar import LITERAL_MARKER, Atom, GrammarError, LiteralFraming
from protocols.stringgrammar import quote, tokenize, tokenizeParts

#: How each failure of the shared vocabulary reads in ManageSieve (RFC 5804 response codes).
FAILURES = (
    (AuthenticationFailed, b'NO "Authentication failed."'),
    (DirectoryUnavailable, b'NO (TRYLATER) "Temporary authentication failure, try again later."'),
    (BackendUnavailable, b'NO (TRYLATER) "Mailbox server unavailable, try again later."'),
    (Throttled, b'NO (TRYLATER) "Too many sessions or logins, try again later."'),
    (PolicyRefused, b'NO "Access not allowed."'),
    (
        PrivacyRequired,
        b'NO (ENCRYPT-NEEDED) "Plaintext authentication disallowed on non-secure (SSL/TLS)'
        b' connections."',
    ),
)

INTERNAL_FAILURE = b'NO (TRYLATER) "Internal error, try again later."'

#: Commands of the authenticated state: refused before login, but not unknown.
AUTHENTICATED_COMMANDS = frozenset(
    "HAVESPACE PUTSCRIPT LISTSCRIPTS SETACTIVE GETSCRIPT DELETESCRIPT RENAMESCRIPT CHECKSCRIPT"
    " UNAUTHENTICATE".split()
)

#: What Dovecot's Pigeonhole announces by default.
DEFAULT_EXTENSIONS = (
    "fileinto reject envelope encoded-character vacation subaddress comparator-i;ascii-numeric"
    " relational regex imap4flags copy include variables body enotify environment mailbox date"
    " index ihave duplicate mime foreverypart extracttext"
)


def _isString(token) -> bool:
    # A quoted string or a literal: bytes, but not an atom (RFC 5804 wants strings here).
    return isinstance(token, bytes) and not isinstance(token, Atom)


class ManageSieveServer(LiteralFraming, FrontendProtocol):
    """
    The client side of a ManageSieve session before login.
    """

    failures = FAILURES
    internalFailure = INTERNAL_FAILURE

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.maxLiteral = self.section.max_literal_size

    def capabilities(self) -> bytes:
        section = self.section
        mechanisms = " ".join(MECHANISMS) if self.client.plaintextAllowed else ""
        lines = [
            b'"IMPLEMENTATION" ' + quote(section.implementation),
            b'"SASL" ' + quote(mechanisms),
            b'"SIEVE" ' + quote(section.sieve_extensions),
        ]
        if section.notify_methods:
            lines.append(b'"NOTIFY" ' + quote(section.notify_methods))
        if self.tlsAvailable:
            lines.append(b'"STARTTLS"')
        lines.append(b'"VERSION" "1.0"')
        return b"".join(line + b"\r\n" for line in lines)

    def greet(self) -> None:
        self.send(self.capabilities() + b'OK "casd ready."\r\n')

    # -- framing ----------------------------------------------------------------------------

    def replyOk(self, token, text: bytes) -> None:
        self.send(b"OK " + quote(text) + b"\r\n")

    def replyNo(self, token, text: bytes) -> None:
        self.send(b"NO " + quote(text) + b"\r\n")

    def replyBye(self, text: bytes) -> None:
        self.send(b"BYE " + quote(text) + b"\r\n")

    def saslChallenge(self, token, challenge: bytes) -> None:
        self.send(quote(challenge) + b"\r\n")

    # -- reading commands -------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.collectLine(line)

    def literalTooLarge(self, nonSync: bool) -> None:
        # ManageSieve has no continuation: every literal's data is on its way already.
        self.replyBye(b"Literal too large.")
        self.close("literal too large")

    def commandReceived(self, parts: list) -> None:
        try:
            tokens = tokenizeParts(parts)
        except GrammarError as e:
            if self.saslInProgress:
                self.abortSASL(SASLRefusal.BAD_RESPONSE)
            else:
                self.invalidCommand(None, b"Error in MANAGESIEVE command: " + str(e).encode())
            return
        if self.saslInProgress:
            # The response to a challenge: one string (an atom is tolerated: base64 is one).
            if len(tokens) == 1 and isinstance(tokens[0], bytes):
                self.saslResponse(tokens[0])
            else:
                self.abortSASL(SASLRefusal.BAD_RESPONSE)
        elif not tokens or not isinstance(tokens[0], Atom):
            self.invalidCommand(None, b"Error in MANAGESIEVE command received by server.")
        else:
            self.dispatch(tokens[0], tokens[1:])

    def unknownCommand(self, token, name: str) -> None:
        if name in AUTHENTICATED_COMMANDS:
            self.invalidCommand(token, b"Authenticate first.")
        else:
            super().unknownCommand(token, name)

    # -- commands ---------------------------------------------------------------------------

    def unauth_CAPABILITY(self, args):
        if self.noArguments(None, args):
            self.send(self.capabilities() + b'OK "Capability completed."\r\n')

    def unauth_NOOP(self, args):
        if not args:
            self.replyOk(None, b"NOOP completed.")
        elif len(args) == 1 and _isString(args[0]):
            try:
                tag = quote(args[0])
            except ValueError:
                self.invalidCommand(None, b"Invalid NOOP tag.")
                return
            # RFC 5804 2.15: the tag comes back in a TAG response code.
            self.send(b"OK (TAG " + tag + b') "Done"\r\n')
        else:
            self.invalidCommand(None, b'Invalid arguments: NOOP ["tag"]')

    def unauth_LOGOUT(self, args):
        self.replyOk(None, b"Logout completed.")
        self.close("logout")

    def unauth_STARTTLS(self, args):
        if self.noArguments(None, args) and self.startTLSCommand(None):
            # RFC 5804 2.2: the capabilities again, now that TLS is on (and SASL may be offered).
            self.send(self.capabilities() + b'OK "TLS negotiation successful."\r\n')

    def unauth_AUTHENTICATE(self, args):
        if not 1 <= len(args) <= 2 or not all(_isString(a) for a in args):
            self.invalidCommand(None, b'Invalid arguments: AUTHENTICATE "mechanism" ["initial-response"]')
        else:
            self.startSASL(None, args[0], args[1] if len(args) == 2 else None)

    # -- login ------------------------------------------------------------------------------

    def loginSucceeded(self, token, dialogue) -> None:
        self.replyOk(None, b"Logged in.")

    def makeDialogue(self, target, user, credentials):
        return ManageSieveBackend(target, self.client, user, credentials, self.context)


class ManageSieveBackend(BackendDialogue):
    """
    The login dialogue with a ManageSieve server (Dovecot's Pigeonhole): the greeting's
    capabilities, STARTTLS (after which the server lists its capabilities again), C{XCLIENT}
    with the client's address when offered (Pigeonhole offers it to proxies in its
    C{login_trusted_networks}), then C{AUTHENTICATE "PLAIN"} with the user's credentials or as a
    master user.
    """

    _literal = 0

    def expectResponse(self, what: str, then) -> None:
        """
        Read data lines up to the response (C{OK}, C{NO} or C{BYE}), skipping the literals a
        line announces (an error text may come as one), then call
        C{then(status, code, names)}: the response's status upper-cased, its response code
        (C{b""} when none) and the first word of each data line (a capability), upper-cased.
        """
        self._what, self._then, self._names, self._head = what, then, [], None
        self.expectLine(self._responseLine)

    def _responseLine(self, line: bytes) -> None:
        if self._literal:
            self._data += line + b"\r\n"
            if len(self._data) < self._literal:
                return
            # What follows the literal on its last line may announce another one.
            line, self._literal = self._data[self._literal :], 0
            if line.endswith(b"\r\n"):
                line = line[:-2]
        m = LITERAL_MARKER.search(line)
        if m is not None:
            if self._head is None:
                self._head = line[: m.start()]
            self._literal, self._data = int(m.group(1)), b""
            self.expectLine()
            return
        if self._head is not None:
            line, self._head = self._head, None
        what = self._what
        if line.startswith(b'"'):
            try:
                name = tokenize(line)[0]
            except (GrammarError, IndexError):
                name = None
            if not isinstance(name, bytes) or isinstance(name, Atom):
                raise self.fail(f"garbled capability before {what}: {line[:80]!r}")
            self._names.append(name.upper())
            self.expectLine()
            return
        status, _, rest = line.partition(b" ")
        status = status.upper()
        if status not in (b"OK", b"NO", b"BYE"):
            raise self.fail(f"unexpected reply to {what}: {line[:80]!r}")
        code = rest[1:].partition(b")")[0].upper() if rest.startswith(b"(") else b""
        self._then(status, code, self._names)

    def dialogue(self):
        self.expectResponse("the greeting", self.greeting)

    def greeting(self, status, code, caps) -> None:
        if status != b"OK":
            raise self.fail(f"greeted with {status.decode()}")
        if self.target.tls == "starttls":
            self.sendLine(b"STARTTLS")
            self.expectResponse("STARTTLS", self.startTLSReply)
        else:
            self.introduce(status, code, caps)

    def startTLSReply(self, status, code, caps) -> None:
        if status != b"OK":
            raise self.fail("refused STARTTLS")
        # The capabilities seen before TLS are not to be trusted; the server sends new ones.
        self.startTLS(lambda: self.expectResponse("the capabilities after STARTTLS", self.introduce))

    def introduce(self, status, code, caps) -> None:
        if status != b"OK":
            raise self.fail("no capabilities after STARTTLS")
        if b"XCLIENT" in caps:
            self.sendLine(self.xclientCommand())
            self.expectResponse("XCLIENT", self.xclientReply)
        else:
            self.logIn()

    def xclientReply(self, status, code, caps) -> None:
        if status != b"OK":
            raise self.fail("refused XCLIENT")
        self.logIn()

    def logIn(self) -> None:
        authc, password, authz = self.loginIdentity()
        self.sendLine(b'AUTHENTICATE "PLAIN" "' + encodePlain(authc, password, authz) + b'"')
        self.expectResponse("AUTHENTICATE", self.loginReply)

    def loginReply(self, status, code, caps) -> None:
        if status != b"OK":
            temporary = status == b"BYE" or code.startswith(b"TRYLATER")
            raise self.fail(
                "refused the login", authFailed=not temporary and not self.target.masterUser
            )
        self.succeed()


class ManageSieveProtocol(ProtocolDescriptor):
    """
    The descriptor of casd's ManageSieve proxy: its capability texts must be quotable.
    """

    def buildFactory(self, context, section, listener):
        for key in ("sieve_extensions", "notify_methods", "implementation"):
            try:
                quote(getattr(section, key))
            except ValueError:
                raise ConfigError(
                    context.config.path, f"{self.name}.{key}", "expected one line of text"
                ) from None
        return super().buildFactory(context, section, listener)


managesieve = ManageSieveProtocol(
    name="managesieve",
    description="ManageSieve (RFC 5804) proxy: pre-login in casd, then relayed to the mailbox server",
    server=ManageSieveServer,
    defaultListeners=({"endpoint": "tcp:4190", "tls": "starttls"},),
    defaultBackendPort=4190,
    defaultBackendTLS="starttls",
    alpnProtocols=("managesieve",),
    # The greeting opens with a capability line (a string); a busy server says BYE instead.
    healthProbe=HealthProbe(expect=b'"', quit=b"LOGOUT\r\n"),
    settings=(
        Setting(
            "enabled",
            "bool",
            False,
            "Serve ManageSieve.  Off unless set, so that a configuration written before casd"
            " spoke ManageSieve opens no new port.",
        ),
        Setting(
            "max_literal_size", "int", 8192, "Largest literal accepted before login (bytes).", minimum=1
        ),
        Setting(
            "sieve_extensions",
            "str",
            DEFAULT_EXTENSIONS,
            "The SIEVE capability announced before login: the mailbox servers' Sieve extensions.",
        ),
        Setting(
            "notify_methods",
            "str",
            "mailto",
            "The NOTIFY capability announced before login; empty for none.",
        ),
        Setting("implementation", "str", "casd", "The IMPLEMENTATION capability."),
    ),
)
