"""
Draining a node of an array: on C{SIGUSR1} casd stops listening, so the load balancer's health
check (a connection expecting the greeting) fails and it sends the node nothing new, while the
sessions already open go on until they end.  Stop the node once they have (C{casd} then has
nothing left to cut).  The admin listener's C{/health} will report the drain the same way.
"""

from __future__ import annotations

import signal as _signal

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet import defer
from twisted.logger import Logger


class DrainService(service.Service):
    """
    @ivar draining: whether the node stopped listening.
    """

    name = "drain"
    log = Logger()
    draining = False

    def __init__(self, reactor, signals=_signal) -> None:
        self.reactor = reactor
        self.signals = signals
        self._previous = None
        self._installed = False

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = self.signals.signal(self.signals.SIGUSR1, self._onSignal)
            self._installed = True
        except (ValueError, AttributeError, OSError) as e:
            self.log.warn("no SIGUSR1 drain: {reason}", reason=str(e))

    def stopService(self) -> None:
        super().stopService()
        if self._installed:
            try:
                if self.signals.getsignal(self.signals.SIGUSR1) == self._onSignal:
                    self.signals.signal(self.signals.SIGUSR1, self._previous)
            except (ValueError, OSError, TypeError):
                pass
            self._installed = False
            self._previous = None

    def _onSignal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.drain)

    def drain(self):
        """
        Stop every listener of the service tree; open sessions are left alone.

        @return: a L{Deferred} firing once no listener is left.
        """
        if self.draining:
            return defer.succeed(None)
        self.draining = True
        listeners = [s for s in self.parent if isinstance(s, StreamServerEndpointService)]
        self.log.info(
            "draining: {count} listener(s) closed, open sessions go on", count=len(listeners)
        )
        # Taken out of the tree, so that stopping casd later does not stop them a second time.
        return defer.DeferredList(
            [defer.maybeDeferred(s.disownServiceParent) for s in listeners], consumeErrors=True
        )
