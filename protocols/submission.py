# -*- test-case-name: tests.test_submission -*-
"""
Message submission (RFC 6409, RFC 8314) on ports 587 and 465: users authenticate (SASL PLAIN or
LOGIN, RFC 4954), casd checks the sender and the user's limits, and every message goes to the
user's own mailbox server's submission service, which is told who the user is.  The
transaction itself is L{protocols.smtp}'s.
"""

from __future__ import annotations

from twisted.internet import defer

from casd.plugin import MECHANISMS, CASFailure, Setting
from protocols.smtp import SharedState, SMTPDescriptor, SMTPServer
from protocols.smtpfilters import SendingLimits, ownsAddress, policyInt
from protocols.smtpsettings import COMMON_SETTINGS

SUBMISSION_SETTINGS = (
    Setting(
        "enabled",
        "bool",
        False,
        "Serve submission on ports 587 and 465.  Off unless set, so that a configuration"
        " written before casd spoke SMTP opens no new port.",
    ),
    Setting(
        "enforce_sender",
        "bool",
        False,
        "Refuse (C{553 5.7.1}) an envelope sender other than the user's own address.",
    ),
    Setting(
        "backend_login_required",
        "bool",
        True,
        "Use only backends that can be told who the user is (XCLIENT LOGIN, or AUTH as the"
        " backend's C{master_user}); false for one that trusts casd's connections as they are"
        " (an Exchange receive connector with Externally Secured): then set C{enforce_sender}.",
    ),
    Setting(
        "user_messages_per_hour",
        "int",
        0,
        "Messages one user may send per hour through this node (a user's"
        " C{smtp_messages_per_hour} policy attribute overrides it); 0 means no limit.",
        minimum=0,
    ),
)

#: AUTH when the health checks know that no member of the user's route is up.
ROUTE_DOWN = b"454 4.7.0 Mailbox server unavailable, try again later"


class SubmissionServer(SMTPServer):
    """
    One submission session: AUTH first, then transactions routed by the user.
    """

    passUser = True
    # RFC 4954 5: the backend learns the sender's identity from casd instead.
    droppedMailParameters = frozenset({"AUTH"})

    def extensions(self) -> list[bytes]:
        lines = super().extensions()
        if self.user is None and self.client.plaintextAllowed:
            lines.append(b"AUTH " + b" ".join(m.encode("ascii") for m in MECHANISMS))
        return lines

    def requireBackendLogin(self) -> bool:
        return self.section.backend_login_required

    # -- AUTH ---------------------------------------------------------------------------------

    def smtp_AUTH(self, args: bytes) -> None:
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

    def login(self, token, credentials) -> defer.Deferred:
        """
        Authenticate only (the core's L{authenticate}): submission opens no backend session at
        AUTH (see L{routeRecipient}).  When the health checks already know that no member of
        the user's route is up, AUTH says C{454} rather than C{235} and a failure at RCPT.
        """
        d = self.authenticate(credentials)
        d.addCallback(self._authenticated)
        d.addCallbacks(self._authDone, self._authFailed)
        return self.wait(d)

    def _authenticated(self, user):
        d = self.routeFor(user)

        def located(route):
            return route if self.routeAvailable(route) else None

        def unknown(failure):
            # A route that cannot be found now is RCPT's to report, as before.
            if not failure.check(CASFailure):
                self.log.failure("locating {user} failed unexpectedly", failure, user=user.login)
            return True

        d.addCallbacks(located, unknown)
        return d

    def _authDone(self, route) -> None:
        if self._closing:
            return
        if route is None:
            self.log.warn(
                "no member of the route of {user} is up: AUTH refused", user=self.user.login
            )
            self.user = None
            self.result = "BackendUnavailable"
            self.reply(ROUTE_DOWN)
            return
        self.reply(b"235 2.7.0 Authentication successful")

    def _authFailed(self, failure) -> None:
        if not self._closing:
            self.reply(self.renderFailure(failure.value))

    # -- the transaction ------------------------------------------------------------------------

    def mailRefusal(self) -> bytes | None:
        if self.user is None:
            return b"530 5.7.0 Authentication required"
        return None

    def senderRefusal(self, sender):
        if self.section.enforce_sender and not ownsAddress(self.user, sender):
            return (
                b"553 5.7.1 " + sender.path() + b": Sender address rejected: not owned by user",
                True,
            )
        if not self.shared.limits.mayStart(self.user):
            return b"450 4.7.1 Error: too many messages sent, try again later", False
        return None

    def recipientLimit(self) -> int:
        limit = self.section.max_recipients
        return policyInt(self.user, "smtp_max_recipients", limit) or limit

    def routeRecipient(self, rcpt) -> defer.Deferred:
        # Every recipient goes to the user's own mailbox server, which relays it.
        return self.routeFor(self.user)

    def messageAccepted(self, tx) -> None:
        self.shared.limits.sent(self.user)


class SubmissionShared(SharedState):
    """
    Submission's shared state: the connection filter, the per-user sending limits.
    """

    def __init__(self, section, context) -> None:
        super().__init__(section, context)
        self.limits = SendingLimits(section, context.reactor)


class SubmissionDescriptor(SMTPDescriptor):
    def makeShared(self, section, context) -> SubmissionShared:
        return SubmissionShared(section, context)


submission = SubmissionDescriptor(
    name="submission",
    description="Message submission (RFC 6409, RFC 8314) on ports 587 and 465: authenticated"
    " users, passed on to their mailbox server's submission service",
    server=SubmissionServer,
    defaultListeners=(
        {"endpoint": "tcp:587", "tls": "starttls"},
        {"endpoint": "tcp:465", "tls": "implicit"},
    ),
    defaultBackendPort=587,
    settings=COMMON_SETTINGS + SUBMISSION_SETTINGS,
)
