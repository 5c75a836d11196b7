# -*- test-case-name: tests.integration.test_workers -*-
"""
Multi-core casd: C{twistd cas --config FILE --workers N}.

The parent process binds every listener of the configuration once (so a bind error stops it at
start-up, and privileged ports are bound before privileges are dropped) and never accepts on
them; it starts N worker processes that inherit the listening sockets and adopt them with
C{IReactorSocket.adoptStreamPort}.  The kernel hands each new connection to whichever worker
accepts first, the way nginx's workers share their listening sockets.  Every worker reads the
same configuration file and builds the same service tree as a single-process casd.

The parent:
  - relays the workers' log events (one JSON line each on their standard output, formatted by
    the worker) into its own log, each marked with the worker's number, so there is one log and
    one place that rotates it;
  - restarts a worker that dies (after a pause, longer when it dies young);
  - forwards C{SIGHUP} (reload) to the workers;
  - stops them when it stops: it closes their standard input (they stop gracefully on end of
    file), then C{SIGTERM}, then C{SIGKILL}, each after a bounded wait.

A worker also stops on end of file of its standard input, so workers never outlive their parent,
even one killed with C{SIGKILL}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import serverFromString
from twisted.logger import InvalidLogLevelError, Logger, LogLevel, eventAsText
from twisted.protocols.tls import TLSMemoryBIOFactory

#: Seconds the workers get to stop after their standard input closed, before C{SIGTERM}.
STOP_GRACE = 10.0
#: Seconds after C{SIGTERM} before C{SIGKILL}.
KILL_GRACE = 5.0
#: Pause before a dead worker is started again; a worker that died within L{YOUNG} seconds of
#: its start waits L{RESTART_DELAY_YOUNG} instead, so a broken worker does not spin.
RESTART_DELAY = 1.0
RESTART_DELAY_YOUNG = 10.0
YOUNG = 5.0


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
        self._buffer = b""
        self.ended = defer.Deferred()
        self.startedAt = pool.reactor.seconds()

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
        try:
            when, levelName, namespace, text = json.loads(line)
            level = LogLevel.levelWithName(levelName)
        except (ValueError, TypeError, KeyError, InvalidLogLevelError):
            text = line.decode("utf-8", "replace").strip()
            if text:
                self.log.info("worker {index}: {line}", index=self.index, line=text)
            return
        # Already formatted by the worker: the parent only stamps and writes it.
        self.log.observer(
            {
                "log_format": "{casd_text}",
                "casd_text": text,
                "casd_worker": self.index,
                "log_level": level,
                "log_namespace": namespace,
                "log_system": f"worker{self.index}:{namespace}#{levelName}",
                "log_time": when,
            }
        )

    def processEnded(self, reason) -> None:
        if self._buffer:
            self._relay(self._buffer)
            self._buffer = b""
        self.pool.workerEnded(self, reason)
        self.ended.callback(None)


class WorkerPool(service.Service):
    """
    Binds the listeners and keeps N worker processes running over them.

    @ivar workers: index -> the running L{_WorkerProcess} (its C{transport.pid} is the PID).
    """

    log = Logger()

    def __init__(self, reactor, configPath: str, config, count: int, executable: str = sys.executable) -> None:
        self.reactor = reactor
        self.configPath = os.path.abspath(configPath)
        self.config = config
        self.count = count
        self.executable = executable
        self.ports: dict = {}
        self.workers: dict[int, _WorkerProcess] = {}
        self._stopping = False
        self._restarts: dict[int, object] = {}
        self._previousHup = None

    def startService(self) -> None:
        self.ports = bindListeners(self.reactor, self.config)
        super().startService()
        self._stopping = False
        for index in range(1, self.count + 1):
            self._spawn(index)
        try:
            self._previousHup = signal.signal(signal.SIGHUP, self._forwardHup)
        except ValueError:  # not the main thread (tests): no forwarding
            self._previousHup = None

    def _forwardHup(self, signum, frame) -> None:
        self.reactor.callFromThread(self.signalWorkers, "HUP")

    def signalWorkers(self, name: str) -> None:
        for worker in self.workers.values():
            try:
                worker.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        fds = {port.fileno(): port.fileno() for port in self.ports.values()}
        listeners = [f"--listener={name}={port.fileno()}" for name, port in self.ports.items()]
        args = [self.executable, "-m", "casd.service.workers", "--config", self.configPath, f"--index={index}"] + listeners
        env = dict(os.environ)
        # The worker imports what the parent imported (this checkout's casd and plugins).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        childFDs = {0: "w", 1: "r", 2: "r"}
        childFDs.update(fds)
        worker = _WorkerProcess(self, index)
        self.reactor.spawnProcess(worker, self.executable, args, env=env, childFDs=childFDs)
        self.workers[index] = worker
        self.log.info("worker {index} started, pid {pid}", index=index, pid=worker.transport.pid)

    def workerEnded(self, worker: _WorkerProcess, reason) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        if self._stopping:
            return
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
        if self._previousHup is not None:
            signal.signal(signal.SIGHUP, self._previousHup)
            self._previousHup = None
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        workers = list(self.workers.values())
        for worker in workers:
            worker.transport.closeStdin()
        timers = [
            self.reactor.callLater(STOP_GRACE, self.signalWorkers, "TERM"),
            self.reactor.callLater(STOP_GRACE + KILL_GRACE, self.signalWorkers, "KILL"),
        ]

        def stopped(_):
            for timer in timers:
                if timer.active():
                    timer.cancel()
            for port in self.ports.values():
                port.stopListening()
            self.ports = {}

        return defer.gatherResults([w.ended for w in workers]).addBoth(stopped)


def makeParentService(options, reactor) -> service.MultiService:
    """
    The service tree of C{twistd cas --workers N}: the L{WorkerPool} alone; the configuration
    was validated by the options, and each worker builds the rest.
    """
    top = service.MultiService()
    pool = WorkerPool(reactor, options["config"], options.config, options["workers"])
    pool.setName("workers")
    pool.setServiceParent(top)
    return top


# -- the worker process -------------------------------------------------------------------------


class _AdoptingReactor:
    """
    A reactor for C{serverFromString} in a worker: listening adopts the inherited socket instead
    of binding a new one, so every endpoint kind that ends in C{listenTCP}, C{listenSSL} or
    C{listenUNIX} (C{tcp:}, C{tcp6:}, C{ssl:}, C{unix:}, C{haproxy:tcp:...}) works unchanged.
    Everything else is the real reactor's.
    """

    def __init__(self, reactor, fd: int) -> None:
        self._reactor = reactor
        self._fd = fd

    def __getattr__(self, name):
        return getattr(self._reactor, name)

    def _adopt(self, factory):
        probe = socket.socket(fileno=self._fd)
        try:
            family = probe.family
        finally:
            probe.detach()
        return self._reactor.adoptStreamPort(self._fd, family, factory)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._adopt(factory)

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        return self._adopt(TLSMemoryBIOFactory(contextFactory, False, factory))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        return self._adopt(factory)


def adoptingReactors(reactor, fds: dict) -> dict:
    """
    @param fds: listener name -> inherited listening socket.
    @return: listener name -> a reactor whose C{listen*} adopts that socket.
    """
    return {name: _AdoptingReactor(reactor, fd) for name, fd in fds.items()}


def _relayObserver(out):
    """
    A worker's log observer: one JSON array a line, C{[time, level, namespace, text]}, the text
    formatted here (with any traceback), so the parent does no more than for its own events.
    """
    dumps = json.dumps

    def observe(event):
        level = event.get("log_level", LogLevel.info)
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        out.write(
            dumps([event.get("log_time"), level.name, event.get("log_namespace", "-"), text]) + "\n"
        )
        out.flush()

    return observe


class _ParentWatch:
    """
    Reads the worker's standard input, a pipe from the parent: end of file means the parent
    stopped (or died), so the worker stops.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "parent-watch"

    def doRead(self):
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return error.ConnectionDone()
        return None

    def connectionLost(self, reason) -> None:
        if self.reactor.running:
            self.reactor.stop()


def workerMain(argv=None) -> int:
    """
    The worker process: C{python -m casd.service.workers --config FILE --index N --listener NAME=FD ...}.
    """
    parser = argparse.ArgumentParser(prog="casd worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--listener", action="append", default=[])
    args = parser.parse_args(argv)
    fds = {}
    for item in args.listener:
        name, _, fd = item.rpartition("=")
        fds[name] = int(fd)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from casd.service.tap import Options, makeService

    globalLogBeginner.beginLoggingTo([_relayObserver(sys.stdout)], redirectStandardIO=False)
    options = Options()
    options.parseOptions(["--config", args.config])
    top = makeService(options, reactor, adopted=adoptingReactors(reactor, fds))
    os.set_blocking(0, False)
    reactor.addReader(_ParentWatch(reactor))

    def started():
        # Ctrl-C in a terminal reaches the whole process group: the parent decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        top.startService()
        for fd in fds.values():
            os.close(fd)  # adoptStreamPort listens on duplicates

    reactor.callWhenRunning(started)
    reactor.addSystemEventTrigger("before", "shutdown", top.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(workerMain())
