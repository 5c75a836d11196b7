# -*- test-case-name: tests.test_pop3 -*-
"""
POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), AUTH (RFC 5034) and the response codes of
RFC 2449 and RFC 3206: the pre-login grammar, the wording of the shared failures and the backend
login dialogue.  After login casd only relays bytes.
"""

from __future__ import annotations

import re

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
    encodePlain,
)

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
    return bool(value) and _LINE_BREAK.search(value) is None and value.strip() == value


_LINE_BREAK = re.compile(b"[\r\n\x00]")


class POP3Server(FrontendProtocol):
    """
    The client side of a POP3 session in the AUTHORIZATION state.
    """

    failures = FAILURES
    internalFailure = INTERNAL_FAILURE
    _user: bytes | None = None

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

    # -- framing ----------------------------------------------------------------------------

    def replyOk(self, token, text: bytes = b"") -> None:
        self.send(b"+OK" + (b" " + text if text else b"") + b"\r\n")

    def replyNo(self, token, text: bytes) -> None:
        self.send(b"-ERR " + text + b"\r\n")

    def saslChallenge(self, token, challenge: bytes) -> None:
        self.send(b"+ " + challenge + b"\r\n")

    def lineReceived(self, line: bytes) -> None:
        if self.saslInProgress:
            self.saslResponse(line)
            return
        command, _, argument = line.partition(b" ")
        self.dispatch(command, argument)

    # -- commands ---------------------------------------------------------------------------

    def unauth_CAPA(self, argument):
        if self.noArguments(None, argument.strip()):
            self.send(
                b"+OK Capability list follows\r\n"
                + b"".join(c + b"\r\n" for c in self.capabilities())
                + b".\r\n"
            )

    def unauth_NOOP(self, argument):
        if self.noArguments(None, argument.strip()):
            self.replyOk(None)

    def unauth_QUIT(self, argument):
        self.replyOk(None, b"Logging out.")
        self.close("logout")

    def unauth_STLS(self, argument):
        if self.noArguments(None, argument.strip()) and self.startTLSCommand(None):
            # A USER sent in clear is forgotten with everything else from before the handshake.
            self._user = None

    def unauth_USER(self, argument):
        if not argument or len(argument.split()) != 1:
            self.invalidCommand(None, b"Invalid arguments: USER name")
        elif self.client.tls or self.client.trusted or not self.privacyRequired(None):
            self._user = argument
            self.replyOk(None)

    def unauth_PASS(self, argument):
        # RFC 1939: the password is the rest of the line, spaces included.
        user, self._user = self._user, None
        if user is None:
            self.invalidCommand(None, b"No username given.")
        else:
            self.passwordLogin(None, user, argument)

    def unauth_APOP(self, argument):
        # APOP needs the clear-text password on the server side, which a directory of hashes
        # does not have; the greeting offers no timestamp, so no client should try it.
        self.replyNo(None, b"APOP not supported.")

    def unauth_AUTH(self, argument):
        args = argument.split()
        if not args:
            # RFC 1734: a bare AUTH lists the mechanisms (those usable on this connection).
            mechanisms = MECHANISMS if self.client.plaintextAllowed else ()
            self.send(b"+OK\r\n" + b"".join(m.encode("ascii") + b"\r\n" for m in mechanisms) + b".\r\n")
        elif len(args) > 2:
            self.invalidCommand(None, b"Invalid arguments: AUTH mechanism [initial-response]")
        else:
            self.startSASL(None, args[0], args[1] if len(args) == 2 else None)

    # -- login ------------------------------------------------------------------------------

    def loginSucceeded(self, token, dialogue) -> None:
        self.replyOk(None, b"Logged in.")

    def makeDialogue(self, target, user, credentials):
        return POP3Backend(target, self.client, user, credentials, self.context)


class POP3Backend(BackendDialogue):
    """
    The login dialogue with a POP3 mailbox server, as Dovecot's own proxy does it: greeting,
    STLS, C{XCLIENT} with the client's address when the greeting offers it (Dovecot's
    C{[XCLIENT]} for proxies in its C{login_trusted_networks}), then C{USER}/C{PASS} with the
    user's credentials, or C{AUTH PLAIN} as a master user (or when the password holds bytes a
    C{PASS} line cannot carry).  When the greeting offers C{XCLIENT}, the login is pipelined
    behind it (see L{introduce}).
    """

    #: Whether the greeting offered XCLIENT: then the login goes out in the same write
    #: (L{introduce}).
    _xclient = False
    #: Whether the pipelined login is C{USER} and C{PASS} (else C{AUTH PLAIN}).
    _viaUser = False

    def status(self, line: bytes, what: str) -> bool:
        """
        @return: whether C{line} is C{+OK} (C{False} for C{-ERR}).
        @raise BackendUnavailable: for anything else.
        """
        if line[:3] == b"+OK":
            return True
        if line[:4] == b"-ERR":
            return False
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

    def dialogue(self):
        self.expectLine(self.greeting)

    # Each reply's "+OK" is told inline (the usual case), without the call to status().

    def greeting(self, line: bytes) -> None:
        if line[:3] != b"+OK" and not self.status(line, "the greeting"):
            raise self.fail("greeted with " + repr(line[:80]))
        self._xclient = line[3:].lstrip().upper().startswith(b"[XCLIENT]")
        if self.target.tls == "starttls":
            self.command(b"STLS", self.stlsReply)
        else:
            self.introduce()

    def stlsReply(self, line: bytes) -> None:
        if not self.status(line, "STLS"):
            raise self.fail("refused STLS")
        self.startTLS(self.introduce)

    def introduce(self) -> None:
        if self._xclient:
            # A server that offers XCLIENT is Dovecot's pop3-login (or speaks like it), which
            # announces PIPELINING (RFC 2449) in every CAPA: XCLIENT and the whole login go out
            # in one write, as Dovecot's own proxy sends XCLIENT and USER, and the replies are
            # read in order.  One round trip instead of three.
            commands = [self.xclientCommand(), *self.loginCommands(*self.loginIdentity()), b""]
            self.send(b"\r\n".join(commands))
            self.expectLine(self.xclientReply)
        else:
            self.logIn()

    def xclientReply(self, line: bytes) -> None:
        if line[:3] != b"+OK" and not self.status(line, "XCLIENT"):
            raise self.fail("refused XCLIENT: " + line[:200].decode("utf-8", "replace"))
        self.expectLine(self.userReply if self._viaUser else self.loginReply)

    def loginCommands(self, authc: str, password: bytes, authz: str) -> list[bytes]:
        """
        The login's commands: C{AUTH PLAIN} with its initial response (a master user, or
        credentials a C{USER} or C{PASS} line cannot carry), else C{USER} and C{PASS}.
        Sets L{_viaUser}.
        """
        user = authc.encode("utf-8")
        self._viaUser = not authz and _lineSafe(user) and _lineSafe(password)
        if self._viaUser:
            return [b"USER " + user, b"PASS " + password]
        return [b"AUTH PLAIN " + encodePlain(authc, password, authz)]

    def logIn(self) -> None:
        # One command at a time: USER (its reply sends PASS), or AUTH PLAIN.
        first = self.loginCommands(*self.loginIdentity())[0]
        self.command(first, self.userReply if self._viaUser else self.loginReply)

    def userReply(self, line: bytes) -> None:
        if line[:3] != b"+OK" and not self.status(line, "USER"):
            # Pipelined, the PASS went out too: the connection is aborted with its reply unread.
            raise self.refused(line, "USER")
        if self._xclient:
            # Pipelined: the PASS went out with the USER.
            self.expectLine(self.loginReply)
        else:
            self.command(b"PASS " + self.loginIdentity()[1], self.loginReply)

    def loginReply(self, line: bytes) -> None:
        if line[:3] != b"+OK" and not self.status(line, "the login"):
            raise self.refused(line, "the login")
        self.succeed()


pop3 = ProtocolDescriptor(
    name="pop3",
    description="POP3 (RFC 1939) proxy: pre-login in casd, then relayed to the mailbox server",
    server=POP3Server,
    defaultListeners=(
        {"endpoint": "tcp:110", "tls": "starttls"},
        {"endpoint": "tcp:995", "tls": "implicit"},
    ),
    defaultBackendPort=110,
    defaultBackendTLS="starttls",
    alpnProtocols=("pop3",),
    healthProbe=HealthProbe(expect=b"+OK", quit=b"QUIT\r\n"),
    settings=(
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
    ),
)
