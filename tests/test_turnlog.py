"""
The lines of a reactor turn in one C{write(2)} (L{casd.service.turns}, L{casd.service.logfile}'s
L{TurnBuffer}): held in the lean loop's thread until the end of the turn, written earlier when
something else must go to the file first, and at once everywhere else.  Here the thread is made
the loop's by hand (L{TurnCase.holdTurns}); the loop itself is in L{tests.test_turnloop}.
"""

import io
import json
import os
import threading
from select import PIPE_BUF

from twisted.logger import LogPublisher, Logger
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.service.logfile import PENDING_LIMIT, AppendFile, RotatingLogFile, StreamFile, standardOutput
from casd.service.logs import LogFileService, LineLog, TextLogObserver, WorkerLogObserver, workerLogObserver
from casd.service.turns import TurnEnd, here
from tests.support.calls import pythonCalls


def countWrites(sink) -> list:
    """
    @return: the list of every C{bytes} the sink hands to C{write(2)} from now on (its C{raw}
        still writes them).
    """
    writes = []
    real = sink.raw

    def raw(data):
        writes.append(bytes(data))
        return real(data)

    sink.raw = raw
    return writes


def texts(data: bytes) -> list:
    """
    @return: the texts of the lines in C{data} (without time stamp and system).
    """
    return [line.split("] ", 1)[1] for line in data.decode().splitlines()]


class TurnCase(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "casd.log")

    def holdTurns(self) -> TurnEnd:
        """
        Make this thread the thread of a lean loop, as L{casd.service.leanloop} does while it runs.
        """
        turn = TurnEnd()
        previous = here.turn
        here.turn = turn
        self.addCleanup(setattr, here, "turn", previous)
        return turn

    def read(self, suffix="") -> str:
        with open(self.path + suffix, encoding="utf-8") as f:
            return f.read()


class _SinkTests:
    """
    For both sinks: C{self.open()} returns one at C{self.path}.
    """

    #: The calls of a turn's write: the hook, the lock, the write.
    flushCalls = 3

    def lines(self, sink):
        return LineLog("casd.session", TextLogObserver(sink))

    def test_linesOfATurnInOneWrite(self):
        """
        In the lean loop's thread, the lines of a turn are held, then written in order with one
        C{write(2)} when the turn ends.
        """
        turn = self.holdTurns()
        sink = self.open()
        writes = countWrites(sink)
        lines = self.lines(sink)
        for n in range(3):
            lines.emit(f"line={n}", {})
        self.assertTrue(turn.due)
        self.assertEqual((writes, self.read()), ([], ""))
        turn.end()
        self.assertFalse(turn.due)
        self.assertEqual(len(writes), 1)
        self.assertEqual(texts(writes[0]), ["line=0", "line=1", "line=2"])
        self.assertEqual(texts(self.read().encode()), ["line=0", "line=1", "line=2"])
        turn.end()  # nothing left
        self.assertEqual(len(writes), 1)

    def test_withoutTurnsOneWritePerLine(self):
        """
        Elsewhere (no lean loop in this thread: tests, another reactor) each line is written at
        once, one C{write(2)} each, as before.
        """
        self.assertIsNone(here.turn)
        sink = self.open()
        writes = countWrites(sink)
        lines = self.lines(sink)
        lines.emit("one", {})
        self.assertEqual(texts(self.read().encode()), ["one"])
        lines.emit("two", {})
        self.assertEqual([texts(w) for w in writes], [["one"], ["two"]])

    def test_otherEventAfterThePendingLines(self):
        """
        An event that is not a line (a warning, an error) is written at once, after the lines
        held before it.
        """
        self.holdTurns()
        sink = self.open()
        writes = countWrites(sink)
        observer = TextLogObserver(sink)
        lines = LineLog("casd.session", observer)
        lines.emit("first", {})
        lines.emit("second", {})
        Logger(namespace="casd.other", observer=observer).warn("then {what}", what="this")
        self.assertEqual(texts(self.read().encode()), ["first", "second", "then this"])
        self.assertEqual(len(writes), 2)
        self.assertFalse(sink.pending)

    def test_boundWrittenAtOnce(self):
        """
        Past L{PENDING_LIMIT} bytes the held lines are written without waiting for the end of
        the turn; nothing is lost, nothing reordered.
        """
        turn = self.holdTurns()
        sink = self.open()
        writes = countWrites(sink)
        lines = self.lines(sink)
        text = "x" * 1000
        count = PENDING_LIMIT // 1000 + 10
        for n in range(count):
            lines.emit(f"n={n:03d} {text}", {})
        self.assertEqual(len(writes), 1)
        self.assertGreater(len(writes[0]), PENDING_LIMIT)
        turn.end()
        self.assertEqual(len(writes), 2)
        self.assertEqual(texts(self.read().encode()), [f"n={n:03d} {text}" for n in range(count)])

    def test_lineFromAnotherThread(self):
        """
        A line logged in another thread is written at once, after the lines the loop's thread
        holds; the loop's next lines are held again.
        """
        turn = self.holdTurns()
        sink = self.open()
        lines = self.lines(sink)
        lines.emit("loop 1", {})
        seen = []

        def other():
            self.assertIsNone(here.turn)
            lines.emit("thread", {})
            seen.append(self.read())

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        self.assertEqual(texts(seen[0].encode()), ["loop 1", "thread"])
        lines.emit("loop 2", {})
        self.assertEqual(texts(self.read().encode()), ["loop 1", "thread"])
        turn.end()
        self.assertEqual(texts(self.read().encode()), ["loop 1", "thread", "loop 2"])

    def test_threadsAtOnce(self):
        """
        The loop's thread holding lines while other threads write theirs: every line arrives,
        whole, and each thread's in its order.
        """
        turn = self.holdTurns()
        sink = self.open()
        lines = self.lines(sink)

        def other(name):
            for i in range(300):
                lines.emit(f"{name} {i:03d}", {})

        threads = [threading.Thread(target=other, args=(f"t{n}",)) for n in range(3)]
        for t in threads:
            t.start()
        for i in range(300):
            lines.emit(f"loop {i:03d}", {})
            if i % 7 == 0:
                turn.end()
        for t in threads:
            t.join()
        turn.end()
        found = texts(self.read().encode())
        for name in ("loop", "t0", "t1", "t2"):
            self.assertEqual([t for t in found if t.startswith(name + " ")], [f"{name} {i:03d}" for i in range(300)])
        self.assertEqual(len(found), 1200)

    def test_closeWritesThePendingLines(self):
        """
        Closing the file writes what it holds and takes it off the turn's hooks.
        """
        turn = self.holdTurns()
        sink = self.open()
        self.lines(sink).emit("last", {})
        self.assertEqual(len(turn.hooks), 1)
        sink.close()
        self.assertEqual(texts(self.read().encode()), ["last"])
        self.assertEqual(turn.hooks, [])

    def test_failedWriteQuiet(self):
        """
        A write that fails at the end of the turn (a full disk) loses that turn's lines, as a
        failed write of a line did, and raises nothing; the next turn writes again.
        """
        turn = self.holdTurns()
        sink = self.open()
        real = sink.raw

        def full(data):
            raise OSError(28, "No space left on device")

        lines = self.lines(sink)
        sink.raw = full
        lines.emit("lost", {})
        turn.end()
        sink.raw = real
        lines.emit("kept", {})
        turn.end()
        self.assertEqual(texts(self.read().encode()), ["kept"])

    def test_heldLineCostsFewCalls(self):
        """
        A held line costs the observer and the encoding; the end of a turn the hook, the lock
        and the write.
        """
        self.holdTurns()
        sink = self.open()
        observer = TextLogObserver(sink)
        events = []
        LineLog("casd.session", LogPublisher(events.append), now=lambda: 1000.0).emit("x=1", {})
        observer(events[0])  # the time stamp of this second, the turn joined
        self.assertLessEqual(pythonCalls(observer, events[0]), 2)
        self.assertLessEqual(pythonCalls(sink.flushTurn), self.flushCalls)
        self.assertEqual(self.read().count("x=1\n"), 2)


class RotatingLogFileTurnTests(_SinkTests, TurnCase):
    def open(self, **kwargs):
        f = RotatingLogFile.fromFullPath(self.path, **kwargs)
        self.addCleanup(f.close)
        return f

    def test_rotationAfterThePendingLines(self):
        """
        A rotation (C{SIGUSR1}, L{casd.service.logfile.SharedRotation}) writes the held lines to
        the file being rotated away first.
        """
        self.holdTurns()
        sink = self.open()
        lines = self.lines(sink)
        lines.emit("before", {})
        sink.rotate()
        lines.emit("after", {})
        sink.close()
        self.assertEqual(texts(self.read(".1").encode()), ["before"])
        self.assertEqual(texts(self.read().encode()), ["after"])

    def test_rotatedBySizeAtTheEndOfATurn(self):
        """
        The size rotation happens before a turn's write, once the file has reached
        C{rotateLength}: the turn's lines go whole to the new file.
        """
        turn = self.holdTurns()
        sink = self.open(rotateLength=100)
        lines = self.lines(sink)
        lines.emit("a" * 120, {})
        turn.end()
        lines.emit("b1", {})
        lines.emit("b2", {})
        turn.end()
        self.assertEqual(texts(self.read(".1").encode()), ["a" * 120])
        self.assertEqual(texts(self.read().encode()), ["b1", "b2"])


class AppendFileTurnTests(_SinkTests, TurnCase):
    def open(self):
        f = AppendFile(self.path)
        self.addCleanup(f.close)
        return f

    def test_reopenAfterThePendingLines(self):
        """
        Reopening (logrotate moved the file, C{SIGUSR2}) writes the held lines to the old file
        first.
        """
        turn = self.holdTurns()
        sink = self.open()
        lines = self.lines(sink)
        lines.emit("old", {})
        os.rename(self.path, self.path + ".1")
        sink.reopen()
        lines.emit("new", {})
        turn.end()
        self.assertEqual(texts(self.read(".1").encode()), ["old"])
        self.assertEqual(texts(self.read().encode()), ["new"])


class StreamFileTurnTests(_SinkTests, TurnCase):
    """
    Standard output (here a file opened for appending) the same way.
    """

    #: And the pieces of at most PIPE_BUF bytes.
    flushCalls = 6

    def open(self):
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        return StreamFile(fd)

    def test_wholeLinesUpToPipeBuf(self):
        """
        Each C{write(2)} is at most C{PIPE_BUF} bytes and ends at a line's end (a pipe shared
        with the workers never cuts a line with theirs); a longer line goes in pieces, whole.
        """
        turn = self.holdTurns()
        writes = []
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.set_blocking(r, False)

        def write(fd, data):
            writes.append(bytes(data))
            return os.write(fd, data)

        sink = StreamFile(w, write)
        lines = self.lines(sink)
        expected = [f"n={n:02d} " + "y" * 300 for n in range(40)] + ["z" * (PIPE_BUF + 100), "end"]
        for text in expected:
            lines.emit(text, {})
        turn.end()
        received = b""
        while True:
            try:
                received += os.read(r, 65536)
            except BlockingIOError:
                break
        self.assertEqual(texts(received), expected)
        self.assertTrue(all(len(w) <= PIPE_BUF for w in writes))
        self.assertTrue(all(w.endswith(b"\n") for w in writes if len(w) < PIPE_BUF))
        self.assertLess(len(writes), 10)

    def test_partialWritesCompleted(self):
        """
        A descriptor that takes fewer bytes than given gets the rest.
        """
        turn = self.holdTurns()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.addCleanup(os.close, fd)
        sink = StreamFile(fd, lambda fd, data: os.write(fd, data[:7]))
        lines = self.lines(sink)
        lines.emit("a line longer than seven bytes", {})
        lines.emit("and another", {})
        turn.end()
        self.assertEqual(texts(self.read().encode()), ["a line longer than seven bytes", "and another"])

    def test_standardOutput(self):
        """
        A text stream with a descriptor becomes a L{StreamFile} on it, once what it held is
        written; one without stays as it is.
        """
        out = io.StringIO()
        self.assertIs(standardOutput(out), out)
        with open(self.path, "w") as f:
            f.write("printed before\n")
            sink = standardOutput(f)
            self.assertIsInstance(sink, StreamFile)
            self.assertEqual(sink.fd, f.fileno())
            self.assertEqual(self.read(), "printed before\n")
            self.lines(sink).emit("logged", {})
            sink.close()
            self.assertFalse(f.closed)
        self.assertEqual(self.read().splitlines()[0], "printed before")
        self.assertEqual(texts(self.read().split("\n", 1)[1].encode()), ["logged"])


class WorkerPipeTests(TurnCase):
    """
    A worker whose lines go to the parent (its standard output, a pipe): the records of a turn
    are flushed together at its end.
    """

    def test_recordsFlushedAtTheEndOfTheTurn(self):
        flushed = []

        class Pipe(io.StringIO):
            def flush(self):
                flushed.append(self.getvalue())

        out = Pipe()
        observer = WorkerLogObserver(out)
        lines = LineLog("casd.session", observer)
        lines.emit("one", {})
        self.assertEqual(len(flushed), 1)  # no turn: at once
        turn = self.holdTurns()
        lines.emit("two", {})
        lines.emit("three", {})
        self.assertEqual(len(flushed), 1)
        self.assertTrue(turn.due)
        turn.end()
        self.assertEqual(len(flushed), 2)
        records = flushed[1].splitlines()
        self.assertEqual([r[:1] for r in records], ["\x1f"] * 3)
        self.assertEqual([json.loads(r[1:])["casd_line"] for r in records], ["one", "two", "three"])
        lines.emit("four", {})
        Logger(namespace="casd.other", observer=observer).warn("warned")
        # The other event's own flush takes the record before it.
        self.assertIn('"four"', flushed[-1])
        self.assertIn("warned", flushed[-1])
        self.assertLess(flushed[-1].index('"four"'), flushed[-1].index("warned"))


class FakeSignals:
    SIGUSR2 = 12

    def signal(self, number, handler):
        return None


class LogFileServiceTurnTests(TurnCase):
    """
    C{[log] file}: the same in both formats, and at the service's stop.
    """

    def start(self, fmt):
        self.publisher = LogPublisher()
        svc = LogFileService(MemoryReactorClock(), self.path, fmt, publisher=self.publisher, signals=FakeSignals())
        svc.startService()
        return svc

    def test_jsonLinesHeld(self):
        """
        JSON lines are held for the end of the turn too; another event follows the held ones.
        """
        turn = self.holdTurns()
        svc = self.start("json")
        self.addCleanup(svc.stopService)
        lines = LineLog("casd.http.access", self.publisher)
        lines.emit("status=200", {"status": 200})
        lines.emit("status=404", {"status": 404})
        self.assertEqual(self.read(), "")
        Logger(namespace="casd.other", observer=self.publisher).error("boom")
        lines.emit("status=500", {"status": 500})
        turn.end()
        records = [json.loads(line) for line in self.read().splitlines()]
        self.assertEqual([r.get("status", r["message"]) for r in records], [200, 404, "boom", 500])

    def test_stopWritesThePendingLines(self):
        """
        The service's stop (the reactor's shutdown) writes what the file holds.
        """
        self.holdTurns()
        svc = self.start("text")
        LineLog("casd.session", self.publisher).emit("session=last", {})
        self.assertEqual(self.read(), "")
        svc.stopService()
        self.assertEqual(texts(self.read().encode()), ["session=last"])

    def test_reopenWritesThePendingLines(self):
        """
        C{SIGUSR2}'s reopening: the held lines go to the old file, the next ones to the new one.
        """
        turn = self.holdTurns()
        svc = self.start("text")
        self.addCleanup(svc.stopService)
        lines = LineLog("casd.session", self.publisher)
        lines.emit("session=old", {})
        os.rename(self.path, self.path + ".1")
        svc.reopen()
        lines.emit("session=new", {})
        turn.end()
        self.assertEqual(texts(self.read(".1").encode()), ["session=old"])
        self.assertEqual(texts(self.read().encode()), ["session=new"])


class WorkerTurnTests(TurnCase):
    """
    A worker writing the parent's C{--logfile} itself holds its lines the same way; its other
    events go to the parent after the held lines are written.
    """

    def test_workerLinesHeld(self):
        turn = self.holdTurns()
        sink = AppendFile(self.path)
        self.addCleanup(sink.close)
        toParent = []

        class Pipe:
            def write(self, text):
                toParent.append((text, self_.read()))

            def flush(self):
                pass

        self_ = self
        observer = workerLogObserver(Pipe(), direct=sink, index=2)
        lines = LineLog("casd.session", observer)
        lines.emit("session=a", {})
        lines.emit("session=b", {})
        self.assertEqual(self.read(), "")
        Logger(namespace="casd.other", observer=observer).warn("to the parent")
        # The lines were in the file when the warning left for the parent.
        self.assertEqual(texts(toParent[0][1].encode()), ["session=a", "session=b"])
        lines.emit("session=c", {})
        turn.end()
        self.assertEqual(texts(self.read().encode()), ["session=a", "session=b", "session=c"])
        self.assertIn("[worker2:casd.session#info] session=c", self.read())
