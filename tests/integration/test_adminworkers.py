"""
The admin listener of a real C{twistd cas --workers 2} node: one listener, in the parent,
answering for the whole node from both workers' figures.
"""

import base64
import json
import os
import signal
import time

from twisted.internet import defer, reactor, task, threads
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from twisted.trial.unittest import TestCase

from tests.integration.test_workers import WAIT, WorkersNode
from tests.support import chromium
from tests.support.procs import freePort


def imapSessions(exposition: bytes) -> float:
    """
    @return: C{casd_sessions_total} for IMAP in C{exposition}, summed over results.
    """
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in exposition.decode().splitlines()
        if line.startswith('casd_sessions_total{protocol="imap"')
    )


class AdminWorkersTests(WorkersNode, TestCase):
    """
    C{[admin]} with C{users}: the parent serves it; the workers start (none fails to bind it).
    """

    timeout = 120

    def setUp(self):
        super().setUp()
        self.admin = freePort()
        with open(self.config, "a") as f:
            f.write(
                f"""
[admin]
listen = "tcp:{self.admin}:interface=127.0.0.1"
users = ["alice"]
[health]
interval = 0.5
"""
            )
        self.agent = Agent(reactor)

    @defer.inlineCallbacks
    def get(self, path, credentials=("alice", "alice-pw")):
        """
        @return: C{(status, body)}.
        """
        headers = Headers()
        if credentials:
            token = base64.b64encode(":".join(credentials).encode())
            headers.addRawHeader(b"authorization", b"Basic " + token)
        response = yield self.agent.request(b"GET", f"http://127.0.0.1:{self.admin}{path}".encode(), headers)
        body = yield readBody(response)
        return response.code, body

    @defer.inlineCallbacks
    def until(self, check, what):
        """
        Poll C{check()} (a L{Deferred} of a truth value) until it holds, for at most L{WAIT} s.

        @return: the last value.
        """
        deadline = time.monotonic() + WAIT
        while True:
            value = yield check()
            if value or time.monotonic() > deadline:
                if not value:
                    self.fail(f"{what}:\n{self.proc.output.decode(errors='replace')[-3000:]}")
                return value
            yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def sessionsCounted(self):
        """
        @return: the node's C{casd_sessions_total} for IMAP, summed over results.
        """
        status, body = yield self.get("/metrics")
        self.assertEqual(status, 200, body)
        return imapSessions(body)

    @defer.inlineCallbacks
    def test_oneAdminListenerForTheNode(self):
        proc = yield self.startParent(2)
        output = proc.output.decode(errors="replace")
        self.assertNotIn("CannotListenError", output)
        self.assertEqual(output.count("admin listener on"), 1, output[-3000:])
        # /health: 200 once a worker's checker saw the backend UP.
        yield self.until(lambda: self.get("/health", None).addCallback(lambda r: r[0] == 200), "health 200")
        # Without credentials: 401 for every page but /health.
        for path in ("/metrics", "/status", "/"):
            status, _ = yield self.get(path, None)
            self.assertEqual(status, 401, path)
        status, _ = yield self.get("/metrics", ("alice", "wrong"))
        self.assertEqual(status, 401)

        # Both workers serve logins; the node's counter counts every one of them.
        before = yield self.sessionsCounted()
        made, served = yield self.loginOnBoth(proc, atLeast=10)
        self.assertEqual(served, {1, 2})
        counted = yield self.until(
            lambda: self.sessionsCounted().addCallback(lambda n: n if n - before >= made else 0), "sessions counted"
        )
        self.assertEqual(counted - before, made)
        status, body = yield self.get("/metrics")
        text = body.decode()
        self.assertIn('casd_worker_answered{worker="1"} 1.0', text)
        self.assertIn('casd_worker_answered{worker="2"} 1.0', text)
        self.assertIn("casd_workers 2.0", text)
        self.assertNotIn("alice-pw", text)

        # /status: the node's view, each worker's part.
        status, body = yield self.get("/status")
        self.assertEqual(status, 200)
        node = json.loads(body)
        self.assertEqual([w["worker"] for w in node["workers"]], [1, 2])
        self.assertEqual(sorted(w["pid"] for w in node["workers"]), sorted(self.workerPids))
        self.assertTrue(all(w["answered"] for w in node["workers"]))
        self.assertTrue(node["healthy"])
        # The dashboard shows each worker's part.
        self.assertTrue(chromium.available(), "Debian's chromium is required")
        result = yield threads.deferToThread(
            chromium.snapshot,
            f"http://127.0.0.1:{self.admin}/",
            os.path.join(self.dir, "dashboard.png"),
            waitFor="body[data-loaded=yes]",
            read=["#workers", "#health"],
            credentials={"username": "alice", "password": "alice-pw"},
        )
        self.assertEqual(result["texts"]["#health"], "OK")
        for pid in self.workerPids:
            self.assertIn(str(pid), result["texts"]["#workers"])

        # SIGUSR1 to the parent drains the node: /health 503, the workers drain too, and the
        # parent keeps running.
        os.kill(self.parentPid, signal.SIGUSR1)
        yield self.until(lambda: self.get("/health", None).addCallback(lambda r: r[0] == 503), "health 503")
        yield self.until(
            lambda: self.get("/status").addCallback(lambda r: all(w["draining"] for w in json.loads(r[1])["workers"])),
            "workers draining",
        )
        status, body = yield self.get("/health", None)
        self.assertIn(b"draining (SIGUSR1)", body)
        # A reload (the file says drain = false) ends the drain, as in a single-process casd.
        os.kill(self.parentPid, signal.SIGHUP)
        yield self.until(lambda: self.get("/health", None).addCallback(lambda r: r[0] == 200), "health 200 again")
        # [server] drain = true in the file, then a reload: the node drains again.
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(text.replace("[server]\n", "[server]\ndrain = true\n", 1))
        os.kill(self.parentPid, signal.SIGHUP)
        yield self.until(
            lambda: self.get("/health", None).addCallback(lambda r: r[0] == 503 and b"(configuration)" in r[1]),
            "health 503 by the file",
        )
        yield self.until(
            lambda: self.get("/status").addCallback(lambda r: all(w["draining"] for w in json.loads(r[1])["workers"])),
            "workers draining by the file",
        )
        yield self.stopParent(proc)

    @defer.inlineCallbacks
    def test_countersKeptWhenAWorkerDies(self):
        """
        A worker killed and restarted: the node's counters keep its sessions (up to its last
        answer), and the restart is counted.
        """
        proc = yield self.startParent(2)
        clients = yield defer.gatherResults([self.login() for _ in range(6)])
        for c in clients:
            c.transport.loseConnection()
        counted = yield self.until(
            lambda: self.sessionsCounted().addCallback(lambda n: n if n >= 6 else 0), "sessions counted"
        )
        self.assertEqual(counted, 6)
        # A hung worker (stopped) does not hold a scrape up: the node answers within the bounded
        # wait, with that worker's last figures, and says it did not answer.
        indexOf = {w["pid"]: w["worker"] for w in json.loads((yield self.get("/status"))[1])["workers"]}
        hung = self.workerPids[1]
        os.kill(hung, signal.SIGSTOP)
        try:
            # Answered at all while the worker is stopped: the wait is bounded.
            status, body = yield self.get("/metrics")
        finally:
            os.kill(hung, signal.SIGCONT)
        self.assertEqual(status, 200)
        self.assertIn(f'casd_worker_answered{{worker="{indexOf[hung]}"}} 0.0'.encode(), body)
        self.assertEqual(imapSessions(body), 6)
        victim = self.workerPids[0]
        os.kill(victim, signal.SIGKILL)
        yield self.waitGone([victim])
        # The parent learns of the end from its child's exit, a moment after the process is gone:
        # scrape until it counted the restart (its part of the counters is kept from then on).
        yield self.until(
            lambda: self.get("/metrics").addCallback(lambda r: b"casd_worker_restarts_total 1.0" in r[1]),
            "the restart counted",
        )
        self.assertEqual((yield self.sessionsCounted()), 6)
        # The restarted worker answers again.
        yield self.until(
            lambda: self.get("/metrics").addCallback(
                lambda r: b'casd_worker_answered{worker="1"} 1.0' in r[1]
                and b'casd_worker_answered{worker="2"} 1.0' in r[1]
            ),
            "both workers answer",
        )
        self.assertEqual((yield self.sessionsCounted()), 6)
        self.workerPids = [p for p in self.workerPids if p != victim] + [
            w["pid"] for w in json.loads((yield self.get("/status"))[1])["workers"] if w["pid"] not in self.workerPids
        ]
        yield self.stopParent(proc)

