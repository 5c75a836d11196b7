"""
The lean per-event dispatch of the epoll reactor (casd.service.leanpoll), on a private reactor
instance (never the global one).
"""

import socket

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.testing import MemoryReactor
from twisted.python import log as legacyLog
from twisted.trial.unittest import SynchronousTestCase

from casd.service.leanpoll import doPollMatches, leanDispatch


class Reader:
    """
    The least a reactor needs to dispatch reads to.
    """

    def __init__(self, sock, fail=False):
        self.sock = sock
        self.fail = fail
        self.read = []
        self.lost = []

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return "Reader"

    def doRead(self):
        if self.fail:
            raise RuntimeError("boom")
        self.read.append(self.sock.recv(100))

    def connectionLost(self, reason):
        self.lost.append(reason)


class LeanDispatchTests(SynchronousTestCase):
    def setUp(self):
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.reactor = EPollReactor()
        self.addCleanup(self._closeReactor)  # runs first: before the sockets close
        self.wrapped = []
        original = legacyLog.callWithLogger

        def spy(logger, func, *args, **kw):
            self.wrapped.append(logger)
            return original(logger, func, *args, **kw)

        self.patch(legacyLog, "callWithLogger", spy)

    def _closeReactor(self):
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def test_twistedDoPollUnchanged(self):
        """
        If this fails after a Twisted upgrade: compare the new C{EPollReactor.doPoll} with
        C{casd.service.leanpoll._leanDoPoll}, bring the copy up to date and its hash with it.
        """
        self.assertTrue(doPollMatches())

    def test_eventsDispatchedWithoutTheLoggingContext(self):
        reader = Reader(self.a)
        self.reactor.addReader(reader)
        self.b.send(b"twisted's own")
        self.reactor.doIteration(0)
        self.assertEqual((reader.read, self.wrapped), ([b"twisted's own"], [reader]))
        self.assertTrue(leanDispatch(self.reactor))
        self.b.send(b"lean")
        self.reactor.doIteration(0)
        self.assertEqual(reader.read, [b"twisted's own", b"lean"])
        self.assertEqual(self.wrapped, [reader])  # no wrapper the second time

    def test_failingReadStillDisconnects(self):
        leanDispatch(self.reactor)
        reader = Reader(self.a, fail=True)
        self.reactor.addReader(reader)
        self.b.send(b"x")
        self.reactor.doIteration(0)
        self.assertEqual(len(reader.lost), 1)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_otherReactorsLeftAlone(self):
        reactor = MemoryReactor()
        self.assertFalse(leanDispatch(reactor))
        self.assertNotIn("doIteration", vars(reactor))
