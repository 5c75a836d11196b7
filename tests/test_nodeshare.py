"""
The forms-logoff relay of a node's workers (L{casd.service.nodeshare}): its messages (bad input
ignored, sizes bounded), the worker's and the parent's sides, and the forms front end wired to it.
"""

from __future__ import annotations

import io
import os

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from casd import nodesecret
from casd.interfaces import IRevocationSet
from casd.nodesecret import NodeSecret
from casd.service.nodeshare import (
    MAX_LINE,
    REVOKE_RECORD,
    ParentRevocations,
    RelayedRevocationSet,
    WorkerRevocations,
    installNodeSecret,
    nodeWords,
    parseRevocation,
    revocationLine,
)
from casd.service.workers import STOP_WORD, WorkerPool, _WorkerProcess
from casd.service.logfile import REOPEN_WORD
from protocols.http.cookies import MemoryRevocationSet, nodeRevocations

NOW = 1_800_000_000
TOKEN = "q1w2e3r4t5y6u7i8o9p0aA"


class MessageTests(SynchronousTestCase):
    def test_roundTrip(self):
        line = revocationLine(TOKEN, NOW + 600.7)
        self.assertEqual(line, b"revoke " + TOKEN.encode().hex().encode() + b" %d\n" % (NOW + 600))
        self.assertEqual(parseRevocation(line), (TOKEN, NOW + 600))
        self.assertEqual(parseRevocation(line.rstrip(b"\n")), (TOKEN, NOW + 600))

    def test_neverSpellsTheOtherWords(self):
        """
        The parent's other words (C{stop}, C{reopen-log}) are found by substring in what the
        worker reads: a revocation never contains them, whatever its token.
        """
        for token in ("stop", "reopen-log", "x" * 64, "stopstop", "\u00e9t\u00e9"):
            line = revocationLine(token, NOW)
            self.assertNotIn(b"stop", line[len(b"revoke") :])
            self.assertNotIn(REOPEN_WORD.strip(), line)
            self.assertEqual(parseRevocation(line), (token, NOW))

    def test_refusedToSend(self):
        for token, expiry in (("", NOW), ("x" * 65, NOW), (None, NOW), (TOKEN, 5), (TOKEN, 2**41),
                              (TOKEN, float("nan")), (TOKEN, "soon"), ("\ud800", NOW)):
            self.assertIsNone(revocationLine(token, expiry), (token, expiry))

    def test_badInputIgnored(self):
        good = revocationLine(TOKEN, NOW)
        for line in (
            b"", b"stop\n", REOPEN_WORD, b"revoke\n", b"revoke \n", b"revoke abc 123\n",
            b"revoke zz %d\n" % NOW, b"revoke 6162 -5\n", b"revoke 6162 12x\n", b"revoke 6162 %d 1\n" % NOW,
            b"revoke 6162  %d\n" % NOW, b"REVOKE 6162 %d\n" % NOW, b"revoke ff %d\n" % NOW,
            b"revoke 6162 99\n", b"revoke 6162 %d\n" % 2**41, good[:-3], b"revoke " + b"61" * 65 + b" %d\n" % NOW,
            good.replace(b"revoke ", b"revoke " + b"6" * 1000),
        ):
            self.assertIsNone(parseRevocation(line), line)

    def test_maxLine(self):
        longest = revocationLine("x" * 64, 2**40 - 1)
        self.assertLessEqual(len(longest), MAX_LINE)
        self.assertIsNotNone(parseRevocation(longest))


class WorkerSideTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.out = io.StringIO()
        self.relay = WorkerRevocations(self.out)
        self.local = MemoryRevocationSet(self.clock)
        self.revocations = RelayedRevocationSet(self.local, self.relay)

    def contains(self, revocations, token):
        result = []
        revocations.contains(token).addCallback(result.append)
        return result[0]

    def test_interface(self):
        verifyObject(IRevocationSet, self.revocations)

    def test_addTellsTheParent(self):
        d = self.revocations.add(TOKEN, NOW + 60)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(self.contains(self.revocations, TOKEN))
        self.assertEqual(self.out.getvalue(), REVOKE_RECORD + revocationLine(TOKEN, NOW + 60).decode())

    def test_parentGone(self):
        """
        A parent that went away (its pipe closed) costs the relay, never the logoff.
        """
        self.out.close()
        self.successResultOf(self.revocations.add(TOKEN, NOW + 60))
        self.assertTrue(self.contains(self.revocations, TOKEN))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_wordsApplied(self):
        """
        Another worker's logoff, however the parent's writes are cut, among its other words;
        applied locally, not sent back.
        """
        data = STOP_WORD + revocationLine(TOKEN, NOW + 60) + REOPEN_WORD + revocationLine("other", NOW + 5)
        for i in range(len(data)):
            self.relay.wordsReceived(data[i : i + 1])
        self.assertTrue(self.contains(self.revocations, TOKEN))
        self.assertTrue(self.contains(self.revocations, "other"))
        self.assertEqual(self.out.getvalue(), "")

    def test_badWordsIgnored(self):
        self.relay.wordsReceived(b"revoke zz 1\nrevoke\n\n\x00\xff\nrevoke 6162 5\n")
        self.assertEqual(len(self.local), 0)

    def test_overlongLineSkipped(self):
        """
        A line longer than L{MAX_LINE} is dropped whole, however it arrives; the buffer never
        holds more than one line's worth; the next line counts.
        """
        self.relay.wordsReceived(b"revoke " + b"61" * 40)
        for _ in range(100):
            self.relay.wordsReceived(b"62" * 100)
            self.assertLessEqual(len(self.relay._lines._buffer), MAX_LINE + 200)
        self.relay.wordsReceived(b" %d\n" % (NOW + 60) + revocationLine(TOKEN, NOW + 60))
        self.assertEqual(len(self.local), 1)
        self.assertTrue(self.contains(self.revocations, TOKEN))

    def test_everyReceiver(self):
        other = MemoryRevocationSet(self.clock)
        held = RelayedRevocationSet(other, self.relay)
        self.assertEqual(len(self.relay.receivers), 2)
        self.relay.wordsReceived(revocationLine(TOKEN, NOW + 60))
        self.assertTrue(self.contains(other, TOKEN))
        self.assertTrue(self.contains(self.local, TOKEN))
        # A set no longer used (a reload built another) is no longer a receiver.
        del held
        self.assertEqual(len(self.relay.receivers), 1)

    def test_receiverFails(self):
        class Broken:
            def add(self, tokenId, expiresAt):
                return defer.fail(RuntimeError("store down"))

        held = RelayedRevocationSet(Broken(), self.relay)
        self.relay.wordsReceived(revocationLine(TOKEN, NOW + 60))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertTrue(self.contains(self.local, TOKEN))
        self.assertIn(held, self.relay.receivers)


class InstallTests(SynchronousTestCase):
    def tearDown(self):
        nodesecret.install(None, None)

    def test_install(self):
        secret = NodeSecret.generate()
        r, w = os.pipe()
        os.write(w, secret._secret)
        os.close(w)
        out = io.StringIO()
        installNodeSecret(r, out)
        self.assertEqual(nodesecret.derivedKey(b"x"), secret.derive(b"x"))
        relay = nodesecret.revocationRelay()
        self.assertIsInstance(relay, WorkerRevocations)
        self.assertIs(relay.out, out)
        local = MemoryRevocationSet(Clock())
        wrapped = nodeRevocations(local, shared=False)
        self.assertIsInstance(wrapped, RelayedRevocationSet)
        self.assertIs(nodeRevocations(local, shared=True), local)
        nodeWords(revocationLine(TOKEN, 2**39))
        self.assertEqual(len(local), 1)

    def test_badPipe(self):
        r, w = os.pipe()
        os.write(w, b"short")
        os.close(w)
        e = self.assertRaises(SystemExit, installNodeSecret, r, io.StringIO())
        self.assertIn("node secret", str(e))
        self.assertIsNone(nodesecret.revocationRelay())

    def test_single(self):
        """
        Without workers, nothing is wrapped, and the parent's words go nowhere.
        """
        local = MemoryRevocationSet(Clock())
        self.assertIs(nodeRevocations(local, shared=False), local)
        nodeWords(revocationLine(TOKEN, 2**39))


class Transport:
    def __init__(self):
        self.written = b""

    def write(self, data):
        self.written += data


class ParentSideTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)

    def test_keptUntilExpiry(self):
        parent = ParentRevocations(self.clock)
        self.assertEqual(parent.recordReceived(revocationLine(TOKEN, NOW + 60)), revocationLine(TOKEN, NOW + 60))
        self.assertEqual(parent.live(), revocationLine(TOKEN, NOW + 60))
        self.clock.advance(61)
        self.assertEqual(parent.live(), b"")

    def test_badRecordsIgnored(self):
        parent = ParentRevocations(self.clock)
        for record in (b"", b"revoke 6162\n", b"hello", revocationLine(TOKEN, NOW - 1), b"x" * 100_000):
            self.assertIsNone(parent.recordReceived(record))
        self.assertEqual(len(parent), 0)

    def test_bounded(self):
        parent = ParentRevocations(self.clock, maxEntries=100)
        for i in range(1000):
            parent.recordReceived(revocationLine(f"t{i}", NOW + 60))
            self.assertLessEqual(len(parent), 100)
        self.assertIn(revocationLine("t999", NOW + 60), parent.live())
        self.assertNotIn(revocationLine("t0", NOW + 60), parent.live())
        self.clock.advance(61)
        for i in range(200):
            parent.recordReceived(revocationLine(f"u{i}", NOW + 600))
        self.assertLessEqual(len(parent), 100)
        self.assertEqual({token[0] for token in parent._entries}, {"u"})

    def pool(self):
        pool = WorkerPool.__new__(WorkerPool)
        pool.reactor = self.clock
        pool._initNodeShare()
        pool._stopping = False
        pool.workers = {}
        for index in (1, 2, 3):
            worker = _WorkerProcess.__new__(_WorkerProcess)
            worker.pool, worker.index, worker.transport = pool, index, Transport()
            pool.workers[index] = worker
        return pool

    def test_fanOut(self):
        """
        A worker's record reaches every other worker, not itself; the log sees nothing.
        """
        pool = self.pool()
        logged = []
        self.patch(_WorkerProcess.log, "observer", logged.append)
        line = revocationLine(TOKEN, NOW + 60)
        pool.workers[2]._relay(REVOKE_RECORD.encode() + line.rstrip(b"\n"))
        self.assertEqual(pool.workers[1].transport.written, line)
        self.assertEqual(pool.workers[3].transport.written, line)
        self.assertEqual(pool.workers[2].transport.written, b"")
        self.assertEqual(logged, [])

    def test_fanOutBadRecord(self):
        pool = self.pool()
        pool.workers[2]._relay(REVOKE_RECORD.encode() + b"revoke nonsense")
        self.assertEqual([w.transport.written for w in pool.workers.values()], [b""] * 3)

    def test_notWhileStopping(self):
        pool = self.pool()
        pool._stopping = True
        pool.revocationFrom(pool.workers[1], revocationLine(TOKEN, NOW + 60))
        self.assertEqual(pool.workers[2].transport.written, b"")

    def test_restartedWorkerLearns(self):
        """
        A worker started after logoffs is told the live ones; the secret stays the parent's.
        """
        pool = self.pool()
        secret = pool.nodeSecret
        pool.revocationFrom(pool.workers[1], revocationLine(TOKEN, NOW + 60))
        pool.revocationFrom(pool.workers[1], revocationLine("gone", NOW + 1))
        self.clock.advance(2)
        fresh = _WorkerProcess.__new__(_WorkerProcess)
        fresh.transport = Transport()
        r, w = os.pipe()
        os.close(w)
        pool._workerStarted(fresh, r)
        self.assertRaises(OSError, os.fstat, r)
        self.assertEqual(fresh.transport.written, revocationLine(TOKEN, NOW + 60))
        self.assertIs(pool.nodeSecret, secret)

    def test_passNodeSecret(self):
        pool = self.pool()
        childFDs = {0: "w", 1: "r", 2: "r", 7: 7}
        args = []
        fd = pool._passNodeSecret(childFDs, args)
        self.assertEqual(childFDs[8], fd)
        self.assertEqual(args, ["--node-secret-fd=8"])
        self.assertEqual(os.read(fd, 100), pool.nodeSecret._secret)
        os.close(fd)


class ParentWatchTests(SynchronousTestCase):
    def test_wordsHandedOn(self):
        """
        The worker's reader of its standard input hands everything the parent writes to the
        relay (L{nodeWords} by default), and still sees C{stop}.
        """
        from casd.service.worker import _ParentWatch

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        seen = []
        watch = _ParentWatch(object(), fd=r, onWords=seen.append)
        os.write(w, revocationLine(TOKEN, NOW) + STOP_WORD)
        self.assertIsNone(watch.doRead())
        self.assertEqual(seen, [revocationLine(TOKEN, NOW) + STOP_WORD])
        self.assertTrue(watch.stopAsked)
        self.assertIs(_ParentWatch(object(), fd=r).onWords, nodeWords)
