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
