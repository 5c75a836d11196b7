# -*- test-case-name: tests.test_nodeadmin -*-
"""
The admin pages of C{twistd cas --workers N}: the parent serves the one admin listener of the
node and answers each request from its workers' answers over their control channels
(L{casd.service.control}), gathered for at most L{casd.service.workers.ASK_WAIT} seconds.

  - C{/health}: 503 while the node drains (C{SIGUSR1} to the parent, or C{[server] drain} in
    the file a worker reloaded), when no worker answered, or when no answering worker has a
    backend member UP; else 200;
  - C{/metrics}: the workers' families merged (L{casd.service.nodemetrics}), plus the parent's
    own C{casd_workers}, C{casd_worker_answered} and C{casd_worker_restarts_total}.  A worker
    that did not answer in time counts with its last answer; the counters of a worker that
    ended stay in the node's (up to its last answer), so they never fall back;
  - C{/status} and the dashboard: the node's view, with a C{workers} list.
"""

from __future__ import annotations

import time

from prometheus_client import generate_latest
from twisted.internet import defer
from zope.interface import implementer

import casd
from casd.service.admin import IAdminView
from casd.service.nodemetrics import NodeCollector, growing, mergeFamilies


@implementer(IAdminView)
class NodeView:
    """
    The node's figures, from its workers.

    @ivar answers: worker index -> C{(pid, families)}: each running worker's last metrics.
    @ivar retired: the growing families of the workers that ended (L{growing}), merged.
    """

    def __init__(self, pool, config, listeners, clock, now=time.time) -> None:
        """
        @param pool: the L{casd.service.workers.WorkerPool}.
        @param listeners: the listeners, as C{/status} lists them.
        """
        self.pool = pool
        self.config = config
        self.listeners = listeners
        self.clock = clock
        self.now = now
        self.startedAt = now()
        self.answers: dict = {}
        self.retired: list = []
        pool.onWorkerEnded.append(self._ended)

    def _ended(self, worker) -> None:
        kept = self.answers.pop(worker.index, None)
        if kept is not None and kept[0] == worker.pid:
            self.retired = growing(mergeFamilies([self.retired, kept[1]]))

    def verdict(self, answers: dict) -> tuple[bool, str]:
        """
        @param answers: worker index -> its answer, or L{None} (L{WorkerPool.ask}).
        @return: C{(healthy, why)} for the node.
        """
        node = self.pool.node
        if node.draining:
            return False, f"draining ({node.reason})"
        answered = {index: a for index, a in sorted(answers.items()) if a is not None}
        if not answered:
            return False, "no worker answered"
        for index, answer in answered.items():
            if answer["draining"]:
                return False, f"worker {index}: {answer['health'][1]}"
        if not any(answer["health"][0] for answer in answered.values()):
            return False, next(iter(answered.values()))["health"][1]
        return True, "OK"

    def health(self) -> defer.Deferred:
        return self.pool.ask("health").addCallback(self.verdict)

    def metrics(self) -> defer.Deferred:
        return self.pool.ask("metrics").addCallback(self._exposition)

    def _exposition(self, answers: dict) -> bytes:
        for index, answer in answers.items():
            if answer is not None:
                self.answers[index] = (answer["pid"], answer["families"])
        sources = [self.retired] + [self.answers[i][1] for i in sorted(self.answers) if i in self.pool.workers]
        families = mergeFamilies(sources) + self._own(answers)
        return generate_latest(NodeCollector(families))

    def _own(self, answers: dict) -> list:
        answered = [
            ["casd_worker_answered", {"worker": str(index)}, 1 if answers.get(index) is not None else 0]
            for index in range(1, self.pool.count + 1)
        ]
        return [
            ["casd_workers", "gauge", "Worker processes running.", "",
             [["casd_workers", {}, len(self.pool.workers)]]],
            ["casd_worker_answered", "gauge",
             "Whether a worker answered this scrape in time (0: the node's figures hold its last answer).",
             "", answered],
            ["casd_worker_restarts", "counter", "Workers restarted after they ended unexpectedly.", "",
             [["casd_worker_restarts_total", {}, self.pool.restarts]]],
        ]

    def status(self) -> defer.Deferred:
        return self.pool.ask("status").addCallback(self._status)

    def _status(self, answers: dict) -> dict:
        healthy, why = self.verdict(answers)
        statuses = {i: a["status"] for i, a in sorted(answers.items()) if a is not None and "status" in a}
        sessions: dict = {}
        logins = {"logins": 0, "failures": 0, "window": 60}
        backends: dict = {}
        for status in statuses.values():
            for protocol, count in status["sessions"].items():
                sessions[protocol] = sessions.get(protocol, 0) + count
            for key in ("logins", "failures"):
                logins[key] += status["logins"][key]
            for member in status["backends"]:
                key = (member["backend"], member["address"])
                seen = backends.get(key)
                if seen is None:
                    backends[key] = dict(member)
                else:
                    seen["sessions"] += member["sessions"]
                    if member["state"] == "UP" and seen["state"] != "UP":
                        seen.update(state="UP", reason=member["reason"], lastCheck=member["lastCheck"])
        first = next(iter(statuses.values()), {})
        workers = []
        for index in range(1, self.pool.count + 1):
            answer = answers.get(index)
            worker = self.pool.workers.get(index)
            workers.append(
                {
                    "worker": index,
                    "pid": worker.pid if worker is not None else None,
                    "answered": answer is not None,
                    "health": answer["health"][1] if answer is not None else None,
                    "draining": answer["draining"] if answer is not None else None,
                    "uptime": statuses[index]["uptime"] if index in statuses else None,
                    "sessions": statuses[index]["sessions"] if index in statuses else None,
                }
            )
        return {
            "node": self.config.hostname,
            "version": casd.__version__,
            "uptime": round(self.now() - self.startedAt, 1),
            "healthy": healthy,
            "health": why,
            "draining": self.pool.node.draining or any(w["draining"] for w in workers),
            "listeners": self.listeners,
            "sessions": dict(sorted(sessions.items())),
            "logins": logins,
            "backends": [backends[key] for key in sorted(backends)],
            "state": first.get("state", {"backend": "local"}),
            "workers": workers,
            "workerRestarts": self.pool.restarts,
        }
