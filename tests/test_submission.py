# -*- test-case-name: tests.test_submission -*-
"""
Submission (L{protocols.submission}, ports 587/465): AUTH only after TLS, the user passed on to
the backend (XCLIENT LOGIN or a master user), per-user limits, AUTH refused when the user's
route is known to be down, STARTTLS and implicit TLS.
"""

import os
from base64 import b64decode, b64encode

from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.failures import DirectoryUnavailable
from casd.testing import ScriptedBackend
from protocols.submission import submission
from tests.support.certs import CertificateAuthority
from tests.test_smtp_helpers import CONFIG, EHLO_PLAIN, HELO, SMTPTestMixin

PLAIN = b64encode(b"\x00alice\x00alice-pw")
UNTRUSTED, TRUSTED = 0, 1

XCLIENT_LOGIN = (
    b"XCLIENT ADDR=198.51.100.7 PORT=40000 NAME=[UNAVAILABLE] HELO=client.example.org PROTO=ESMTP"
    b" LOGIN=alice\r\n"
)


def keywords(ehlo: bytes) -> list:
    """
    The keywords of an EHLO reply.
    """
    return [line[4:] for line in ehlo.split(b"\r\n")[1:] if line]


class SubmissionTests(SMTPTestMixin, SynchronousTestCase):
    descriptor = submission

    def loggedIn(self):
        self.ready(TRUSTED)
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"), b"235 2.7.0 Authentication successful\r\n"
        )

    def test_noAuthBeforeTLS(self):
        self.connect(UNTRUSTED)
        ehlo = self.send(b"EHLO " + HELO + b"\r\n")
        self.assertNotIn(b"AUTH", ehlo)
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"530 5.7.0 Must issue a STARTTLS command first\r\n",
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<alice@example.com>\r\n"),
            b"530 5.7.0 Authentication required\r\n",
        )
        self.assertIsNone(self.server.user)

    def test_authAdvertisedWhenAllowed(self):
        self.connect(TRUSTED)
        self.assertIn(b"AUTH PLAIN LOGIN", keywords(self.send(b"EHLO " + HELO + b"\r\n")))

    def test_authPlainThenRoutedByUser(self):
        """
        Any recipient domain once authenticated; the backend is the user's mailbox server, told
        who the user is with XCLIENT LOGIN.
        """
        self.loggedIn()
        self.assertNotIn(b"AUTH", self.send(b"EHLO " + HELO + b"\r\n"))
        self.send(
            b"MAIL FROM:<alice@example.com> AUTH=<>\r\nRCPT TO:<friend@elsewhere.example>\r\n"
        )
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.10", 587))
        backend = self.openBackend(xclient=XCLIENT_LOGIN)
        backend.step(
            b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<friend@elsewhere.example>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")
        self.startData(backend)
        self.send(b"hi\r\n.\r\n")
        backend.step(b"hi\r\n.\r\n", b"250 2.0.0 Ok: queued as S1\r\n")
        self.assertEqual(self.out(), b"250 2.0.0 Ok: queued as S1\r\n")

    def test_authLogin(self):
        self.ready(TRUSTED)
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), b"334 " + b64encode(b"Username:") + b"\r\n")
        self.assertEqual(
            self.send(b64encode(b"alice") + b"\r\n"), b"334 " + b64encode(b"Password:") + b"\r\n"
        )
        self.assertEqual(
            self.send(b64encode(b"alice-pw") + b"\r\n"), b"235 2.7.0 Authentication successful\r\n"
        )
        self.assertEqual(self.server.user.login, "alice")

    def test_authPlainWithoutInitialResponse(self):
        self.ready(TRUSTED)
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), b"334 \r\n")
        self.assertEqual(self.send(PLAIN + b"\r\n"), b"235 2.7.0 Authentication successful\r\n")

    def test_authErrors(self):
        self.ready(TRUSTED)
        self.assertEqual(
            self.send(b"AUTH CRAM-MD5\r\n"), b"504 5.5.4 Unrecognized authentication type\r\n"
        )
        self.assertEqual(self.send(b"AUTH PLAIN !!!\r\n"), b"501 5.5.2 Cannot decode response\r\n")
        self.send(b"AUTH LOGIN\r\n")
        self.assertEqual(self.send(b"*\r\n"), b"501 5.7.0 Authentication aborted\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + b64encode(b"\x00alice\x00wrong") + b"\r\n"),
            b"535 5.7.8 Authentication credentials invalid\r\n",
        )
        self.context.directory.error = DirectoryUnavailable("down")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"454 4.7.0 Temporary authentication failure, try again later\r\n",
        )
        self.assertIsNone(self.server.user)

    def test_authSequence(self):
        self.connect(TRUSTED)
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"), b"503 5.5.1 Error: send EHLO first\r\n"
        )
        self.send(b"EHLO " + HELO + b"\r\n")
        self.send(b"AUTH PLAIN " + PLAIN + b"\r\n")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"503 5.5.1 Error: already authenticated\r\n",
        )

    def test_masterUserWithoutXclientLogin(self):
        """
        A backend that cannot take XCLIENT LOGIN learns the user from an AUTH as the master user
        with the user as authorisation identity.
        """
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("master-secret\n")
        self.reconfigure(
            CONFIG.replace(
                '[backends.mbx1.submission]\ntls = "none"',
                '[backends.mbx1.submission]\ntls = "none"\nmaster_user = "casd"\n'
                f'master_password_file = "{os.path.abspath(secret)}"',
            )
        )
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        backend = ScriptedBackend(
            self.reactor,
            [
                (b"", b"220 mbx ESMTP\r\n"),
                (
                    b"EHLO cas.example.net\r\n",
                    b"250-mbx\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN\r\n",
                ),
            ],
        ).run()
        sent = backend.received()
        self.assertTrue(sent.startswith(b"AUTH PLAIN "), sent)
        self.assertEqual(
            b64decode(sent[len(b"AUTH PLAIN ") :].strip()), b"alice\x00casd\x00master-secret"
        )
        backend.send(b"235 2.7.0 Authentication successful\r\n")
        backend.step(
            b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_masterUserRefused(self):
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write("master-secret\n")
        self.reconfigure(
            CONFIG.replace(
                '[backends.mbx1.submission]\ntls = "none"',
                '[backends.mbx1.submission]\ntls = "none"\nmaster_user = "casd"\n'
                f'master_password_file = "{os.path.abspath(secret)}"',
            )
        )
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        backend = ScriptedBackend(
            self.reactor,
            [
                (b"", b"220 mbx ESMTP\r\n"),
                (b"EHLO cas.example.net\r\n", b"250-mbx\r\n250 AUTH PLAIN\r\n"),
            ],
        ).run()
        backend.received()
        backend.send(b"535 5.7.8 Error: authentication failed\r\n")
        self.assertEqual(
            self.out(),
            b"451 4.4.1 <x@elsewhere.example>: Mailbox server unavailable, try again later\r\n",
        )

    def test_userCannotBePassedOn(self):
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        ScriptedBackend(
            self.reactor, [(b"", b"220 mbx ESMTP\r\n"), (b"EHLO cas.example.net\r\n", EHLO_PLAIN)]
        ).run()
        self.assertEqual(
            self.out(),
            b"451 4.4.1 <x@elsewhere.example>: Mailbox server unavailable, try again later\r\n",
        )

    def test_enforceSender(self):
        self.reconfigure(
            CONFIG.replace(
                "user_messages_per_hour = 2", "user_messages_per_hour = 2\nenforce_sender = true"
            )
        )
        self.loggedIn()
        self.assertEqual(
            self.send(b"MAIL FROM:<ceo@example.com>\r\n"),
            b"553 5.7.1 <ceo@example.com>: Sender address rejected: not owned by user\r\n",
        )
        self.assertEqual(self.send(b"MAIL FROM:<Alice@Example.com>\r\n"), b"250 2.1.0 Ok\r\n")

    def test_backendTrustedWithoutLogin(self):
        """
        backend_login_required = false: a backend that cannot be told the user (Exchange) is
        used as it is.
        """
        self.reconfigure(
            CONFIG.replace(
                "user_messages_per_hour = 2",
                "user_messages_per_hour = 2\nbackend_login_required = false",
            )
        )
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        backend = ScriptedBackend(
            self.reactor,
            [(b"", b"220 exchange ESMTP\r\n"), (b"EHLO cas.example.net\r\n", EHLO_PLAIN)],
        ).run()
        self.assertEqual(backend.dialogue.passedLogin, "")
        backend.step(
            b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_xclientLoginEvenWhenNotRequired(self):
        self.reconfigure(
            CONFIG.replace(
                "user_messages_per_hour = 2",
                "user_messages_per_hour = 2\nbackend_login_required = false",
            )
        )
        self.loggedIn()
        self.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n")
        self.assertEqual(self.openBackend(xclient=XCLIENT_LOGIN).dialogue.passedLogin, "xclient")

    def test_messagesPerHour(self):
        self.reconfigure(
            CONFIG.replace(
                "user_messages_per_hour = 2", "user_messages_per_hour = 2\ncommand_timeout = 4000.0"
            )
        )
        self.loggedIn()
        backend = None
        for n in range(2):
            self.send(b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n")
            if backend is None:
                backend = self.openBackend(xclient=XCLIENT_LOGIN)
                backend.step(
                    b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n",
                    b"250 Ok\r\n250 Ok\r\n",
                )
            else:
                backend.step(
                    b"RSET\r\nMAIL FROM:<alice@example.com>\r\nRCPT TO:<x@elsewhere.example>\r\n",
                    b"250 Ok\r\n250 Ok\r\n250 Ok\r\n",
                )
            self.startData(backend)
            self.send(b".\r\n")
            backend.step(b".\r\n", b"250 2.0.0 Ok\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<alice@example.com>\r\n"),
            b"450 4.7.1 Error: too many messages sent, try again later\r\n",
        )
        self.reactor.advance(3601)
        self.assertEqual(self.send(b"MAIL FROM:<alice@example.com>\r\n"), b"250 2.1.0 Ok\r\n")

    def test_recipientLimitPolicy(self):
        self.context.directory.add(
            "erin",
            "erin-pw",
            UserRecord(login="erin", mailHost="mbx1", policy=[("smtp_max_recipients", "1")]),
        )
        self.ready(TRUSTED)
        self.send(b"AUTH PLAIN " + b64encode(b"\x00erin\x00erin-pw") + b"\r\n")
        self.send(b"MAIL FROM:<erin@example.com>\r\nRCPT TO:<a@elsewhere.example>\r\n")
        backend = self.openBackend(xclient=XCLIENT_LOGIN.replace(b"alice", b"erin"))
        backend.step(
            b"MAIL FROM:<erin@example.com>\r\nRCPT TO:<a@elsewhere.example>\r\n",
            b"250 Ok\r\n250 Ok\r\n",
        )
        self.assertEqual(
            self.send(b"RCPT TO:<b@elsewhere.example>\r\n"),
            b"452 4.5.3 Error: too many recipients\r\n",
        )


class RouteDownTests(SMTPTestMixin, SynchronousTestCase):
    """
    AUTH when the health checks already know that no member of the user's route is up: 454,
    no connection (issue 15 defect 6); otherwise the usual flow.
    """

    descriptor = submission

    def markDown(self, login: str) -> None:
        user = self.successResultOf(self.context.directory.lookup(login))
        route = self.successResultOf(self.context.router.locate(user, submission))
        for target in route.targets:
            member = self.context.connector.member(target)
            member.activelyChecked = True
            for _ in range(member.settings.fall):
                member.checked(False, "connection refused")
            self.assertFalse(member.available())

    def test_authRefusedWhenRouteDown(self):
        self.markDown("alice")
        self.ready(TRUSTED)
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"454 4.7.0 Mailbox server unavailable, try again later\r\n",
        )
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIsNone(self.server.user)
        self.assertEqual(
            self.send(b"MAIL FROM:<alice@example.com>\r\n"),
            b"530 5.7.0 Authentication required\r\n",
        )
        # A later AUTH, once the route is up again, succeeds.
        for member in self.context.connector.members.values():
            for _ in range(member.settings.rise):
                member.checked(True)
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"235 2.7.0 Authentication successful\r\n",
        )

    def test_otherUsersUnaffected(self):
        self.markDown("bob")
        self.ready(TRUSTED)
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"),
            b"235 2.7.0 Authentication successful\r\n",
        )

    def test_wrongPasswordStill535(self):
        self.markDown("alice")
        self.ready(TRUSTED)
        wrong = b64encode(b"\x00alice\x00nope")
        self.assertEqual(
            self.send(b"AUTH PLAIN " + wrong + b"\r\n"),
            b"535 5.7.8 Authentication credentials invalid\r\n",
        )


class StartTLSTests(SMTPTestMixin, SynchronousTestCase):
    descriptor = submission

    def setUp(self):
        super().setUp()
        ca = CertificateAuthority.create(self.mktemp())
        cert, key = ca.issue(["cas.example.net"], "cas")
        implicit = '[[submission.listen]]\nendpoint = "tcp:2465"\ntls = "implicit"\n'
        self.reconfigure(CONFIG + implicit + f'\n[tls]\ncertificate = "{cert}"\nkey = "{key}"\n')

    def test_implicitTLS(self):
        """
        Port 465: TLS from the first byte, AUTH offered at once, no STARTTLS.
        """
        self.connect(2)
        ehlo = keywords(self.send(b"EHLO " + HELO + b"\r\n"))
        self.assertIn(b"AUTH PLAIN LOGIN", ehlo)
        self.assertNotIn(b"STARTTLS", ehlo)
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"), b"235 2.7.0 Authentication successful\r\n"
        )

    def test_starttls(self):
        self.ready(UNTRUSTED)
        self.connect(UNTRUSTED)
        ehlo = keywords(self.send(b"EHLO " + HELO + b"\r\n"))
        self.assertIn(b"STARTTLS", ehlo)
        self.assertNotIn(b"AUTH PLAIN LOGIN", ehlo)
        # Bytes pipelined behind STARTTLS are dropped, never run after the handshake.
        self.assertEqual(
            self.send(b"STARTTLS\r\nAUTH PLAIN " + PLAIN + b"\r\n"),
            b"220 2.0.0 Ready to start TLS\r\n",
        )
        self.assertIsNotNone(self.transport.tlsStarted)
        self.assertIsNone(self.server.user)
        # Everything learnt before TLS is forgotten: EHLO again.
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"), b"503 5.5.1 Error: send EHLO first\r\n"
        )
        ehlo = keywords(self.send(b"EHLO " + HELO + b"\r\n"))
        self.assertIn(b"AUTH PLAIN LOGIN", ehlo)
        self.assertNotIn(b"STARTTLS", ehlo)
        self.assertEqual(
            self.send(b"AUTH PLAIN " + PLAIN + b"\r\n"), b"235 2.7.0 Authentication successful\r\n"
        )
        self.assertEqual(self.send(b"STARTTLS\r\n"), b"503 5.5.1 Error: TLS already active\r\n")
