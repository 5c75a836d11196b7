# -*- test-case-name: tests.test_gctune -*-
"""
Tests for L{casd.service.gctune}: the collector set for serving once the reactor runs, and set
again after a reload.
"""

from __future__ import annotations

from twisted.trial import unittest

from casd.service import gctune


class FakeCollector:
    """
    The parts of the C{gc} module casd uses, recording the calls.
    """

    def __init__(self):
        self.calls = []
        self.threshold = (700, 10, 10)
        self.frozen = 0

    def collect(self):
        self.calls.append("collect")
        return 0

    def freeze(self):
        self.calls.append("freeze")
        self.frozen = 1000

    def unfreeze(self):
        self.calls.append("unfreeze")
        self.frozen = 0

    def get_freeze_count(self):
        return self.frozen

    def get_threshold(self):
        return self.threshold

    def set_threshold(self, *threshold):
        self.calls.append("set_threshold")
        self.threshold = threshold


class FakeReactor:
    def __init__(self):
        self.whenRunning = []

    def callWhenRunning(self, f, *args):
        self.whenRunning.append((f, args))

    def run(self):
        for f, args in self.whenRunning:
            f(*args)


class TuneTests(unittest.TestCase):
    def test_nothingBeforeTheReactorRuns(self):
        """
        Start-up is not over before the reactor runs: nothing is frozen yet.
        """
        collector, reactor = FakeCollector(), FakeReactor()
        gctune.tuneCollector(reactor, collector)
        self.assertEqual(collector.calls, [])

    def test_freezeThenRaise(self):
        """
        Once the reactor runs: one collection, start-up's survivors frozen, the young
        generation's threshold raised, the older generations' kept.
        """
        collector, reactor = FakeCollector(), FakeReactor()
        gctune.tuneCollector(reactor, collector)
        reactor.run()
        self.assertEqual(collector.calls, ["collect", "freeze", "set_threshold"])
        self.assertEqual(collector.threshold, (gctune.YOUNG_THRESHOLD, 10, 10))
        self.assertGreater(gctune.YOUNG_THRESHOLD, 700)

    def test_refreeze(self):
        """
        After a reload, the frozen objects go back to the collector (an old configuration is
        freed), then what survives is frozen again.
        """
        collector, reactor = FakeCollector(), FakeReactor()
        gctune.tuneCollector(reactor, collector)
        reactor.run()
        del collector.calls[:]
        gctune.refreeze(object(), collector)
        self.assertEqual(collector.calls, ["unfreeze", "collect", "freeze"])

    def test_refreezeUntuned(self):
        """
        In a process that was not tuned (nothing frozen), a reload leaves the collector alone.
        """
        collector = FakeCollector()
        gctune.refreeze(object(), collector)
        self.assertEqual(collector.calls, [])
