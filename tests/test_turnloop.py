"""
The lean main loop ends each turn (L{casd.service.turns}): on a private epoll reactor, with and
without the lean dispatch, the log lines of a turn are written with one C{write(2)} before the
loop sleeps again, never held across a sleep.
"""

import os
import socket
import threading

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from casd.service import leanloop, leanpoll
from casd.service.logfile import RotatingLogFile
from casd.service.logs import LineLog, TextLogObserver
from casd.service.turns import here
from tests.test_turnlog import countWrites, texts


class _Reader:
    """
    A readable socket whose every read logs a line.
    """

    def __init__(self, sock, lines, name):
        self.sock, self.lines, self.name = sock, lines, name

    def fileno(self):
        return self.sock.fileno()

    def logPrefix(self):
        return self.name

    def doRead(self):
        data = self.sock.recv(100)
        self.lines.emit(f"{self.name} read {data.decode()}", {})

    def connectionLost(self, reason):
        pass


class _WatchedPoller:
    """
    The reactor's epoll object, checking before each poll (the loop about to sleep) that the log
    file holds nothing.
    """

    def __init__(self, poller, sink, held):
        self._poller, self._sink, self._held = poller, sink, held

    def __getattr__(self, name):
        return getattr(self._poller, name)

    def poll(self, *args):
        if self._sink.pending:
            self._held.append(bytes(self._sink.pending))
        return self._poller.poll(*args)


class LeanLoopTurnTests(SynchronousTestCase):
    """
    The lean main loop on a private epoll reactor: it ends each turn before it sleeps again.
    """

    inline = True

    def setUp(self):
        self.reactor = EPollReactor()
        self.addCleanup(self._closeReactor)
        if self.inline:
            self.assertTrue(leanpoll.leanDispatch(self.reactor))
        self.assertTrue(leanloop.leanLoop(self.reactor))
        self.watchdog = self.reactor.callLater(10, self.reactor.stop)
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "twistd.log")
        self.sink = RotatingLogFile.fromFullPath(self.path)
        self.addCleanup(self.sink.close)
        self.writes = countWrites(self.sink)
        self.lines = LineLog("casd.session", TextLogObserver(self.sink))
        self.held = []
        self.reactor._poller = _WatchedPoller(self.reactor._poller, self.sink, self.held)

    def _closeReactor(self):
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def runLoop(self):
        self.reactor.run(installSignalHandlers=False)
        self.assertTrue(self.watchdog.active(), "the loop did not stop by itself")
        self.watchdog.cancel()

    def read(self):
        with open(self.path, encoding="utf-8") as f:
            return texts(f.read().encode())

    def test_eventsOfOnePollInOneWrite(self):
        """
        The lines of the events one poll brought are written with one C{write(2)}, in order,
        before the loop sleeps again.
        """
        r = self.reactor
        pairs = [socket.socketpair() for _ in range(3)]
        for a, b in pairs:
            self.addCleanup(a.close)
            self.addCleanup(b.close)
        readers = [_Reader(a, self.lines, f"r{n}") for n, (a, b) in enumerate(pairs)]
        for n, (a, b) in enumerate(pairs):
            b.send(f"{n}".encode())  # all three ready at the first poll

        def start():
            for reader in readers:
                r.addReader(reader)

        r.callWhenRunning(start)
        # Long enough for the poll to see all three; then stop.
        r.callLater(0.2, r.stop)
        self.runLoop()
        self.assertEqual(self.held, [])
        self.assertEqual(sorted(self.read()), ["r0 read 0", "r1 read 1", "r2 read 2"])
        self.assertEqual(len(self.writes), 1, self.writes)

    def test_timerLinesBeforeTheSleep(self):
        """
        Lines logged by a timer are written before the loop sleeps until the next one: the end
        of the turn waits for no later event.
        """
        r = self.reactor
        seen = []

        def tick(n, then):
            self.lines.emit(f"tick {n}", {})
            self.lines.emit(f"tock {n}", {})
            r.callLater(0.01, *then)

        def look():
            seen.append(self.read())
            r.callLater(0.01, tick, 2, (r.stop,))

        # Each step armed by the one before: never two of them in one turn, however late.
        r.callLater(0.01, tick, 1, (look,))
        self.runLoop()
        self.assertEqual(self.held, [])
        self.assertEqual(seen, [["tick 1", "tock 1"]])
        self.assertEqual([texts(w) for w in self.writes], [["tick 1", "tock 1"], ["tick 2", "tock 2"]])

    def test_stopWritesTheLastTurn(self):
        """
        Lines of the turn in which the reactor stops (its shutdown triggers) are written when
        the loop ends, and later lines are written at once.
        """
        r = self.reactor
        r.addSystemEventTrigger("before", "shutdown", self.lines.emit, "stopping", {})
        r.addSystemEventTrigger("after", "shutdown", self.lines.emit, "stopped", {})
        r.callLater(0.01, r.stop)
        self.runLoop()
        self.assertIsNone(here.turn)
        self.assertEqual(self.read(), ["stopping", "stopped"])
        self.lines.emit("after the loop", {})
        self.assertEqual(self.read(), ["stopping", "stopped", "after the loop"])

    def test_otherThreadWritesAtOnce(self):
        """
        While the loop runs, a line logged in another thread is written at once, without the
        reactor.
        """
        r = self.reactor
        seen = []

        def other():
            self.lines.emit("from a thread", {})
            seen.append(self.read())

        def inLoop():
            self.lines.emit("loop", {})
            thread = threading.Thread(target=other)
            thread.start()
            thread.join()
            r.stop()

        r.callLater(0.01, inLoop)
        self.runLoop()
        self.assertEqual(seen, [["loop", "from a thread"]])
        self.assertEqual(self.read(), ["loop", "from a thread"])

    def test_failingHookLogged(self):
        """
        A hook that fails is logged; the other hooks and the loop go on.
        """
        r = self.reactor
        failures = []

        def observe(event):
            if "log_failure" in event:
                failures.append(event["log_failure"].value)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        def broken():
            raise RuntimeError("broken hook")

        def start():
            here.turn.join(broken)
            self.lines.emit("one", {})

        r.callLater(0, start)  # in the loop (callWhenRunning's run before it)
        r.callLater(0.02, lambda: self.lines.emit("two", {}))
        r.callLater(0.05, r.stop)
        self.runLoop()
        self.assertEqual(self.read(), ["one", "two"])
        # At the end of each turn with lines (one or two), and at the loop's end.
        logged = self.flushLoggedErrors(RuntimeError)
        self.assertGreaterEqual(len(logged), 2)
        self.assertEqual({str(f.value) for f in logged}, {"broken hook"})
        self.assertEqual(len(failures), len(logged))


class LeanLoopWithoutDispatchTurnTests(LeanLoopTurnTests):
    """
    The same with the lean main loop over the reactor's own C{doIteration}.
    """

    inline = False


class OtherLoopTests(SynchronousTestCase):
    """
    A reactor without the lean main loop (Twisted's own C{mainLoop}, here with the lean
    dispatch): no turns, every line written at once, one C{write(2)} each, as before.
    """

    def test_linesWrittenAtOnce(self):
        r = EPollReactor()
        self.addCleanup(r._poller.close)
        self.addCleanup(r.waker.connectionLost, None)
        self.addCleanup(r.removeAll)
        self.assertTrue(leanpoll.leanDispatch(r))
        watchdog = r.callLater(10, r.stop)
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "twistd.log")
        sink = RotatingLogFile.fromFullPath(path)
        self.addCleanup(sink.close)
        writes = countWrites(sink)
        lines = LineLog("casd.session", TextLogObserver(sink))
        seen = []

        def inLoop():
            seen.append(here.turn)
            lines.emit("one", {})
            lines.emit("two", {})
            seen.append([texts(w) for w in writes])
            r.stop()

        r.callLater(0.01, inLoop)
        r.run(installSignalHandlers=False)
        self.assertTrue(watchdog.active(), "the loop did not stop by itself")
        watchdog.cancel()
        self.assertEqual(seen, [None, [["one"], ["two"]]])
