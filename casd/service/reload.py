# -*- test-case-name: tests.test_health -*-
"""
The operator's handle on a running node: C{SIGHUP} re-reads the configuration file and applies
its routing and backend sections (C{[routing]} and the map file, C{[backend]}, C{[backends]},
C{[groups]}, C{[sites]}, C{[health]}).  That is how a member is drained (C{drain = true} on its
C{[backends.NAME]}) or put back, a group changed or a site re-pointed, without a restart and
without dropping a session.

A signal and the file, rather than an admin port, because the file is the one source of truth
every node of an array already shares: a drain survives a restart, needs no credentials of its
own and cannot be half-applied to some nodes from a script that lost its connection.
"""

from __future__ import annotations

import signal as _signal

from twisted.application import service
from twisted.logger import Logger

from casd.config import ConfigError, loadConfig

#: The sections a reload applies; any other change waits for a restart.
RELOADED = ("routing", "backend", "backends", "groups", "sites", "health")


class ReloadService(service.Service):
    """
    Applies the configuration file again on C{SIGHUP} (or L{reload}).

    @ivar config: the configuration in force for routing and backends.
    """

    name = "reload"
    log = Logger()

    def __init__(self, reactor, context, checker=None, signals=_signal) -> None:
        """
        @param context: the running L{casd.service.context.CASContext}: its router and connector are
            reconfigured in place.
        @param checker: the L{casd.pool.health.HealthChecker}, if any.
        @param signals: the C{signal} module (a fake in tests).
        """
        self.reactor = reactor
        self.context = context
        self.checker = checker
        self.signals = signals
        self.config = context.config
        self._previous = None

    def startService(self) -> None:
        super().startService()
        try:
            self._previous = self.signals.signal(self.signals.SIGHUP, self._onSignal)
        except (ValueError, AttributeError, OSError) as e:
            # Not the main thread, or no SIGHUP on this platform: reload is then unavailable.
            self.log.warn("no SIGHUP reload: {reason}", reason=str(e))
            self._previous = None

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            try:
                if self.signals.getsignal(self.signals.SIGHUP) == self._onSignal:
                    self.signals.signal(self.signals.SIGHUP, self._previous)
            except (ValueError, OSError):
                pass
            self._previous = None

    def _onSignal(self, signum, frame) -> None:
        # Signal handlers run between bytecodes: hand the work to the reactor.
        self.reactor.callFromThread(self.reload)

    def reload(self) -> bool:
        """
        Re-read the configuration file and apply its routing and backend sections.  A file that
        does not validate is logged and changes nothing.

        @return: whether the new configuration is in force.
        """
        if not self.running:
            return False
        path = self.config.path
        try:
            config = loadConfig(path, self.context.protocols.values())
        except ConfigError as e:
            self.log.error("configuration not reloaded, the running one stays: {reason}", reason=str(e))
            return False
        self.context.router.reconfigure(config)
        self.context.connector.reconfigure(config)
        if self.checker is not None:
            self.checker.reconfigure(config)
        stale = [name for name in _changedSections(self.config, config) if name not in RELOADED]
        self.config = config
        self.log.info(
            "configuration {path} reloaded ({sections}){stale}",
            path=path,
            sections=", ".join(RELOADED),
            stale=f"; changes to {', '.join(stale)} need a restart" if stale else "",
        )
        return True


def _changedSections(old, new) -> list[str]:
    changed = []
    for name in ("server", "tls", "auth", "demo"):
        if getattr(old, name) != getattr(new, name):
            changed.append(name)
    if old.protocols != new.protocols:
        changed.append("protocols")
    return changed
