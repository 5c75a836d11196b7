# -*- test-case-name: tests.test_smtp -*-
"""
The SMTP transaction core (L{protocols.smtp}, L{protocols.smtpdata}), driven through port 25's
server with StringTransport and MemoryReactorClock: the command grammar and its states, routing
by recipient (452 for another group), the transaction, DATA streaming without smuggling, limits
and timeouts, RSET and QUIT in every state.  Recipient filtering: L{tests.test_smtpmx}; the
backend's replies: L{tests.test_smtpbackend}.
"""

from twisted.trial.unittest import SynchronousTestCase

import attr

from casd.testing import ScriptedBackend, connectFrontend
from tests.test_smtp_helpers import (
    CONFIG,
    EHLO_PLAIN,
    EHLO_XCLIENT,
    HELO,
    XCLIENT,
    SMTPTestMixin,
)

BODY = b"Subject: hello\r\n\r\nline one\r\n..a stuffed dot\r\n"


class GreetingAndCommandTests(SMTPTestMixin, SynchronousTestCase):
    def test_greetingAndEhlo(self):
        self.assertEqual(self.connect(), b"220 cas.example.net ESMTP ready\r\n")
        self.assertEqual(
            self.send(b"EHLO client.example.org\r\n"),
            b"250-cas.example.net\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
            b"250 ENHANCEDSTATUSCODES\r\n",
        )

    def test_smtputf8OnlyWhenConfigured(self):
        self.reconfigure(
            CONFIG.replace("max_recipients = 3", "max_recipients = 3\nsmtputf8 = true")
        )
        self.connect()
        self.assertIn(b"250-SMTPUTF8\r\n", self.send(b"EHLO x.example\r\n"))
        self.assertEqual(
            self.send("MAIL FROM:<jörg@example.org> SMTPUTF8\r\n".encode()), b"250 2.1.0 Ok\r\n"
        )

    def test_helo(self):
        self.connect()
        self.assertEqual(self.send(b"HELO client.example.org\r\n"), b"250 cas.example.net\r\n")
        # No ESMTP parameters after HELO.
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org> SIZE=10\r\n"),
            b"555 5.5.4 Unsupported option: SIZE\r\n",
        )

    def test_ehloSyntax(self):
        self.connect()
        self.assertEqual(self.send(b"EHLO\r\n"), b"501 5.5.4 Syntax: EHLO hostname\r\n")
        self.assertEqual(self.send(b"HELO a b\r\n"), b"501 5.5.4 Syntax: HELO hostname\r\n")

    def test_noopHelpVrfyRset(self):
        self.connect()
        self.assertEqual(
            self.send(b"NOOP\r\nHELP\r\nVRFY alice\r\nRSET\r\nEXPN list\r\n"),
            b"250 2.0.0 Ok\r\n214 2.0.0 See RFC 5321\r\n"
            b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
            b"250 2.0.0 Ok\r\n502 5.5.1 Error: command not implemented\r\n",
        )

    def test_junkCommandLimit(self):
        """
        A client that only keeps the session alive (NOOP, RSET, VRFY, HELP) is told 421 and
        closed after C{junk_command_limit} of them, however slowly it sends them.
        """
        self.reconfigure(CONFIG.replace("max_recipients = 3", "max_recipients = 3\njunk_command_limit = 3"))
        self.connect()
        self.assertEqual(self.send(b"NOOP\r\nRSET\r\n"), b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n")
        self.reactor.advance(20)
        self.assertEqual(self.send(b"HELP\r\n"), b"214 2.0.0 See RFC 5321\r\n")
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(
            self.send(b"NOOP\r\n"),
            b"421 4.7.0 Too many commands that move no mail, closing the connection\r\n",
        )
        self.assertTrue(self.transport.disconnecting)

    def test_sequenceErrors(self):
        self.connect()
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org>\r\n"),
            b"503 5.5.1 Error: send HELO/EHLO first\r\n",
        )
        self.send(b"EHLO x.example\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<alice@example.com>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n"
        )
        self.assertEqual(self.send(b"DATA\r\n"), b"503 5.5.1 Error: need RCPT command\r\n")
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org>\r\nDATA\r\n"),
            b"503 5.5.1 Error: nested MAIL command\r\n554 5.5.1 Error: no valid recipients\r\n",
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_tooManyErrors(self):
        self.connect()
        out = self.send(b"FOO\r\nBAR\r\nBAZ\r\nQUUX\r\nA\r\nB\r\nNOOP\r\n")
        self.assertEqual(
            out,
            b"500 5.5.2 Error: command not recognized\r\n" * 5
            + b"421 4.7.0 cas.example.net Error: too many errors\r\n",
        )
        self.assertTrue(self.transport.disconnecting)

    def test_authNotOnPort25(self):
        self.ready()
        self.assertEqual(
            self.send(b"AUTH PLAIN AGFsaWNlAGFsaWNlLXB3\r\n"),
            b"503 5.5.1 Error: authentication not enabled\r\n",
        )

    def test_starttlsWithoutCertificate(self):
        self.ready()
        self.assertEqual(
            self.send(b"STARTTLS\r\n"), b"502 5.5.1 Error: command not implemented\r\n"
        )

    def test_overlongLine(self):
        self.connect()
        self.assertEqual(self.send(b"EHLO " + b"x" * 600), b"500 5.5.2 Error: line too long\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_overlongLineAfterNewline(self):
        self.ready()
        self.assertEqual(
            self.send(b"MAIL FROM:<" + b"a" * 600 + b"@example.org>\r\nNOOP\r\n"),
            b"500 5.5.2 Error: line too long\r\n",
        )

    def test_commandTimeout(self):
        self.ready()
        self.reactor.advance(59)
        self.send(b"NOOP\r\n")
        self.reactor.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        self.assertEqual(self.out(), b"421 4.4.2 cas.example.net Error: timeout exceeded\r\n")
        self.assertTrue(self.transport.disconnecting)


class TransactionTests(SMTPTestMixin, SynchronousTestCase):
    def test_wholeTransaction(self):
        """
        The backend hears who the client is (XCLIENT, then EHLO as the client), gets MAIL and
        RCPT pipelined, the body byte for byte, and its reply to the end of data is the one the
        client gets.
        """
        self.ready()
        backend = self.firstRecipient()
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.10", 25))
        self.startData(backend)
        self.assertEqual(self.send(BODY), b"")
        self.assertEqual(backend.received(), BODY[:-4])  # the last bytes wait for the end
        self.assertEqual(self.send(b".\r\n"), b"")
        backend.step(b"ot\r\n.\r\n", b"250 2.0.0 Ok: queued as 4Xz1\r\n")
        self.assertEqual(self.out(), b"250 2.0.0 Ok: queued as 4Xz1\r\n")
        self.assertEqual(self.server.messages, 1)
        self.assertEqual(self.send(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(backend.received(), b"QUIT\r\n")
        self.assertTrue(backend.transport.disconnecting)

    def test_pipeliningAcrossSegments(self):
        """
        A pipelined transaction cut at random places: every reply comes, in order, once.
        """
        self.connect()
        script = (
            b"EHLO client.example.org\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n"
            b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n"
        )
        out = self.send(script[:7]) + self.send(script[7:30]) + self.send(script[30:90])
        backend = self.openBackend()
        backend.step(
            b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        out += self.out() + self.send(script[90:131]) + self.send(script[131:])
        backend.step(b"RCPT TO:<carol@example.com>\r\n", b"250 2.1.5 Ok\r\n")
        backend.step(b"DATA\r\n", b"354 go\r\n")
        out += self.out()
        out += self.send(b"x\r\n.\r\nMAIL FROM:<t@example.org>\r\nRCPT TO:<carol@example.com>\r\n")
        backend.step(b"x\r\n.\r\n", b"250 2.0.0 Ok: queued as A\r\n")
        backend.step(
            b"RSET\r\nMAIL FROM:<t@example.org>\r\nRCPT TO:<carol@example.com>\r\n",
            b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        out += self.out()
        self.assertEqual(
            out,
            b"250-cas.example.net\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
            b"250 ENHANCEDSTATUSCODES\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
            b"550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown\r\n"
            b"250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n250 2.0.0 Ok: queued as A\r\n"
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_backendRepliesAcrossSegments(self):
        """
        The backend's replies, multi-line and pipelined, cut at every byte: the same session.
        """
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        backend = ScriptedBackend(self.reactor, [(b"", b"")]).run()
        for chunk, expected in (
            (b"220-mbx.example.com ESMTP\r\n220 hi\r\n", b"EHLO cas.example.net\r\n"),
            (EHLO_XCLIENT, XCLIENT),
            (b"220 mbx.example.com ESMTP\r\n", b"EHLO " + HELO + b"\r\n"),
            (EHLO_PLAIN, b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n"),
            (b"250 2.1.0 Ok\r\n250-2.1.5 Ok\r\n250 2.1.5 really\r\n", b""),
        ):
            for i in range(len(chunk)):
                backend.dialogue.dataReceived(chunk[i : i + 1])
            self.assertEqual(backend.received(), expected)
        self.assertEqual(self.out(), b"250-2.1.5 Ok\r\n250 2.1.5 really\r\n")

    def test_splitRouting(self):
        """
        The first accepted recipient fixes the backend; one on another mailbox server gets 452
        and arrives in the next transaction at its own server.
        """
        self.ready()
        first = self.firstRecipient()
        self.assertEqual(
            self.send(b"RCPT TO:<bob@example.com>\r\n"),
            b"452 4.5.3 <bob@example.com>: Recipient on another mailbox server, send it in a new"
            b" transaction\r\n",
        )
        self.send(b"RCPT TO:<carol@example.com>\r\n")
        first.step(b"RCPT TO:<carol@example.com>\r\n", b"250 2.1.5 Ok\r\n")
        self.startData(first)
        self.send(b"hi\r\n.\r\n")
        first.step(b"hi\r\n.\r\n", b"250 2.0.0 Ok: queued as 1\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        # The retry: a transaction of its own, at mbx2.
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<bob@example.com>\r\n")
        self.assertEqual(first.received(), b"QUIT\r\n")
        self.assertEqual(self.reactor.tcpClients[1][:2], ("192.0.2.20", 25))
        second = self.openBackend()
        second.step(
            b"MAIL FROM:<s@example.org>\r\nRCPT TO:<bob@example.com>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_rebindWhileNoRecipientAccepted(self):
        """
        The group is fixed by the first *accepted* recipient: one the backend refused fixes
        nothing.
        """
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        first = self.openBackend()
        first.step(
            b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n",
            b"250 2.1.0 Ok\r\n550 5.2.1 <alice@example.com>: mailbox disabled\r\n",
        )
        self.assertEqual(self.out(), b"550 5.2.1 <alice@example.com>: mailbox disabled\r\n")
        self.send(b"RCPT TO:<bob@example.com>\r\n")
        self.assertEqual(first.received(), b"QUIT\r\n")
        second = self.openBackend()
        second.step(
            b"MAIL FROM:<s@example.org>\r\nRCPT TO:<bob@example.com>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_xforward(self):
        """
        A backend without XCLIENT but with XFORWARD hears the client's identity before each
        transaction (it forgets it after one).
        """
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        backend = ScriptedBackend(
            self.reactor,
            [
                (b"", b"220 mbx ESMTP\r\n"),
                (
                    b"EHLO cas.example.net\r\n",
                    b"250-mbx\r\n250-PIPELINING\r\n250 XFORWARD NAME ADDR PROTO HELO IDENT\r\n",
                ),
            ],
        ).run()
        xforward = (
            b"XFORWARD ADDR=198.51.100.7 NAME=[UNAVAILABLE] HELO=client.example.org PROTO=ESMTP IDENT="
            + self.server.client.sessionId.encode()
        )
        backend.step(
            xforward + b"\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n",
            b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")
        self.startData(backend)
        self.send(b".\r\n")
        backend.step(b".\r\n", b"250 2.0.0 Ok\r\n")
        self.send(b"MAIL FROM:<t@example.org>\r\nRCPT TO:<carol@example.com>\r\n")
        backend.step(
            b"RSET\r\n"
            + xforward
            + b"\r\nMAIL FROM:<t@example.org>\r\nRCPT TO:<carol@example.com>\r\n",
            b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )

    def test_noPipeliningAtBackend(self):
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        backend = ScriptedBackend(
            self.reactor,
            [(b"", b"220 mbx ESMTP\r\n"), (b"EHLO cas.example.net\r\n", b"250 mbx\r\n")],
        ).run()
        backend.step(b"MAIL FROM:<s@example.org>\r\n", b"250 2.1.0 Ok\r\n")
        backend.step(b"RCPT TO:<alice@example.com>\r\n", b"250 2.1.5 Ok\r\n")
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_ipv6Client(self):
        self.server, self.transport = connectFrontend(
            self.descriptor, self.context, 0, ("198.51.100.7", 1)
        )
        # connectFrontend speaks IPv4: give the session an IPv6 peer before it says anything.
        self.server.client = attr.evolve(self.server.client, peerHost="2001:db8::7", peerPort=1234)
        self.send(
            b"EHLO v6.example.org\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n"
        )
        self.openBackend(
            helo=b"v6.example.org",
            xclient=b"XCLIENT ADDR=IPV6:2001:db8::7 PORT=1234 NAME=[UNAVAILABLE] HELO=v6.example.org PROTO=ESMTP\r\n",
        )

    def test_starttlsAtBackend(self):
        """
        STARTTLS towards the backend: the capabilities seen before TLS are asked again after.
        """
        self.reconfigure(
            CONFIG.replace(
                '[backends.mbx1.smtp]\ntls = "none"', '[backends.mbx1.smtp]\ntls = "starttls"'
            )
        )
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        backend = ScriptedBackend(
            self.reactor,
            [
                (b"", b"220 mbx ESMTP\r\n"),
                (b"EHLO cas.example.net\r\n", b"250-mbx\r\n250-STARTTLS\r\n250 PIPELINING\r\n"),
                (b"STARTTLS\r\n", b"220 2.0.0 Ready\r\n"),
                (b"EHLO cas.example.net\r\n", EHLO_XCLIENT),
                (XCLIENT, b"220 mbx ESMTP\r\n"),
                (b"EHLO " + HELO + b"\r\n", EHLO_PLAIN),
                (
                    b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n",
                    b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
                ),
            ],
        ).run()
        self.assertEqual(backend.transport.tlsStarted, ("client-tls", "192.0.2.10"))
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_backendWithoutStarttlsRefused(self):
        self.reconfigure(
            CONFIG.replace(
                '[backends.mbx1.smtp]\ntls = "none"', '[backends.mbx1.smtp]\ntls = "starttls"'
            )
        )
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        ScriptedBackend(
            self.reactor,
            [(b"", b"220 mbx ESMTP\r\n"), (b"EHLO cas.example.net\r\n", b"250 mbx\r\n")],
        ).run()
        self.assertEqual(
            self.out(),
            b"451 4.4.1 <alice@example.com>: Mailbox server unavailable, try again later\r\n",
        )


class DataTests(SMTPTestMixin, SynchronousTestCase):
    def test_smuggling(self):
        """
        A smuggled second message behind a bare-LF "end" is content of the one message; the
        backend sees one end of data, the client gets one reply for it, and the commands after
        the true end run afterwards.
        """
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(
            b"Subject: one\r\n\r\nbody\n.\nMAIL FROM:<forged@example.org>\r\nRCPT TO:<carol@example.com>\r\n"
            b"DATA\r\nforged\r\n.\r\nNOOP\r\n"
        )
        self.assertEqual(self.out(), b"")
        backend.step(
            b"Subject: one\r\n\r\nbody\r\n..\r\nMAIL FROM:<forged@example.org>\r\nRCPT TO:<carol@example.com>\r\n"
            b"DATA\r\nforged\r\n.\r\n",
            b"250 2.0.0 Ok: queued as S\r\n",
        )
        self.assertEqual(self.out(), b"250 2.0.0 Ok: queued as S\r\n250 2.0.0 Ok\r\n")
        self.assertEqual(backend.received(), b"")

    def test_bareLineEndingsRejected(self):
        self.reconfigure(
            CONFIG.replace("max_recipients = 3", 'max_recipients = 3\nbare_line_endings = "reject"')
        )
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b"ok line\r\n")
        self.send(b"bad\n.\nmore\r\n")
        self.assertTrue(backend.transport.disconnected)  # aborted: no end of data ever
        self.assertEqual(
            self.send(b".\r\nNOOP\r\n"),
            b"554 5.6.0 Message refused: bare CR or LF in its data, use CRLF line endings\r\n250 2.0.0 Ok\r\n",
        )
        self.assertNotIn(b"\r\n.\r\n", backend.transport.value())

    def test_sizeExceededInData(self):
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b"x" * 998 + b"\r\n")
        self.assertFalse(backend.transport.disconnected)
        self.send(b"y" * 10 + b"\r\n")
        self.assertTrue(backend.transport.disconnected)
        self.assertEqual(self.send(b".\r\n"), b"552 5.3.4 Message size exceeds fixed limit\r\n")
        self.assertNotIn(b"\r\n.\r\n", backend.transport.value())

    def test_flowControl(self):
        """
        While DATA streams, a backend that cannot keep up pauses reading from the client.
        """
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        producer = backend.transport.producer
        self.assertIsNotNone(producer)
        self.assertTrue(backend.transport.streaming)
        producer.pauseProducing()
        self.assertEqual(self.transport.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.transport.producerState, "producing")
        producer.pauseProducing()
        self.send(b"end\r\n.\r\n")
        self.assertIsNone(backend.transport.producer)
        self.assertEqual(self.transport.producerState, "producing")

    def test_clientLeavesInData(self):
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b"half a message\r\n")
        self.clientGone()
        self.assertTrue(backend.transport.disconnected)
        self.assertNotIn(b"\r\n.\r\n", backend.transport.value())
        self.assertNotIn(b"QUIT", backend.transport.value())

    def test_timeoutInData(self):
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b"half\r\n")
        self.reactor.advance(61)
        self.assertEqual(self.out(), b"421 4.4.2 cas.example.net Error: timeout exceeded\r\n")
        self.assertTrue(backend.transport.disconnected)
        self.assertNotIn(b"\r\n.\r\n", backend.transport.value())


class RsetQuitTests(SMTPTestMixin, SynchronousTestCase):
    """
    RSET and QUIT in every state.
    """

    def test_beforeEhlo(self):
        self.connect()
        self.assertEqual(
            self.send(b"RSET\r\nQUIT\r\nNOOP\r\n"), b"250 2.0.0 Ok\r\n221 2.0.0 Bye\r\n"
        )
        self.assertTrue(self.transport.disconnecting)

    def test_afterMail(self):
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertEqual(
            self.send(b"RSET\r\nMAIL FROM:<t@example.org>\r\n"), b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n"
        )
        self.assertEqual(self.send(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_afterRcpt(self):
        self.ready()
        backend = self.firstRecipient()
        self.assertEqual(self.send(b"RSET\r\n"), b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.send(b"DATA\r\n"), b"503 5.5.1 Error: need RCPT command\r\n")
        # The next transaction resets the backend's before it starts.
        self.send(b"MAIL FROM:<t@example.org>\r\nRCPT TO:<carol@example.com>\r\n")
        backend.step(
            b"RSET\r\nMAIL FROM:<t@example.org>\r\nRCPT TO:<carol@example.com>\r\n",
            b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.send(b"QUIT\r\n"), b"221 2.0.0 Bye\r\n")
        self.assertEqual(backend.received(), b"QUIT\r\n")

    def test_insideData(self):
        """
        In DATA, "RSET" and "QUIT" are lines of the message.
        """
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.assertEqual(self.send(b"RSET\r\nQUIT\r\n"), b"")
        self.send(b".\r\n")
        backend.step(b"RSET\r\nQUIT\r\n.\r\n", b"250 2.0.0 Ok\r\n")
        self.assertFalse(self.transport.disconnecting)

    def test_quitWhileBackendAnswers(self):
        """
        A QUIT pipelined behind the end of data waits for the backend's reply, which the client
        gets first.
        """
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b".\r\nQUIT\r\n")
        self.assertFalse(self.transport.disconnecting)
        backend.step(b".\r\n", b"250 2.0.0 Ok: queued as Q\r\n")
        self.assertEqual(self.out(), b"250 2.0.0 Ok: queued as Q\r\n221 2.0.0 Bye\r\n")
        self.assertEqual(backend.received(), b"QUIT\r\n")

    def test_quitWhileRecipientPending(self):
        self.ready()
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\nQUIT\r\n"),
            b"250 2.1.0 Ok\r\n",
        )
        backend = self.openBackend()
        backend.step(
            b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n221 2.0.0 Bye\r\n")
        self.assertEqual(backend.received(), b"QUIT\r\n")

    def test_ehloResetsTransaction(self):
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.send(b"EHLO other.example.org\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<alice@example.com>\r\n"), b"503 5.5.1 Error: need MAIL command\r\n"
        )
