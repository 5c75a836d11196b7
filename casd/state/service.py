# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
The shared state as a service of the node: built from C{[state]}, connected when casd starts,
disconnected when it stops, renewing the session leases meanwhile.
"""

from __future__ import annotations

import os

from twisted.application import service
from twisted.internet import task
from twisted.logger import Logger

from casd.auth.penalty import LoginPenalty
from casd.state import StateStats
from casd.state.fallback import FallbackState
from casd.state.keys import KeyMaker, readSecret
from casd.state.local import LocalState
from casd.state.revocation import RevocationSet
from casd.state.sessions import SessionLimiter


class StateService(service.Service):
    """
    @ivar shared: the L{casd.interfaces.ISharedState} decisions go to.
    @ivar keys: the L{KeyMaker}.
    @ivar sessions: the L{SessionLimiter}.
    @ivar revocations: the L{RevocationSet}.
    @ivar stats: the L{StateStats}.
    @ivar remote: the L{casd.state.redis.RedisState}, or C{None} with the local backend.
    """

    name = "shared-state"
    log = Logger()

    def __init__(self, config, clock, connect=None) -> None:
        """
        @param config: the whole L{casd.config.CASConfig}.
        @param connect: for tests: C{callable(url) -> txredisapi connection}.
        """
        self.config = config
        self.clock = clock
        settings = config.state
        self.settings = settings
        self.stats = StateStats(backend=settings.backend)
        self.remote = None
        self._connect = connect
        self._renewal = None
        if settings.backend == "redis":
            from casd.state.redis import RedisState

            self.keys = KeyMaker(readSecret(settings.secret_file), settings.key_prefix)
            penalty = self.penalty(config.auth)
            local = LocalState(clock, LoginPenalty.fromConfig(clock, config.auth), settings.session_lease)
            self.remote = RedisState([], lease=settings.session_lease, **penalty.storeSettings())
            self.shared = FallbackState(
                self.remote, local, clock, settings.timeout, settings.retry_interval, self.stats
            )
        else:
            self.keys = KeyMaker(os.urandom(32), settings.key_prefix)
            self.shared = LocalState(clock, lease=settings.session_lease)
        self.sessions = SessionLimiter(self.shared, self.keys)
        self.revocations = RevocationSet(self.shared, self.keys)

    @property
    def isShared(self) -> bool:
        """
        Whether decisions are shared by an array (C{backend = "redis"}), not only this node's.
        """
        return self.remote is not None

    def penalty(self, auth):
        """
        The login penalty for C{[auth]}: the array's, or C{None} for today's local one.
        """
        if self.settings.backend != "redis":
            return None
        from casd.state.penalty import SharedLoginPenalty

        return SharedLoginPenalty.fromConfig(
            self.clock, auth, getattr(self, "shared", None), self.keys
        )

    def _connections(self):
        from casd.state.redis import connect

        settings = self.settings
        password = None
        if settings.password_file:
            with open(settings.password_file) as f:
                password = f.readline().strip()
        tlsOptions = None
        if any(u.startswith("rediss:") for u in settings.urls):
            from casd.tls import ClientTLS

            tlsOptions = ClientTLS(settings.ca_file).optionsFor
        make = self._connect or (
            lambda url: connect(
                url, password, tlsOptions, settings.connect_timeout, max(settings.connect_timeout, 1.0)
            )
        )
        return [lambda url=url: make(url) for url in settings.urls]

    def startService(self) -> None:
        super().startService()
        if self.remote is not None:
            self.remote.makers = self._connections()
            self.remote.connections = [make() for make in self.remote.makers]
            # Connect now rather than on the first login; an error is the fallback's business.
            self.remote.ping().addErrback(lambda f: None)
            self.log.info(
                "shared state in Redis ({count} server(s)), decisions wait at most {ms:g} ms",
                count=len(self.remote.connections),
                ms=self.settings.timeout * 1000,
            )
        self._renewal = task.LoopingCall(self.sessions.renew)
        self._renewal.clock = self.clock
        self._renewal.start(self.settings.session_lease / 3.0, now=False)

    def stopService(self):
        super().stopService()
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        if self.remote is not None and self.remote.connections:
            return self.remote.close()
        return None
