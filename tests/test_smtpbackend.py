# -*- test-case-name: tests.test_smtpbackend -*-
"""
The SMTP backend session (L{protocols.smtpbackend}) through port 25's server: replies of every
class at every step, replies matched in order to the commands sent (a line sent unasked breaks
the session), body bytes only to a session in its own DATA, and only the per-phase timeouts
after the login (the failover deadline lifted).
"""

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.testing import CLOSE, ScriptedBackend, failBackend
from protocols.smtpbackend import NotInData
from tests.test_smtp_helpers import CONFIG, EHLO_XCLIENT, XCLIENT, SMTPTestMixin

LOST = b"451 4.4.2 Connection to the mailbox server lost, try again later\r\n"


class BackendReplyTests(SMTPTestMixin, SynchronousTestCase):
    """
    Replies of every class at every step of the backend session; a failing backend never yields
    a 250 the backend did not say.
    """

    def rcptWithBackend(self, script):
        self.ready()
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n"),
            b"250 2.1.0 Ok\r\n",
        )
        return ScriptedBackend(self.reactor, script).run()

    UNAVAILABLE = b"451 4.4.1 <alice@example.com>: Mailbox server unavailable, try again later\r\n"

    def test_connectRefused(self):
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        failBackend(self.reactor)
        self.assertEqual(self.out(), self.UNAVAILABLE)
        # Another recipient of that server in the same transaction: no second try.
        self.assertEqual(
            self.send(b"RCPT TO:<carol@example.com>\r\n"),
            b"451 4.4.1 <carol@example.com>: Mailbox server unavailable, try again later\r\n",
        )
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_greeting4xxAnd5xx(self):
        for greeting in (b"421 4.3.2 busy\r\n", b"554 5.3.2 no service\r\n", b"hello\r\n"):
            self.setUp()
            self.rcptWithBackend([(b"", greeting)])
            self.assertEqual(self.out(), self.UNAVAILABLE, greeting)

    def test_ehloRefused(self):
        self.rcptWithBackend(
            [(b"", b"220 mbx\r\n"), (b"EHLO cas.example.net\r\n", b"550 5.7.1 go away\r\n")]
        )
        self.assertEqual(self.out(), self.UNAVAILABLE)

    def test_starttlsRefused(self):
        self.reconfigure(
            CONFIG.replace('[backends.mbx1.smtp]\ntls = "none"', '[backends.mbx1.smtp]\ntls = "starttls"')
        )
        self.rcptWithBackend(
            [
                (b"", b"220 mbx\r\n"),
                (b"EHLO cas.example.net\r\n", b"250-mbx\r\n250 STARTTLS\r\n"),
                (b"STARTTLS\r\n", b"454 4.7.0 TLS not available due to local problem\r\n"),
            ]
        )
        self.assertEqual(self.out(), self.UNAVAILABLE)

    def test_xclientRefused(self):
        self.rcptWithBackend(
            [
                (b"", b"220 mbx\r\n"),
                (b"EHLO cas.example.net\r\n", EHLO_XCLIENT),
                (XCLIENT, b"550 5.7.0 Error: insufficient authorization\r\n"),
            ]
        )
        self.assertEqual(self.out(), self.UNAVAILABLE)

    def test_greetingTimeout(self):
        self.rcptWithBackend([])
        self.reactor.advance(5.1)
        self.assertEqual(self.out(), self.UNAVAILABLE)

    def test_mailRefusedAtBackend(self):
        for code in (b"451 4.3.0 try later", b"553 5.7.1 <s@example.org>: Sender address rejected"):
            self.setUp()
            self.ready()
            self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
            backend = self.openBackend()
            backend.step(
                b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n",
                code + b"\r\n503 5.5.1 Error: need MAIL command\r\n",
            )
            self.assertEqual(self.out(), code + b"\r\n")
            self.assertEqual(self.send(b"DATA\r\n"), b"554 5.5.1 Error: no valid recipients\r\n")

    def test_garbageAtMail(self):
        """
        A backend that answers MAIL with garbage is dropped; the other recipients of its group
        in this transaction get 451 at once, without a new connection.
        """
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        backend = self.openBackend()
        backend.step(
            b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n", b"hello there\r\n"
        )
        self.assertEqual(
            self.out(), b"451 4.4.2 Connection to the mailbox server lost, try again later\r\n"
        )
        self.assertTrue(backend.transport.disconnected)
        self.assertEqual(
            self.send(b"RCPT TO:<carol@example.com>\r\n"),
            b"451 4.4.1 <carol@example.com>: Mailbox server unavailable, try again later\r\n",
        )
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_rcptReplies(self):
        self.ready()
        backend = self.firstRecipient()
        for reply in (
            b"450 4.2.1 Mailbox busy",
            b"550 5.1.1 No such user",
            b"251 2.1.5 forwarded",
            b"250 2.1.5 Ok",
        ):
            self.send(b"RCPT TO:<carol@example.com>\r\n")
            backend.step(b"RCPT TO:<carol@example.com>\r\n", reply + b"\r\n")
            self.assertEqual(self.out(), reply + b"\r\n")

    def test_rcptMultilineReply(self):
        self.ready()
        backend = self.firstRecipient()
        self.send(b"RCPT TO:<carol@example.com>\r\n")
        backend.step(
            b"RCPT TO:<carol@example.com>\r\n",
            b"550-5.1.1 No such user\r\n550 5.1.1 See the docs\r\n",
        )
        self.assertEqual(self.out(), b"550-5.1.1 No such user\r\n550 5.1.1 See the docs\r\n")

    def test_rcptUnexpectedReplyLosesTransaction(self):
        self.ready()
        backend = self.firstRecipient()
        self.send(b"RCPT TO:<carol@example.com>\r\n")
        backend.step(b"RCPT TO:<carol@example.com>\r\n", b"354 what\r\n")
        lost = b"451 4.4.2 Connection to the mailbox server lost, try again later\r\n"
        self.assertEqual(self.out(), lost)
        self.assertTrue(backend.transport.disconnected)
        self.assertEqual(self.send(b"RCPT TO:<alice+x@example.com>\r\n"), lost)
        self.assertEqual(self.send(b"DATA\r\n"), lost)
        self.assertEqual(self.send(b"MAIL FROM:<s@example.org>\r\n"), b"250 2.1.0 Ok\r\n")

    def test_rcptTimeout(self):
        self.ready()
        self.firstRecipient()
        self.send(b"RCPT TO:<carol@example.com>\r\n")
        self.reactor.advance(5.1)
        self.assertEqual(
            self.out(), b"451 4.4.2 Connection to the mailbox server lost, try again later\r\n"
        )

    def test_backendClosesBetweenCommands(self):
        self.ready()
        backend = self.firstRecipient()
        backend.dialogue.dataReceived(b"421 4.4.2 mbx Error: timeout exceeded\r\n")
        backend.dialogue.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(
            self.send(b"DATA\r\n"),
            b"451 4.4.2 Connection to the mailbox server lost, try again later\r\n",
        )

    def test_dataReplies(self):
        for reply in (b"451 4.3.0 busy", b"554 5.5.1 no valid recipients"):
            self.setUp()
            self.ready()
            backend = self.firstRecipient()
            self.send(b"DATA\r\n")
            backend.step(b"DATA\r\n", reply + b"\r\n")
            self.assertEqual(self.out(), reply + b"\r\n")
            # Not in DATA: a next command is a command.
            self.assertEqual(self.send(b"NOOP\r\n"), b"250 2.0.0 Ok\r\n")

    def test_dataUnexpected250(self):
        self.ready()
        backend = self.firstRecipient()
        self.send(b"DATA\r\n")
        backend.step(b"DATA\r\n", b"250 2.0.0 what\r\n")
        self.assertEqual(
            self.out(), b"451 4.4.2 Connection to the mailbox server lost, try again later\r\n"
        )
        self.assertTrue(backend.transport.disconnected)

    def test_finalReplies(self):
        for reply in (
            b"250 2.0.0 Ok: queued as X",
            b"452 4.3.1 Insufficient system storage",
            b"554 5.7.1 Message rejected: spam",
        ):
            self.setUp()
            self.ready()
            backend = self.firstRecipient()
            self.startData(backend)
            self.send(b"x\r\n.\r\n")
            backend.step(b"x\r\n.\r\n", reply + b"\r\n")
            self.assertEqual(self.out(), reply + b"\r\n")
            self.assertEqual(self.server.messages, 1 if reply.startswith(b"250") else 0)

    def test_finalUnexpected(self):
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b".\r\n")
        backend.step(b".\r\n", b"354 again?\r\n")
        self.assertEqual(
            self.out(),
            b"451 4.4.2 The mailbox server did not confirm the message, try again later\r\n",
        )
        self.assertEqual(self.server.messages, 0)

    def test_finalTimeout(self):
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b".\r\n")
        self.reactor.advance(29)
        self.assertEqual(self.out(), b"")
        self.reactor.advance(2)
        self.assertEqual(
            self.out(),
            b"451 4.4.2 The mailbox server did not confirm the message, try again later\r\n",
        )
        self.assertTrue(backend.transport.disconnected)
        self.assertFalse(self.transport.disconnecting)  # the client timer did not fire first

    def test_finalClose(self):
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b".\r\n")
        backend.step(b".\r\n", CLOSE)
        self.assertEqual(
            self.out(),
            b"451 4.4.2 The mailbox server did not confirm the message, try again later\r\n",
        )

    def test_backendLostWhileStreaming(self):
        self.ready()
        backend = self.firstRecipient()
        self.startData(backend)
        self.send(b"first part\r\n")
        backend.dialogue.connectionLost(Failure(ConnectionDone()))
        backend.transport.clear()
        self.send(b"second part\r\n")
        self.assertEqual(backend.transport.value(), b"")
        self.assertEqual(
            self.send(b".\r\n"),
            b"451 4.4.2 Connection to the mailbox server lost, try again later\r\n",
        )
        self.assertEqual(self.server.messages, 0)
        self.assertEqual(self.transport.producerState, "producing")


class ReplyOrderTests(SMTPTestMixin, SynchronousTestCase):
    """
    Every reply the session reads answers a command it sent, in order; the body goes only to
    the session that answered 354 to its own DATA (issue 15 defect 9).
    """

    def test_unaskedLineBreaksSession(self):
        """
        A line the backend sends between transactions steps (here a 354 nobody asked for) is
        never kept for the next command: the session is dropped, DATA is never sent to it, and
        the client's DATA gets 451, so its body is never streamed.
        """
        self.ready()
        backend = self.firstRecipient()
        backend.transport.clear()
        backend.dialogue.dataReceived(b"354 go ahead\r\n")
        self.assertTrue(backend.transport.disconnected)
        self.assertEqual(self.send(b"DATA\r\n"), LOST)
        self.assertEqual(backend.transport.value(), b"")
        # Body lines are commands again: the transaction is over.
        self.assertEqual(
            self.send(b"RCPT TO:<carol@example.com>\r\n"),
            b"503 5.5.1 Error: need MAIL command\r\n",
        )

    def test_extraLineAfterReply(self):
        """
        A stray line behind the RCPT reply, in the same segment, is not saved up as the answer
        to DATA.
        """
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        backend = self.openBackend()
        backend.step(
            b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 early\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")
        self.assertTrue(backend.transport.disconnected)
        backend.transport.clear()
        self.assertEqual(
            self.send(b"DATA\r\nMAIL FROM:<forged@example.org>\r\n"), LOST + b"250 2.1.0 Ok\r\n"
        )
        self.assertEqual(backend.transport.value(), b"")

    def test_noBodyOutsideData(self):
        """
        The session refuses body bytes unless it answered 354 itself, and drops itself.
        """
        self.ready()
        backend = self.firstRecipient()
        session = backend.dialogue
        backend.transport.clear()
        self.assertRaises(NotInData, session.write, b"RCPT TO:<carol@example.com>\r\n")
        self.assertEqual(backend.transport.value(), b"")
        self.assertTrue(backend.transport.disconnected)

    def test_bodyOnlyAfterOwn354(self):
        self.ready()
        backend = self.firstRecipient()
        self.assertFalse(backend.dialogue.inData)
        self.startData(backend)
        self.assertTrue(backend.dialogue.inData)
        self.send(b"x\r\n.\r\n")
        self.assertFalse(backend.dialogue.inData)
        backend.step(b"x\r\n.\r\n", b"250 2.0.0 Ok\r\n")
        self.assertEqual(self.out(), b"250 2.0.0 Ok\r\n")


class FailoverDeadlineTests(SMTPTestMixin, SynchronousTestCase):
    """
    The failover deadline bounds the backend login only (issue 15 defect 2).
    """

    config = CONFIG.replace("reply_timeout = 5.0", "reply_timeout = 5.0\nfailover_timeout = 10.0")

    def test_deadlineLiftedAfterLogin(self):
        self.ready()
        backend = self.firstRecipient()
        self.assertEqual(backend.dialogue.deadline, float("inf"))
        # Long past the failover deadline, each reply still gets its own reply_timeout.
        self.reactor.advance(20)
        self.startData(backend)
        self.send(b"x\r\n.\r\n")
        self.reactor.advance(25)  # data_timeout is 30
        backend.step(b"x\r\n.\r\n", b"250 2.0.0 Ok: queued\r\n")
        self.assertEqual(self.out(), b"250 2.0.0 Ok: queued\r\n")
        # A second transaction on the same session, later still.
        self.reactor.advance(20)
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<carol@example.com>\r\n"),
            b"250 2.1.0 Ok\r\n",
        )
        self.reactor.advance(4)
        backend.step(
            b"RSET\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<carol@example.com>\r\n",
            b"250 2.0.0 Ok\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_loginStillBounded(self):
        """
        During the login the deadline holds: a backend that greets and then says nothing is
        given up on at the deadline (3 s), before its reply timeout (5 s).
        """
        self.reconfigure(CONFIG.replace("reply_timeout = 5.0", "reply_timeout = 5.0\nfailover_timeout = 3.0"))
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice@example.com>\r\n")
        backend = ScriptedBackend(self.reactor, [(b"", b"220 mbx ESMTP\r\n")]).run()
        self.assertEqual(backend.dialogue.deadline, 3.0)
        self.reactor.advance(2.9)
        self.assertEqual(self.out(), b"")
        self.reactor.advance(0.2)
        self.assertEqual(
            self.out(),
            b"451 4.4.1 <alice@example.com>: Mailbox server unavailable, try again later\r\n",
        )
