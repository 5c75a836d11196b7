"""
casd out of file descriptors: its own shortage is not a backend's fault.  Found by
C{bench/soak.py}: with C{RLIMIT_NOFILE} reached, every connect failed with C{EMFILE} and took the
backend DOWN, so new logins kept failing for C{rise} checks after descriptors were free again.
"""

from twisted.internet import error
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.failures import BackendUnavailable
from casd.pool.health import NOT_CHECKED, HealthChecker, isLocalExhaustion, probeMember
from casd.testing import failBackend
from tests.test_health import CONFIG as HEALTH_CONFIG
from tests.test_connector import PoolTestMixin


def emfile():
    return error.ConnectBindError(24, "Too many open files")


class LocalExhaustionTests(SynchronousTestCase):
    def test_classified(self):
        self.assertTrue(isLocalExhaustion(emfile()))
        self.assertTrue(isLocalExhaustion(OSError(23, "Too many open files in system")))
        self.assertFalse(isLocalExhaustion(error.ConnectionRefusedError()))
        self.assertFalse(isLocalExhaustion(error.ConnectError(111, "refused")))


class PoolTests(PoolTestMixin, SynchronousTestCase):
    def test_memberStaysUp(self):
        """
        Connects that fail with EMFILE fail the session (temporarily) but never take the member
        DOWN, however many.
        """
        for _ in range(5):
            d = self.connect(self.route("m1"))
            failBackend(self.reactor, reason=emfile())
            e = self.failureResultOf(d, BackendUnavailable).value
            self.assertIn("out of file descriptors", str(e))
        self.assertTrue(self.member("m1").up)
        self.assertEqual(self.logged("is DOWN"), [])


class HealthTests(SynchronousTestCase):
    def test_probeNotChecked(self):
        reactor = MemoryReactorClock()
        from casd.testing import makeContext
        from protocols.imap import imap

        context = makeContext(reactor, config=HEALTH_CONFIG)
        from casd.routing.router import targetFor

        target = targetFor(context.config.backends["m1"], imap)
        d = probeMember(reactor, context.connector.endpointFor(target, 2.0), imap.healthProbe, 2.0)
        failBackend(reactor, reason=emfile())
        self.assertEqual(self.successResultOf(d), NOT_CHECKED)

    def test_checkerLeavesMemberAlone(self):
        from casd.testing import makeContext
        from casd.routing.router import targetFor
        from protocols.imap import imap

        reactor = MemoryReactorClock()
        context = makeContext(reactor, config=HEALTH_CONFIG)
        checker = HealthChecker(reactor, context.connector, context.config, context.protocols)
        checker.startService()
        self.addCleanup(checker.stopService)
        member = context.connector.member(targetFor(context.config.backends["m1"], imap))
        handled = 0
        for _ in range(6):
            reactor.advance(context.config.health.interval)
            for i in range(handled, len(reactor.tcpClients)):
                failBackend(reactor, reason=emfile(), index=i)
            handled = len(reactor.tcpClients)
        # Each of m1 and m2 was probed every interval, more than C{fall} times, in vain.
        self.assertGreaterEqual(handled, 10)
        self.assertTrue(member.up)
