# -*- test-case-name: tests.integration.test_workers -*-
"""
The worker process of C{twistd cas --workers N} (its parent is L{casd.service.workers}): it
adopts the listening sockets the parent bound, builds the same service tree as a
single-process casd but for the admin listener (its parent serves it, for the node), sends its
log events to the parent as JSON (L{casd.service.logs.workerLogObserver}) and answers the
parent's questions on its control channel (L{casd.service.control}).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from twisted.internet import error
from twisted.internet.stdio import StandardIO
from twisted.logger import globalLogBeginner

from casd.service.control import WorkerControl
from casd.service.leanaccept import adoptStreamPort, leanAccept
from casd.service.logfile import REOPEN_WORD, AppendFile, StreamFile
from casd.service.logs import workerLogObserver
from casd.service.nodeshare import installNodeSecret, nodeWords
from casd.service.tap import Options, makeService
from casd.tlslayer import TLSFactory


class _AdoptingReactor:
    """
    A reactor for C{serverFromString} in a worker: listening adopts the inherited socket instead
    of binding a new one, so every endpoint kind that ends in C{listenTCP}, C{listenSSL} or
    C{listenUNIX} (C{tcp:}, C{tcp6:}, C{ssl:}, C{unix:}, C{haproxy:tcp:...}) works unchanged; a
    TCP socket is adopted by a L{casd.service.leanaccept.LeanPort} where it applies.
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
        return adoptStreamPort(self._reactor, self._fd, family, factory)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        return self._adopt(factory)

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        return self._adopt(TLSFactory(contextFactory, False, factory))

    def listenUNIX(self, address, factory, backlog=50, mode=0o666, wantPID=0):
        return self._adopt(factory)


def adoptingReactors(reactor, fds: dict) -> dict:
    """
    @param fds: listener name -> inherited listening socket.
    @return: listener name -> a reactor whose C{listen*} adopts that socket.
    """
    return {name: _AdoptingReactor(reactor, fd) for name, fd in fds.items()}


class _ParentWatch:
    """
    Reads the worker's standard input, a pipe from the parent: end of file means the parent
    stopped (or died), so the worker stops.  A parent that stops writes C{stop} first and asks
    for a graceful stop (the sessions finish, up to C{[server] shutdown_grace}); an end of file
    without it is a parent that died, which leaves the listening sockets to the casd started in
    its place, so the orphan stops at once.
    """

    def __init__(self, reactor, onOrphaned=lambda: None, fd: int = 0, onReopen=lambda: None, onWords=None) -> None:
        """
        @param onReopen: called when the parent writes L{REOPEN_WORD} (it rotated its log file).
        @param onWords: called with everything the parent writes; by default, the revocation
            relay of the node's workers (L{nodeWords}).
        """
        self.onWords = nodeWords if onWords is None else onWords
        self.reactor = reactor
        self.onOrphaned = onOrphaned
        self.onReopen = onReopen
        self.fd = fd
        self.stopAsked = False

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "parent-watch"

    def doRead(self):
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            return error.ConnectionDone()
        self.onWords(data)
        if b"stop" in data:
            self.stopAsked = True
        if REOPEN_WORD in data:
            try:
                self.onReopen()
            except OSError:
                pass  # the file stays the one open (the parent's rotated one): nothing is lost
        return None

    def connectionLost(self, reason) -> None:
        if not self.stopAsked:
            self.onOrphaned()
        if self.reactor.running:
            try:
                self.reactor.stop()
            except error.ReactorNotRunning:
                pass  # stopping already (a SIGTERM to the process group reached this worker too)


def workerMain(argv=None) -> int:
    """
    The worker process: C{python -m casd.service.worker --config FILE --index N --listener NAME=FD ...}.
    """
    parser = argparse.ArgumentParser(prog="casd worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, default=1)
    parser.add_argument("--listener", action="append", default=[])
    parser.add_argument("--node-secret-fd", type=int, default=None, help="the pipe of the node secret (casd.nodesecret)")
    parser.add_argument("--log-fd", type=int, default=None)
    parser.add_argument("--log-file", default=None, help="the file --log-fd is, reopened when the parent says so")
    parser.add_argument("--control", default=None, help="IN,OUT: the control channel's pipes (casd.service.control)")
    args = parser.parse_args(argv)
    fds = {}
    for item in args.listener:
        name, _, fd = item.rpartition("=")
        fds[name] = int(fd)

    from twisted.internet import reactor

    from casd.service.gctune import tuneAllocator, tuneCollector
    from casd.service.leanloop import leanLoop
    from casd.service.leanpoll import leanDispatch

    leanDispatch(reactor)
    leanAccept(reactor)
    leanLoop(reactor)
    tuneCollector(reactor)
    tuneAllocator()
    # Structured events to the parent, which reads them back (casd.service.logs).
    # The session lines straight to the parent's log when it is a stream the worker shares.
    if args.log_fd is None:
        direct = None
    elif args.log_file is not None:
        # twistd's --logfile, appended to; the parent rotates it.
        direct = AppendFile(args.log_file, fd=args.log_fd)
    else:
        # The parent's standard output, inherited.
        direct = StreamFile(args.log_fd)
    globalLogBeginner.beginLoggingTo(
        [workerLogObserver(sys.stdout, direct=direct, index=args.index)], redirectStandardIO=False
    )
    if args.node_secret_fd is not None:
        installNodeSecret(args.node_secret_fd, sys.stdout)
    options = Options()
    options.parseOptions(["--config", args.config])
    top = makeService(options, reactor, adopted=adoptingReactors(reactor, fds))
    os.set_blocking(0, False)
    def orphaned():
        node = top.getServiceNamed("node")
        node.grace = 0

    reactor.addReader(_ParentWatch(reactor, orphaned, onReopen=getattr(direct, "reopen", lambda: None)))
    if args.control:
        controlIn, controlOut = (int(fd) for fd in args.control.split(","))
        StandardIO(WorkerControl(top.adminView), stdin=controlIn, stdout=controlOut, reactor=reactor)

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
