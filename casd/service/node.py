# -*- test-case-name: tests.test_node -*-
"""
The node's own state as an array member sees it: draining or not, and a graceful stop.

A draining node keeps serving the sessions it holds and answers its health check with 503, so a
load balancer sends it nothing new; a stopping node stops accepting, lets its sessions finish for
up to C{[server] shutdown_grace} seconds, then closes the rest.
"""

from __future__ import annotations

import signal as _signal

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger


class NodeState:
    """
    @ivar draining: whether the node is draining.
    @ivar reason: why (C{"SIGUSR1"}, C{"configuration"}, ...), for the status page.
    """

    log = Logger()

    def __init__(self, draining: bool = False, reason: str = "") -> None:
        self.draining = draining
        self.reason = reason if draining else ""

    def drain(self, reason: str) -> None:
        if not self.draining:
            self.log.warn("node draining ({reason}): health checks now fail, sessions go on", reason=reason)
        self.draining = True
        self.reason = reason

    def resume(self, reason: str) -> None:
        if self.draining:
            self.log.info("node no longer draining ({reason})", reason=reason)
        self.draining = False
        self.reason = ""


class NodeService(service.Service):
    """
    C{SIGUSR1} drains the node; C{stopService} (C{SIGTERM}) waits for the node's sessions.

    @ivar sessionSets: the C{sessions} sets of the listening factories (open client sessions).
    """

    name = "node"
    log = Logger()

    def __init__(self, reactor, state: NodeState, grace: float, sessionSets=(), signals=_signal) -> None:
        self.reactor = reactor
        self.state = state
        self.grace = grace
        self.sessionSets = list(sessionSets)
        self.signals = signals
        self._previous = None

    def openSessions(self) -> int:
        return sum(len(s) for s in self.sessionSets)

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = self.signals.signal(self.signals.SIGUSR1, self._onSignal)
        except (ValueError, AttributeError, OSError) as e:
            self.log.warn("no SIGUSR1 drain: {reason}", reason=str(e))

    def _onSignal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.state.drain, "SIGUSR1")

    def stopService(self):
        super().stopService()
        if self._previous is not None:
            try:
                self.signals.signal(self.signals.SIGUSR1, self._previous)
            except (ValueError, OSError):
                pass
            self._previous = None
        if self.openSessions() == 0 or self.grace <= 0:
            return None
        self.log.info(
            "stopping: {count} session(s) open, waiting up to {grace:g} s",
            count=self.openSessions(),
            grace=self.grace,
        )
        deadline = self.reactor.seconds() + self.grace
        done = defer.Deferred()

        def poll():
            if self.openSessions() == 0:
                loop.stop()
                done.callback(None)
            elif self.reactor.seconds() >= deadline:
                loop.stop()
                self.log.warn(
                    "stopping: closing {count} session(s) still open after {grace:g} s",
                    count=self.openSessions(),
                    grace=self.grace,
                )
                for sessions in self.sessionSets:
                    for session in list(sessions):
                        transport = getattr(session, "transport", None)
                        if transport is not None:
                            transport.abortConnection()
                done.callback(None)

        loop = task.LoopingCall(poll)
        loop.clock = self.reactor
        loop.start(0.2, now=False)
        return done
