"""
C{twistd cas --workers N} over real sockets: the workers share the parent's listening sockets and
both serve sessions, stop with the parent, and never outlive it, even when it is killed.
"""

import io
import os
import pwd
import re
import signal
import socket
import subprocess
import sys
import time

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.logger import Logger, LogLevel, LogPublisher, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase

from casd.auth.hashing import makeHash
from casd.service.logs import WorkerLogObserver
from casd.service.worker import _AdoptingReactor, adoptingReactors
from casd.service.workers import _WorkerProcess
from tests.support.procs import freePort, pidAlive

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

#: Bound of every wait in these tests (seconds).
WAIT = 30.0


class FakeIMAPBackend(protocol.Protocol):
    """
    Just enough of an IMAP server for casd's backend dialogue, then C{NOOP}.
    """

    open = set()

    def connectionMade(self):
        self.open.add(self)
        self.buffer = b""
        self.transport.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID] fake ready\r\n")

    def connectionLost(self, reason):
        self.open.discard(self)

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            tag, _, rest = line.partition(b" ")
            command = rest.split(b" ", 1)[0].upper()
            if command == b"ID":
                self.transport.write(b'* ID ("name" "fake")\r\n' + tag + b" OK ID done\r\n")
            elif command == b"AUTHENTICATE":
                self.transport.write(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
            elif command == b"LOGOUT":
                self.transport.write(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                self.transport.loseConnection()
            else:
                self.transport.write(tag + b" OK " + command + b" done\r\n")


class Client(protocol.Protocol):
    """
    Logs in, waits for the tagged OK, then reports.
    """

    def __init__(self):
        self.received = b""
        self.loggedIn = defer.Deferred()

    def connectionMade(self):
        self.transport.write(b"a LOGIN alice alice-pw\r\n")

    def dataReceived(self, data):
        self.received += data
        if b"\r\na OK" in self.received and not self.loggedIn.called:
            self.loggedIn.callback(self)

    def connectionLost(self, reason):
        if not self.loggedIn.called:
            self.loggedIn.errback(reason)


class Twistd(protocol.ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ended = defer.Deferred()

    def outReceived(self, data):
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.reason = reason
        self.ended.callback(None)


def lowFreePort() -> int:
    """
    A free port below 1024 on 127.0.0.1 (binding one takes root).
    """
    for port in range(1023, 600, -1):
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
        finally:
            s.close()
    raise RuntimeError("no free port below 1024")


def uidsOf(pid) -> set:
    """
    The real, effective, saved and file-system user ids of process C{pid}.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return {int(u) for u in line.split()[1:]}
    return set()


def interpreterFor(user):
    """
    An interpreter that C{user} can run, with this environment's packages: this one, or else the
    system's C{python3} of the same version (a virtualenv's interpreter may live under a home
    that only root may enter).

    @return: C{(executable, PYTHONPATH)}.
    """
    sitePackages = [p for p in sys.path if p.endswith("site-packages")]
    path = os.pathsep.join([ROOT, *sitePackages])
    version = "%d.%d" % sys.version_info[:2]
    for python in (sys.executable, f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"):
        try:
            check = subprocess.run(
                [python, "-c", "import sys, twisted, casd; print(sys.version_info[:2])"],
                user=user.pw_uid, group=user.pw_gid, env=dict(os.environ, PYTHONPATH=path),
                capture_output=True, text=True, cwd="/", timeout=WAIT,
            )
        except OSError:  # not executable for the user
            continue
        if check.returncode == 0 and check.stdout.strip() == str(tuple(sys.version_info[:2])):
            return python, path
    raise RuntimeError(f"no python{sys.version_info[0]}.{sys.version_info[1]} that {user.pw_name} can run")


def childrenOf(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class WorkersNode:
    """
    A C{twistd cas --workers N} node over a fake IMAP backend, for a L{TestCase}.
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        backend = reactor.listenTCP(0, protocol.Factory.forProtocol(FakeIMAPBackend), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        users = os.path.join(self.dir, "users")
        with open(users, "w") as f:
            f.write(f"alice:{makeHash('SSHA256', b'alice-pw')}\n")
        self.port = freePort()
        self.config = os.path.join(self.dir, "casd.toml")
        with open(self.config, "w") as f:
            f.write(
                f"""
[server]
trusted_networks = ["127.0.0.0/8"]
[auth]
users_file = "{users}"
failure_delay = 0.0
[routing]
default_backend = "fake"
[backends.fake]
host = "127.0.0.1"
[backends.fake.imap]
port = {backend.getHost().port}
tls = "none"
[imap]
[[imap.listen]]
name = "imap"
endpoint = "tcp:{self.port}:interface=127.0.0.1"
tls = "none"
"""
            )

    @defer.inlineCallbacks
    def startParent(self, workers=2, twistdArgs=(), python=sys.executable, pythonPath=ROOT, logFile=None):
        """
        @param logFile: the parent's C{--logfile}, where its log is read from (else its standard
            output).
        """
        proc = Twistd()

        def output():
            if logFile is None:
                return proc.output
            try:
                with open(logFile, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return b""

        args = [
            python, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile", os.path.join(self.dir, "twistd.pid"),
            *(() if logFile is None else ("--logfile", logFile)), *twistdArgs,
            "cas", "--config", self.config, "--workers", str(workers),
        ]
        env = dict(os.environ, PYTHONPATH=pythonPath)
        transport = reactor.spawnProcess(proc, python, args, env=env, path=self.dir)
        self.parentPid = transport.pid
        self.proc = proc

        def cleanup():
            # Whatever a failed test left: the parent, then any worker.
            for pid in [self.parentPid] + getattr(self, "workerPids", []):
                if pidAlive(pid):
                    os.kill(pid, signal.SIGKILL)

        self.addCleanup(cleanup)
        deadline = time.monotonic() + WAIT
        while len(childrenOf(self.parentPid)) < workers or b"FrontendFactory starting" not in output():
            if time.monotonic() > deadline or proc.ended.called:
                self.fail(f"workers did not start:\n{proc.output.decode(errors='replace')}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.workerPids = childrenOf(self.parentPid)
        # Both workers have adopted the socket once each logged its listener.
        while output().count(b"FrontendFactory starting") < workers:
            if time.monotonic() > deadline:
                self.fail(f"workers did not listen:\n{proc.output.decode(errors='replace')}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        return proc

    @defer.inlineCallbacks
    def login(self):
        client = yield protocol.ClientCreator(reactor, Client).connectTCP("127.0.0.1", self.port)
        yield client.loggedIn
        return client

    @defer.inlineCallbacks
    def waitGone(self, pids):
        deadline = time.monotonic() + WAIT
        while any(pidAlive(p) for p in pids):
            if time.monotonic() > deadline:
                self.fail(f"processes still alive: {[p for p in pids if pidAlive(p)]}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def quiet(self):
        """
        Wait (bounded) until the fake backend's connections from the workers are closed.
        """
        deadline = time.monotonic() + WAIT
        while FakeIMAPBackend.open and time.monotonic() < deadline:
            yield task.deferLater(reactor, 0.05, lambda: None)
        yield task.deferLater(reactor, 0.1, lambda: None)

    @defer.inlineCallbacks
    def sessionLinesIn(self, path, count):
        """
        Wait (bounded) until C{path} holds C{count} session lines of the workers.

        @return: the file's bytes.
        """
        deadline = time.monotonic() + WAIT
        while True:
            with open(path, "rb") as f:
                text = f.read()
            if text.count(b":casd.session#info] session=") >= count or time.monotonic() > deadline:
                return text
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def loginOnBoth(self, proc, atLeast=0):
        """
        Bounded: rounds of 5 concurrent logins, each session closed, until each of the two
        workers has logged a session and at least C{atLeast} were made.

        @return: C{(sessions made, the workers that logged one)}.
        """
        served, sessions = set(), 0
        for _ in range(20):
            clients = yield defer.gatherResults([self.login() for _ in range(5)])
            sessions += len(clients)
            for c in clients:
                c.transport.loseConnection()
            yield task.deferLater(reactor, 0.2, lambda: None)
            served = {w for w in (1, 2) if f"[worker{w}:casd.session".encode() in proc.output}
            if served == {1, 2} and sessions >= atLeast:
                break
        return sessions, served

    @defer.inlineCallbacks
    def stopParent(self, proc):
        os.kill(self.parentPid, signal.SIGTERM)
        yield proc.ended
        yield self.waitGone(self.workerPids)
        yield self.quiet()


class WorkersTests(WorkersNode, TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_bothWorkersServeAndStopWithParent(self):
        proc = yield self.startParent(2)
        self.assertEqual(len(self.workerPids), 2)
        sessions, served = yield self.loginOnBoth(proc)
        self.assertEqual(served, {1, 2}, proc.output.decode(errors="replace")[-3000:])
        self.assertEqual(proc.output.count(b"casd.session"), sessions)
        # The parent logs to its standard output: each worker holds it, and writes its session
        # lines there itself.
        parentLog = os.readlink(f"/proc/{self.parentPid}/fd/1")
        for pid in self.workerPids:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd") if int(fd) > 2}
            self.assertIn(parentLog, held)

        os.kill(self.parentPid, signal.SIGTERM)
        yield proc.ended
        # twistd re-raises the signal it stopped on once it has shut down cleanly.
        self.assertIsInstance(proc.reason.value, (ProcessDone, ProcessTerminated))
        self.assertIn(getattr(proc.reason.value, "signal", None), (None, signal.SIGTERM))
        yield self.waitGone(self.workerPids)
        self.assertIn(b"Server Shut Down", proc.output)
        yield self.quiet()

    @defer.inlineCallbacks
    def test_sessionLinesWrittenToTheParentsLogFile(self):
        """
        With C{--logfile} (twistd's rotating file), the workers append their session lines to
        it themselves, one per session, marked with the worker, as the parent would have
        written them; the parent does nothing per session.
        """
        logPath = os.path.join(self.dir, "twistd.log")
        proc = yield self.startParent(2, logFile=logPath)
        sessions = 0
        for _ in range(3):
            clients = yield defer.gatherResults([self.login() for _ in range(4)])
            sessions += len(clients)
            for c in clients:
                c.transport.loseConnection()
        text = yield self.sessionLinesIn(logPath, sessions)
        self.assertEqual(text.count(b":casd.session#info] session="), sessions, text.decode(errors="replace")[-2000:])
        self.assertRegex(text, rb"\n\d{4}-\d\d-\d\dT[\d:]+[+-]\d{4} \[worker[12]:casd\.session#info\] session=\S+ proto=imap ")
        self.assertNotIn(b"casd.session", proc.output)
        for pid in self.workerPids:
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            self.assertIn(os.path.realpath(logPath), held)
        # Every line whole, one per line.
        lines = text.splitlines()
        self.assertTrue(all(re.match(rb"\d{4}-\d\d-\d\dT", line) for line in lines), text[-2000:])
        yield self.stopParent(proc)

    @defer.inlineCallbacks
    def test_parentRotatesTheWorkersLogFile(self):
        """
        twistd's C{--logfile} rotates at 1,000,000 bytes, whoever wrote them: the parent sees the
        size within a second, rotates, and the workers write their next lines to the new file.
        """
        logPath = os.path.join(self.dir, "twistd.log")
        proc = yield self.startParent(2, logFile=logPath)
        with open(logPath, "ab") as f:
            f.write(b"# filler\n" * 120_000)
        deadline = time.monotonic() + WAIT
        while not os.path.exists(logPath + ".1"):
            if time.monotonic() > deadline:
                self.fail("not rotated")
            yield task.deferLater(reactor, 0.05, lambda: None)
        # The workers reopen the path when the parent tells them: wait until both hold it.
        while True:
            held = [{os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
                    for pid in self.workerPids]
            if all(os.path.realpath(logPath) in h for h in held):
                break
            if time.monotonic() > deadline:
                self.fail(f"workers did not reopen the log file: {held}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        clients = yield defer.gatherResults([self.login() for _ in range(4)])
        for c in clients:
            c.transport.loseConnection()
        text = yield self.sessionLinesIn(logPath, 4)
        self.assertEqual(text.count(b":casd.session#info] session="), 4, text.decode(errors="replace")[-2000:])
        with open(logPath + ".1", "rb") as f:
            self.assertNotIn(b"casd.session#info] session=", f.read())
        yield self.stopParent(proc)

    @defer.inlineCallbacks
    def test_logReopenedOnSIGUSR2(self):
        """
        C{SIGUSR2} to the parent (logrotate's postrotate) reaches the workers, which write casd's
        own log file (C{[log] file}): each reopens it, and the parent keeps running.
        """
        logPath = os.path.join(self.dir, "casd.log")
        with open(self.config, "a") as f:
            f.write(f'[log]\nfile = "{logPath}"\n')
        proc = yield self.startParent(2)

        def read(path):
            try:
                with open(path) as f:
                    return f.read()
            except FileNotFoundError:
                return ""

        client = yield self.login()
        client.transport.loseConnection()
        deadline = time.monotonic() + WAIT
        while "casd.session" not in read(logPath):
            if time.monotonic() > deadline:
                self.fail(f"no session line in {logPath}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        os.rename(logPath, logPath + ".1")
        os.kill(self.parentPid, signal.SIGUSR2)
        while read(logPath).count("reopened") < 2:
            if time.monotonic() > deadline or proc.ended.called:
                self.fail(f"the workers did not reopen the log:\n{proc.output.decode(errors='replace')[-2000:]}")
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(pidAlive(self.parentPid))
        client = yield self.login()
        client.transport.loseConnection()
        while "casd.session" not in read(logPath):
            if time.monotonic() > deadline:
                self.fail("no session line in the reopened log")
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(read(logPath + ".1").count("casd.session"), 1)
        os.kill(self.parentPid, signal.SIGTERM)
        yield proc.ended
        yield self.waitGone(self.workerPids)
        yield self.quiet()

    @defer.inlineCallbacks
    def test_privilegedPortThenDropPrivileges(self):
        """
        As root, C{--workers 2 --uid nobody --gid nogroup} on a port below 1024: the parent
        binds it before twistd drops privileges, and the workers, running as nobody, serve
        IMAP on it.
        """
        if os.getuid() != 0:
            self.fail("this test runs as root (CI runs the suite as root)")
        nobody = pwd.getpwnam("nobody")
        # The workers (as nobody) read the configuration and the users file.
        d = self.dir
        while d.startswith(os.getcwd() + os.sep):
            os.chmod(d, os.stat(d).st_mode | 0o055)
            d = os.path.dirname(d)
        self.port = lowFreePort()
        with open(self.config) as f:
            text = f.read()
        with open(self.config, "w") as f:
            f.write(re.sub(r"tcp:\d+:interface", f"tcp:{self.port}:interface", text))
        python, pythonPath = interpreterFor(nobody)
        proc = yield self.startParent(
            2, ("--uid", "nobody", "--gid", "nogroup"), python=python, pythonPath=pythonPath
        )
        for pid in [self.parentPid] + self.workerPids:
            self.assertEqual(uidsOf(pid), {nobody.pw_uid}, proc.output.decode(errors="replace"))
        client = yield self.login()
        self.assertIn(b"a OK", client.received)
        client.transport.loseConnection()
        os.kill(self.parentPid, signal.SIGTERM)
        yield proc.ended
        yield self.waitGone(self.workerPids)
        yield self.quiet()

    @defer.inlineCallbacks
    def test_workersDieWithKilledParent(self):
        """
        A parent killed with SIGKILL cannot stop its workers: they notice the end of their
        standard input and stop by themselves.
        """
        proc = yield self.startParent(2)
        client = yield self.login()
        os.kill(self.parentPid, signal.SIGKILL)
        yield proc.ended
        self.assertIsInstance(proc.reason.value, ProcessTerminated)
        yield self.waitGone(self.workerPids)
        client.transport.loseConnection()
        yield self.quiet()

    @defer.inlineCallbacks
    def test_deadWorkerRestarted(self):
        proc = yield self.startParent(2)
        victim = self.workerPids[0]
        os.kill(victim, signal.SIGKILL)
        yield self.waitGone([victim])
        deadline = time.monotonic() + WAIT
        while True:
            pids = childrenOf(self.parentPid)
            if len(pids) == 2 and victim not in pids:
                break
            if time.monotonic() > deadline:
                self.fail(f"no replacement worker: {proc.output.decode(errors='replace')[-2000:]}")
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.workerPids = pids
        self.assertIn(b"exited unexpectedly", proc.output)
        client = yield self.login()
        client.transport.loseConnection()
        os.kill(self.parentPid, signal.SIGTERM)
        yield proc.ended
        yield self.waitGone(pids)
        yield self.quiet()


class WorkerLogTests(TestCase):
    """
    A worker's log events reach the parent's observers as the structured events they were.
    """

    def test_structuredEvents(self):
        out = io.StringIO()
        workerLog = Logger(namespace="casd.session", observer=WorkerLogObserver(out))
        workerLog.info("{user} logged in from {peer}", user="alice", peer="192.0.2.7")
        try:
            1 / 0
        except ZeroDivisionError:
            workerLog.failure("oops")
        events = []

        class Pool:
            reactor = task.Clock()

        worker = _WorkerProcess(Pool(), 3)
        worker.log = Logger(observer=events.append)
        data = out.getvalue().encode()
        # Lines arrive in arbitrary chunks.
        worker.outReceived(data[:7])
        worker.outReceived(data[7:] + b"not json\n")
        self.assertEqual(len(events), 3)
        first = events[0]
        self.assertEqual((first["user"], first["peer"], first["casd_worker"]), ("alice", "192.0.2.7", 3))
        self.assertEqual(first["log_level"], LogLevel.info)
        self.assertEqual(first["log_system"], "worker3:casd.session#info")
        self.assertEqual(formatEvent(first), "alice logged in from 192.0.2.7")
        self.assertEqual(events[1]["log_level"], LogLevel.critical)
        self.assertIn("ZeroDivisionError", events[1]["log_failure"].getTraceback())
        self.assertEqual(formatEvent(events[2]), "worker 3: not json")


    def relay(self, data: bytes, index=3):
        events = []

        class Pool:
            reactor = task.Clock()

        worker = _WorkerProcess(Pool(), index)
        worker.log = Logger(observer=events.append)
        worker.outReceived(data)
        return events

    def test_sessionLine(self):
        """
        A session line travels as a compact record and reaches the parent's observers as the event
        it was in the worker: the same fields and text, marked with the worker.
        """
        from casd.service.logs import LINE_KEY, LINE_RECORD, LineLog, TextLogObserver
        from casd.session.clientinfo import ClientInfo
        from casd.session.protolog import SessionLog

        out = io.StringIO()
        sent = []
        publisher = LogPublisher(WorkerLogObserver(out), sent.append)
        client = ClientInfo("abc", "imap", "imap-1", "2001:db8::7", 4000, "::1", 143, True, False)
        SessionLog(lines=LineLog("casd.session", publisher, now=lambda: 1000.25)).record(
            client, "alicé", "mbx1(192.0.2.1:143)", "proxy(client closed)", 10, 20, 1.5
        )
        self.assertTrue(out.getvalue().startswith(LINE_RECORD))
        (event,) = self.relay(out.getvalue().encode("utf-8"))
        (original,) = sent
        for key in ("session", "protocol", "listener", "client", "user", "backend", "result", "bytesIn",
                    "bytesOut", "duration", "line", LINE_KEY, "log_namespace", "log_time", "log_level"):
            self.assertEqual(event[key], original[key], key)
        self.assertEqual(event["casd_worker"], 3)
        self.assertEqual(event["log_system"], "worker3:casd.session#info")
        self.assertEqual(formatEvent(event), original["line"])
        text = io.StringIO()
        TextLogObserver(text)(event)
        self.assertIn(f"[worker3:casd.session#info] {original['line']}\n", text.getvalue())

    def test_sessionLineWrittenByTheWorker(self):
        """
        When the parent's log is a stream the worker shares, the worker writes its session lines
        there itself, the same text as the parent writes for a relayed line, and sends the
        parent nothing for them.
        """
        from casd.service.logs import LineLog, TextLogObserver

        def emit(observer):
            LineLog("casd.session", LogPublisher(observer), now=lambda: 1000.25).emit(
                "session=abc user=alice\nmore", {"user": "alice"}
            )

        pipe, direct = io.StringIO(), io.StringIO()
        emit(WorkerLogObserver(pipe, direct=direct, index=2))
        self.assertEqual(pipe.getvalue(), "")
        relayedPipe, parentLog = io.StringIO(), io.StringIO()
        emit(WorkerLogObserver(relayedPipe))
        (event,) = self.relay(relayedPipe.getvalue().encode(), index=2)
        TextLogObserver(parentLog)(event)
        self.assertEqual(direct.getvalue(), parentLog.getvalue())
        self.assertIn("[worker2:casd.session#info] session=abc user=alice\n\tmore\n", direct.getvalue())

    def test_sessionLineAppendedByTheWorker(self):
        """
        When the parent's log is twistd's C{--logfile}, the worker appends its session lines to
        it (an L{AppendFile}), the same text, and sends the parent nothing for them.
        """
        from casd.service.logfile import AppendFile
        from casd.service.logs import LineLog

        path = self.mktemp()
        direct = AppendFile(path)
        self.addCleanup(direct.close)
        pipe, text = io.StringIO(), io.StringIO()
        for observer in (WorkerLogObserver(pipe, direct=direct, index=2),
                         WorkerLogObserver(pipe, direct=text, index=2)):
            LineLog("casd.session", LogPublisher(observer), now=lambda: 1000.25).emit(
                "session=abc user=alice\nmore", {"user": "alice"}
            )
        self.assertEqual(pipe.getvalue(), "")
        with open(path, encoding="utf-8") as f:
            self.assertEqual(f.read(), text.getvalue())
        self.assertIn("[worker2:casd.session#info] session=abc user=alice\n\tmore\n", text.getvalue())

    def test_workerObserverWithoutIndirection(self):
        """
        The worker logs through L{workerLogObserver}: where it writes the parent's log itself,
        the text observer that L{WorkerLogObserver} would call (the same text, other events to
        the parent); else a L{WorkerLogObserver}.
        """
        from casd.service.logs import LineLog, TextLogObserver, workerLogObserver

        pipe, direct, viaClass = io.StringIO(), io.StringIO(), io.StringIO()
        observer = workerLogObserver(pipe, direct=direct, index=2)
        self.assertIsInstance(observer, TextLogObserver)
        for o in (observer, WorkerLogObserver(io.StringIO(), direct=viaClass, index=2)):
            LineLog("casd.session", LogPublisher(o), now=lambda: 1000.25).emit("session=abc", {})
        self.assertEqual(direct.getvalue(), viaClass.getvalue())
        self.assertIn("[worker2:casd.session#info] session=abc\n", direct.getvalue())
        Logger(namespace="casd.other", observer=observer).info("other {x}", x=1)
        (event,) = self.relay(pipe.getvalue().encode(), index=2)
        self.assertEqual(formatEvent(event), "other 1")
        self.assertIsInstance(workerLogObserver(io.StringIO()), WorkerLogObserver)

    def test_brokenLineRecord(self):
        """
        A line record that does not decode is relayed as text, never dropped or a traceback.
        """
        from casd.service.logs import LINE_RECORD

        events = self.relay(LINE_RECORD.encode() + b'{"casd_line": 3}\n' + LINE_RECORD.encode() + b"{nope\n")
        self.assertEqual([formatEvent(e) for e in events], ['worker 3: {"casd_line": 3}', "worker 3: {nope"])


class AdoptingReactorTests(TestCase):
    """
    The worker's listening goes through the inherited socket, for every endpoint kind.
    """

    def test_listenAdoptsTheSocket(self):
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(5)
        self.addCleanup(s.close)
        adopting = adoptingReactors(reactor, {"imap": s.fileno()})["imap"]
        self.assertIsInstance(adopting, _AdoptingReactor)
        port = adopting.listenTCP(12345, protocol.Factory.forProtocol(protocol.Protocol), interface="10.0.0.1")
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().port, s.getsockname()[1])
        # Anything but listening is the real reactor's.
        self.assertIs(adopting.callLater.__self__, reactor)


class ParentWatchTests(SynchronousTestCase):
    """
    How a worker tells a parent that stopped it from a parent that died.
    """

    def watch(self, written):
        from casd.service.worker import _ParentWatch

        class Reactor:
            running = False

        orphaned = []
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        os.write(w, written)
        os.close(w)
        watch = _ParentWatch(Reactor(), lambda: orphaned.append(True), fd=r)
        while True:
            reason = watch.doRead()
            if reason is not None:
                watch.connectionLost(reason)
                return orphaned

    def test_reopenLog(self):
        """
        The parent's reopen word (it rotated its log file) has the worker reopen it; the worker
        goes on.
        """
        from casd.service.logfile import REOPEN_WORD
        from casd.service.worker import _ParentWatch

        reopened = []
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.set_blocking(r, False)
        watch = _ParentWatch(object(), fd=r, onReopen=lambda: reopened.append(True))
        os.write(w, REOPEN_WORD)
        self.assertIsNone(watch.doRead())
        self.assertEqual(reopened, [True])
        self.assertFalse(watch.stopAsked)

    def test_stopAsked(self):
        """
        "stop", then end of file: the parent stopped the worker (graceful).
        """
        self.assertEqual(self.watch(b"stop\n"), [])

    def test_parentDied(self):
        """
        End of file alone: the parent died; the worker stops at once.
        """
        self.assertEqual(self.watch(b""), [True])

    def test_reactorStoppingAlready(self):
        """
        A worker whose reactor is stopping already (a SIGTERM to the whole process group) sees
        its parent's end of file without a traceback.
        """
        from twisted.internet.error import ReactorNotRunning

        from casd.service.worker import _ParentWatch

        class Stopping:
            running = True

            def stop(self):
                raise ReactorNotRunning("Can't stop reactor that isn't running.")

        r, w = os.pipe()
        self.addCleanup(os.close, r)
        os.write(w, b"stop\n")
        os.close(w)
        watch = _ParentWatch(Stopping(), lambda: None, fd=r)
        while (reason := watch.doRead()) is None:
            pass
        watch.connectionLost(reason)
        self.assertTrue(watch.stopAsked)
