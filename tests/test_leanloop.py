"""
The lean main loop (casd.service.leanloop), run on a private epoll reactor (never the global
one): timers fire, move, cancel; calls from threads run; a failing iteration is logged and the
loop goes on; the loop stops.
"""

import socket
import threading

from twisted.internet.base import ReactorBase
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from casd.service import leanloop, leanpoll


class LeanLoopTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = EPollReactor()
        self.addCleanup(self._closeReactor)
        self.assertTrue(leanloop.leanLoop(self.reactor))
        # Bound every test: a loop that failed to stop fails the test instead of hanging.
        self.watchdog = self.reactor.callLater(10, self._expired)
        self.expired = False

    def _expired(self):
        self.expired = True
        self.reactor.stop()

    def _closeReactor(self):
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def runReactor(self):
        self.reactor.run(installSignalHandlers=False)
        self.assertFalse(self.expired, "the loop did not stop by itself")

    def test_twistedLoopUnchanged(self):
        """
        If this fails after a Twisted upgrade: compare C{ReactorBase.mainLoop}, C{timeout},
        C{runUntilCurrent} and C{_insertNewDelayedCalls} with C{casd.service.leanloop}, bring
        the loop up to date and its hash with it.
        """
        self.assertTrue(leanloop.baseMatches())

    def test_timersInOrder(self):
        fired = []
        r = self.reactor
        r.callLater(0.03, fired.append, "c")
        r.callLater(0.01, fired.append, "a")
        later = r.callLater(0.02, fired.append, "b")
        gone = r.callLater(0.015, fired.append, "cancelled")
        gone.cancel()
        later.reset(0.04)  # pushed back: after "c"

        def armMore():
            fired.append("armed in a timer")
            r.callLater(0.01, fired.append, "d")
            r.callLater(0.05, r.stop)

        r.callLater(0.035, armMore)
        self.runReactor()
        self.assertEqual(fired, ["a", "c", "armed in a timer", "b", "d"])

    def test_sleepComputedInline(self):
        """
        The lean loop computes the sleep itself: Twisted's C{timeout()} (two more calls and two
        more readings of the clock per iteration) is never called.
        """
        asked = []
        r = self.reactor
        self.patch(r, "timeout", lambda: asked.append(1) or ReactorBase.timeout(r))
        r.callLater(0.01, r.stop)
        self.runReactor()
        self.assertEqual(asked, [])

    def test_timerMovedSooner(self):
        fired = []
        r = self.reactor
        call = r.callLater(5, fired.append, "moved")
        r.callLater(0, call.reset, 0.01)
        r.callLater(0.05, r.stop)
        self.runReactor()
        self.assertEqual(fired, ["moved"])

    def test_callFromThread(self):
        fired = []
        r = self.reactor

        def fromThread():
            r.callFromThread(fired.append, threading.current_thread().name)
            r.callFromThread(r.stop)

        r.callWhenRunning(lambda: threading.Thread(target=fromThread, name="other").start())
        self.runReactor()
        self.assertEqual(fired, ["other"])

    def test_failingTimerLoggedLoopGoesOn(self):
        fired = []
        r = self.reactor

        def boom():
            raise RuntimeError("boom")

        r.callLater(0, boom)
        r.callLater(0.01, fired.append, "after")
        r.callLater(0.02, r.stop)
        self.runReactor()
        self.assertEqual(fired, ["after"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_manyCancelledTimersCompacted(self):
        """
        Cancelled timers are dropped from the heap as Twisted drops them, and the loop keeps
        reading the heap it rebuilt.
        """
        fired = []
        r = self.reactor
        calls = [r.callLater(100 + i, fired.append, i) for i in range(200)]

        def cancelAll():
            for c in calls:
                c.cancel()
            r.callLater(0.01, fired.append, "kept")
            r.callLater(0.03, r.stop)

        r.callLater(0.01, cancelAll)
        self.runReactor()
        self.assertEqual(fired, ["kept"])
        self.assertLess(len(r._pendingTimedCalls), 50)


class LeanLoopWithDispatchTests(LeanLoopTests):
    """
    The same, on a reactor with the lean dispatch too: the loop polls and dispatches inline.
    """

    def setUp(self):
        self.reactor = EPollReactor()
        self.addCleanup(self._closeReactor)
        self.assertFalse(leanpoll.dispatchesInline(self.reactor))
        self.assertTrue(leanpoll.leanDispatch(self.reactor))
        self.assertTrue(leanpoll.dispatchesInline(self.reactor))
        self.assertTrue(leanloop.leanLoop(self.reactor))
        self.watchdog = self.reactor.callLater(10, self._expired)
        self.expired = False

    def test_readsDispatchedWithoutDoIteration(self):
        """
        A readable socket is dispatched by the loop itself: the reactor's C{doIteration} is not
        called once per pass.
        """
        r = self.reactor
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        iterations = []
        read = []

        class Reader:
            def fileno(self):
                return a.fileno()

            def logPrefix(self):
                return "Reader"

            def doRead(self):
                read.append(a.recv(10))
                r.removeReader(self)
                r.callLater(0, r.stop)

            def connectionLost(self, reason):
                pass

        def started():
            r.doIteration = lambda timeout: iterations.append(timeout)
            r.addReader(Reader())
            b.send(b"ready")

        r.callLater(0, started)  # in the loop (callWhenRunning's triggers run before it)
        self.runReactor()
        self.assertEqual((read, iterations), ([b"ready"], []))


class InstallTests(SynchronousTestCase):
    def test_otherReactorsLeftAlone(self):
        reactor = MemoryReactor()
        self.assertFalse(leanloop.leanLoop(reactor))

    def test_ownLoopLeftAlone(self):
        class Custom(EPollReactor):
            def timeout(self):
                return ReactorBase.timeout(self)

        reactor = Custom()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertFalse(leanloop.leanLoop(reactor))
        self.assertNotIn("mainLoop", vars(reactor))

    def test_changedTwistedLeftAlone(self):
        self.patch(leanloop, "BASE_SHA256", "0" * 64)
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertFalse(leanloop.leanLoop(reactor))
