"""
Tests for L{casd.service.logs}: casd's own log file, text or JSON, reopened after logrotate.
"""

import json
import os

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogPublisher, Logger
from twisted.trial.unittest import SynchronousTestCase

from casd.service.logs import LogFileService, eventAsLine
from casd.session.clientinfo import ClientInfo
from casd.session.protolog import SessionLog


class FakeSignals:
    SIGUSR2 = 12

    def signal(self, number, handler):
        return None


class LogFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "casd.log")
        self.publisher = LogPublisher()

    def start(self, fmt):
        svc = LogFileService(MemoryReactorClock(), self.path, fmt, publisher=self.publisher, signals=FakeSignals())
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    def sessionLine(self):
        client = ClientInfo("abc", "imap", "imap-1", "198.51.100.7", 4000, "127.0.0.1", 143, True, False)
        SessionLog(Logger(namespace="casd.session", observer=self.publisher)).record(
            client, "alice", "mbx1", "proxy", 10, 20, 1.5
        )

    def test_jsonOneObjectPerLine(self):
        """
        In JSON format each event is one line holding one object with the session's fields.
        """
        self.start("json")
        self.sessionLine()
        with open(self.path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 1)
        record = json.loads(lines[0])
        self.assertEqual(record["namespace"], "casd.session")
        self.assertEqual(record["user"], "alice")
        self.assertEqual(record["bytesOut"], 20)
        self.assertEqual(record["session"], "abc")
        self.assertIn("proto=imap", record["message"])
        self.assertTrue(record["time"].endswith("Z"))

    def test_textFormat(self):
        self.start("text")
        self.sessionLine()
        with open(self.path) as f:
            text = f.read()
        self.assertIn("session=abc proto=imap", text)
        self.assertRaises(ValueError, json.loads, text)

    def test_reopenAfterRotation(self):
        """
        After logrotate renamed the file, L{LogFileService.reopen} starts a new one at the same
        path; nothing is written to the old one any more.
        """
        svc = self.start("text")
        self.sessionLine()
        os.rename(self.path, self.path + ".1")
        svc.reopen()
        self.sessionLine()
        with open(self.path + ".1") as f:
            self.assertEqual(f.read().count("session=abc"), 1)
        with open(self.path) as f:
            text = f.read()
        self.assertEqual(text.count("session=abc"), 1)

    def test_failureAsMessage(self):
        from twisted.python.failure import Failure

        event = {"log_namespace": "x", "log_format": "boom", "log_failure": Failure(ValueError("bad"))}
        self.assertEqual(json.loads(eventAsLine(event))["failure"], "bad")


class FakeSignalTable:
    SIGUSR1 = 10

    def __init__(self):
        self.handlers = {}

    def getsignal(self, number):
        return self.handlers.get(number)

    def signal(self, number, handler):
        self.handlers[number] = handler


def classicText(event):
    """
    What Twisted's own text observer writes for C{event}.
    """
    from twisted.logger import formatEventAsClassicLogText

    return formatEventAsClassicLogText(event)


class LineLogTests(SynchronousTestCase):
    """
    L{LineLog}: a line rendered once, published as the event C{Logger.info("{line}", ...)} makes.
    """

    def setUp(self):
        self.events = []
        self.publisher = LogPublisher(self.events.append)

    def test_event(self):
        """
        The event carries the text, the fields, the namespace and level, and its format renders
        the text.
        """
        from twisted.logger import LogLevel, formatEvent

        from casd.service.logs import LINE_KEY, LineLog

        LineLog("casd.test", self.publisher, now=lambda: 1234.5).emit("a=1 b={x}", {"a": 1, "b": "{x}"})
        (event,) = self.events
        self.assertEqual(event[LINE_KEY], "a=1 b={x}")
        self.assertEqual(event["line"], "a=1 b={x}")
        self.assertEqual((event["a"], event["b"]), (1, "{x}"))
        self.assertEqual(event["log_namespace"], "casd.test")
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["log_time"], 1234.5)
        self.assertEqual(formatEvent(event), "a=1 b={x}")

    def test_sessionLineSameAsBefore(self):
        """
        The session line's text and fields are those of C{SESSION_FORMAT}.
        """
        from casd.session.protolog import SESSION_FORMAT

        client = ClientInfo("abc", "imap", "imap-1", "2001:db8::7", 4000, "::1", 143, True, False)
        SessionLog(Logger(namespace="casd.session", observer=self.publisher)).record(
            client, "", None, "logout", 0, 7, 0.0125
        )
        (event,) = self.events
        fields = {k: event[k] for k in ("session", "protocol", "listener", "client", "user", "backend",
                                         "result", "bytesIn", "bytesOut", "duration")}
        self.assertEqual(fields["client"], "[2001:db8::7]:4000")
        self.assertEqual((fields["user"], fields["backend"]), ("-", "-"))
        self.assertEqual(event["line"], SESSION_FORMAT.format(**fields))


class TextLogObserverTests(SynchronousTestCase):
    """
    L{TextLogObserver} writes what Twisted's text observer writes, without rendering a
    L{LineLog} line's format.
    """

    def observe(self, events):
        import io

        from casd.service.logs import TextLogObserver

        out = io.StringIO()
        observer = TextLogObserver(out)
        for event in events:
            observer(event)
        return out.getvalue()

    def test_sameTextAsTwisted(self):
        """
        Lines and ordinary events, across second boundaries and with a C{log_system}, come out as
        Twisted writes them.
        """
        from casd.service.logs import LineLog

        events = []
        times = iter([1000.0, 1000.999, 1001.0, 1001.5, 86399.99, 86400.0])
        lines = LineLog("casd.session", LogPublisher(events.append), now=lambda: next(times))
        lines.emit("session=a user=x", {"user": "x"})
        lines.emit("two\nlines", {})
        Logger(namespace="casd.other", observer=events.append).warn("hello {who}", who="you")
        lines.emit("session=b", {})
        lines.emit("session=c", {"log_system": "worker2:casd.session#info"})
        lines.emit("session=d", {})
        text = self.observe(events)
        self.assertEqual(text, "".join(classicText(e) for e in events))
        self.assertIn("[worker2:casd.session#info] session=c\n", text)
        self.assertIn("two\n\tlines\n", text)

    def test_lineNotFormatted(self):
        """
        A line is written as it is: its format is not rendered (a format that would fail shows it).
        """
        from casd.service.logs import LineLog

        events = []
        LineLog("casd.session", LogPublisher(events.append)).emit("ok", {})
        events[0]["log_format"] = "{missing"
        self.assertTrue(self.observe(events).endswith(" [casd.session#info] ok\n"))

    def test_nothingToWrite(self):
        """
        An event without a format writes nothing, as with Twisted's observer.
        """
        self.assertEqual(self.observe([{"log_namespace": "x"}]), "")


class MainLogTests(SynchronousTestCase):
    """
    L{mainLogObserver} and L{MainLogRoot}: twistd's log written by L{TextLogObserver}, to where
    twistd's options say.
    """

    def test_leftToTwistd(self):
        """
        Without twistd's options, with C{--syslog} or C{--logger}, and for C{--logfile=-} of a
        daemon (which twistd refuses), twistd keeps its own observer.
        """
        from casd.service.logs import mainLogObserver

        reactor = MemoryReactorClock()
        self.assertIsNone(mainLogObserver(None, reactor))
        self.assertIsNone(mainLogObserver({"syslog": True, "nodaemon": True}, reactor))
        self.assertIsNone(mainLogObserver({"logger": "x.y", "nodaemon": True}, reactor))
        self.assertIsNone(mainLogObserver({"logfile": "-", "nodaemon": False}, reactor))

    def test_logsToStandardOutput(self):
        from casd.service.logs import logsToStandardOutput

        self.assertTrue(logsToStandardOutput({"nodaemon": True, "logfile": None}))
        self.assertTrue(logsToStandardOutput({"nodaemon": True, "logfile": "-"}))
        self.assertFalse(logsToStandardOutput({"nodaemon": True, "logfile": "casd.log"}))
        self.assertFalse(logsToStandardOutput({"nodaemon": False, "logfile": None}))
        self.assertFalse(logsToStandardOutput({"nodaemon": True, "syslog": True}))
        self.assertFalse(logsToStandardOutput({"nodaemon": True, "logger": "x.y"}))
        self.assertFalse(logsToStandardOutput(None))

    def test_standardOutput(self):
        import io

        from casd.service.logs import TextLogObserver, mainLogObserver

        out = io.StringIO()
        for options in ({"logfile": "-", "nodaemon": True}, {"logfile": None, "nodaemon": True}):
            observer = mainLogObserver(options, MemoryReactorClock(), stdout=out)
            self.assertIsInstance(observer, TextLogObserver)
            self.assertIs(observer.outFile, out)

    def test_logFileRotatedOnSignal(self):
        """
        C{--logfile}: the file twistd would write (its L{LogFile}), rotated on C{SIGUSR1} while
        nothing else takes that signal.
        """
        from casd.service.logs import LineLog, mainLogObserver

        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "twistd.log")
        reactor = MemoryReactorClock()
        signals = FakeSignalTable()
        observer = mainLogObserver({"logfile": path, "nodaemon": False}, reactor, signals=signals)
        self.addCleanup(observer.outFile.close)
        LineLog("casd.session", observer).emit("session=one", {})
        with open(path) as f:
            self.assertIn("[casd.session#info] session=one\n", f.read())
        calls = []
        reactor.callFromThread = lambda f, *a: calls.append(f)
        signals.handlers[signals.SIGUSR1](10, None)
        self.assertEqual(calls, [observer.outFile.rotate])

    def test_rootGivesApplicationItsObserver(self):
        """
        Attached to twistd's application, L{MainLogRoot} sets the application's C{ILogObserver}
        (which twistd logs to), unless one is set already; without twistd's options it sets none.
        """
        import io

        from twisted.application.service import Application
        from twisted.logger import ILogObserver

        from casd.service.logs import MainLogRoot, TextLogObserver

        application = Application("cas")
        MainLogRoot({"nodaemon": True}, MemoryReactorClock()).setServiceParent(application)
        self.assertIsInstance(application.getComponent(ILogObserver), TextLogObserver)

        mine = TextLogObserver(io.StringIO())
        application = Application("cas")
        application.setComponent(ILogObserver, mine)
        MainLogRoot({"nodaemon": True}, MemoryReactorClock()).setServiceParent(application)
        self.assertIs(application.getComponent(ILogObserver), mine)

        application = Application("cas")
        MainLogRoot(None, MemoryReactorClock()).setServiceParent(application)
        self.assertIsNone(application.getComponent(ILogObserver, None))
