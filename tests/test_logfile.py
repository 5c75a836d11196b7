"""
Tests for L{casd.service.logfile}: twistd's rotating log file and casd's appended one, written by
L{casd.service.logs.TextLogObserver} one C{write(2)} per line, without a Python lock.
"""

import json
import os
import threading

from twisted.logger import LogPublisher, Logger, formatEventAsClassicLogText
from twisted.trial.unittest import SynchronousTestCase

from casd.service.logfile import AppendFile, RotatingLogFile
from casd.service.logs import LineLog, TextLogObserver
from tests.support.calls import pythonCalls


class RotatingLogFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "twistd.log")

    def open(self, **kwargs):
        f = RotatingLogFile.fromFullPath(self.path, **kwargs)
        self.addCleanup(f.close)
        return f

    def read(self, suffix=""):
        with open(self.path + suffix, encoding="utf-8") as f:
            return f.read()

    def test_sameTextAsTwisted(self):
        """
        Through a L{RotatingLogFile}, lines and ordinary events are the bytes Twisted's text
        observer writes.
        """
        events = []
        times = iter([1000.0, 1000.5, 1001.0, 1001.2])
        lines = LineLog("casd.session", LogPublisher(events.append), now=lambda: next(times))
        lines.emit("session=a user=x", {"user": "x"})
        Logger(namespace="casd.other", observer=events.append).warn("hello {who}", who="you")
        lines.emit("two\nlines", {})
        lines.emit("session=c", {"log_system": "worker2:casd.session#info"})
        lines.emit("session=d", {})
        observer = TextLogObserver(self.open())
        for event in events:
            observer(event)
        self.assertEqual(self.read(), "".join(formatEventAsClassicLogText(e) for e in events))

    def test_appendsToExistingFile(self):
        """
        An existing file is appended to, and its size counts towards the rotation.
        """
        with open(self.path, "w") as f:
            f.write("x" * 50 + "\n")
        f = self.open(rotateLength=55)
        self.assertEqual(f.size, 51)
        f.write("short\n")
        self.assertEqual(self.read(), "x" * 50 + "\nshort\n")
        f.write("next\n")
        self.assertEqual(self.read(".1"), "x" * 50 + "\nshort\n")
        self.assertEqual(self.read(), "next\n")

    def test_rotatedBySize(self):
        """
        Once the file has reached C{rotateLength} bytes, the next line goes to a new file and the
        old ones move to C{.1}, C{.2}, ...; every line is written once and whole, none deleted.
        """
        f = self.open(rotateLength=200)
        observer = TextLogObserver(f)
        lines = LineLog("casd.session", observer)
        for i in range(30):
            lines.emit(f"session={i:04d} user=someone result=logout", {})
        names = sorted(os.listdir(self.dir))
        self.assertGreater(len(names), 4)
        self.assertIn("twistd.log.1", names)
        text = "".join(self.read(name[len("twistd.log"):]) for name in names)
        found = [line.rsplit("session=", 1)[1].split()[0] for line in text.splitlines()]
        self.assertEqual(sorted(found), [f"{i:04d}" for i in range(30)])
        for name in names:
            self.assertLess(os.path.getsize(os.path.join(self.dir, name)), 200 + 100)
        # The newest lines are in the current file, the oldest in the highest number.
        self.assertIn("session=0029", self.read())
        self.assertIn("session=0000", self.read(f".{len(names) - 1}"))

    def test_rotateOnSignal(self):
        """
        C{rotate()} (twistd's signal) moves the file to C{.1}; the next line starts a new one.
        """
        f = self.open()
        lines = LineLog("casd.session", TextLogObserver(f))
        lines.emit("before", {})
        f.rotate()
        lines.emit("after", {})
        self.assertTrue(self.read(".1").endswith(" before\n"))
        self.assertTrue(self.read().endswith(" after\n"))
        self.assertNotIn("before", self.read())

    def test_oneLockForWriteAndRotate(self):
        """
        C{LogFile}'s synchronised C{rotate} takes the file's own lock, a C lock.
        """
        f = self.open()
        self.assertIs(f._threadable_lock, f.lock)
        self.assertIsInstance(f.lock, type(threading.RLock()))

    def test_threads(self):
        """
        Lines written from several threads at once, across rotations, all arrive whole.
        """
        f = self.open(rotateLength=2000)
        lines = LineLog("casd.session", TextLogObserver(f))

        def write(n):
            for i in range(200):
                lines.emit(f"thread={n} line={i:03d}", {})

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        text = "".join(self.read(name[len("twistd.log"):]) for name in os.listdir(self.dir))
        found = sorted(line.split("] ", 1)[1] for line in text.splitlines())
        self.assertEqual(found, sorted(f"thread={n} line={i:03d}" for n in range(4) for i in range(200)))

    def test_notUTF8(self):
        """
        Text that UTF-8 cannot encode (a lone surrogate) is escaped, never an exception.
        """
        f = self.open()
        LineLog("casd.session", TextLogObserver(f)).emit("user=\udcff", {})
        self.assertIn("user=\\udcff\n", self.read())

    def test_lineCostsFewCalls(self):
        """
        A line through the observer to the file is a handful of calls: no Python lock, no
        rotation check or encoding in a function of its own.
        """
        f = self.open()
        observer = TextLogObserver(f)
        events = []
        LineLog("casd.session", LogPublisher(events.append), now=lambda: 1000.0).emit("x=1", {})
        observer(events[0])  # the time stamp of this second
        # The observer, the encoding, the write, the C lock's release.
        self.assertLessEqual(pythonCalls(observer, events[0]), 4)
        self.assertEqual(self.read().count("x=1\n"), 2)


class AppendFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "casd.log")

    def read(self, path=None):
        with open(path or self.path, encoding="utf-8") as f:
            return f.read()

    def test_appends(self):
        """
        Two writers of the same file (two processes) append: neither overwrites the other.
        """
        one, two = AppendFile(self.path), AppendFile(self.path)
        self.addCleanup(one.close)
        self.addCleanup(two.close)
        one.write("one\n")
        two.write("two\n")
        one.write("three\n")
        self.assertEqual(self.read(), "one\ntwo\nthree\n")

    def test_reopen(self):
        """
        After a rename, L{AppendFile.reopen} writes to a new file at the path.
        """
        f = AppendFile(self.path)
        self.addCleanup(f.close)
        observer = TextLogObserver(f)
        lines = LineLog("casd.session", observer)
        lines.emit("old", {})
        os.rename(self.path, self.path + ".1")
        lines.emit("still old", {})
        f.reopen()
        lines.emit("new", {})
        self.assertEqual(self.read(self.path + ".1").count("old"), 2)
        self.assertTrue(self.read().endswith(" new\n"))
        self.assertEqual(self.read().count("\n"), 1)

    def test_closed(self):
        """
        Writing to a closed file raises L{ValueError}, as a closed Python file does (which
        L{casd.service.logs.LogFileService} ignores).
        """
        f = AppendFile(self.path)
        f.close()
        self.assertRaises(ValueError, f.write, "late\n")
        self.assertRaises(ValueError, TextLogObserver(f), {"casd_line": "x", "log_namespace": "n"})


class SharedRotationTests(SynchronousTestCase):
    """
    With C{--workers}, the workers append to twistd's log file and the parent rotates it.
    """

    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "twistd.log")

    def read(self, suffix=""):
        with open(self.path + suffix, encoding="utf-8") as f:
            return f.read()

    def test_appendedByOthers(self):
        """
        The file is opened for appending: another process's appends (a worker's lines) and the
        parent's own lines never overwrite each other.
        """
        mine = RotatingLogFile.fromFullPath(self.path)
        self.addCleanup(mine.close)
        worker = AppendFile(self.path, fd=os.dup(mine.fileno()))
        self.addCleanup(worker.close)
        mine.write("parent 1\n")
        worker.write("worker 1\n")
        mine.write("parent 2\n")
        self.assertEqual(self.read(), "parent 1\nworker 1\nparent 2\n")

    def test_newFileMode(self):
        """
        A new file gets C{defaultMode}, as with Twisted's L{LogFile}.
        """
        f = RotatingLogFile.fromFullPath(self.path, defaultMode=0o640)
        self.addCleanup(f.close)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o640)

    def test_rotatedWhenOthersFilledIt(self):
        """
        Every interval the parent takes the size from the file system and rotates at
        C{rotateLength}; after the rotation (that one or a signal's) the workers are told to
        reopen the path, from the reactor thread.
        """
        from twisted.internet.task import Clock

        from casd.service.logfile import REOPEN_WORD, SharedRotation

        clock = Clock()
        scheduled = []
        clock.callFromThread = lambda f, *a: scheduled.append((f, a))
        told = []
        mine = RotatingLogFile.fromFullPath(self.path, rotateLength=100)
        self.addCleanup(mine.close)
        worker = AppendFile(self.path)
        self.addCleanup(worker.close)
        rotation = SharedRotation(mine, clock, told.append)
        rotation.start()
        worker.write("w" * 99 + "\n")
        self.assertEqual(mine.size, 0)
        clock.advance(1.0)
        self.assertEqual(self.read(".1"), "w" * 99 + "\n")
        self.assertEqual(self.read(), "")
        self.assertEqual(scheduled, [(told.append, (REOPEN_WORD,))])
        # A signal's rotation tells them too.
        mine.rotate()
        self.assertEqual(len(scheduled), 2)
        # Below the size, nothing.
        clock.advance(1.0)
        self.assertEqual(len(scheduled), 2)
        rotation.stop()
        self.assertIsNone(mine.onRotate)
        self.assertEqual(clock.getDelayedCalls(), [])


    def test_rotationFailsQuietly(self):
        """
        A rotation that fails (the file system refuses the rename) leaves the file open and
        written, and the next check tries again.
        """
        mine = RotatingLogFile.fromFullPath(self.path, rotateLength=10)
        self.addCleanup(mine.close)
        mine.write("0123456789\n")
        renames = []

        def refuse(src, dst):
            renames.append(src)
            raise PermissionError(src)

        self.patch(os, "rename", refuse)
        mine.checkSize()
        mine.checkSize()
        self.assertEqual(len(renames), 2)
        mine.write("still\n")
        self.patch(os, "rename", os.replace)
        mine.checkSize()
        mine.write("after\n")
        self.assertEqual(self.read(".1"), "0123456789\nstill\n")
        self.assertEqual(self.read(), "after\n")


def referenceLine(event):
    """
    The JSON line as C{eventAsLine} wrote it before it was made cheaper (C{json.dumps}).
    """
    import json
    import time

    from twisted.logger import formatEvent

    from casd.service.logs import _SKIP, LINE_KEY

    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time()))) + "Z",
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": event.get(LINE_KEY) or formatEvent(event),
    }
    for key, value in event.items():
        if key in _SKIP or key.startswith("log_") or key in record:
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getErrorMessage()
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


class JSONLineTests(SynchronousTestCase):
    """
    C{eventAsLine} (C{[log] format = "json"}): the same line as C{json.dumps} of the same record.
    """

    def events(self):
        from twisted.python.failure import Failure

        events = []
        lines = LineLog("casd.session", LogPublisher(events.append), now=lambda: 1_700_000_000.75)
        lines.emit("session=a user=\u00e9l\u00e8ve \"q\" \\ \n", {
            "session": "a", "user": "\u00e9l\u00e8ve \"q\"", "bytesIn": 12, "duration": 0.125, "tls": True,
            "backend": None, "nan": float("nan"), "obj": object(), "big": 10**30,
        })
        log = Logger(namespace="casd.other", observer=events.append)
        log.warn("hello {who}", who="you", n=3)
        log.failure("boom", Failure(ValueError("bad")))
        events.append({"log_format": "bare {x}", "x": 1})
        events.append({"log_format": "timeless", "log_time": None, "log_level": "weird"})
        return events

    def test_sameAsJSONDumps(self):
        from casd.service.logs import eventAsLine

        for event in self.events():
            if event.get("log_time") is None:
                # The time is now: compare all but it.
                mine, theirs = json.loads(eventAsLine(event)), json.loads(referenceLine(event))
                self.assertEqual(mine.pop("time")[:13], theirs.pop("time")[:13])
                self.assertEqual(mine, theirs)
            else:
                self.assertEqual(eventAsLine(event), referenceLine(event))

    def test_fewCalls(self):
        """
        A session line as JSON: the encoder, its join, the items, no call per field.
        """
        from casd.service.logs import eventAsLine

        event = self.events()[0]
        eventAsLine(event)  # the time stamp of this second
        self.assertLessEqual(pythonCalls(eventAsLine, event), 5)

    def test_workerRecordSameAsEncoder(self):
        """
        A worker's line record is what C{json.JSONEncoder(separators=(",", ":"), default=str)}
        writes: ASCII, any other value as its C{str}.
        """
        from casd.service.logs import _ENCODE

        record = {"user": "\u00e9l\u00e8ve \"q\"", "n": 3, "f": 0.5, "obj": object(), "none": None, "t": True}
        self.assertEqual(_ENCODE(record), json.JSONEncoder(separators=(",", ":"), default=str).encode(record))
