"""
Tests for the admin pages of C{--workers N}: the control channel (L{casd.service.control}), the
parent's questions to its workers (L{casd.service.workers.WorkerPool.ask}) and the node's view
built from their answers (L{casd.service.nodeadmin.NodeView}); the pages over a view whose
answers come later (L{casd.service.admin.AdminRoot}).
"""

import base64
import json
import types

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from casd.service.admin import AdminRoot, IAdminView, LocalView
from casd.service.control import DRAIN_LINE, WorkerControl, askLine
from casd.service.metrics import Metrics
from casd.service.node import NodeState
from casd.service.nodeadmin import NodeView
from casd.service.workers import ASK_WAIT, WorkerPool, _WorkerProcess
from casd.testing import makeContext


def session():
    return dict(log_namespace="casd.session", protocol="imap", result="proxy", bytesIn=1, bytesOut=2, duration=1.0)


def localView(reactor=None):
    context = makeContext(reactor or MemoryReactorClock(), users={"alice": "pw"})
    metrics = Metrics(context, ["imap"])
    return LocalView(context, context.node, metrics, [{"name": "imap"}]), metrics


class WorkerControlTests(SynchronousTestCase):
    def setUp(self):
        self.view, self.metrics = localView()
        self.control = WorkerControl(self.view, getpid=lambda: 4242)
        self.transport = StringTransport()
        self.control.makeConnection(self.transport)

    def answer(self):
        lines = self.transport.value().splitlines()
        self.transport.clear()
        self.assertEqual(len(lines), 1)
        return json.loads(lines[0])

    def test_metrics(self):
        """
        C{ask ID metrics}: one JSON line with the id, the pid, the health verdict and the
        worker's metric families.
        """
        self.metrics.observe(session())
        self.control.dataReceived(askLine(7, "metrics"))
        answer = self.answer()
        self.assertEqual((answer["id"], answer["pid"], answer["draining"]), (7, 4242, False))
        self.assertEqual(answer["health"], [True, "OK"])
        (sessions,) = [f for f in answer["families"] if f[0] == "casd_sessions"]
        self.assertIn(["casd_sessions_total", {"protocol": "imap", "result": "proxy"}, 1.0], sessions[4])
        self.assertNotIn("status", answer)

    def test_status(self):
        self.control.dataReceived(askLine(8, "status"))
        answer = self.answer()
        self.assertEqual(answer["status"]["listeners"], [{"name": "imap"}])
        self.assertNotIn("families", answer)

    def test_drain(self):
        """
        C{drain} drains the worker; its next answer says so.
        """
        self.control.dataReceived(DRAIN_LINE)
        self.assertEqual(self.transport.value(), b"")
        self.assertTrue(self.view.node.draining)
        self.control.dataReceived(askLine(9, "health"))
        answer = self.answer()
        self.assertTrue(answer["draining"])
        self.assertEqual(answer["health"], [False, "draining (SIGUSR1)"])

    def test_badRequestsIgnored(self):
        """
        Unknown, malformed and overlong requests get no answer, and the channel stays usable.
        """
        self.control.dataReceived(b"hello\nask x metrics\nask 1\n" + b"a" * 5000 + b"\n")
        self.control.dataReceived(askLine(3, "health"))
        self.assertEqual(self.answer()["id"], 3)
        self.assertFalse(self.transport.disconnecting)

    def test_noMetrics(self):
        """
        A worker without C{[admin] listen} keeps no metrics: it still answers, with none.
        """
        context = makeContext(MemoryReactorClock(), users={})
        control = WorkerControl(LocalView(context, context.node, None, []), getpid=lambda: 1)
        control.makeConnection(self.transport)
        control.dataReceived(askLine(1, "metrics") + askLine(2, "status"))
        first, second = (json.loads(line) for line in self.transport.value().splitlines())
        self.assertEqual(first["families"], [])
        self.assertNotIn("status", second)

    def test_interface(self):
        self.assertTrue(verifyObject(IAdminView, self.view))


class _ChildTransport:
    def __init__(self, pid):
        self.pid = pid
        self.written = []

    def writeToChild(self, fd, data):
        self.written.append((fd, data))


class PoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        config = types.SimpleNamespace(server=types.SimpleNamespace(shutdown_grace=0.0))
        self.pool = WorkerPool(self.clock, "casd.toml", config, 2)
        for index in (1, 2):
            worker = _WorkerProcess(self.pool, index)
            worker.transport = _ChildTransport(100 + index)
            worker.pid, worker.controlIn, worker.controlOut = 100 + index, 7, 8
            self.pool.workers[index] = worker

    def reply(self, index, **answer):
        worker = self.pool.workers[index]
        line = json.dumps(answer).encode() + b"\n"
        # In two pieces: the parent reads whole lines.
        worker.childDataReceived(8, line[:5])
        worker.childDataReceived(8, line[5:])

    def test_askWaitsBounded(self):
        """
        Each worker is asked on its control channel; one that does not answer within
        L{ASK_WAIT} seconds is L{None}, the others' answers are kept.
        """
        got = []
        self.pool.ask("metrics").addCallback(got.append)
        self.assertEqual(self.pool.workers[1].transport.written, [(7, askLine(1, "metrics"))])
        self.reply(1, id=1, pid=101)
        self.reply(1, id=99, pid=101)  # an answer nobody waits for: ignored
        self.assertEqual(got, [])
        self.clock.advance(ASK_WAIT)
        self.assertEqual(got, [{1: {"id": 1, "pid": 101}, 2: None}])
        self.assertEqual(self.pool.workers[2].pending, {})
        # A late answer changes nothing.
        self.reply(2, id=1, pid=102)

    def test_logLinesStillRelayed(self):
        """
        The worker's standard output is its log, as before.
        """
        events = []
        self.pool.workers[1].log = types.SimpleNamespace(observer=events.append)
        self.pool.workers[1].childDataReceived(1, b"\x1e{\"log_level\": {\"__class_uuid__\": \"02E59486-F24D-46AD-8224-3ACDF2A5732A\", \"name\": \"info\"}, \"log_namespace\": \"x\"}\n")
        self.assertEqual(events[0]["casd_worker"], 1)

    def test_workerEndsWhileAsked(self):
        """
        A worker that ends before it answers is L{None} at once; the hooks hear of its end, and a
        restart is counted.
        """
        got, ended = [], []
        self.pool.onWorkerEnded.append(ended.append)
        self.pool.ask("health").addCallback(got.append)
        self.reply(2, id=1, pid=102)
        worker = self.pool.workers[1]
        worker.processEnded(types.SimpleNamespace(getErrorMessage=lambda: "killed"))
        self.assertEqual(got, [{1: None, 2: {"id": 1, "pid": 102}}])
        self.assertEqual(ended, [worker])
        self.assertEqual(self.pool.restarts, 1)
        for call in self.clock.getDelayedCalls():
            call.cancel()

    def test_drain(self):
        """
        The parent drains: its node state, and each worker told on its control channel; a reload
        ends that drain.
        """
        self.pool.drain("SIGUSR1")
        self.assertTrue(self.pool.node.draining)
        for worker in self.pool.workers.values():
            self.assertEqual(worker.transport.written, [(7, DRAIN_LINE)])
        self.pool.reloaded()
        self.assertFalse(self.pool.node.draining)


class FakePool:
    def __init__(self, count=2):
        self.node = NodeState()
        self.count = count
        self.restarts = 0
        self.onWorkerEnded = []
        self.workers = {i: types.SimpleNamespace(index=i, pid=100 + i) for i in range(1, count + 1)}
        self.answers = {}

    def ask(self, what):
        self.asked = what
        return defer.succeed(dict(self.answers))

    def end(self, index):
        worker = self.workers.pop(index)
        for hook in self.onWorkerEnded:
            hook(worker)


def answer(index, families=(), healthy=True, why="OK", draining=False, status=None):
    reply = {"id": 1, "pid": 100 + index, "health": [healthy, why], "draining": draining, "families": list(families)}
    if status is not None:
        reply["status"] = status
    return reply


def sessions(n):
    return [["casd_sessions", "counter", "Sessions.", "",
             [["casd_sessions_total", {"protocol": "imap"}, float(n)]]],
            ["casd_sessions_active", "gauge", "Open.", "", [["casd_sessions_active", {"protocol": "imap"}, 1.0]]]]


class NodeViewTests(SynchronousTestCase):
    def setUp(self):
        self.pool = FakePool()
        config = types.SimpleNamespace(hostname="node-a")
        self.view = NodeView(self.pool, config, [{"name": "imap"}], MemoryReactorClock(), now=lambda: 50.0)

    def verdict(self):
        return self.successResultOf(defer.maybeDeferred(self.view.health))

    def test_interface(self):
        self.assertTrue(verifyObject(IAdminView, self.view))

    def test_health(self):
        pool = self.pool
        pool.answers = {1: answer(1), 2: answer(2, healthy=False, why="no backend member is UP")}
        self.assertEqual(self.verdict(), (True, "OK"))
        self.assertEqual(pool.asked, "health")
        pool.answers = {1: None, 2: None}
        self.assertEqual(self.verdict(), (False, "no worker answered"))
        pool.answers = {1: answer(1, healthy=False, why="no backend member is UP"), 2: None}
        self.assertEqual(self.verdict(), (False, "no backend member is UP"))
        pool.answers = {1: answer(1), 2: answer(2, healthy=False, why="draining (configuration)", draining=True)}
        self.assertEqual(self.verdict(), (False, "worker 2: draining (configuration)"))
        pool.answers = {1: answer(1), 2: answer(2)}
        pool.node.drain("SIGUSR1")
        self.assertEqual(self.verdict(), (False, "draining (SIGUSR1)"))

    def scrape(self) -> str:
        return self.successResultOf(defer.maybeDeferred(self.view.metrics)).decode()

    def test_metricsSummedAndMonotonic(self):
        """
        The node's counters are the workers' sums; a worker that does not answer counts with its
        last answer; one that ended keeps its counters in the node's (not its gauges).
        """
        pool = self.pool
        pool.answers = {1: answer(1, sessions(3)), 2: answer(2, sessions(4))}
        text = self.scrape()
        self.assertIn('casd_sessions_total{protocol="imap"} 7.0', text)
        self.assertIn('casd_sessions_active{protocol="imap"} 2.0', text)
        self.assertIn('casd_worker_answered{worker="1"} 1.0', text)
        self.assertIn("casd_workers 2.0", text)
        pool.answers = {1: answer(1, sessions(5)), 2: None}
        text = self.scrape()
        self.assertIn('casd_sessions_total{protocol="imap"} 9.0', text)
        self.assertIn('casd_worker_answered{worker="2"} 0.0', text)
        pool.end(1)
        pool.restarts = 1
        pool.answers = {2: answer(2, sessions(6))}
        text = self.scrape()
        self.assertIn('casd_sessions_total{protocol="imap"} 11.0', text)
        self.assertIn('casd_sessions_active{protocol="imap"} 1.0', text)
        self.assertIn("casd_worker_restarts_total 1.0", text)
        self.assertIn("casd_workers 1.0", text)
        # Its successor starts from zero: the node goes on from where it was.
        pool.workers[1] = types.SimpleNamespace(index=1, pid=201)
        pool.answers = {1: dict(answer(1, sessions(1)), pid=201), 2: answer(2, sessions(6))}
        self.assertIn('casd_sessions_total{protocol="imap"} 12.0', self.scrape())

    def test_status(self):
        member = {"backend": "b", "address": "127.0.0.1:143", "state": "DOWN", "reason": "refused", "sessions": 1,
                  "activelyChecked": True, "lastCheck": None}

        def status(state, count):
            return {"uptime": 3.0, "sessions": {"imap": count}, "logins": {"logins": count, "failures": 1},
                    "backends": [dict(member, state=state)], "state": {"backend": "local"}}

        self.pool.answers = {1: answer(1, status=status("DOWN", 2)), 2: answer(2, status=status("UP", 3))}
        node = self.successResultOf(defer.maybeDeferred(self.view.status))
        self.assertEqual(self.pool.asked, "status")
        self.assertEqual(node["node"], "node-a")
        self.assertEqual(node["sessions"], {"imap": 5})
        self.assertEqual(node["logins"], {"logins": 5, "failures": 2, "window": 60})
        self.assertEqual([(b["state"], b["sessions"]) for b in node["backends"]], [("UP", 2)])
        self.assertEqual([(w["worker"], w["pid"], w["answered"]) for w in node["workers"]], [(1, 101, True), (2, 102, True)])
        self.assertTrue(node["healthy"])
        json.dumps(node)


class _View:
    """
    A view whose answers come when the test says.
    """

    def __init__(self):
        self.waiting = []

    def later(self, value):
        d = defer.Deferred()
        self.waiting.append((d, value))
        return d

    def health(self):
        return self.later((False, "draining (SIGUSR1)"))

    def metrics(self):
        return self.later(b"casd_workers 2.0\n")

    def status(self):
        return self.later({"node": "node-a"})

    def fire(self):
        waiting, self.waiting = self.waiting, []
        for d, value in waiting:
            d.callback(value)


class AdminRootTests(SynchronousTestCase):
    def setUp(self):
        self.context = makeContext(MemoryReactorClock(), users={"alice": "pw"})
        self.view = _View()
        self.root = AdminRoot(self.context.config, self.context.authenticator, self.view)

    def render(self, path, method=b"GET", credentials=None):
        request = DummyRequest([path.lstrip(b"/")])
        request.path = path
        request.method = method
        request._disconnected = False  # what twisted.web's Request has and DummyRequest lacks
        if credentials:
            request.requestHeaders.addRawHeader(b"authorization", b"Basic " + base64.b64encode(credentials))
        self.root.render(request)
        self.view.fire()
        return request

    def test_deferredPages(self):
        """
        Pages whose figures come later are written when they come.
        """
        request = self.render(b"/health")
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(b"".join(request.written), f"UNAVAILABLE {self.context.config.hostname}: draining (SIGUSR1)\n".encode())
        request = self.render(b"/metrics")
        self.assertEqual(b"".join(request.written), b"casd_workers 2.0\n")
        self.assertEqual(request.finished, 1)
        request = self.render(b"/status", method=b"HEAD")
        self.assertEqual(json.loads(b"".join(request.written)), {"node": "node-a"})

    def test_credentialsAsked(self):
        self.root.config = types.SimpleNamespace(admin=types.SimpleNamespace(users=["alice"]), hostname="n")
        request = self.render(b"/metrics")
        self.assertEqual(request.responseCode, 401)
        self.assertEqual(self.view.waiting, [])
