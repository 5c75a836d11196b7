"""
The lean per-event dispatch of the epoll reactor (casd.service.leanpoll), on a private reactor
instance (never the global one).
"""

import os
import select
import socket

from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone, ConnectionFdescWentAway, ConnectionLost
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.testing import MemoryReactor
from twisted.python import log as legacyLog
from twisted.trial.unittest import SynchronousTestCase

from casd.service import leanpoll
from casd.service.leanpoll import doPollMatches, fdSetMatches, leanDispatch, readInsteadOfWriting


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


class EPollMixin:
    """
    A private epoll reactor and a connected socket pair, all closed after the test.
    """

    def setUpReactor(self):
        self.a, self.b = socket.socketpair()
        self.addCleanup(self.a.close)
        self.addCleanup(self.b.close)
        self.reactor = EPollReactor()
        self.poller = self.reactor._poller
        self.addCleanup(self._closeReactor)  # runs first: before the sockets close

    def _closeReactor(self):
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.poller.close()


class LeanDispatchTests(EPollMixin, SynchronousTestCase):
    def setUp(self):
        self.setUpReactor()
        self.wrapped = []
        original = legacyLog.callWithLogger

        def spy(logger, func, *args, **kw):
            self.wrapped.append(logger)
            return original(logger, func, *args, **kw)

        self.patch(legacyLog, "callWithLogger", spy)

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

    def test_goneSinceThePollSkipped(self):
        """
        A descriptor removed by an earlier event's handler of the same wake-up is not dispatched.
        """
        leanDispatch(self.reactor)
        readers = []

        class Removing(Reader):
            def doRead(self):
                super().doRead()
                for other in readers:
                    if other is not self:
                        self.reactor.removeReader(other)

        for _ in range(2):
            a, b = socket.socketpair()
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            reader = Removing(a)
            reader.reactor = self.reactor
            self.reactor.addReader(reader)
            self.addCleanup(self.reactor.removeReader, reader)
            b.send(b"x")
            readers.append(reader)
        self.reactor.doIteration(0)
        self.assertEqual(sorted(len(r.read) for r in readers), [0, 1])

    def test_moreReadyThanOneWakeUpTakes(self):
        """
        More ready descriptors than one wake-up reports (L{leanpoll._MAX_EVENTS}): the rest are
        dispatched by the next one, none lost.
        """
        self.patch(leanpoll, "_MAX_EVENTS", 2)
        leanDispatch(self.reactor)
        readers = []
        for _ in range(3):
            a, b = socket.socketpair()
            self.addCleanup(a.close)
            self.addCleanup(b.close)
            reader = Reader(a)
            self.reactor.addReader(reader)
            self.addCleanup(self.reactor.removeReader, reader)
            b.send(b"x")
            readers.append(reader)
        self.reactor.doIteration(0)
        self.assertEqual(sorted(len(r.read) for r in readers), [0, 1, 1])
        self.reactor.doIteration(0)
        self.assertEqual([r.read for r in readers], [[b"x"]] * 3)


class Writer(Reader):
    """
    A selectable that wants to write, and records each chance it gets.
    """

    def __init__(self, sock, returns=None):
        super().__init__(sock)
        self.returns = returns
        self.writes = 0
        self.gone = False

    def fileno(self):
        return -1 if self.gone else self.sock.fileno()

    def doWrite(self):
        self.writes += 1
        return self.returns


class InlinedReadOrWriteTests(EPollMixin, SynchronousTestCase):
    """
    The reactor's C{_doReadOrWrite}, inlined in the lean dispatch, keeps its outcomes: reads,
    writes, clean and unclean disconnections, a vanished descriptor.
    """

    def setUp(self):
        self.setUpReactor()
        self.assertTrue(leanDispatch(self.reactor))
        calls = []
        self.calls = calls
        original = self.reactor._doReadOrWrite

        def spy(*args):
            calls.append(args)
            return original(*args)

        self.reactor._doReadOrWrite = spy

    def test_readDispatchedInline(self):
        reader = Reader(self.a)
        self.reactor.addReader(reader)
        self.b.send(b"inline")
        self.reactor.doIteration(0)
        self.assertEqual(reader.read, [b"inline"])
        self.assertEqual(self.calls, [])  # not through the reactor's method

    def test_hangUpIsConnectionDone(self):
        """
        A reader whose peer hung up with nothing left to read (C{EPOLLHUP} without C{EPOLLIN}:
        a pipe whose writer closed) is lost cleanly (Twisted's C{CONNECTION_DONE}) without a
        read, and is no longer watched.
        """
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        reader = Reader(None)
        reader.fileno = lambda: r
        self.reactor.addReader(reader)
        os.close(w)
        self.reactor.doIteration(0)
        self.assertEqual(reader.read, [])
        self.assertEqual(len(reader.lost), 1)
        reader.lost[0].trap(ConnectionDone)
        self.assertNotIn(reader, self.reactor.getReaders())

    def test_writeReturningAReasonDisconnects(self):
        writer = Writer(self.a, returns=CONNECTION_LOST)
        self.reactor.addWriter(writer)
        self.reactor.doIteration(0)
        self.assertEqual(writer.writes, 1)
        self.assertEqual(len(writer.lost), 1)
        writer.lost[0].trap(ConnectionLost)
        self.assertNotIn(writer, self.reactor.getWriters())

    def test_writeWithoutReasonKeepsWriting(self):
        writer = Writer(self.a)
        self.reactor.addWriter(writer)
        self.reactor.doIteration(0)
        self.reactor.doIteration(0)
        self.assertEqual((writer.writes, writer.lost), (2, []))
        self.assertIn(writer, self.reactor.getWriters())

    def test_vanishedDescriptor(self):
        """
        A selectable whose C{fileno()} says -1 is disconnected (C{ConnectionFdescWentAway})
        without a read or a write.
        """
        writer = Writer(self.a)
        self.reactor.addWriter(writer)
        writer.gone = True
        self.reactor.doIteration(0)
        self.assertEqual(writer.writes, 0)
        self.assertEqual(len(writer.lost), 1)
        writer.lost[0].trap(ConnectionFdescWentAway)

    def test_failingWriteLoggedAndDisconnected(self):
        writer = Writer(self.a)

        def boom():
            raise ValueError("boom")

        writer.doWrite = boom
        self.reactor.addWriter(writer)
        self.reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(len(writer.lost), 1)
        self.assertNotIn(writer, self.reactor.getWriters())


class Connecting(FileDescriptor):
    """
    A descriptor waiting to write, as a connecting socket does, that records its reads.
    """

    def __init__(self, sock, reactor):
        super().__init__(reactor=reactor)
        self.sock = sock
        self.read = []
        self.writes = 0

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.read.append(self.sock.recv(100))

    def doWrite(self):
        self.writes += 1


class CountingPoller:
    """
    The reactor's epoll object, with its C{epoll_ctl} calls recorded.
    """

    def __init__(self, poller):
        self.poller = poller
        self.calls = []

    def __getattr__(self, name):
        return getattr(self.poller, name)

    def register(self, fd, flags):
        self.calls.append(("register", fd, flags))
        self.poller.register(fd, flags)

    def modify(self, fd, flags):
        self.calls.append(("modify", fd, flags))
        self.poller.modify(fd, flags)

    def unregister(self, fd):
        self.calls.append(("unregister", fd))
        self.poller.unregister(fd)


class ReadInsteadOfWritingTests(EPollMixin, SynchronousTestCase):
    def setUp(self):
        self.setUpReactor()
        self.counting = CountingPoller(self.poller)
        self.reactor._poller = self.counting

    def registered(self, c):
        """
        @return: whether C{c} is among the reactor's readers, and among its writers.
        """
        return c in self.reactor.getReaders(), c in self.reactor.getWriters()

    def test_twistedFDSetUnchanged(self):
        """
        If this fails after a Twisted upgrade: compare the epoll reactor's C{_add}, C{_remove},
        C{addReader} and C{removeWriter} with what L{readInsteadOfWriting} does to its sets,
        then update L{casd.service.leanpoll.FDSET_SHA256}.
        """
        self.assertTrue(fdSetMatches())

    def test_oneModify(self):
        """
        A descriptor waiting to write alone is switched to reading with one C{epoll_ctl}, and
        the reactor's own view follows: a reader, not a writer; then read, never written.
        """
        c = Connecting(self.a, self.reactor)
        c.startWriting()
        del self.counting.calls[:]
        readInsteadOfWriting(c)
        self.assertEqual(self.counting.calls, [("modify", self.a.fileno(), select.EPOLLIN)])
        self.assertEqual(self.registered(c), (True, False))
        self.b.send(b"greeting")
        self.reactor.doIteration(0)
        self.assertEqual((c.read, c.writes), ([b"greeting"], 0))
        c.stopReading()
        self.assertEqual(self.counting.calls[-1], ("unregister", self.a.fileno()))
        self.assertEqual(self.registered(c), (False, False))

    def test_alreadyReadingFallsBack(self):
        """
        A descriptor that reads already (not the connecting case) gets Twisted's own calls.
        """
        c = Connecting(self.a, self.reactor)
        c.startWriting()
        c.startReading()
        readInsteadOfWriting(c)
        self.assertEqual(self.registered(c), (True, False))

    def test_changedTwistedFallsBack(self):
        self.patch(leanpoll, "_fdSetKnown", [False])
        c = Connecting(self.a, self.reactor)
        c.startWriting()
        del self.counting.calls[:]
        readInsteadOfWriting(c)
        self.assertEqual(len(self.counting.calls), 2)  # Twisted's two modifications
        self.assertEqual(self.registered(c), (True, False))

    def test_otherReactors(self):
        reactor = MemoryReactor()
        c = Connecting(self.a, reactor)
        c.startWriting()
        readInsteadOfWriting(c)
        self.assertEqual((reactor.getReaders(), reactor.getWriters()), ([c], []))
