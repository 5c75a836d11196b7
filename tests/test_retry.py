"""
The pool retries members that refused the connection or closed it untouched (a restarting
backend), with back-off, within C{connect_retry_time} and C{failover_timeout}, and never once a
byte of the login was sent (issue 15, defect 5).
"""

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.failures import AuthenticationFailed, BackendUnavailable
from casd.testing import acceptBackend, failBackend
from tests.test_connector import CONFIG, Hello, PoolTestMixin

RETRY_CONFIG = CONFIG.replace("connect_retry_time = 0.0", "connect_retry_time = 2.0")


class Eager(Hello):
    """
    A dialogue that speaks first (as an HTTP request does): its first bytes may be a login.
    """

    def dialogue(self):
        self.sendLine(b"LOGIN")
        return super().dialogue()


class RetryTests(PoolTestMixin, SynchronousTestCase):
    config = RETRY_CONFIG

    def attempts(self):
        return len(self.reactor.tcpClients)

    def test_refusedThenAccepted(self):
        """
        A single-member route whose member refuses (restarting) is tried again after a short
        pause; when it accepts, the login succeeds and the member is healthy.
        """
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        self.assertNoResult(d)
        self.assertEqual(self.attempts(), 1)
        self.reactor.advance(0.05)
        self.assertEqual(self.connectedHosts(), ["192.0.2.11", "192.0.2.11"])
        failBackend(self.reactor)
        self.reactor.advance(0.1)  # the pause doubles
        self.assertEqual(self.attempts(), 3)
        dialogue, transport = self.accept()
        self.assertIs(self.successResultOf(d), dialogue)
        self.assertEqual(transport.value(), b"LOGIN\r\n")  # the login went out once
        self.assertTrue(self.member("m1").up)
        self.assertEqual(len(self.logged("took the session after")), 1)

    def test_budgetExhausted(self):
        """
        A member that keeps refusing is retried with a doubling pause until
        C{connect_retry_time} is spent, then the session gets the unavailable failure.
        """
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        for pause in (0.05, 0.1, 0.2, 0.4, 0.8):
            before = self.attempts()
            self.reactor.advance(pause - 0.001)
            self.assertEqual(self.attempts(), before)
            self.reactor.advance(0.002)
            self.assertEqual(self.attempts(), before + 1)
            failBackend(self.reactor)
        # 1.55 s spent; the next pause (1 s) would end past the 2 s: given up now.
        e = self.failureResultOf(d, BackendUnavailable).value
        self.assertIn("5 retries", str(e))
        self.assertIn("refused", str(e).lower())
        self.assertEqual(self.attempts(), 6)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_failoverTimeoutBoundsRetries(self):
        self.connector.settings = self.context.config.backend.__class__(
            dict(self.context.config.backend.asDict(), failover_timeout=0.3)
        )
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        self.reactor.advance(0.05)
        failBackend(self.reactor)
        self.reactor.advance(0.1)
        failBackend(self.reactor)
        # 0.15 s spent; a 0.2 s pause would end past the 0.3 s budget.
        self.failureResultOf(d, BackendUnavailable)
        self.assertEqual(self.attempts(), 3)

    def test_retriesCountOnceForHealth(self):
        """
        One session's retries count as one failed connection: a restart seen by one login does
        not take the member DOWN (C{passive_fall} is 2 here).
        """
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        for pause in (0.05, 0.1, 0.2):
            self.reactor.advance(pause)
            failBackend(self.reactor)
        self.assertTrue(self.member("m1").up)
        self.reactor.advance(0.4)
        self.accept()
        self.successResultOf(d)
        self.assertTrue(self.member("m1").up)

    def test_groupFailsOverFirst(self):
        """
        A refusal fails over at once; members that refused are retried only when the others are
        tried too.
        """
        d = self.connect()
        failBackend(self.reactor)
        self.assertEqual(self.connectedHosts(), ["192.0.2.11", "192.0.2.12"])
        failBackend(self.reactor)
        failBackend(self.reactor)
        self.assertEqual(self.attempts(), 3)
        self.reactor.advance(0.05)
        self.assertEqual(self.connectedHosts()[3:], ["192.0.2.11"])
        failBackend(self.reactor)
        self.assertEqual(self.connectedHosts()[4:], ["192.0.2.12"])
        self.accept()
        self.assertEqual(self.successResultOf(d).target.server, "m2")

    def test_closedBeforeGreetingIsRetried(self):
        """
        A member that accepts and closes before its greeting, nothing sent to it (a server
        going down), is retried like a refusal.
        """
        d = self.connect(self.route("m1"))
        dialogue, transport = acceptBackend(self.reactor)
        dialogue.connectionLost(Failure(ConnectionLost("reset")))
        self.assertNoResult(d)
        self.reactor.advance(0.05)
        self.assertEqual(self.attempts(), 2)
        self.accept()
        self.successResultOf(d)

    def test_noRetryAfterLoginSent(self):
        """
        A connection lost after the login went out is never retried: the login would be sent
        twice.
        """
        d = self.connect(self.route("m1"))
        dialogue, transport = acceptBackend(self.reactor)
        dialogue.dataReceived(b"HELLO\r\n")
        self.assertEqual(transport.value(), b"LOGIN\r\n")
        dialogue.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, BackendUnavailable)
        self.reactor.advance(5)
        self.assertEqual(self.attempts(), 1)

    def test_noRetryWhenDialogueSpokeFirst(self):
        d = self.connector.connect(
            self.route("m1"), lambda target: Eager(target, None, self.user, None, self.context)
        )
        dialogue, transport = acceptBackend(self.reactor)
        self.assertEqual(transport.value(), b"LOGIN\r\n")
        dialogue.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, BackendUnavailable)
        self.reactor.advance(5)
        self.assertEqual(self.attempts(), 1)

    def test_timeoutNotRetried(self):
        """
        Only refusals are retried: a member that does not answer has had its connect timeout.
        """
        d = self.connect(self.route("m1"))
        self.reactor.advance(4.0)
        self.failureResultOf(d, BackendUnavailable)
        self.reactor.advance(5)
        self.assertEqual(self.attempts(), 1)

    def test_authenticationFailureOnRetry(self):
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        self.reactor.advance(0.05)
        self.accept(reply=b"NO")
        self.failureResultOf(d, AuthenticationFailed)

    def test_drainedDuringRetryIsLeft(self):
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        self.connector.setDraining({"m1"})
        self.reactor.advance(0.05)
        self.failureResultOf(d, BackendUnavailable)
        self.assertEqual(self.attempts(), 1)

    def test_disabled(self):
        self.connector.settings = self.context.config.backend.__class__(
            dict(self.context.config.backend.asDict(), connect_retry_time=0.0)
        )
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        self.failureResultOf(d, BackendUnavailable)
