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


class FakeLibc:
    def __init__(self, answer=1):
        self.calls = []
        self.answer = answer

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return self.answer


#: A relay's reads in a child process: 256 KiB C{recv}s of 512 MiB through a socket pair, after
#: L{gctune.tuneAllocator} when the argument says so; prints the minor page faults per MB.
_RECV_LOOP = """
import os, resource, socket, sys
if sys.argv[1] == "tuned":
    from casd.service.gctune import tuneAllocator
    assert tuneAllocator()
a, b = socket.socketpair()
pid = os.fork()
if pid == 0:
    a.close()
    chunk = b"x" * (1 << 20)
    for _ in range(512):
        b.sendall(chunk)
    os._exit(0)
b.close()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
received = 0
while True:
    data = a.recv(262144)
    if not data:
        break
    received += len(data)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
os.waitpid(pid, 0)
print(faults / (received / 1e6))
"""


class AllocatorTests(unittest.TestCase):
    def test_thresholdsSet(self):
        """
        Blocks up to 4 MiB from the heap (an HTTP body's reads grow to 2 MiB), 16 MiB kept at its top: both thresholds set (setting
        one turns glibc's dynamic thresholds off, so the other must be set too).
        """
        libc = FakeLibc()
        self.assertTrue(gctune.tuneAllocator(libc))
        self.assertEqual(
            libc.calls,
            [(gctune.M_MMAP_THRESHOLD, 4 << 20), (gctune.M_TRIM_THRESHOLD, 16 << 20)],
        )

    def test_withoutMallopt(self):
        """
        A C library without C{mallopt} (not glibc) is left alone.
        """
        self.assertFalse(gctune.tuneAllocator(object()))

    def test_refused(self):
        """
        C{mallopt} answering 0 (refused) is reported.
        """
        self.assertFalse(gctune.tuneAllocator(FakeLibc(answer=0)))

    def test_relayReadsWithoutPageFaults(self):
        """
        With this process's glibc, a loop of 256 KiB reads faults pages in again and again by
        default, and hardly at all once tuned.
        """
        import os
        import subprocess
        import sys

        package = os.path.dirname(os.path.dirname(os.path.abspath(gctune.__file__)))
        env = dict(os.environ, PYTHONPATH=os.path.dirname(package))

        def faultsPerMB(mode):
            out = subprocess.run(
                [sys.executable, "-c", _RECV_LOOP, mode], env=env, capture_output=True, text=True, timeout=60
            )
            self.assertEqual(out.returncode, 0, out.stderr)
            return float(out.stdout)

        self.assertLess(faultsPerMB("tuned"), 1.0)
        self.assertGreater(faultsPerMB("default"), 4.0)
