"""
ManageSieve (RFC 5804): the pre-login grammar, the wording of the shared failures and the backend
login dialogue.  After login casd only relays bytes, so script uploads, checks and activation
are the backend's business.

ManageSieve's strings are IMAP's (quoted strings and literals), so the tokenizer and the literal
framing come from L{protocols.stringgrammar}.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.internet import defer
from twisted.plugin import IPlugin

from casd.session.dialogue import BackendDialogue
from casd.config import ConfigError, Setting
from casd.failures import (
    AuthenticationFailed,
    BackendUnavailable,
    DirectoryUnavailable,
    PolicyRefused,
    PrivacyRequired,
    Throttled,
)
from casd.session.frontend import FrontendFactory, FrontendProtocol, renderFailure
from casd.pool.health import HealthProbe
from casd.interfaces import ICASProtocol
from casd.auth.sasl import MECHANISMS, SASLRefusal, encodePlain
from protocols.stringgrammar import (
    LITERAL_MARKER,
    Atom,
    GrammarError,
    LiteralFraming,
    quote,
    tokenize,
    tokenizeParts,
)

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
    (
        "HAVESPACE",
        "PUTSCRIPT",
        "LISTSCRIPTS",
        "SETACTIVE",
        "GETSCRIPT",
        "DELETESCRIPT",
        "RENAMESCRIPT",
        "CHECKSCRIPT",
        "UNAUTHENTICATE",
    )
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

    # -- capabilities -----------------------------------------------------------------------

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

    # -- reading commands -------------------------------------------------------------------

    def respond(self, status: bytes, text: bytes, code: bytes = b"") -> None:
        self.send(status + (b" (" + code + b")" if code else b"") + b" " + quote(text) + b"\r\n")

    def bad(self, text: bytes) -> None:
        """
        An invalid command: counted, and the connection closed at the limit.
        """
        if self.badCommand():
            self.respond(b"BYE", b"Too many invalid commands.")
            self.close("too many errors")
            return
        self.respond(b"NO", text)

    def lineTooLong(self) -> None:
        self.respond(b"BYE", b"Line too long.")
        self.close()

    def timedOut(self) -> None:
        self.respond(b"BYE", b"Disconnected for inactivity.")
        self.close()

    def lineReceived(self, line: bytes) -> None:
        self.collectLine(line)

    def literalTooLarge(self, nonSync: bool) -> None:
        # ManageSieve has no continuation: every literal's data is on its way already.
        self.respond(b"BYE", b"Literal too large.")
        self.close("literal too large")

    def commandReceived(self, parts: list) -> None:
        try:
            tokens = tokenizeParts(parts)
        except GrammarError as e:
            if self.saslInProgress:
                self.abortSASL(SASLRefusal.BAD_RESPONSE)
            else:
                self.bad(b"Error in MANAGESIEVE command: " + str(e).encode())
            return
        if self.saslInProgress:
            # The response to a challenge: one string (an atom is tolerated: base64 is one).
            if len(tokens) == 1 and isinstance(tokens[0], bytes):
                self.saslResponse(tokens[0])
            else:
                self.abortSASL(SASLRefusal.BAD_RESPONSE)
            return
        if not tokens or not isinstance(tokens[0], Atom):
            self.bad(b"Error in MANAGESIEVE command received by server.")
            return
        name = tokens[0].decode("ascii", "replace").upper()
        handler = getattr(self, "do_" + name, None) if name.isalpha() else None
        if handler is None:
            if name in AUTHENTICATED_COMMANDS:
                self.bad(b"Authenticate first.")
            else:
                self.bad(b"Unknown command.")
            return
        handler(tokens[1:])

    # -- commands ---------------------------------------------------------------------------

    def _noArguments(self, args: list) -> bool:
        if args:
            self.bad(b"Unexpected arguments.")
            return False
        return True

    def do_CAPABILITY(self, args):
        if self._noArguments(args):
            self.send(self.capabilities() + b'OK "Capability completed."\r\n')

    def do_NOOP(self, args):
        if not args:
            self.respond(b"OK", b"NOOP completed.")
        elif len(args) == 1 and _isString(args[0]):
            try:
                tag = quote(args[0])
            except ValueError:
                self.bad(b"Invalid NOOP tag.")
                return
            # RFC 5804 2.15: the tag comes back in a TAG response code.
            self.send(b"OK (TAG " + tag + b') "Done"\r\n')
        else:
            self.bad(b"Invalid arguments: NOOP [\"tag\"]")

    def do_LOGOUT(self, args):
        self.respond(b"OK", b"Logout completed.")
        self.close("logout")

    def do_STARTTLS(self, args):
        if not self._noArguments(args):
            return
        if self.client.tls:
            self.bad(b"TLS is already active.")
            return
        if not self.tlsAvailable:
            self.bad(b"TLS support isn't enabled.")
            return
        self.respond(b"OK", b"Begin TLS negotiation now.")
        self.startTLS()
        # RFC 5804 2.2: the capabilities again, now that TLS is on (and SASL may be offered).
        self.send(self.capabilities() + b'OK "TLS negotiation successful."\r\n')

    def do_AUTHENTICATE(self, args):
        if not 1 <= len(args) <= 2 or not all(_isString(a) for a in args):
            self.bad(b'Invalid arguments: AUTHENTICATE "mechanism" ["initial-response"]')
            return
        self.startSASL(None, args[0], args[1] if len(args) == 2 else None)

    # -- SASL and login ---------------------------------------------------------------------

    def saslChallenge(self, token, challenge: bytes) -> None:
        self.send(quote(challenge) + b"\r\n")

    def saslFailed(self, token, refusal: SASLRefusal) -> None:
        if refusal is SASLRefusal.UNSUPPORTED:
            self.respond(b"NO", b"Unsupported authentication mechanism.")
        elif refusal is SASLRefusal.PRIVACY_REQUIRED:
            self.send(self.renderFailure(PrivacyRequired()) + b"\r\n")
        elif refusal is SASLRefusal.BAD_INITIAL:
            self.bad(b"Invalid base64 data in initial response.")
        elif refusal is SASLRefusal.BAD_RESPONSE:
            self.bad(b"Invalid base64 data in continued response.")
        elif refusal is SASLRefusal.CANCELLED:
            self.respond(b"NO", b"Authentication aborted by client.")
        else:
            self.loginFailed(token, AuthenticationFailed())

    def loginSucceeded(self, token, dialogue) -> None:
        self.respond(b"OK", b"Logged in.")

    def loginFailed(self, token, failure) -> None:
        self.send(self.renderFailure(failure) + b"\r\n")

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

    @defer.inlineCallbacks
    def readResponseLine(self):
        """
        Read one line of a response, with any literal it announces (an error text may come as
        one).

        @return: the line up to its first literal announcement, if any.
        """
        line = yield self.readLine()
        head = None
        while True:
            m = LITERAL_MARKER.search(line)
            if m is None:
                return line if head is None else head
            if head is None:
                head = line[: m.start()]
            size = int(m.group(1))
            data = b""
            while len(data) < size:
                data += (yield self.readLine()) + b"\r\n"
            # What follows the literal on its last line may announce another one.
            line = data[size:]
            if line.endswith(b"\r\n"):
                line = line[:-2]

    @defer.inlineCallbacks
    def readResponse(self, what: str):
        """
        Read data lines up to the response (C{OK}, C{NO} or C{BYE}).

        @return: C{(status, code, capability names)}: the response's status upper-cased, its
            response code (C{b""} when none) and the first word of each data line, upper-cased.
        """
        names = []
        while True:
            line = yield self.readResponseLine()
            if line.startswith(b'"'):
                try:
                    name = tokenize(line)[0]
                except (GrammarError, IndexError):
                    raise self.fail(f"garbled capability before {what}: {line[:80]!r}")
                if not isinstance(name, bytes) or isinstance(name, Atom):
                    raise self.fail(f"garbled capability before {what}: {line[:80]!r}")
                names.append(name.upper())
                continue
            status, _, rest = line.partition(b" ")
            status = status.upper()
            if status not in (b"OK", b"NO", b"BYE"):
                raise self.fail(f"unexpected reply to {what}: {line[:80]!r}")
            code = b""
            if rest.startswith(b"("):
                code = rest[1:].partition(b")")[0].upper()
            return status, code, names

    @defer.inlineCallbacks
    def dialogue(self):
        status, code, caps = yield self.readResponse("the greeting")
        if status != b"OK":
            raise self.fail(f"greeted with {status.decode()}")
        if self.target.tls == "starttls":
            self.sendLine(b"STARTTLS")
            status, code, _ = yield self.readResponse("STARTTLS")
            if status != b"OK":
                raise self.fail("refused STARTTLS")
            yield self.startTLS()
            # The capabilities seen before TLS are not to be trusted; the server sends new ones.
            status, code, caps = yield self.readResponse("the capabilities after STARTTLS")
            if status != b"OK":
                raise self.fail("no capabilities after STARTTLS")
        if b"XCLIENT" in caps:
            self.sendLine(self.xclientCommand())
            status, code, _ = yield self.readResponse("XCLIENT")
            if status != b"OK":
                raise self.fail("refused XCLIENT")
        authc, password, authz = self.loginIdentity()
        self.sendLine(b'AUTHENTICATE "PLAIN" "' + encodePlain(authc, password, authz) + b'"')
        status, code, _ = yield self.readResponse("AUTHENTICATE")
        if status != b"OK":
            temporary = status == b"BYE" or code.startswith(b"TRYLATER")
            raise self.fail(
                "refused the login", authFailed=not temporary and not self.target.masterUser
            )


@implementer(IPlugin, ICASProtocol)
class ManageSieveProtocol:
    """
    The descriptor of casd's ManageSieve proxy.
    """

    name = "managesieve"
    description = (
        "ManageSieve (RFC 5804) proxy: pre-login in casd, then relayed to the mailbox server"
    )
    defaultListeners = ({"endpoint": "tcp:4190", "tls": "starttls"},)
    defaultBackendPort = 4190
    defaultBackendTLS = "starttls"
    # The greeting opens with a capability line (a string); a busy server says BYE instead.
    healthProbe = HealthProbe(expect=b'"', quit=b"LOGOUT\r\n")
    settings = (
        Setting(
            "enabled",
            "bool",
            False,
            "Serve ManageSieve.  Off unless set, so that a configuration written before casd"
            " spoke ManageSieve opens no new port.",
        ),
        Setting(
            "max_literal_size",
            "int",
            8192,
            "Largest literal accepted before login (bytes).",
            minimum=1,
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
    )

    def buildFactory(self, context, section, listener):
        for key in ("sieve_extensions", "notify_methods", "implementation"):
            try:
                quote(getattr(section, key))
            except ValueError:
                raise ConfigError(
                    context.config.path, f"{self.name}.{key}", "expected one line of text"
                ) from None
        return FrontendFactory(ManageSieveServer, context, section, listener, self)

    @staticmethod
    def renderFailure(exc: BaseException) -> bytes:
        return renderFailure(FAILURES, exc, INTERNAL_FAILURE)


managesieve = ManageSieveProtocol()
