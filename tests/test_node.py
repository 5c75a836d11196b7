"""
Tests for L{casd.service.node}: drain on C{SIGUSR1}, and the graceful stop on C{SIGTERM}.
"""

import signal

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.service.node import NodeService, NodeState


class Reactor(MemoryReactorClock):
    def callFromThread(self, f, *args, **kwargs):
        self.callLater(0, f, *args, **kwargs)


class FakeSignals:
    SIGUSR1 = signal.SIGUSR1

    def __init__(self):
        self.handlers = {}

    def signal(self, number, handler):
        previous = self.handlers.get(number, signal.SIG_DFL)
        self.handlers[number] = handler
        return previous


class _Transport:
    aborted = False

    def abortConnection(self):
        self.aborted = True


class _Session:
    def __init__(self):
        self.transport = _Transport()


class NodeServiceTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = Reactor()
        self.signals = FakeSignals()
        self.state = NodeState()
        self.sessions = set()
        self.service = NodeService(self.reactor, self.state, 30.0, [self.sessions], signals=self.signals)
        self.service.startService()

    def test_sigusr1Drains(self):
        """
        C{SIGUSR1} drains the node (through the reactor, not inside the handler).
        """
        self.signals.handlers[signal.SIGUSR1](signal.SIGUSR1, None)
        self.assertFalse(self.state.draining)
        self.reactor.advance(0)
        self.assertTrue(self.state.draining)
        self.assertEqual(self.state.reason, "SIGUSR1")

    def test_stopWaitsForSessions(self):
        """
        Stopping waits while sessions are open and ends as soon as the last one closes.
        """
        session = _Session()
        self.sessions.add(session)
        d = self.service.stopService()
        self.assertNoResult(d)
        self.reactor.advance(5)
        self.assertNoResult(d)
        self.sessions.discard(session)
        self.reactor.advance(0.2)
        self.successResultOf(d)
        self.assertFalse(session.transport.aborted)

    def test_stopClosesAfterGrace(self):
        """
        Sessions still open after the grace period are closed, and the stop completes.
        """
        session = _Session()
        self.sessions.add(session)
        d = self.service.stopService()
        self.reactor.advance(29.8)
        self.assertNoResult(d)
        self.reactor.advance(0.4)
        self.successResultOf(d)
        self.assertTrue(session.transport.aborted)

    def test_stopWithoutSessions(self):
        self.assertIsNone(self.service.stopService())

    def test_stateResume(self):
        self.state.drain("configuration")
        self.assertTrue(self.state.draining)
        self.state.resume("configuration")
        self.assertFalse(self.state.draining)
        self.assertEqual(self.state.reason, "")
