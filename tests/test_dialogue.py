"""
The base of every backend login dialogue (L{casd.session.dialogue.BackendDialogue}): line-driven
steps, TLS, time-outs set by the pool, and what is left over for the relay.
"""

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.failures import AuthenticationFailed, BackendUnavailable
from casd.routing.router import routeTo
from casd.session.dialogue import BackendDialogue
from casd.testing import acceptBackend, makeContext
from casd.timerwheel import RESOLUTION
from protocols.imap import imap

CONFIG = """
[routing]
default_backend = "mbx"

[backend]
tls_timeout = 3.0
banner_timeout = 2.0
reply_timeout = 5.0

[backends.mbx]
host = "192.0.2.10"
[backends.mbx.imap]
tls = "starttls"
"""


class Toy(BackendDialogue):
    """
    Greeting C{HI} (C{TLS} in it asks for STARTTLS), then C{LOGIN} answered C{OK}, C{NO} or
    C{BOOM} (a step's own bug).
    """

    def dialogue(self):
        self.expectLine(self.greeting)

    def greeting(self, line):
        if not line.startswith(b"HI"):
            raise self.fail("bad greeting")
        if b"TLS" in line:
            self.command(b"STARTTLS", lambda reply: self.startTLS(self.logIn))
        else:
            self.logIn()

    def logIn(self):
        self.command(b"LOGIN", self.loginReply)

    def loginReply(self, line):
        if line == b"BOOM":
            raise ZeroDivisionError("a bug in a step")
        if line == b"NO":
            raise self.fail("refused", authFailed=True)
        self.succeed()


class DialogueTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, config=CONFIG)
        self.user = UserRecord(login="alice")
        route = routeTo(self.context.config, "mbx", self.user, imap, "test")
        self.loggedIn = self.context.connector.connect(
            route, lambda target: Toy(target, None, self.user, None, self.context)
        )
        self.dialogue, self.transport = acceptBackend(self.reactor)

    def test_timeoutsFromThePool(self):
        """
        The pool sets the dialogue's time-outs from the configuration; the dialogue reads none.
        """
        d = self.dialogue
        self.assertEqual((d.tlsTimeout, d.bannerTimeout, d.replyTimeout), (3.0, 2.0, 5.0))

    def test_linesToSteps(self):
        """
        Each line goes to the step waiting for it; what the backend sent after the login reply
        is left over for the relay.
        """
        self.dialogue.dataReceived(b"HI there\r\n")
        self.assertEqual(self.transport.value(), b"LOGIN\r\n")
        self.dialogue.dataReceived(b"OK\r\n* unsolicited\r\npartial")
        self.assertIs(self.successResultOf(self.loggedIn), self.dialogue)
        self.assertEqual(self.dialogue.leftover, b"* unsolicited\r\npartial")
        self.assertIsNone(self.dialogue.credentials)

    def test_greetingThenReplyTimeouts(self):
        self.reactor.advance(1.9)
        self.assertNoResult(self.loggedIn)
        self.dialogue.dataReceived(b"HI\r\n")
        self.reactor.advance(4.9)
        self.assertNoResult(self.loggedIn)
        # The session timers are on the wheel: due at 6.9, run at its next slot (up to
        # RESOLUTION later).
        self.reactor.advance(0.1 + RESOLUTION)
        failure = self.failureResultOf(self.loggedIn, BackendUnavailable)
        self.assertIn("no reply in time", str(failure.value))
        self.assertTrue(self.transport.disconnecting)

    def test_refusal(self):
        self.dialogue.dataReceived(b"HI\r\nNO\r\n")
        self.failureResultOf(self.loggedIn, AuthenticationFailed)

    def test_bugInAStep(self):
        """
        An exception that is not a failure of the vocabulary is logged and fails the session
        as a protocol error of the backend.
        """
        events = []
        self.patch(BackendDialogue, "log", Logger(observer=events.append))
        self.dialogue.dataReceived(b"HI\r\nBOOM\r\n")
        failure = self.failureResultOf(self.loggedIn, BackendUnavailable)
        self.assertIn("protocol error", str(failure.value))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 0)
        self.assertIsInstance(events[0]["log_failure"].value, ZeroDivisionError)

    def test_startTLSThenNextStep(self):
        """
        C{startTLS(then)}: what was read before is forgotten; the next step runs once the
        handshake completed.
        """
        self.dialogue.dataReceived(b"HI TLS\r\n")
        self.transport.clear()
        self.dialogue.dataReceived(b"GO\r\ninjected\r\n")
        self.assertIsNotNone(self.transport.tlsStarted)
        self.assertEqual(self.transport.value(), b"")
        self.dialogue.handshakeCompleted()
        self.assertEqual(self.transport.value(), b"LOGIN\r\n")
        self.dialogue.dataReceived(b"OK\r\n")
        self.assertEqual(self.successResultOf(self.loggedIn).leftover, b"")

    def test_queuedLinesLeftOverInOrder(self):
        """
        Lines read while no step waited (here: before the handshake completed) go to the next
        step; what follows the login reply is left over in the order it came, the partial line
        last.
        """
        self.dialogue.dataReceived(b"HI TLS\r\nGO\r\n")
        self.dialogue.dataReceived(b"OK\r\n* one\r\n* two\r\npart")
        self.dialogue.handshakeCompleted()
        self.assertEqual(self.successResultOf(self.loggedIn).leftover, b"* one\r\n* two\r\npart")

    def test_oneTimerForTheDialogue(self):
        """
        The dialogue's steps share one timer, pushed forward rather than replaced.
        """
        self.assertEqual(len(self.reactor.getDelayedCalls()), 1)
        timer = self.dialogue._timer
        self.dialogue.dataReceived(b"HI\r\n")
        self.assertIs(self.dialogue._timer, timer)
        self.assertEqual(timer.getTime(), 5.0)
        self.dialogue.dataReceived(b"OK\r\n")
        self.successResultOf(self.loggedIn)
        self.assertFalse(timer.active())

    def test_handshakeTimeout(self):
        self.dialogue.dataReceived(b"HI TLS\r\nGO\r\n")
        self.reactor.advance(3.0)
        failure = self.failureResultOf(self.loggedIn, BackendUnavailable)
        self.assertIn("no TLS handshake in time", str(failure.value))


class OutcomeTests(SynchronousTestCase):
    """
    The outcome of a dialogue goes to the pool through L{BackendDialogue.whenDone}, with no
    L{Deferred} per login; L{BackendDialogue.loggedIn} is made when asked for, before or after.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, config=CONFIG)
        self.user = UserRecord(login="alice")
        route = routeTo(self.context.config, "mbx", self.user, imap, "test")
        self.target = route.targets[0]

    def dialogue(self):
        toy = Toy(self.target, None, self.user, None, self.context)
        toy.tlsTimeout, toy.bannerTimeout, toy.replyTimeout = 3.0, 2.0, 5.0
        toy.deadline = float("inf")
        self.reported = []
        toy.whenDone(lambda d: self.reported.append(("ok", d)), lambda f: self.reported.append(("failed", f)))
        return toy

    def connect(self, toy):
        from casd.testing import TLSStringTransport

        transport = TLSStringTransport()
        toy.makeConnection(transport)
        return transport

    def test_noDeferredUnlessAsked(self):
        toy = self.dialogue()
        self.connect(toy)
        toy.dataReceived(b"HI\r\nOK\r\n")
        self.assertEqual(self.reported, [("ok", toy)])
        self.assertIsNone(toy._loggedInDeferred)
        # Asked for afterwards: already fired with the same outcome.
        self.assertIs(self.successResultOf(toy.loggedIn), toy)

    def test_failureReportedOnceToBoth(self):
        toy = self.dialogue()
        d = toy.loggedIn
        self.connect(toy)
        toy.dataReceived(b"HI\r\nNO\r\n")
        self.assertEqual([kind for kind, _ in self.reported], ["failed"])
        self.reported[0][1].trap(AuthenticationFailed)
        self.failureResultOf(d, AuthenticationFailed)
        toy.connectionLost(None)  # nothing reported again
        self.assertEqual(len(self.reported), 1)

    def test_timeoutReported(self):
        toy = self.dialogue()
        self.connect(toy)
        self.reactor.advance(2.0)
        self.assertEqual([kind for kind, _ in self.reported], ["failed"])
        self.assertIn("no greeting in time", str(self.reported[0][1].value))
        self.failureResultOf(toy.loggedIn, BackendUnavailable)

    def test_failingReceiverLogged(self):
        """
        A receiver that raises is logged, as a failing callback of a L{Deferred} would be, and
        does not fail the dialogue's read.
        """
        toy = self.dialogue()

        def broken(d):
            raise RuntimeError("receiver bug")

        toy.whenDone(broken, lambda f: None)
        self.connect(toy)
        toy.dataReceived(b"HI\r\nOK\r\n")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIs(self.successResultOf(toy.loggedIn), toy)
