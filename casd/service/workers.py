# -*- test-case-name: tests.integration.test_workers -*-
"""
Multi-core casd: C{twistd cas --config FILE --workers N}.

The parent process binds every listener of the configuration once, in
C{privilegedStartService} (so a bind error stops it at start-up, and with C{--uid}/C{--gid}
privileged ports are bound before twistd drops privileges), and never accepts on them; once
privileges are dropped, it starts N worker processes that inherit the listening sockets and adopt them with
C{IReactorSocket.adoptStreamPort}.  The kernel hands each new connection to whichever worker
accepts first, the way nginx's workers share their listening sockets.  Every worker reads the
same configuration file and builds the same service tree as a single-process casd.

The parent:
  - relays the workers' log events into its own log as the structured events they are (each
    worker writes them on its standard output with L{casd.service.logs.WorkerLogObserver}: the
    session lines as compact records the parent decodes with one C{json.loads}, the rest with
    C{jsonFileLogObserver}, read back with C{eventFromJSON}), each marked with the worker's number in C{casd_worker} and
    C{log_system}, so there is one log and observers of the parent see the workers' fields;
    where the workers can write the parent's log themselves (its standard output, or twistd's
    C{--logfile}, appended to by every process), they write their session lines there and send
    the parent nothing per session; the parent rotates C{--logfile} (L{SharedRotation});
  - restarts a worker that dies (after a pause, longer when it dies young);
  - forwards C{SIGHUP} (reload) and C{SIGUSR2} (reopen C{[log] file}, which the workers write)
    to the workers; takes C{SIGUSR1} (drain) itself and tells each worker, one started later
    too, on its control channel (L{casd.service.control}: a pair of pipes apart from the log);
  - serves the node's one admin listener (C{[admin] listen}) from the workers' answers on those
    channels (L{casd.service.nodeadmin}), gathered for at most L{ASK_WAIT} seconds;
  - stops them when it stops: it closes their standard input (they stop gracefully on end of
    file), then C{SIGTERM}, then C{SIGKILL}, each after a bounded wait.

A worker (L{casd.service.worker}) also stops on end of file of its standard input, so workers
never outlive their parent, even one killed with C{SIGKILL}.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, eventFromJSON

from casd.nodesecret import NodeSecret, secretPipe
from casd.service.control import DRAIN_LINE, askLine
from casd.service.logfile import SharedRotation
from casd.service.logs import LINE_RECORD, MainLogRoot, eventFromLineRecord, logsToStandardOutput
from casd.service.node import NodeState
from casd.service.nodeshare import REVOKE_RECORD, ParentRevocations

_LINE_RECORD = LINE_RECORD.encode("ascii")
_REVOKE_RECORD = REVOKE_RECORD.encode("ascii")

#: Seconds the workers get to stop after their standard input closed, before C{SIGTERM}.
STOP_GRACE = 10.0
#: Seconds after C{SIGTERM} before C{SIGKILL}.
KILL_GRACE = 5.0

#: What the parent writes on a worker's standard input before closing it to stop it.
STOP_WORD = b"stop\n"
#: Pause before a dead worker is started again; a worker that died within L{YOUNG} seconds of
#: its start waits L{RESTART_DELAY_YOUNG} instead, so a broken worker does not spin.
RESTART_DELAY = 1.0
RESTART_DELAY_YOUNG = 10.0
YOUNG = 5.0
#: Seconds the parent waits for the workers' answers (L{WorkerPool.ask}) before it answers
#: with what came.
ASK_WAIT = 2.0


class _Refuse(protocol.Factory):
    """
    The parent's factory for its listening ports: it never accepts (reading is stopped), this
    only satisfies C{listen()}.
    """

    noisy = False

    def buildProtocol(self, addr):
        return None


def bindListeners(reactor, config) -> dict:
    """
    Bind every enabled listener of C{config} without accepting on it.

    @return: listener name -> the L{IListeningPort}.
    @raise Exception: whatever binding raised (address in use, permission denied).
    """
    ports = {}
    try:
        for section in config.protocols.values():
            if not section.enabled:
                continue
            for listener in section.listeners:
                results = []
                d = serverFromString(reactor, listener.endpoint).listen(_Refuse())
                d.addBoth(results.append)
                if not results:
                    raise RuntimeError(f"listener {listener.name}: {listener.endpoint} did not bind at once")
                result = results[0]
                if hasattr(result, "raiseException"):
                    result.raiseException()
                # The workers accept; the parent only holds the socket open.
                result.stopReading()
                ports[listener.name] = result
    except BaseException:
        for port in ports.values():
            port.stopListening()
        raise
    return ports


class _WorkerProcess(protocol.ProcessProtocol):
    """
    The parent's side of one worker: its log events and its end.
    """

    log = Logger()

    def __init__(self, pool, index: int) -> None:
        self.pool = pool
        self.index = index
        # The logger the class attribute gives, made once: it relays a line per session.
        self.log = self.log
        self._buffer = b""
        self.ended = defer.Deferred()
        self.startedAt = pool.reactor.seconds()
        #: The worker's ends of its control channel (L{casd.service.control}): the parent
        #: writes on C{controlIn}, reads C{controlOut}; set when it is spawned.
        self.controlIn = self.controlOut = None
        self.pid = None
        self._control = b""
        #: Request id -> the L{Deferred} of its answer.
        self.pending: dict[int, defer.Deferred] = {}

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != self.controlOut:
            return super().childDataReceived(childFD, data)
        self._control += data
        *lines, self._control = self._control.split(b"\n")
        for line in lines:
            try:
                answer = json.loads(line)
                waiting = self.pending.pop(answer["id"], None)
            except (ValueError, TypeError, KeyError):
                self.log.warn("worker {index}: unreadable control answer ignored", index=self.index)
                continue
            if waiting is not None:
                waiting.callback(answer)

    def ask(self, ident: int, what: str) -> defer.Deferred:
        """
        @return: a L{Deferred} of the worker's answer (a dict); it fails when the worker ends
            first, or is cancelled.
        """
        d = defer.Deferred(lambda d: self.pending.pop(ident, None))
        self.pending[ident] = d
        try:
            self.transport.writeToChild(self.controlIn, askLine(ident, what))
        except (KeyError, OSError):
            self.pending.pop(ident, None)
            return defer.fail(error.ProcessExitedAlready())
        return d

    def say(self, line: bytes) -> None:
        try:
            self.transport.writeToChild(self.controlIn, line)
        except (KeyError, OSError):
            pass  # ended, or ending: a new worker is told when it starts

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            self._relay(line)

    def errReceived(self, data: bytes) -> None:
        # A worker's stderr is only written before its logging starts, or on a crash.
        for line in data.decode("utf-8", "replace").splitlines():
            if line.strip():
                self.log.warn("worker {index}: {line}", index=self.index, line=line)

    def _relay(self, line: bytes) -> None:
        if line[:1] == _REVOKE_RECORD:
            # A forms logoff (casd.service.nodeshare), never a log event.
            self.pool.revocationFrom(self, line[1:])
            return
        if line[:1] == _LINE_RECORD:
            # A session (or other per-request) line: its compact record, decoded in one call.
            try:
                event = eventFromLineRecord(line[1:])
            except ValueError:
                pass
            else:
                event["casd_worker"] = self.index
                event["log_system"] = f"worker{self.index}:{event.get('log_namespace', '-')}#{event['log_level'].name}"
                self.log.observer(event)
                return
        # jsonFileLogObserver's records: a record separator, the JSON event, a line feed.
        text = line.decode("utf-8", "replace").lstrip("\x1e\x1f").strip()
        if not text:
            return
        try:
            event = eventFromJSON(text)
            namespace = event.get("log_namespace", "-")
            levelName = event["log_level"].name
        except (ValueError, TypeError, KeyError, AttributeError):
            self.log.info("worker {index}: {line}", index=self.index, line=text)
            return
        event["casd_worker"] = self.index
        event["log_system"] = f"worker{self.index}:{namespace}#{levelName}"
        self.log.observer(event)

    def processEnded(self, reason) -> None:
        if self._buffer:
            self._relay(self._buffer)
            self._buffer = b""
        pending, self.pending = self.pending, {}
        for waiting in pending.values():
            waiting.errback(error.ProcessExitedAlready())
        self.pool.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """
    Binds the listeners and keeps N worker processes running over them.

    @ivar workers: index -> the running L{_WorkerProcess} (its C{transport.pid} is the PID).
    @ivar node: the node's L{NodeState}: C{SIGUSR1} to the parent drains it and every worker
        (a worker started later too), a reload (C{SIGHUP}) ends that drain as in a
        single-process casd.
    @ivar restarts: workers restarted since the start.
    @ivar onWorkerEnded: C{callable(worker)}s called when a worker ends.
    @ivar onReload: C{callable()}s called on C{SIGHUP}, after the workers were told.
    """

    log = Logger()

    def __init__(
        self, reactor, configPath: str, config, count: int, executable: str = sys.executable, sharedLog: bool = False,
        logFile=lambda: None,
    ) -> None:
        """
        @param sharedLog: whether the parent's log is its standard output, which the workers
            then inherit and write their session lines to themselves (nothing per session in
            the parent).
        @param logFile: returns twistd's C{--logfile} (a L{RotatingLogFile}) or L{None}, once
            twistd has set its log up: the workers append their session lines to it
            themselves, and the parent rotates it (L{SharedRotation}).
        """
        self.reactor = reactor
        self._initNodeShare()
        self.sharedLog = sharedLog
        self.logFile = logFile
        self._logFile = None
        self._rotation = None
        self.configPath = os.path.abspath(configPath)
        self.config = config
        self.stopGrace = STOP_GRACE + config.server.shutdown_grace
        self.count = count
        self.executable = executable
        self.ports: dict = {}
        self.workers: dict[int, _WorkerProcess] = {}
        self._stopping = False
        self._restarts: dict[int, object] = {}
        self._previousSignals: dict = {}
        self.node = NodeState()
        self.restarts = 0
        self.onWorkerEnded: list = []
        self.onReload: list = []
        self._asked = 0

    def privilegedStartService(self) -> None:
        # Before twistd drops privileges (--uid/--gid): ports below 1024 bind here.
        self.ports = bindListeners(self.reactor, self.config)
        super().privilegedStartService()

    def startService(self) -> None:
        if not self.ports:
            self.ports = bindListeners(self.reactor, self.config)
        super().startService()
        self._stopping = False
        self._logFile = None if self.sharedLog else self.logFile()
        if self._logFile is not None:
            self._rotation = SharedRotation(self._logFile, self.reactor, self.tellWorkers)
            self._rotation.start()
        for index in range(1, self.count + 1):
            self._spawn(index)
        self._previousSignals = {}
        for number in (signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1):
            try:
                self._previousSignals[number] = signal.signal(number, self._forward)
            except ValueError:  # not the main thread (tests): no forwarding
                pass

    def _forward(self, signum, frame) -> None:
        # SIGHUP: reload; SIGUSR2: reopen the log file (the workers write [log] file); SIGUSR1:
        # drain, told on the control channel (a worker that is starting has no handler yet).
        if signum == signal.SIGUSR1:
            self.reactor.callFromThread(self.drain, "SIGUSR1")
            return
        self.reactor.callFromThread(self.signalWorkers, signum)
        if signum == signal.SIGHUP:
            self.reactor.callFromThread(self.reloaded)

    def drain(self, reason: str) -> None:
        """
        Drain the node: the parent's health verdict fails from now on, and every worker drains.
        """
        self.node.drain(reason)
        for worker in self.workers.values():
            worker.say(DRAIN_LINE)

    def reloaded(self) -> None:
        """
        C{SIGHUP}: the workers reload; so does the parent's admin listener (C{onReload}).
        """
        # The configuration file is the source of truth: each worker applies its [server] drain
        # on reload, which ends a SIGUSR1 drain, as in a single-process casd.
        self.node.resume("reload")
        for hook in self.onReload:
            hook()

    def ask(self, what: str, timeout: float = ASK_WAIT) -> defer.Deferred:
        """
        Ask every running worker C{what} (L{casd.service.control}); never waits longer than
        C{timeout} seconds.

        @return: a L{Deferred} that fires with worker index -> its answer (a dict), or L{None}
            for a worker that did not answer in time or ended first.
        """
        self._asked += 1
        ident = self._asked
        indexes, answers = [], []
        for index, worker in sorted(self.workers.items()):
            d = worker.ask(ident, what)
            d.addTimeout(timeout, self.reactor)
            d.addErrback(lambda failure: None)
            indexes.append(index)
            answers.append(d)
        return defer.gatherResults(answers).addCallback(lambda got: dict(zip(indexes, got)))

    def tellWorkers(self, word: bytes) -> None:
        """
        Write C{word} on every worker's standard input.
        """
        for worker in self.workers.values():
            worker.transport.write(word)

    def signalWorkers(self, name) -> None:
        """
        @param name: C{"HUP"}, C{"TERM"}, C{"KILL"} (Twisted's names), or a signal number.
        """
        for worker in self.workers.values():
            try:
                worker.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        fds = {port.fileno(): port.fileno() for port in self.ports.values()}
        listeners = [f"--listener={name}={port.fileno()}" for name, port in self.ports.items()]
        args = [self.executable, "-m", "casd.service.worker", "--config", self.configPath, f"--index={index}"] + listeners
        env = dict(os.environ)
        # The worker imports what the parent imported (this checkout's casd and plugins).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        childFDs = {0: "w", 1: "r", 2: "r"}
        childFDs.update(fds)
        # The control channel (casd.service.control): the parent writes on one, reads the other.
        controlIn, controlOut = max(childFDs) + 1, max(childFDs) + 2
        childFDs[controlIn], childFDs[controlOut] = "w", "r"
        args.append(f"--control={controlIn},{controlOut}")
        if self.sharedLog:
            # The parent's standard output, its log, under a number no listener uses.
            logFD = max(childFDs) + 1
            childFDs[logFD] = 1
            args.append(f"--log-fd={logFD}")
        elif self._logFile is not None:
            # twistd's --logfile, open for appending: inherited (whatever user the worker runs
            # as), reopened by its path after each rotation.
            logFD = max(childFDs) + 1
            childFDs[logFD] = self._logFile.fileno()
            args += [f"--log-fd={logFD}", f"--log-file={self._logFile.path}"]
        secretFD = self._passNodeSecret(childFDs, args)
        worker = _WorkerProcess(self, index)
        worker.controlIn, worker.controlOut = controlIn, controlOut
        self.reactor.spawnProcess(worker, self.executable, args, env=env, childFDs=childFDs)
        worker.pid = worker.transport.pid  # the transport forgets it once the process ended
        self.workers[index] = worker
        if self.node.draining and self.node.reason == "SIGUSR1":
            worker.say(DRAIN_LINE)
        self.log.info("worker {index} started, pid {pid}", index=index, pid=worker.transport.pid)
        self._workerStarted(worker, secretFD)

    def workerEnded(self, worker: _WorkerProcess, reason) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        for hook in self.onWorkerEnded:
            hook(worker)
        if self._stopping:
            return
        self.restarts += 1
        young = self.reactor.seconds() - worker.startedAt < YOUNG
        delay = RESTART_DELAY_YOUNG if young else RESTART_DELAY
        self.log.error(
            "worker {index} exited unexpectedly ({reason}); restarting in {delay}s",
            index=worker.index,
            reason=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[worker.index] = self.reactor.callLater(delay, self._spawn, worker.index)

    def stopService(self):
        super().stopService()
        self._stopping = True
        if self._rotation is not None:
            self._rotation.stop()
            self._rotation = None
        for number, previous in self._previousSignals.items():
            signal.signal(number, previous)
        self._previousSignals = {}
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        workers = list(self.workers.values())
        for worker in workers:
            # "stop" then end of file: a stop asked for (graceful), not a parent that died.
            worker.transport.write(STOP_WORD)
            worker.transport.closeStdin()
        timers = [
            # The workers let their sessions finish for [server] shutdown_grace seconds first.
            self.reactor.callLater(self.stopGrace, self.signalWorkers, "TERM"),
            self.reactor.callLater(self.stopGrace + KILL_GRACE, self.signalWorkers, "KILL"),
        ]

        def stopped(_):
            for timer in timers:
                if timer.active():
                    timer.cancel()
            for port in self.ports.values():
                port.stopListening()
            self.ports = {}

        return defer.gatherResults([w.ended for w in workers]).addBoth(stopped)

    def _initNodeShare(self) -> None:
        # What the workers of the node share (casd.nodesecret): one secret for the parent's
        # life, so a restarted worker derives the same keys; the forms logoffs.
        self.nodeSecret = NodeSecret.generate()
        self.revocations = ParentRevocations(self.reactor)

    def _passNodeSecret(self, childFDs: dict, args: list) -> int:
        """
        Give the worker about to start the node secret on an inherited pipe.

        @return: the parent's reading end, to close once the worker started.
        """
        secretFD = secretPipe(self.nodeSecret)
        childFD = max(childFDs) + 1
        childFDs[childFD] = secretFD
        args.append(f"--node-secret-fd={childFD}")
        return secretFD

    def _workerStarted(self, worker, secretFD: int) -> None:
        os.close(secretFD)
        # The logoffs it missed (casd.service.nodeshare).
        live = self.revocations.live()
        if live:
            worker.transport.write(live)

    def revocationFrom(self, sender, payload: bytes) -> None:
        """
        A worker recorded a forms logoff: every other worker refuses that token too.

        @param payload: its record (L{casd.service.nodeshare}); bad input is ignored.
        """
        line = self.revocations.recordReceived(payload)
        if line is None or self._stopping:
            return
        for worker in self.workers.values():
            if worker is not sender:
                worker.transport.write(line)


def makeParentService(options, reactor) -> service.MultiService:
    """
    The service tree of C{twistd cas --workers N}: the L{WorkerPool} alone; the configuration
    was validated by the options, and each worker builds the rest.
    """
    twistdOptions = getattr(options, "parent", None)
    top = MainLogRoot(twistdOptions, reactor)
    pool = WorkerPool(
        reactor, options["config"], options.config, options["workers"], sharedLog=logsToStandardOutput(twistdOptions),
        logFile=top.rotatingLogFile,
    )
    pool.setName("workers")
    pool.setServiceParent(top)
    return top
