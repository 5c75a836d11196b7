"""
ManageSieve (RFC 5804) pre-login grammar (strings, literals), state machine, backend dialogue and
hand-off, driven through the public fakes of L{casd.testing}.
"""

import os
import re
import tempfile
from base64 import b64decode, b64encode

from zope.interface.verify import verifyObject

from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.config import ConfigError
from casd.interfaces import ICASProtocol
from casd.testing import CLOSE, ScriptedBackend, TranscriptMixin, failBackend, makeContext
from protocols.managesieve import managesieve
from tests.support.certs import CertificateAuthority

CONFIG = """
[auth]
failure_delay = 2.0

[routing]
default_backend = "mbx"

[backends.mbx]
host = "192.0.2.10"
[backends.mbx.managesieve]
tls = "none"

[backend]
reply_timeout = 5.0
# A refused connection fails at once here; its retries: tests/test_retry.py.
connect_retry_time = 0.0

[managesieve]
enabled = true
max_line_length = 200
max_bad_commands = 3
max_literal_size = 100
preauth_timeout = 30.0
sieve_extensions = "fileinto vacation"
[[managesieve.listen]]
endpoint = "tcp:4190"
[[managesieve.listen]]
endpoint = "tcp:4191"
trusted = true
"""

CAPABILITIES = (
    b'"IMPLEMENTATION" "Dovecot Pigeonhole"\r\n"SIEVE" "fileinto"\r\n"SASL" "PLAIN LOGIN"\r\n'
    b'"VERSION" "1.0"\r\n'
)
PLAIN = b64encode(b"\0alice@example.com\0secret")
LOGIN = [
    (b"", CAPABILITIES + b'OK "Dovecot ready."\r\n'),
    (b'AUTHENTICATE "PLAIN" "' + PLAIN + b'"\r\n', b'OK "Logged in."\r\n'),
]
UNAVAILABLE = b'NO (TRYLATER) "Mailbox server unavailable, try again later."\r\n'


class ManageSieveTestMixin(TranscriptMixin):
    descriptor = managesieve
    config = CONFIG
    listener = 1
    users = {
        "alice": ("secret", UserRecord(login="alice", backendLogin="alice@example.com")),
        "bob": 'p"w\\x',
    }

    def backend(self, script=LOGIN):
        return ScriptedBackend(self.reactor, script).run()


class DescriptorTests(ManageSieveTestMixin, SynchronousTestCase):
    def test_provides(self):
        self.assertTrue(verifyObject(ICASProtocol, managesieve))

    def test_offByDefault(self):
        section = makeContext(self.reactor, config="").config.protocols["managesieve"]
        self.assertFalse(section.enabled)
        self.assertEqual(section.listeners, ())

    def test_capabilityTextIsOneLine(self):
        context = makeContext(
            self.reactor, config=CONFIG.replace('"fileinto vacation"', '"fileinto\\r\\nOK"')
        )
        section = context.config.protocols["managesieve"]
        e = self.assertRaises(
            ConfigError, managesieve.buildFactory, context, section, section.listeners[0]
        )
        self.assertEqual(e.key, "managesieve.sieve_extensions")


class PreLoginTests(ManageSieveTestMixin, SynchronousTestCase):
    def test_greetingTrusted(self):
        self.connect(1)
        self.assertEqual(
            self.greeting,
            b'"IMPLEMENTATION" "casd"\r\n"SASL" "PLAIN LOGIN"\r\n"SIEVE" "fileinto vacation"\r\n'
            b'"NOTIFY" "mailto"\r\n"VERSION" "1.0"\r\nOK "casd ready."\r\n',
        )

    def test_greetingUntrusted(self):
        self.connect(0)
        self.assertIn(b'"SASL" ""\r\n', self.greeting)
        self.assertNotIn(b"STARTTLS", self.greeting)  # no certificate configured

    def test_capabilityNoopLogout(self):
        self.connect()
        out = self.send(b'CAPABILITY\r\nNOOP\r\nnoop "tag 1"\r\nLOGOUT\r\nNOOP\r\n')
        self.assertEqual(
            out,
            self.greeting.replace(b'"casd ready."', b'"Capability completed."')
            + b'OK "NOOP completed."\r\nOK (TAG "tag 1") "Done"\r\nOK "Logout completed."\r\n',
        )
        self.assertTrue(self.transport.disconnecting)

    def test_noopTagAsLiteral(self):
        self.connect()
        self.assertEqual(self.send(b'NOOP {3+}\r\na"b\r\n'), b'OK (TAG "a\\"b") "Done"\r\n')

    def test_plaintextRefusedBeforeTLS(self):
        self.connect(0)
        out = self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0secret") + b'"\r\n')
        self.assertEqual(
            out,
            b'NO (ENCRYPT-NEEDED) "Plaintext authentication disallowed on non-secure (SSL/TLS)'
            b' connections."\r\n',
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_authenticatedCommandsRefused(self):
        self.connect()
        self.assertEqual(self.send(b"LISTSCRIPTS\r\n"), b'NO "Authenticate first."\r\n')
        self.assertEqual(self.send(b'PUTSCRIPT "a" {4+}\r\nkeep\r\n'), b'NO "Authenticate first."\r\n')

    def test_unknownCommand(self):
        self.connect()
        self.assertEqual(self.send(b"XYZZY\r\n"), b'NO "Unknown command."\r\n')
        self.assertEqual(
            self.send(b'"AUTHENTICATE"\r\n'), b'NO "Error in MANAGESIEVE command received by server."\r\n'
        )

    def test_tooManyBadCommands(self):
        self.connect()
        out = self.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
        self.assertEqual(
            out, b'NO "Unknown command."\r\nNO "Unknown command."\r\nBYE "Too many invalid commands."\r\n'
        )
        self.assertTrue(self.transport.disconnecting)

    def test_overlongLine(self):
        self.connect()
        self.assertEqual(self.send(b'NOOP "' + b"x" * 300), b'BYE "Line too long."\r\n')
        self.assertTrue(self.transport.disconnecting)

    def test_preauthTimeout(self):
        self.connect()
        self.reactor.advance(31)
        self.assertEqual(self.transport.value(), b'BYE "Disconnected for inactivity."\r\n')
        self.assertTrue(self.transport.disconnecting)

    def test_starttlsUnavailable(self):
        self.connect()
        self.assertEqual(self.send(b"STARTTLS\r\n"), b'NO "TLS support isn\'t enabled."\r\n')

    def test_badQuoting(self):
        self.connect()
        self.assertEqual(
            self.send(b'AUTHENTICATE "PL\\AIN"\r\n'),
            b'NO "Error in MANAGESIEVE command: Invalid escape in quoted string"\r\n',
        )
        self.assertEqual(self.reactor.tcpClients, [])


class LiteralTests(ManageSieveTestMixin, SynchronousTestCase):
    def test_authenticateWithLiteral(self):
        self.connect()
        blob = b64encode(b"\0alice\0secret")
        out = self.send(b'AUTHENTICATE "PLAIN" {%d+}\r\n%s\r\n' % (len(blob), blob))
        self.assertEqual(out, b"")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_literalSplitAcrossSegments(self):
        self.connect()
        blob = b64encode(b"\0alice\0secret")
        data = b'AUTHENTICATE {5+}\r\nPLAIN {%d+}\r\n%s\r\n' % (len(blob), blob)
        for i in range(0, len(data), 3):
            self.send(data[i : i + 3])
        self.backend()
        self.assertEqual(self.transport.value(), b'OK "Logged in."\r\n')

    def test_synchronisingLiteralAnsweredWithNothing(self):
        """
        ManageSieve has no continuation: a {n} literal is read like {n+}.
        """
        self.connect()
        self.assertEqual(self.send(b'NOOP {2}\r\n'), b"")
        self.assertEqual(self.send(b"ab\r\n"), b'OK (TAG "ab") "Done"\r\n')

    def test_literalHoldingCRLFAndQuote(self):
        self.context.directory.add("carol", b'p"a\r\nss')
        self.connect()
        blob = b64encode(b'\0carol\0p"a\r\nss')
        self.send(b'AUTHENTICATE "PLAIN" {%d+}\r\n%s\r\n' % (len(blob), blob))
        self.backend(
            [
                (b"", CAPABILITIES + b'OK "Dovecot ready."\r\n'),
                (b'AUTHENTICATE "PLAIN" "' + blob + b'"\r\n', b'OK "Logged in."\r\n'),
            ]
        )
        self.assertEqual(self.transport.value(), b'OK "Logged in."\r\n')

    def test_literalTooLarge(self):
        self.connect()
        self.assertEqual(self.send(b'AUTHENTICATE "PLAIN" {101+}\r\n'), b'BYE "Literal too large."\r\n')
        self.assertTrue(self.transport.disconnecting)

    def test_hostileLiteralLength(self):
        self.connect()
        out = self.send(b'NOOP {99999999999999999999+}\r\n')
        # Not a literal marker at all (too many digits): a syntax error, not an allocation.
        self.assertTrue(out.startswith(b'NO "Error in MANAGESIEVE command'))
        self.assertFalse(self.transport.disconnecting)

    def test_tooManyLiterals(self):
        self.connect()
        out = self.send(b"NOOP " + b"{1+}\r\nx " * 9 + b"\r\n")
        self.assertEqual(out, b'BYE "Literal too large."\r\n')


class SASLTests(ManageSieveTestMixin, SynchronousTestCase):
    def test_plainWithContinuation(self):
        self.connect()
        self.assertEqual(self.send(b'AUTHENTICATE "PLAIN"\r\n'), b'""\r\n')
        self.send(b'"' + b64encode(b"\0alice\0secret") + b'"\r\n')
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_continuationAsLiteral(self):
        self.connect()
        self.send(b'AUTHENTICATE "PLAIN"\r\n')
        blob = b64encode(b"\0alice\0secret")
        self.send(b"{%d+}\r\n%s\r\n" % (len(blob), blob))
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_login(self):
        self.connect()
        out = self.send(b'AUTHENTICATE "LOGIN"\r\n')
        self.assertEqual(out, b'"' + b64encode(b"Username:") + b'"\r\n')
        out = self.send(b'"' + b64encode(b"alice") + b'"\r\n')
        self.assertEqual(b64decode(out.strip()[1:-1]), b"Password:")
        self.send(b'"' + b64encode(b"secret") + b'"\r\n')
        self.backend()
        self.assertEqual(self.transport.value(), b'OK "Logged in."\r\n')

    def test_cancel(self):
        self.connect()
        self.send(b'AUTHENTICATE "PLAIN"\r\n')
        self.assertEqual(self.send(b'"*"\r\n'), b'NO "Authentication aborted by client."\r\n')
        self.assertEqual(self.send(b"NOOP\r\n"), b'OK "NOOP completed."\r\n')

    def test_badBase64(self):
        self.connect()
        self.send(b'AUTHENTICATE "PLAIN"\r\n')
        self.assertEqual(
            self.send(b'"!!notbase64"\r\n'), b'NO "Invalid base64 data in continued response."\r\n'
        )
        self.assertEqual(
            self.send(b'AUTHENTICATE "PLAIN" "####"\r\n'),
            b'NO "Invalid base64 data in initial response."\r\n',
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_garbledResponse(self):
        self.connect()
        self.send(b'AUTHENTICATE "PLAIN"\r\n')
        self.assertEqual(
            self.send(b'"abc" "def"\r\n'), b'NO "Invalid base64 data in continued response."\r\n'
        )
        self.send(b'AUTHENTICATE "PLAIN"\r\n')
        self.assertEqual(
            self.send(b'"abc\r\n'), b'NO "Invalid base64 data in continued response."\r\n'
        )
        # Both counted as invalid: the third strike closes.
        self.assertEqual(self.send(b"FOO\r\n"), b'BYE "Too many invalid commands."\r\n')

    def test_mechanismMustBeAString(self):
        self.connect()
        self.assertEqual(
            self.send(b"AUTHENTICATE PLAIN\r\n"),
            b'NO "Invalid arguments: AUTHENTICATE \\"mechanism\\" [\\"initial-response\\"]"\r\n',
        )

    def test_unknownMechanism(self):
        self.connect()
        self.assertEqual(
            self.send(b'AUTHENTICATE "GSSAPI"\r\n'), b'NO "Unsupported authentication mechanism."\r\n'
        )

    def test_malformedPlain(self):
        self.connect()
        self.assertEqual(
            self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"alice-secret") + b'"\r\n'),
            b'NO "Authentication failed."\r\n',
        )


class LoginTests(ManageSieveTestMixin, SynchronousTestCase):
    def test_fullPathAndRelay(self):
        self.connect(1, peer=("203.0.113.5", 51234))
        out = self.send(
            b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0secret") + b'"\r\nLISTSCRIPTS\r\n'
        )
        self.assertEqual(out, b"")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.10", 4190))
        backend = self.backend()
        self.assertEqual(self.transport.value(), b'OK "Logged in."\r\n')
        # The pipelined command went on to the backend; the relay runs both ways.
        self.assertEqual(backend.received(), b"LISTSCRIPTS\r\n")
        self.transport.clear()
        backend.send(b'"main" ACTIVE\r\nOK "Listscripts completed."\r\n')
        self.assertEqual(self.transport.value(), b'"main" ACTIVE\r\nOK "Listscripts completed."\r\n')
        self.server.dataReceived(b'PUTSCRIPT "x" {4+}\r\nkeep\r\n')
        self.assertEqual(backend.received(), b'PUTSCRIPT "x" {4+}\r\nkeep\r\n')
        self.assertIsNone(backend.dialogue.credentials)

    def test_wrongPasswordDelayed(self):
        self.connect(0)
        self.server.client = self.server.client.withTLS()
        self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0wrong") + b'"\r\nNOOP\r\n')
        self.transport.clear()
        self.reactor.advance(1.9)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertEqual(
            self.transport.value(), b'NO "Authentication failed."\r\nOK "NOOP completed."\r\n'
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_directoryDown(self):
        self.context.directory.error = RuntimeError("ldap exploded")
        self.connect()
        out = self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0secret") + b'"\r\n')
        self.assertEqual(
            out, b'NO (TRYLATER) "Temporary authentication failure, try again later."\r\n'
        )
        self.flushLoggedErrors(RuntimeError)

    def test_backendRefusedConnection(self):
        self.connect()
        self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0secret") + b'"\r\n')
        failBackend(self.reactor)
        self.assertEqual(self.transport.value(), UNAVAILABLE)


class BackendDialogueTests(ManageSieveTestMixin, SynchronousTestCase):
    def login(self, script):
        self.connect(1, peer=("203.0.113.5", 51234))
        self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0secret") + b'"\r\n')
        return self.backend(script)

    def test_xclientWhenOffered(self):
        self.login(
            [
                (b"", CAPABILITIES + b'"XCLIENT"\r\nOK "Dovecot ready."\r\n'),
                (
                    re.compile(b"XCLIENT ADDR=203\\.0\\.113\\.5 PORT=51234 SESSION=\\S{12} TTL=4\r\n"),
                    b'OK "Updated"\r\n',
                ),
            ]
            + LOGIN[1:]
        )
        self.assertEqual(self.transport.value(), b'OK "Logged in."\r\n')

    def test_refusesCredentials(self):
        self.login(LOGIN[:1] + [(LOGIN[1][0], b'NO "Authentication failed."\r\n')])
        self.assertEqual(self.transport.value(), b'NO "Authentication failed."\r\n')

    def test_refusalAsLiteral(self):
        self.login(LOGIN[:1] + [(LOGIN[1][0], b"NO {21}\r\nAuthentication\r\nfailed\r\n")])
        self.assertEqual(self.transport.value(), b'NO "Authentication failed."\r\n')

    def test_tryLater(self):
        self.login(LOGIN[:1] + [(LOGIN[1][0], b'NO (TRYLATER) "Later."\r\n')])
        self.assertEqual(self.transport.value(), UNAVAILABLE)

    def test_byeDuringLogin(self):
        self.login(LOGIN[:1] + [(LOGIN[1][0], b'BYE "Shutting down."\r\n')])
        self.assertEqual(self.transport.value(), UNAVAILABLE)

    def test_greetingBye(self):
        self.login([(b"", b'BYE "Too many connections."\r\n')])
        self.assertEqual(self.transport.value(), UNAVAILABLE)

    def test_capabilityWithLiteral(self):
        self.login(
            [
                (b"", b'"SIEVE" {8}\r\nfileinto\r\n"XCLIENT"\r\nOK "hi"\r\n'),
                (re.compile(b"XCLIENT .*\r\n"), b'OK "Updated"\r\n'),
            ]
            + LOGIN[1:]
        )
        self.assertEqual(self.transport.value(), b'OK "Logged in."\r\n')

    def test_garbage(self):
        self.login([(b"", b"* OK IMAP4rev1\r\n")])
        self.assertEqual(self.transport.value(), UNAVAILABLE)

    def test_closesDuringLogin(self):
        self.login(LOGIN[:1] + [(LOGIN[1][0], CLOSE)])
        self.assertEqual(self.transport.value(), UNAVAILABLE)

    def test_silent(self):
        backend = self.login([])
        self.reactor.advance(5.1)
        self.assertEqual(self.transport.value(), UNAVAILABLE)
        self.assertTrue(backend.transport.disconnecting)


class BackendTLSAndMasterTests(ManageSieveTestMixin, SynchronousTestCase):
    config = CONFIG.replace(
        '[backends.mbx.managesieve]\ntls = "none"',
        '[backends.mbx.managesieve]\ntls = "starttls"\nmaster_user = "proxy"\n'
        'master_password_file = "MASTER"',
    )

    def setUp(self):
        fd, path = tempfile.mkstemp()
        os.write(fd, b"m4ster\n")
        os.close(fd)
        self.addCleanup(os.unlink, path)
        self.config = self.config.replace("MASTER", path)
        super().setUp()

    def test_starttlsThenMasterLogin(self):
        self.connect()
        self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0secret") + b'"\r\n')
        backend = self.backend(
            [
                (b"", CAPABILITIES + b'"STARTTLS"\r\nOK "hi"\r\n'),
                (b"STARTTLS\r\n", b'OK "Begin TLS negotiation now."\r\n'),
                # Only the capabilities sent after TLS count: here they offer XCLIENT.
                (b"", CAPABILITIES + b'"XCLIENT"\r\nOK "TLS negotiation successful."\r\n'),
                (re.compile(b"XCLIENT .*\r\n"), b'OK "Updated"\r\n'),
                (
                    b'AUTHENTICATE "PLAIN" "'
                    + b64encode(b"alice@example.com\0proxy\0m4ster")
                    + b'"\r\n',
                    b'OK "Logged in."\r\n',
                ),
            ]
        )
        self.assertEqual(backend.transport.tlsStarted, ("client-tls", "192.0.2.10"))
        self.assertEqual(self.transport.value(), b'OK "Logged in."\r\n')

    def test_masterRefusedIsTemporary(self):
        self.connect()
        self.send(b'AUTHENTICATE "PLAIN" "' + b64encode(b"\0alice\0secret") + b'"\r\n')
        self.backend(
            [
                (b"", CAPABILITIES + b'OK "hi"\r\n'),
                (b"STARTTLS\r\n", b'OK "go"\r\n'),
                (b"", CAPABILITIES + b'OK "hi"\r\n'),
                (re.compile(b'AUTHENTICATE .*\r\n'), b'NO "Authentication failed."\r\n'),
            ]
        )
        self.assertEqual(self.transport.value(), UNAVAILABLE)


class ClientTLSTests(ManageSieveTestMixin, SynchronousTestCase):
    def setUp(self):
        directory = self.mktemp()
        os.makedirs(directory)
        cert, key = CertificateAuthority.create(directory).issue(["sieve.example.com"], "server")
        self.config = CONFIG + f'\n[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
        super().setUp()

    def test_starttlsAdvertised(self):
        self.connect(0)
        self.assertIn(b'"STARTTLS"\r\n', self.greeting)
        self.assertIn(b'"SASL" ""\r\n', self.greeting)

    def test_starttlsInjection(self):
        self.connect(0)
        blob = b64encode(b"\0alice\0secret")
        out = self.send(b'STARTTLS\r\nAUTHENTICATE "PLAIN" "' + blob + b'"\r\nNOOP\r\n')
        self.assertEqual(self.transport.writtenBeforeTLS, b'OK "Begin TLS negotiation now."\r\n')
        self.assertIsNotNone(self.transport.tlsStarted)
        # RFC 5804: the capabilities again over TLS, now with SASL and without STARTTLS; the
        # pipelined commands were dropped, never run.
        after = out[len(self.transport.writtenBeforeTLS) :]
        self.assertIn(b'"SASL" "PLAIN LOGIN"\r\n', after)
        self.assertNotIn(b"STARTTLS", after)
        self.assertTrue(after.endswith(b'OK "TLS negotiation successful."\r\n'))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(self.send(b"STARTTLS\r\n"), b'NO "TLS is already active."\r\n')
        self.send(b'AUTHENTICATE "PLAIN" "' + blob + b'"\r\n')
        self.assertEqual(len(self.reactor.tcpClients), 1)
