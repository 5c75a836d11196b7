"""
POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), AUTH (RFC 5034) and the response codes of
RFC 2449 and RFC 3206: the pre-login grammar, the wording of the shared failures and the backend
login dialogue.  After login casd only relays bytes.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.internet import defer
from twisted.plugin import IPlugin

from casd.session.dialogue import BackendDialogue
from casd.config import Setting
from casd.failures import (
    AuthenticationFailed,
    BackendUnavailable,
    DirectoryUnavailable,
    PolicyRefused,
    PrivacyRequired,
    ProtocolViolation,
    Throttled,
)
from casd.session.frontend import FrontendFactory, FrontendProtocol, renderFailure
from casd.pool.health import HealthProbe
from casd.interfaces import ICASProtocol
from casd.auth.sasl import MECHANISMS, SASLRefusal, encodePlain, makeCredentials

#: How each failure of the shared vocabulary reads in POP3 (RFC 2449 and RFC 3206 codes).
FAILURES = (
    (AuthenticationFailed, b"-ERR [AUTH] Authentication failed."),
    (DirectoryUnavailable, b"-ERR [SYS/TEMP] Temporary authentication failure, try again later."),
    (BackendUnavailable, b"-ERR [SYS/TEMP] Mailbox server unavailable, try again later."),
    (Throttled, b"-ERR [IN-USE] Too many sessions or logins, try again later."),
    (PolicyRefused, b"-ERR [SYS/PERM] Access not allowed."),
    (
        PrivacyRequired,
        b"-ERR Plaintext authentication disallowed on non-secure (SSL/TLS) connections.",
    ),
)

INTERNAL_FAILURE = b"-ERR [SYS/TEMP] Internal error, try again later."



def _lineSafe(value: bytes) -> bool:
    """
    Whether C{value} may travel as a C{USER} or C{PASS} argument: no line break or NUL (which
    would end the command early, or start another), no white space around it (which a
    server may strip).
    """
    return bool(value) and not any(c in value for c in b"\r\n\x00") and value.strip() == value


class POP3Server(FrontendProtocol):
    """
    The client side of a POP3 session in the AUTHORIZATION state.
    """

    failures = FAILURES
    internalFailure = INTERNAL_FAILURE

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._user: bytes | None = None

    # -- capabilities -----------------------------------------------------------------------

    def capabilities(self) -> list[bytes]:
        caps = [b"CAPA"]
        caps.extend(c.encode("utf-8") for c in self.section.capabilities if c.isprintable())
        caps += [b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.tlsAvailable:
            caps.append(b"STLS")
        if self.client.plaintextAllowed:
            caps.append(b"USER")
            caps.append(b"SASL " + b" ".join(m.encode("ascii") for m in MECHANISMS))
        caps.append(b"IMPLEMENTATION casd")
        return caps

    def greet(self) -> None:
        self.send(b"+OK casd ready.\r\n")

    # -- reading commands -------------------------------------------------------------------

    def ok(self, text: bytes = b"") -> None:
        self.send(b"+OK" + (b" " + text if text else b"") + b"\r\n")

    def err(self, text: bytes) -> None:
        self.send(b"-ERR " + text + b"\r\n")

    def bad(self, text: bytes) -> None:
        """
        An invalid command: counted, and the connection closed at the limit.
        """
        if self.badCommand():
            self.err(b"Too many invalid commands.")
            self.close("too many errors")
            return
        self.err(text)

    def lineTooLong(self) -> None:
        self.err(b"Line too long.")
        self.close()

    def timedOut(self) -> None:
        self.err(b"Disconnected for inactivity.")
        self.close()

    def lineReceived(self, line: bytes) -> None:
        if self.saslInProgress:
            self.saslResponse(line)
            return
        command, _, argument = line.partition(b" ")
        try:
            name = command.decode("ascii").upper()
        except UnicodeDecodeError:
            name = ""
        handler = getattr(self, "do_" + name, None) if name.isalpha() else None
        if handler is None:
            self.bad(b"Unknown command.")
            return
        handler(argument)

    # -- commands ---------------------------------------------------------------------------

    def _noArgument(self, argument: bytes) -> bool:
        if argument.strip():
            self.bad(b"Unexpected arguments.")
            return False
        return True

    def do_CAPA(self, argument):
        if self._noArgument(argument):
            self.send(
                b"+OK Capability list follows\r\n"
                + b"".join(c + b"\r\n" for c in self.capabilities())
                + b".\r\n"
            )

    def do_NOOP(self, argument):
        if self._noArgument(argument):
            self.ok()

    def do_QUIT(self, argument):
        self.ok(b"Logging out.")
        self.close("logout")

    def do_STLS(self, argument):
        if not self._noArgument(argument):
            return
        if self.client.tls:
            self.err(b"TLS is already active.")
            return
        if not self.tlsAvailable:
            self.err(b"TLS support isn't enabled.")
            return
        self.ok(b"Begin TLS negotiation now.")
        # A USER sent in clear is forgotten with everything else from before the handshake.
        self._user = None
        self.startTLS()

    def _privacyRequired(self) -> bool:
        if self.client.plaintextAllowed:
            return False
        self.send(self.renderFailure(PrivacyRequired()) + b"\r\n")
        return True

    def do_USER(self, argument):
        if not argument or len(argument.split()) != 1:
            self.bad(b"Invalid arguments: USER name")
            return
        if self._privacyRequired():
            return
        self._user = argument
        self.ok()

    def do_PASS(self, argument):
        # RFC 1939: the password is the rest of the line, spaces included.
        user, self._user = self._user, None
        if user is None:
            self.bad(b"No username given.")
            return
        if self._privacyRequired():
            return
        try:
            credentials = makeCredentials(user, argument)
        except ProtocolViolation:
            self.loginFailed(None, AuthenticationFailed())
            return
        self.login(None, credentials)

    def do_APOP(self, argument):
        # APOP needs the clear-text password on the server side, which a directory of hashes
        # does not have; the greeting offers no timestamp, so no client should try it.
        self.err(b"APOP not supported.")

    def do_AUTH(self, argument):
        args = argument.split()
        if not args:
            # RFC 1734: a bare AUTH lists the mechanisms (those usable on this connection).
            mechanisms = MECHANISMS if self.client.plaintextAllowed else ()
            self.send(b"+OK\r\n" + b"".join(m.encode("ascii") + b"\r\n" for m in mechanisms) + b".\r\n")
            return
        if len(args) > 2:
            self.bad(b"Invalid arguments: AUTH mechanism [initial-response]")
            return
        self.startSASL(None, args[0], args[1] if len(args) == 2 else None)

    # -- SASL and login ---------------------------------------------------------------------

    def saslChallenge(self, token, challenge: bytes) -> None:
        self.send(b"+ " + challenge + b"\r\n")

    def saslFailed(self, token, refusal: SASLRefusal) -> None:
        if refusal is SASLRefusal.UNSUPPORTED:
            self.err(b"Unsupported authentication mechanism.")
        elif refusal is SASLRefusal.PRIVACY_REQUIRED:
            self._privacyRequired()
        elif refusal is SASLRefusal.BAD_INITIAL:
            self.bad(b"Invalid base64 data in initial response.")
        elif refusal is SASLRefusal.BAD_RESPONSE:
            self.bad(b"Invalid base64 data in continued response.")
        elif refusal is SASLRefusal.CANCELLED:
            self.err(b"Authentication aborted by client.")
        else:
            self.loginFailed(token, AuthenticationFailed())

    def loginSucceeded(self, token, dialogue) -> None:
        self.ok(b"Logged in.")

    def loginFailed(self, token, failure) -> None:
        self.send(self.renderFailure(failure) + b"\r\n")

    def makeDialogue(self, target, user, credentials):
        return POP3Backend(target, self.client, user, credentials, self.context)


class POP3Backend(BackendDialogue):
    """
    The login dialogue with a POP3 mailbox server, as Dovecot's own proxy does it: greeting,
    STLS, C{XCLIENT} with the client's address when the greeting offers it (Dovecot's
    C{[XCLIENT]} for proxies in its C{login_trusted_networks}), then C{USER}/C{PASS} with the
    user's credentials, or C{AUTH PLAIN} as a master user (or when the password holds bytes a
    C{PASS} line cannot carry).
    """

    @defer.inlineCallbacks
    def status(self, what: str):
        """
        Read one status line.

        @return: C{(ok, line)}.
        """
        line = yield self.readLine()
        if line.startswith(b"+OK"):
            return True, line
        if line.startswith(b"-ERR"):
            return False, line
        raise self.fail(f"unexpected reply to {what}: {line[:80]!r}")

    def refused(self, line: bytes, what: str):
        """
        The failure for a refused login, from its RFC 2449/3206 response code.
        """
        upper = line.upper()
        reason = f"refused {what}: " + line[:200].decode("utf-8", "replace")
        if b"[IN-USE]" in upper:
            # Another session holds the mailbox: the client's retry may work, another backend's
            # would not, so no failover.
            return Throttled(f"backend {self.target.describe()}: {reason}")
        temporary = b"[SYS/TEMP]" in upper or b"[SYS/PERM]" in upper
        return self.fail(reason, authFailed=not temporary and not self.target.masterUser)

    @defer.inlineCallbacks
    def dialogue(self):
        ok, greeting = yield self.status("the greeting")
        if not ok:
            raise self.fail("greeted with " + repr(greeting[:80]))
        xclient = greeting[3:].lstrip().upper().startswith(b"[XCLIENT]")
        if self.target.tls == "starttls":
            self.sendLine(b"STLS")
            ok, line = yield self.status("STLS")
            if not ok:
                raise self.fail("refused STLS")
            yield self.startTLS()
        if xclient:
            self.sendLine(self.xclientCommand())
            ok, line = yield self.status("XCLIENT")
            if not ok:
                raise self.fail("refused XCLIENT: " + line[:200].decode("utf-8", "replace"))
        authc, password, authz = self.loginIdentity()
        if authz or not _lineSafe(authc.encode("utf-8")) or not _lineSafe(password):
            self.sendLine(b"AUTH PLAIN " + encodePlain(authc, password, authz))
            ok, line = yield self.status("AUTH")
            if not ok:
                raise self.refused(line, "the login")
            return
        self.sendLine(b"USER " + authc.encode("utf-8"))
        ok, line = yield self.status("USER")
        if not ok:
            raise self.refused(line, "USER")
        self.sendLine(b"PASS " + password)
        ok, line = yield self.status("PASS")
        if not ok:
            raise self.refused(line, "the login")


@implementer(IPlugin, ICASProtocol)
class POP3Protocol:
    """
    The descriptor of casd's POP3 proxy.
    """

    name = "pop3"
    description = "POP3 (RFC 1939) proxy: pre-login in casd, then relayed to the mailbox server"
    defaultListeners = (
        {"endpoint": "tcp:110", "tls": "starttls"},
        {"endpoint": "tcp:995", "tls": "implicit"},
    )
    defaultBackendPort = 110
    defaultBackendTLS = "starttls"
    healthProbe = HealthProbe(expect=b"+OK", quit=b"QUIT\r\n")
    settings = (
        Setting(
            "enabled",
            "bool",
            False,
            "Serve POP3.  Off unless set, so that a configuration written before casd spoke"
            " POP3 opens no new port.",
        ),
        Setting(
            "capabilities",
            "strlist",
            ("TOP", "UIDL"),
            "Capabilities of the mailbox servers announced by CAPA before login (after login"
            " CAPA is the backend's own).",
        ),
    )

    def buildFactory(self, context, section, listener):
        return FrontendFactory(POP3Server, context, section, listener, self)

    @staticmethod
    def renderFailure(exc: BaseException) -> bytes:
        return renderFailure(FAILURES, exc, INTERNAL_FAILURE)


pop3 = POP3Protocol()
