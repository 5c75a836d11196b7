"""
POP3 pre-login grammar, state machine, backend dialogue and hand-off, driven through the public
fakes of L{casd.testing} (StringTransport, MemoryReactorClock, a scripted backend).
"""

import os
import re
import tempfile
from base64 import b64decode, b64encode

from zope.interface.verify import verifyObject

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.interfaces import ICASProtocol
from casd.testing import CLOSE, ScriptedBackend, TranscriptMixin, failBackend, makeContext
from protocols.pop3 import pop3
from tests.support.certs import CertificateAuthority

CONFIG = """
[auth]
failure_delay = 2.0

[routing]
default_backend = "mbx"

[backends.mbx]
host = "192.0.2.10"
[backends.mbx.pop3]
tls = "none"

[backend]
reply_timeout = 5.0
# A refused connection fails at once here; its retries: tests/test_retry.py.
connect_retry_time = 0.0

[pop3]
enabled = true
max_line_length = 200
max_bad_commands = 3
preauth_timeout = 30.0
idle_timeout = 100.0
[[pop3.listen]]
endpoint = "tcp:1110"
[[pop3.listen]]
endpoint = "tcp:1111"
trusted = true
"""

GREETING = b"+OK Dovecot ready.\r\n"
LOGIN = [
    (b"", GREETING),
    (b"USER alice@example.com\r\n", b"+OK\r\n"),
    (b"PASS secret\r\n", b"+OK Logged in.\r\n"),
]


class POP3TestMixin(TranscriptMixin):
    descriptor = pop3
    config = CONFIG
    listener = 1
    users = {
        "alice": ("secret", UserRecord(login="alice", backendLogin="alice@example.com")),
        "bob": "pw with spaces",
    }

    def backend(self, script=LOGIN):
        return ScriptedBackend(self.reactor, script).run()


class DescriptorTests(POP3TestMixin, SynchronousTestCase):
    def test_provides(self):
        self.assertTrue(verifyObject(ICASProtocol, pop3))

    def test_offByDefault(self):
        """
        A configuration that does not enable POP3 opens no POP3 port.
        """
        context = makeContext(self.reactor, config="")
        self.assertFalse(context.config.protocols["pop3"].enabled)
        self.assertEqual(context.config.protocols["pop3"].listeners, ())

    def test_defaultListeners(self):
        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = CertificateAuthority.create(directory).issue(["pop.example.com"], "server")
        config = f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n[pop3]\nenabled = true\n'
        section = makeContext(self.reactor, config=config).config.protocols["pop3"]
        self.assertEqual(
            [(l.endpoint, l.tls) for l in section.listeners],
            [("tcp:110", "starttls"), ("tcp:995", "implicit")],
        )


class PreLoginTests(POP3TestMixin, SynchronousTestCase):
    def test_greeting(self):
        self.connect()
        self.assertEqual(self.greeting, b"+OK casd ready.\r\n")
        # No APOP timestamp: a client must not be tempted to use it.
        self.assertNotIn(b"<", self.greeting)

    def test_capaTrusted(self):
        self.connect(1)
        out = self.send(b"CAPA\r\n")
        self.assertEqual(
            out,
            b"+OK Capability list follows\r\nCAPA\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
            b"PIPELINING\r\nUSER\r\nSASL PLAIN LOGIN\r\nIMPLEMENTATION casd\r\n.\r\n",
        )

    def test_capaUntrustedWithoutTLS(self):
        self.connect(0)
        out = self.send(b"CAPA\r\n")
        self.assertNotIn(b"USER", out)
        self.assertNotIn(b"SASL", out)
        self.assertNotIn(b"STLS", out)  # no certificate configured
        self.assertTrue(out.endswith(b"\r\n.\r\n"))

    def test_plaintextRefusedBeforeTLS(self):
        self.connect(0)
        refusal = b"-ERR Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"
        self.assertEqual(self.send(b"USER alice\r\n"), refusal)
        self.assertEqual(self.send(b"AUTH PLAIN " + b64encode(b"\0alice\0secret") + b"\r\n"), refusal)
        self.assertEqual(self.send(b"AUTH LOGIN\r\n"), refusal)
        self.assertEqual(self.send(b"PASS secret\r\n"), b"-ERR No username given.\r\n")
        self.assertEqual(self.send(b"AUTH\r\n"), b"+OK\r\n.\r\n")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_trustedNetworkAllowsPlaintext(self):
        self.context = makeContext(
            self.reactor,
            users={"alice": "secret"},
            config=CONFIG.replace("[auth]", '[server]\ntrusted_networks = ["198.51.100.0/24"]\n[auth]'),
        )
        self.connect(0, ("198.51.100.9", 1))
        self.assertEqual(self.send(b"USER alice\r\nPASS secret\r\n"), b"+OK\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_bareAuthListsMechanisms(self):
        self.connect(1)
        self.assertEqual(self.send(b"AUTH\r\n"), b"+OK\r\nPLAIN\r\nLOGIN\r\n.\r\n")

    def test_noopQuit(self):
        self.connect()
        out = self.send(b"NOOP\r\nQUIT\r\nNOOP\r\n")
        self.assertEqual(out, b"+OK\r\n+OK Logging out.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_apopRefused(self):
        self.connect()
        self.assertEqual(
            self.send(b"APOP alice c4c9334bac560ecc979e58001b3e22fb\r\n"), b"-ERR APOP not supported.\r\n"
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_commandsCaseInsensitive(self):
        self.connect()
        self.assertEqual(self.send(b"noop\r\n"), b"+OK\r\n")

    def test_unknownCommand(self):
        self.connect()
        self.assertEqual(self.send(b"STAT\r\n"), b"-ERR Unknown command.\r\n")
        self.assertEqual(self.send(b"\r\n"), b"-ERR Unknown command.\r\n")

    def test_tooManyBadCommands(self):
        self.connect()
        out = self.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
        self.assertEqual(
            out, b"-ERR Unknown command.\r\n-ERR Unknown command.\r\n-ERR Too many invalid commands.\r\n"
        )
        self.assertTrue(self.transport.disconnecting)

    def test_overlongLine(self):
        self.connect()
        self.assertEqual(self.send(b"USER " + b"x" * 300), b"-ERR Line too long.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_overlongLineWithNewline(self):
        self.connect()
        self.assertEqual(self.send(b"PASS " + b"x" * 300 + b"\r\nNOOP\r\n"), b"-ERR Line too long.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_preauthTimeout(self):
        self.connect()
        self.reactor.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        self.assertEqual(self.transport.value(), b"-ERR Disconnected for inactivity.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_stlsUnavailable(self):
        self.connect()
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR TLS support isn't enabled.\r\n")


class SASLTests(POP3TestMixin, SynchronousTestCase):
    def test_plainWithInitialResponse(self):
        self.connect()
        self.send(b"AUTH PLAIN " + b64encode(b"\0alice\0secret") + b"\r\n")
        self.backend()
        self.assertEqual(self.transport.value(), b"+OK Logged in.\r\n")

    def test_plainWithContinuation(self):
        self.connect()
        self.assertEqual(self.send(b"AUTH PLAIN\r\n"), b"+ \r\n")
        self.send(b64encode(b"\0alice\0secret") + b"\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_login(self):
        self.connect()
        out = self.send(b"AUTH LOGIN\r\n")
        self.assertEqual(b64decode(out[2:]), b"Username:")
        out = self.send(b64encode(b"alice") + b"\r\n")
        self.assertEqual(b64decode(out[2:]), b"Password:")
        self.send(b64encode(b"secret") + b"\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_loginWithInitialResponse(self):
        self.connect()
        out = self.send(b"AUTH LOGIN " + b64encode(b"alice") + b"\r\n")
        self.assertEqual(b64decode(out[2:]), b"Password:")

    def test_cancel(self):
        self.connect()
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(self.send(b"*\r\n"), b"-ERR Authentication aborted by client.\r\n")
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_badBase64(self):
        self.connect()
        self.send(b"AUTH PLAIN\r\n")
        self.assertEqual(
            self.send(b"!!notbase64\r\n"), b"-ERR Invalid base64 data in continued response.\r\n"
        )
        self.assertEqual(
            self.send(b"AUTH PLAIN ####\r\n"), b"-ERR Invalid base64 data in initial response.\r\n"
        )
        # Both counted: the third strike closes.
        self.assertEqual(self.send(b"XYZZY\r\n"), b"-ERR Too many invalid commands.\r\n")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_malformedPlain(self):
        self.connect()
        out = self.send(b"AUTH PLAIN " + b64encode(b"alice-secret") + b"\r\n")
        self.assertEqual(out, b"-ERR [AUTH] Authentication failed.\r\n")

    def test_emptyInitialResponse(self):
        self.connect()
        self.assertEqual(self.send(b"AUTH PLAIN =\r\n"), b"-ERR [AUTH] Authentication failed.\r\n")

    def test_unknownMechanism(self):
        self.connect()
        self.assertEqual(
            self.send(b"AUTH CRAM-MD5\r\n"), b"-ERR Unsupported authentication mechanism.\r\n"
        )


class LoginTests(POP3TestMixin, SynchronousTestCase):
    def test_userPassAndRelay(self):
        self.connect(1, peer=("203.0.113.5", 51234))
        out = self.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST\r\n")
        self.assertEqual(out, b"+OK\r\n")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.10", 110))
        backend = self.backend()
        # Pipelined commands behind the login go on to the backend, in order.
        self.assertEqual(self.transport.value(), b"+OK\r\n+OK Logged in.\r\n")
        self.assertEqual(backend.received(), b"STAT\r\nLIST\r\n")
        self.transport.clear()
        backend.send(b"+OK 2 320\r\n")
        self.assertEqual(self.transport.value(), b"+OK 2 320\r\n")
        self.server.dataReceived(b"RETR 1\r\n")
        self.assertEqual(backend.received(), b"RETR 1\r\n")
        self.assertIs(self.transport.producer.transport, backend.transport)
        self.assertIsNone(backend.dialogue.credentials)

    def connectOverTLS(self):
        # The penalty delay spares trusted clients: come from an untrusted one, over "TLS".
        self.connect(0)
        self.server.client = self.server.client.withTLS()

    def test_pipelinedRepliesInOrder(self):
        self.connectOverTLS()
        out = self.send(b"CAPA\r\nNOOP\r\nUSER alice\r\nPASS wrong\r\nNOOP\r\nQUIT\r\n")
        self.assertTrue(out.startswith(b"+OK Capability list follows\r\n"))
        self.assertTrue(out.endswith(b".\r\n+OK\r\n+OK\r\n"))
        self.transport.clear()
        self.reactor.advance(2.1)
        self.assertEqual(
            self.transport.value(),
            b"-ERR [AUTH] Authentication failed.\r\n+OK\r\n+OK Logging out.\r\n",
        )

    def test_passwordWithSpaces(self):
        self.connect()
        self.send(b"USER bob\r\nPASS pw with spaces\r\n")
        self.backend(
            [
                (b"", GREETING),
                (b"USER bob\r\n", b"+OK\r\n"),
                (b"PASS pw with spaces\r\n", b"+OK Logged in.\r\n"),
            ]
        )
        self.assertEqual(self.transport.value(), b"+OK\r\n+OK Logged in.\r\n")

    def test_backendLeftoverForwarded(self):
        self.connect()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.backend(LOGIN[:2] + [(b"PASS secret\r\n", b"+OK Logged in.\r\n+OK 1 10\r\n")])
        self.assertEqual(self.transport.value(), b"+OK\r\n+OK Logged in.\r\n+OK 1 10\r\n")

    def test_wrongPasswordDelayed(self):
        self.connectOverTLS()
        self.send(b"USER alice\r\nPASS wrong\r\n")
        self.transport.clear()
        self.reactor.advance(1.9)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertEqual(self.transport.value(), b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_directoryDown(self):
        self.context.directory.error = RuntimeError("ldap exploded")
        self.connect()
        out = self.send(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(
            out, b"+OK\r\n-ERR [SYS/TEMP] Temporary authentication failure, try again later.\r\n"
        )
        self.flushLoggedErrors(RuntimeError)

    def test_backendRefusedConnection(self):
        self.connect()
        self.send(b"USER alice\r\nPASS secret\r\n")
        failBackend(self.reactor)
        self.assertTrue(
            self.transport.value().endswith(
                b"-ERR [SYS/TEMP] Mailbox server unavailable, try again later.\r\n"
            )
        )
        self.assertEqual(self.send(b"NOOP\r\n"), b"+OK\r\n")

    def test_sessionLogHasNoSecret(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.connect()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.backend()
        self.server.connectionLost(None)
        sessions = [e for e in events if e.get("log_namespace") == "casd.session"]
        self.assertEqual(len(sessions), 1)
        self.assertEqual(sessions[0]["user"], "alice")
        for event in events:
            self.assertNotIn("secret", formatEvent(event))


class BackendDialogueTests(POP3TestMixin, SynchronousTestCase):
    """
    What the backend says, in each of its ways, and what the client then hears.
    """

    def login(self, script):
        self.connect(1, peer=("203.0.113.5", 51234))
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.transport.clear()
        return self.backend(script)

    def test_xclientWhenOffered(self):
        """
        A greeting that offers XCLIENT (Dovecot's pop3-login, which always announces PIPELINING)
        gets XCLIENT and the whole login in one write: one round trip instead of three.
        """
        self.login(
            [
                (b"", b"+OK [XCLIENT] Dovecot ready.\r\n"),
                (
                    re.compile(
                        b"XCLIENT ADDR=203\\.0\\.113\\.5 PORT=51234 SESSION=[-_A-Za-z0-9]{12} TTL=4\r\n"
                        b"USER alice@example\\.com\r\nPASS secret\r\n"
                    ),
                    b"+OK Updated\r\n+OK\r\n+OK Logged in.\r\n",
                ),
            ]
        )
        self.assertEqual(self.transport.value(), b"+OK Logged in.\r\n")

    def test_xclientRepliesOneByOne(self):
        """
        The pipelined replies may arrive one read at a time.
        """
        backend = self.login(
            [
                (b"", b"+OK [XCLIENT] Dovecot ready.\r\n"),
                (re.compile(b"XCLIENT .*\r\nUSER .*\r\nPASS secret\r\n", re.S), b"+OK Updated\r\n"),
                (b"", b"+OK\r\n"),
            ]
        )
        self.assertEqual(self.transport.value(), b"")
        backend.step(b"", b"+OK Logged in.\r\n")
        self.assertEqual(self.transport.value(), b"+OK Logged in.\r\n")

    def test_xclientCarriesSessionId(self):
        self.connect(1, peer=("203.0.113.5", 51234))
        self.send(b"USER alice\r\nPASS secret\r\n")
        backend = ScriptedBackend(self.reactor, [(b"", b"+OK [XCLIENT] hi\r\n")]).run()
        self.assertEqual(
            backend.received(),
            b"XCLIENT ADDR=203.0.113.5 PORT=51234 SESSION="
            + self.server.client.sessionId.encode()
            + b" TTL=4\r\nUSER alice@example.com\r\nPASS secret\r\n",
        )

    def test_noXCLIENTUnlessOffered(self):
        """
        Without XCLIENT in the greeting nothing says the server takes pipelined commands: USER
        and PASS each wait for the previous reply (the script checks each write alone).
        """
        self.login(LOGIN)
        self.assertEqual(self.transport.value(), b"+OK Logged in.\r\n")

    def test_xclientRefused(self):
        backend = self.login(
            [
                (b"", b"+OK [XCLIENT] Dovecot ready.\r\n"),
                (
                    re.compile(b"XCLIENT .*\r\n", re.S),
                    b"-ERR You aren't allowed to specify XCLIENT\r\n+OK\r\n+OK Logged in.\r\n",
                ),
            ]
        )
        self.assertEqual(
            self.transport.value(), b"-ERR [SYS/TEMP] Mailbox server unavailable, try again later.\r\n"
        )
        # The session the backend may have opened anyway is not used.
        self.assertTrue(backend.transport.disconnecting)
        self.assertIsNone(self.server.relay)

    def test_pipelinedUserRefused(self):
        """
        A refused pipelined USER fails the login as a refused USER does; the PASS's reply is
        not waited for.
        """
        backend = self.login(
            [
                (b"", b"+OK [XCLIENT] Dovecot ready.\r\n"),
                (re.compile(b"XCLIENT .*", re.S), b"+OK Updated\r\n-ERR [AUTH] No such user.\r\n"),
            ]
        )
        self.assertEqual(self.transport.value(), b"-ERR [AUTH] Authentication failed.\r\n")
        self.assertTrue(backend.transport.disconnecting)

    def test_pipelinedPassRefused(self):
        for reply, client in [
            (b"-ERR [AUTH] Authentication failed.", b"-ERR [AUTH] Authentication failed.\r\n"),
            (b"-ERR [SYS/TEMP] Try later", b"-ERR [SYS/TEMP] Mailbox server unavailable, try again later.\r\n"),
            (b"-ERR [IN-USE] Mailbox is locked", b"-ERR [IN-USE] Too many sessions or logins, try again later.\r\n"),
        ]:
            self.login(
                [
                    (b"", b"+OK [XCLIENT] Dovecot ready.\r\n"),
                    (re.compile(b"XCLIENT .*", re.S), b"+OK Updated\r\n+OK\r\n" + reply + b"\r\n"),
                ]
            )
            self.assertEqual(self.transport.value(), client, reply)

    def test_pipelinedGarbage(self):
        self.login(
            [
                (b"", b"+OK [XCLIENT] Dovecot ready.\r\n"),
                (re.compile(b"XCLIENT .*", re.S), b"+OK Updated\r\n* what\r\n"),
            ]
        )
        self.assertIn(b"[SYS/TEMP]", self.transport.value())

    def test_greetingErr(self):
        self.login([(b"", b"-ERR [SYS/TEMP] Too many connections\r\n")])
        self.assertEqual(
            self.transport.value(), b"-ERR [SYS/TEMP] Mailbox server unavailable, try again later.\r\n"
        )

    def test_garbageGreeting(self):
        self.login([(b"", b"* OK this is IMAP\r\n")])
        self.assertIn(b"[SYS/TEMP]", self.transport.value())

    def test_refusesCredentials(self):
        self.login(LOGIN[:2] + [(b"PASS secret\r\n", b"-ERR [AUTH] Authentication failed.\r\n")])
        self.assertEqual(self.transport.value(), b"-ERR [AUTH] Authentication failed.\r\n")

    def test_temporaryFailure(self):
        self.login(LOGIN[:2] + [(b"PASS secret\r\n", b"-ERR [SYS/TEMP] Try later\r\n")])
        self.assertEqual(
            self.transport.value(), b"-ERR [SYS/TEMP] Mailbox server unavailable, try again later.\r\n"
        )

    def test_mailboxInUse(self):
        self.login(LOGIN[:2] + [(b"PASS secret\r\n", b"-ERR [IN-USE] Mailbox is locked\r\n")])
        self.assertEqual(
            self.transport.value(), b"-ERR [IN-USE] Too many sessions or logins, try again later.\r\n"
        )
        # No failover to another backend for a locked mailbox.
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_closesDuringLogin(self):
        self.login([(b"", GREETING), (b"USER alice@example.com\r\n", CLOSE)])
        self.assertIn(b"[SYS/TEMP]", self.transport.value())

    def test_silent(self):
        backend = self.login([])
        self.reactor.advance(5.1)
        self.assertIn(b"[SYS/TEMP]", self.transport.value())
        self.assertTrue(backend.transport.disconnecting)

    def test_unsafePasswordGoesByPLAIN(self):
        """
        A password with a line break cannot travel in a PASS line (it would end the command and
        start another): it goes base64-encoded in AUTH PLAIN.
        """
        self.context.directory.add("carol", b"pa\r\nDELE 1")
        self.connect()
        self.send(b"AUTH PLAIN " + b64encode(b"\0carol\0pa\r\nDELE 1") + b"\r\n")
        self.backend(
            [
                (b"", GREETING),
                (b"AUTH PLAIN " + b64encode(b"\0carol\0pa\r\nDELE 1") + b"\r\n", b"+OK Logged in.\r\n"),
            ]
        )
        self.assertEqual(self.transport.value(), b"+OK Logged in.\r\n")


class BackendTLSAndMasterTests(POP3TestMixin, SynchronousTestCase):
    config = CONFIG.replace(
        '[backends.mbx.pop3]\ntls = "none"',
        '[backends.mbx.pop3]\ntls = "starttls"\nmaster_user = "proxy"\nmaster_password_file = "MASTER"',
    )

    def setUp(self):
        fd, path = tempfile.mkstemp()
        os.write(fd, b"m4ster\n")
        os.close(fd)
        self.addCleanup(os.unlink, path)
        self.config = self.config.replace("MASTER", path)
        super().setUp()

    def test_stlsThenXCLIENTThenMasterLogin(self):
        self.connect()
        self.send(b"USER alice\r\nPASS secret\r\n")
        backend = self.backend(
            [
                (b"", b"+OK [XCLIENT] Dovecot ready.\r\n"),
                (b"STLS\r\n", b"+OK Begin TLS negotiation now.\r\n"),
                (
                    # Pipelined: XCLIENT and the login in one write.
                    re.compile(
                        b"XCLIENT ADDR=198\\.51\\.100\\.7 PORT=40000 SESSION=\\S+ TTL=4\r\n"
                        + re.escape(b"AUTH PLAIN " + b64encode(b"alice@example.com\0proxy\0m4ster") + b"\r\n")
                    ),
                    b"+OK Updated\r\n+OK Logged in.\r\n",
                ),
            ]
        )
        self.assertEqual(backend.transport.tlsStarted, ("client-tls", "192.0.2.10"))
        self.assertEqual(self.transport.value(), b"+OK\r\n+OK Logged in.\r\n")

    def test_masterRefusedIsTemporary(self):
        self.connect()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.backend(
            [
                (b"", GREETING),
                (b"STLS\r\n", b"+OK go\r\n"),
                (re.compile(b"AUTH PLAIN .*\r\n"), b"-ERR [AUTH] Authentication failed.\r\n"),
            ]
        )
        self.assertTrue(self.transport.value().endswith(b"-ERR [SYS/TEMP] Mailbox server unavailable, try again later.\r\n"))

    def test_stlsRefused(self):
        self.connect()
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.backend([(b"", GREETING), (b"STLS\r\n", b"-ERR no TLS here\r\n")])
        self.assertIn(b"[SYS/TEMP]", self.transport.value())


class ClientTLSTests(POP3TestMixin, SynchronousTestCase):
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = CertificateAuthority.create(directory).issue(["pop.example.com"], "server")
        self.config = CONFIG + f'\n[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
        super().setUp()

    def test_capaShowsSTLSOnly(self):
        self.connect(0)
        out = self.send(b"CAPA\r\n")
        self.assertIn(b"\r\nSTLS\r\n", out)
        self.assertNotIn(b"USER", out)
        self.assertNotIn(b"SASL", out)

    def test_stlsInjection(self):
        self.connect(0)
        out = self.send(b"STLS\r\nUSER alice\r\nPASS secret\r\n")
        self.assertEqual(out, b"+OK Begin TLS negotiation now.\r\n")
        self.assertEqual(self.transport.writtenBeforeTLS, out)
        self.assertIsNotNone(self.transport.tlsStarted)
        self.assertEqual(self.reactor.tcpClients, [])
        # After the handshake: plaintext login allowed, STLS gone.
        out = self.send(b"CAPA\r\n")
        self.assertNotIn(b"STLS", out)
        self.assertIn(b"\r\nUSER\r\n", out)
        self.assertEqual(self.send(b"STLS\r\n"), b"-ERR TLS is already active.\r\n")
        self.send(b"USER alice\r\nPASS secret\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_userBeforeSTLSForgotten(self):
        self.connect(1)
        self.send(b"USER alice\r\nSTLS\r\n")
        self.assertEqual(self.send(b"PASS secret\r\n"), b"-ERR No username given.\r\n")
