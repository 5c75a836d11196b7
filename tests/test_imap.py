"""
IMAP pre-login grammar, state machine, backend dialogue and hand-off, driven through
StringTransport and MemoryReactorClock.
"""

from base64 import b64decode, b64encode

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.testing import (
    TranscriptMixin,
    acceptBackend,
    connectFrontend,
    failBackend,
    makeContext,
)
from protocols.imap import imap
from protocols.imapgrammar import parseList
from protocols.stringgrammar import tokenizeParts
from tests.support.certs import CertificateAuthority

CONFIG = """
[auth]
failure_delay = 2.0

[routing]
default_backend = "mbx"

[backends.mbx]
host = "192.0.2.10"
[backends.mbx.imap]
tls = "none"

[backend]
reply_timeout = 5.0
# A refused connection fails at once here; its retries: tests/test_retry.py.
connect_retry_time = 0.0

[imap]
max_line_length = 200
max_bad_commands = 3
max_literal_size = 100
preauth_timeout = 30.0
idle_timeout = 100.0
[[imap.listen]]
endpoint = "tcp:1143"
[[imap.listen]]
endpoint = "tcp:1144"
trusted = true
"""


class IMAPTestMixin(TranscriptMixin):
    descriptor = imap
    config = CONFIG
    listener = 0
    users = {
        "alice": ("secret", UserRecord(login="alice", backendLogin="alice@example.com")),
        "bob": "pw\"\\x",
    }

    def backendLogin(self, capabilities=b"IMAP4rev1 IDLE MOVE"):
        """
        Complete the backend dialogue that a LOGIN started.
        """
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] Dovecot ready.\r\n")
        sent = bt.value()
        bt.clear()
        backend.dataReceived(b"I OK ID completed.\r\n")
        backend.dataReceived(b"A OK [CAPABILITY " + capabilities + b"] Logged in\r\n")
        return backend, bt, sent


class PreLoginTests(IMAPTestMixin, SynchronousTestCase):
    def test_greetingUntrusted(self):
        server, transport = connectFrontend(imap, self.context, 0, ("198.51.100.7", 1))
        greeting = transport.value()
        self.assertTrue(greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 "))
        self.assertIn(b"LOGINDISABLED", greeting)
        self.assertNotIn(b"AUTH=PLAIN", greeting)
        self.assertNotIn(b"STARTTLS", greeting)  # no certificate configured

    def test_greetingTrusted(self):
        server, transport = connectFrontend(imap, self.context, 1)
        greeting = transport.value()
        self.assertIn(b"AUTH=PLAIN AUTH=LOGIN", greeting)
        self.assertNotIn(b"LOGINDISABLED", greeting)

    def test_capabilityNoopLogout(self):
        self.connect()
        out = self.send(b"a CAPABILITY\r\nb NOOP\r\nc LOGOUT\r\nd NOOP\r\n")
        self.assertEqual(
            out.split(b"\r\n")[1:],
            [
                b"a OK Pre-login capabilities listed, post-login capabilities have more.",
                b"b OK NOOP completed.",
                b"* BYE Logging out",
                b"c OK Logout completed.",
                b"",
            ],
        )
        self.assertTrue(out.startswith(b"* CAPABILITY IMAP4rev1 SASL-IR LITERAL+ ID"))
        self.assertTrue(self.transport.disconnecting)

    def test_id(self):
        self.connect()
        out = self.send(b'a ID ("name" "Thunderbird" "version" "1\\"2")\r\nb ID NIL\r\n')
        self.assertEqual(
            out, b'* ID ("name" "casd")\r\na OK ID completed.\r\n* ID ("name" "casd")\r\nb OK ID completed.\r\n'
        )
        # The list parses (the untrusted client's fields are not used).
        self.assertEqual(parseList(tokenizeParts([b'("name" "x" "v" NIL)'])), [b"name", b"x", b"v", None])
        self.assertIsNone(parseList(tokenizeParts([b"NIL"])))

    def test_idOddList(self):
        self.connect()
        self.assertIn(b"a BAD", self.send(b'a ID ("name")\r\n'))

    def test_plaintextRefusedBeforeTLS(self):
        self.connect()
        out = self.send(b"a LOGIN alice secret\r\n")
        self.assertEqual(
            out,
            b"a NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure (SSL/TLS)"
            b" connections.\r\n",
        )
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIn(b"PRIVACYREQUIRED", self.send(b"b AUTHENTICATE PLAIN\r\n"))

    def test_trustedNetworkAllowsPlaintext(self):
        self.context = makeContext(
            self.reactor,
            users={"alice": "secret"},
            config=CONFIG.replace("[auth]", '[server]\ntrusted_networks = ["198.51.100.0/24"]\n[auth]'),
        )
        self.connect(0, ("198.51.100.9", 1))
        self.send(b"a LOGIN alice secret\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_unknownCommand(self):
        self.connect()
        self.assertEqual(
            self.send(b"a SELECT INBOX\r\n"), b"a BAD Unknown command or not allowed before login.\r\n"
        )

    def test_noTag(self):
        self.connect()
        self.assertEqual(self.send(b"\r\n"), b"* BAD Error in IMAP command received by server.\r\n")

    def test_tooManyBadCommands(self):
        self.connect()
        out = self.send(b"a FOO\r\nb BAR\r\nc BAZ\r\nd NOOP\r\n")
        self.assertEqual(out.count(b"BAD"), 2)
        self.assertIn(b"* BYE Too many invalid IMAP commands.\r\n", out)
        self.assertNotIn(b"d OK", out)
        self.assertTrue(self.transport.disconnecting)

    def test_overlongLine(self):
        self.connect()
        out = self.send(b"a NOOP " + b"x" * 300)
        self.assertEqual(out, b"* BYE Too long argument.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_overlongLineWithNewline(self):
        self.connect()
        out = self.send(b"a LOGIN " + b"x" * 300 + b" y\r\n")
        self.assertEqual(out, b"* BYE Too long argument.\r\n")

    def test_preauthTimeout(self):
        self.connect()
        self.reactor.advance(29)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        self.assertEqual(self.transport.value(), b"* BYE Disconnected for inactivity.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_starttlsUnavailable(self):
        self.connect()
        self.assertEqual(self.send(b"a STARTTLS\r\n"), b"a BAD TLS support isn't enabled.\r\n")


class LiteralTests(IMAPTestMixin, SynchronousTestCase):
    def test_syncLiteral(self):
        self.connect(1)
        self.assertEqual(self.send(b"a LOGIN {5}\r\n"), b"+ OK\r\n")
        self.assertEqual(self.send(b"alice {6}\r\n"), b"+ OK\r\n")
        self.send(b"secret\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        backend, bt, sent = self.backendLogin()
        self.assertIn(b"A AUTHENTICATE PLAIN " + b64encode(b"\x00alice@example.com\x00secret"), sent)

    def test_nonSyncLiteralInOneSegment(self):
        self.connect(1)
        out = self.send(b"a LOGIN {5+}\r\nalice {6+}\r\nsecret\r\n")
        self.assertEqual(out, b"")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_literalSplitAcrossSegments(self):
        self.connect(1)
        for piece in (b"a LOGIN {5+}\r\nal", b"ice {6+}\r", b"\nsec", b"ret", b"\r\n"):
            self.send(piece)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_literalHoldingCRLFAndQuote(self):
        self.context.directory.add("carol", b'p"a\r\nss')
        self.connect(1)
        self.send(b'a LOGIN carol {7+}\r\np"a\r\nss\r\n')
        backend, bt, sent = self.backendLogin()
        self.assertIn(b64encode(b'\x00carol\x00p"a\r\nss'), sent)

    def test_quotedEscapes(self):
        self.connect(1)
        self.send(b'a LOGIN "bob" "pw\\"\\\\x"\r\n')
        self.assertEqual(len(self.reactor.tcpClients), 1)
        backend, bt, sent = self.backendLogin()
        self.assertIn(b64encode(b'\x00bob\x00pw"\\x'), sent)

    def test_badEscape(self):
        self.connect(1)
        out = self.send(b'a LOGIN "bob" "p\\w"\r\n')
        self.assertTrue(out.startswith(b"a BAD Error in IMAP command: Invalid escape"))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_syncLiteralTooLarge(self):
        self.connect(1)
        self.assertEqual(self.send(b"a LOGIN {101}\r\n"), b"a BAD [TOOBIG] Literal too large.\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.send(b"b NOOP\r\n"), b"b OK NOOP completed.\r\n")

    def test_nonSyncLiteralTooLarge(self):
        self.connect(1)
        out = self.send(b"a LOGIN {4294967295+}\r\n")
        self.assertEqual(out, b"* BYE [TOOBIG] Literal too large.\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_hostileLiteralLength(self):
        self.connect(1)
        out = self.send(b"a LOGIN {99999999999999999999}\r\n")
        # Not a literal marker at all (too many digits): a syntax error, not an allocation.
        self.assertTrue(out.startswith(b"a BAD"))

    def test_tooManyLiterals(self):
        self.connect(1)
        out = self.send(b"a ID (" + b"{1+}\r\nx " * 9 + b")\r\n")
        self.assertIn(b"[TOOBIG]", out)


class AuthenticateTests(IMAPTestMixin, SynchronousTestCase):
    def test_plainWithInitialResponse(self):
        self.connect(1)
        self.send(b"a AUTHENTICATE PLAIN " + b64encode(b"\x00alice\x00secret") + b"\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_plainWithContinuation(self):
        self.connect(1)
        self.assertEqual(self.send(b"a AUTHENTICATE PLAIN\r\n"), b"+ \r\n")
        self.send(b64encode(b"\x00alice\x00secret") + b"\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_login(self):
        self.connect(1)
        out = self.send(b"a AUTHENTICATE LOGIN\r\n")
        self.assertEqual(b64decode(out[2:]), b"Username:")
        out = self.send(b64encode(b"alice") + b"\r\n")
        self.assertEqual(b64decode(out[2:]), b"Password:")
        self.send(b64encode(b"secret") + b"\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_cancel(self):
        self.connect(1)
        self.send(b"a AUTHENTICATE PLAIN\r\n")
        self.assertEqual(self.send(b"*\r\n"), b"a BAD Authentication aborted by client.\r\n")
        self.assertEqual(self.send(b"b NOOP\r\n"), b"b OK NOOP completed.\r\n")

    def test_badBase64(self):
        self.connect(1)
        self.send(b"a AUTHENTICATE PLAIN\r\n")
        self.assertEqual(
            self.send(b"!!notbase64\r\n"), b"a BAD Invalid base64 data in continued response.\r\n"
        )
        self.assertEqual(
            self.send(b"b AUTHENTICATE PLAIN ####\r\n"),
            b"b BAD Invalid base64 data in initial response.\r\n",
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_malformedPlain(self):
        self.connect(1)
        out = self.send(b"a AUTHENTICATE PLAIN " + b64encode(b"alice-secret") + b"\r\n")
        self.assertEqual(out, b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")

    def test_unknownMechanism(self):
        self.connect(1)
        self.assertEqual(
            self.send(b"a AUTHENTICATE CRAM-MD5\r\n"), b"a NO Unsupported authentication mechanism.\r\n"
        )

    def test_foreignAuthzidRefused(self):
        self.connect(1)
        self.send(b"a AUTHENTICATE PLAIN " + b64encode(b"bob\x00alice\x00secret") + b"\r\n")
        self.reactor.advance(0)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertEqual(
            self.transport.value(), b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        )


class LoginTests(IMAPTestMixin, SynchronousTestCase):
    def test_fullPathAndRelay(self):
        self.connect(1, peer=("203.0.113.5", 51234))
        out = self.send(b"a1 LOGIN alice secret\r\na2 SELECT INBOX\r\n")
        self.assertEqual(out, b"")
        host, port = self.reactor.tcpClients[0][:2]
        self.assertEqual((host, port), ("192.0.2.10", 143))
        backend, bt, sent = self.backendLogin()
        idLine, authLine = sent.split(b"\r\n")[:2]
        self.assertIn(b'"x-originating-ip" "203.0.113.5"', idLine)
        self.assertIn(b'"x-originating-port" "51234"', idLine)
        self.assertIn(b'"x-connected-ip" "127.0.0.1"', idLine)
        self.assertIn(b'"x-session-id" "' + self.server.client.sessionId.encode() + b'"', idLine)
        self.assertEqual(
            authLine, b"A AUTHENTICATE PLAIN " + b64encode(b"\x00alice@example.com\x00secret")
        )
        # The client gets the backend's post-login capabilities; the pipelined SELECT goes on.
        self.assertEqual(
            self.transport.value(), b"a1 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
        )
        self.assertEqual(bt.value(), b"a2 SELECT INBOX\r\n")
        # Relay both ways, producers registered both ways.
        self.transport.clear()
        backend.dataReceived(b"* 3 EXISTS\r\n")
        self.assertEqual(self.transport.value(), b"* 3 EXISTS\r\n")
        self.server.dataReceived(b"a3 NOOP\r\n")
        self.assertEqual(bt.value(), b"a2 SELECT INBOX\r\na3 NOOP\r\n")
        self.assertIs(self.transport.producer.transport, bt)
        self.assertIs(bt.producer.transport, self.transport)
        self.assertIsNone(backend.credentials)

    def test_pipelinedAfterLoginSplitAcrossSegments(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\nb NO")
        self.send(b"OP\r\n")
        backend, bt, _ = self.backendLogin()
        self.assertEqual(bt.value(), b"b NOOP\r\n")

    def test_backendLeftoverForwarded(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK ready\r\n")
        backend.dataReceived(b"I OK\r\nA OK [CAPABILITY IMAP4rev1] done\r\n* 1 EXISTS\r\n")
        self.assertEqual(
            self.transport.value(), b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n* 1 EXISTS\r\n"
        )

    def test_capabilityFetchedWhenNotInOK(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK ready\r\nI OK\r\nA OK Logged in\r\n")
        self.assertTrue(bt.value().endswith(b"C CAPABILITY\r\n"))
        backend.dataReceived(b"* CAPABILITY IMAP4rev1 X-FOO\r\nC OK done\r\n")
        self.assertEqual(self.transport.value(), b"a OK [CAPABILITY IMAP4rev1 X-FOO] Logged in\r\n")

    def test_wrongPasswordDelayed(self):
        self.connect(1, peer=("198.51.100.7", 1))
        # The trusted *listener* makes the client trusted: use the untrusted one over "TLS".
        self.connect(0)
        self.server.client = self.server.client.withTLS()
        self.send(b"a LOGIN alice wrong\r\nb NOOP\r\n")
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(1.9)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertEqual(
            self.transport.value(),
            b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\nb OK NOOP completed.\r\n",
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_emptyPasswordRefused(self):
        self.context.directory.add("empty", b"")
        self.connect(1)
        out = self.send(b'a LOGIN empty ""\r\n')
        self.assertEqual(out, b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.context.directory.checks, 0)

    def test_disabledAccount(self):
        self.context.directory.add("dave", "pw", UserRecord(login="dave", disabled=True))
        self.connect(1)
        out = self.send(b"a LOGIN dave pw\r\n")
        self.assertEqual(out, b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")

    def test_directoryDown(self):
        self.context.directory.error = RuntimeError("ldap exploded")
        self.connect(1)
        out = self.send(b"a LOGIN alice secret\r\n")
        self.assertEqual(
            out, b"a NO [UNAVAILABLE] Temporary authentication failure, try again later.\r\n"
        )
        self.flushLoggedErrors(RuntimeError)

    def test_backendRefused(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        failBackend(self.reactor)
        self.assertEqual(
            self.transport.value(),
            b"a NO [UNAVAILABLE] Mailbox server unavailable, try again later.\r\n",
        )
        self.assertEqual(self.send(b"b NOOP\r\n"), b"b OK NOOP completed.\r\n")

    def test_backendSilent(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        self.reactor.advance(4.9)
        self.assertEqual(self.transport.value(), b"")
        self.reactor.advance(0.2)
        self.assertEqual(
            self.transport.value(),
            b"a NO [UNAVAILABLE] Mailbox server unavailable, try again later.\r\n",
        )
        self.assertTrue(bt.disconnecting)

    def test_backendGreetsBye(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* BYE Too many connections\r\n")
        self.assertIn(b"a NO [UNAVAILABLE]", self.transport.value())

    def test_backendRefusesUser(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK hi\r\nI OK\r\nA NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(
            self.transport.value(), b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        )

    def test_backendClosesDuringLogin(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK hi\r\n")
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        backend.connectionLost(Failure(ConnectionDone()))
        self.assertIn(b"a NO [UNAVAILABLE]", self.transport.value())

    def test_clientGoneDuringLogin(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.server.connectionLost(Failure(ConnectionDone()))
        backend, bt, _ = self.backendLogin()
        self.assertTrue(bt.disconnecting)
        self.assertEqual(self.transport.value(), b"")


class BackendTLSAndMasterTests(IMAPTestMixin, SynchronousTestCase):
    config = CONFIG.replace(
        '[backends.mbx.imap]\ntls = "none"',
        '[backends.mbx.imap]\ntls = "starttls"\nmaster_user = "proxy"\nmaster_password_file = "MASTER"',
    )

    def setUp(self):
        import os
        import tempfile

        fd, path = tempfile.mkstemp()
        os.write(fd, b"m4ster\n")
        os.close(fd)
        self.addCleanup(os.unlink, path)
        self.config = self.config.replace("MASTER", path)
        super().setUp()

    def test_starttlsThenMasterLogin(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 STARTTLS SASL-IR] hi\r\n")
        self.assertEqual(bt.value(), b"S STARTTLS\r\n")
        backend.dataReceived(b"S OK Begin TLS negotiation now.\r\n")
        self.assertEqual(bt.tlsStarted, ("client-tls", "192.0.2.10"))
        bt.clear()
        backend.handshakeCompleted()
        sent = bt.value()
        self.assertIn(b"A AUTHENTICATE PLAIN " + b64encode(b"alice@example.com\x00proxy\x00m4ster"), sent)
        backend.dataReceived(b"I OK\r\nA OK [CAPABILITY IMAP4rev1] ok\r\n")
        self.assertEqual(self.transport.value(), b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n")

    def test_tlsHandshakeTimeout(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK hi\r\nS OK go\r\n")
        self.reactor.advance(10.1)
        self.assertIn(b"a NO [UNAVAILABLE]", self.transport.value())

    def test_masterRefusedIsTemporary(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK hi\r\nS OK go\r\n")
        backend.handshakeCompleted()
        backend.dataReceived(b"I OK\r\nA NO [AUTHENTICATIONFAILED] nope\r\n")
        self.assertIn(b"a NO [UNAVAILABLE]", self.transport.value())


class ClientTLSTests(IMAPTestMixin, SynchronousTestCase):
    def setUp(self):
        directory = self.mktemp()
        import os

        os.makedirs(directory)
        ca = CertificateAuthority.create(directory)
        cert, key = ca.issue(["imap.example.com"], "server")
        self.config = CONFIG + f'\n[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
        super().setUp()

    def test_starttlsAdvertisedAndLoginDisabled(self):
        server, transport = connectFrontend(imap, self.context, 0)
        self.assertIn(b"STARTTLS", transport.value())
        self.assertIn(b"LOGINDISABLED", transport.value())

    def test_starttlsInjection(self):
        self.connect()
        out = self.send(b"a STARTTLS\r\nb LOGIN alice secret\r\nc NOOP\r\n")
        self.assertEqual(out, b"a OK Begin TLS negotiation now.\r\n")
        self.assertEqual(self.transport.writtenBeforeTLS, out)
        self.assertIsNotNone(self.transport.tlsStarted)
        self.assertEqual(self.reactor.tcpClients, [])
        # After the handshake: TLS active, plaintext login now allowed, STARTTLS gone.
        out = self.send(b"d CAPABILITY\r\n")
        self.assertNotIn(b"STARTTLS", out)
        self.assertIn(b"AUTH=PLAIN", out)
        self.assertEqual(self.send(b"e STARTTLS\r\n"), b"e BAD TLS is already active.\r\n")
        self.send(b"f LOGIN alice secret\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)


class SessionLogTests(IMAPTestMixin, SynchronousTestCase):
    def test_oneLineNoSecret(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.connect(1, peer=("203.0.113.5", 4242))
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt, _ = self.backendLogin()
        backend.dataReceived(b"x" * 1000)
        self.server.dataReceived(b"y" * 10)
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.server.connectionLost(Failure(ConnectionDone()))
        backend.connectionLost(Failure(ConnectionDone()))
        sessions = [e for e in events if e.get("log_namespace") == "casd.session"]
        self.assertEqual(len(sessions), 1)
        e = sessions[0]
        self.assertEqual(e["user"], "alice")
        self.assertEqual(e["client"], "203.0.113.5:4242")
        self.assertEqual(e["backend"], "mbx(192.0.2.10:143)")
        self.assertEqual((e["bytesIn"], e["bytesOut"]), (10, 1000))
        self.assertEqual(e["result"], "proxy(client closed)")
        self.assertEqual(e["log_level"], LogLevel.info)
        from twisted.logger import formatEvent

        for event in events:
            self.assertNotIn("secret", formatEvent(event))
            self.assertNotIn("secret", repr(event))


class ForwardedClientTests(IMAPTestMixin, SynchronousTestCase):
    """
    A trusted proxy in front (another casd node) reports the real client in ID; casd passes it on.
    """

    def test_trustedProxyReportsClient(self):
        self.connect(1, peer=("192.0.2.99", 5000))
        self.send(
            b'a ID ("x-originating-ip" "203.0.113.9" "x-originating-port" "4242"'
            b' "x-session-id" "nearNode123" "x-proxy-ttl" "4")\r\n'
        )
        self.assertEqual(self.server.client.peerHost, "203.0.113.9")
        self.send(b"b LOGIN alice secret\r\n")
        backend, bt, sent = self.backendLogin()
        self.assertIn(b'"x-originating-ip" "203.0.113.9" "x-originating-port" "4242"', sent)
        self.assertIn(b'"x-session-id" "nearNode123"', sent)
        self.assertIn(b'"x-proxy-ttl" "3"', sent)

    def test_untrustedClientIgnored(self):
        self.connect(0, peer=("198.51.100.7", 5000))
        self.send(b'a ID ("x-originating-ip" "203.0.113.9" "x-session-id" "forged")\r\n')
        self.assertEqual(self.server.client.peerHost, "198.51.100.7")
        self.assertNotEqual(self.server.client.sessionId, "forged")

    def test_junkValuesIgnored(self):
        self.connect(1, peer=("192.0.2.99", 5000))
        before = self.server.client.sessionId
        self.send(
            b'a ID ("x-originating-ip" "not an address" "x-originating-port" "99999"'
            b' "x-session-id" "has space")\r\n'
        )
        self.assertEqual(
            (self.server.client.peerHost, self.server.client.peerPort, self.server.client.sessionId),
            ("192.0.2.99", 5000, before),
        )


class CachedContextMixin:
    """
    A context on a L{MemoryReactorClock} whose directory is behind a credential cache.
    """

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        from casd.auth.cache import CachingChecker, CredentialCache
        from casd.testing import MemoryDirectory

        self.reactor = MemoryReactorClock()
        self.directory = MemoryDirectory(self.users)
        self.cache = CredentialCache(self.reactor)
        self.context = makeContext(
            self.reactor, config=self.config, directory=CachingChecker(self.directory, self.cache)
        )


class CachedLoginTests(CachedContextMixin, IMAPTestMixin, SynchronousTestCase):
    """
    A login the credential cache answers goes straight on to routing and the backend connection,
    in the very call that read the command: the authenticator's Deferred path is not taken.
    """

    def test_secondLoginFromTheCache(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt, _ = self.backendLogin()
        self.assertEqual(self.cache.stats()["misses"], 1)
        slow = []
        authenticator = self.context.authenticator
        authenticator.login = lambda *a: slow.append(a)
        self.connect(1)
        self.send(b"b LOGIN alice secret\r\nc SELECT INBOX\r\n")
        self.assertEqual((len(self.reactor.tcpClients), slow), (2, []))
        self.assertEqual((self.cache.stats()["hits"], self.directory.checks), (1, 1))
        backend, bt, sent = self.backendLogin()
        self.assertIn(b"A AUTHENTICATE PLAIN " + b64encode(b"\x00alice@example.com\x00secret"), sent)
        self.assertEqual(self.transport.value(), b"b OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
        self.assertEqual(bt.value(), b"c SELECT INBOX\r\n")
        self.assertEqual(self.server.user.login, "alice")

    def test_wrongPasswordStillTheLongWay(self):
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        self.backendLogin()
        self.connect(1)
        self.send(b"b LOGIN alice wrong\r\n")
        self.reactor.advance(2)  # the failure's penalty
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.transport.value(), b"b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
        self.assertEqual(self.cache.stats()["hits"], 0)
