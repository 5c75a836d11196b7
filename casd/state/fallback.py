# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
Redis first, this node's memory when Redis does not answer in time.

Every decision waits at most C{timeout} (50 ms by default, plus one turn of the reactor) for
Redis; then it is taken from the local state, the outage begins (one warning), and for C{retryInterval} seconds every decision is
local at once.  Then one call tries Redis again; its answer ends the outage (one line), and the
shared state is authoritative again: what was counted locally meanwhile stays local, so the
array re-converges as the shared keys fill again.  A reply that comes too late is dropped, never
cancelled: txredisapi matches replies to requests by order on the connection.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from casd.interfaces import ISharedState
from casd.state import StateStats


@implementer(ISharedState)
class FallbackState:
    """
    L{ISharedState} over a remote one (Redis) with a local one as the fallback.

    @ivar stats: the L{StateStats} the metrics endpoint exports.
    """

    log = Logger()

    def __init__(self, remote, local, clock, timeout: float = 0.05, retryInterval: float = 1.0,
                 stats: StateStats | None = None) -> None:
        self.remote = remote
        self.local = local
        self.clock = clock
        self.timeout = timeout
        self.retryInterval = retryInterval
        self.stats = stats if stats is not None else StateStats(backend="redis")
        self._downSince: float | None = None
        self._retryAt = 0.0
        self._pending: deque = deque()
        self._inFlight = 0
        self._timer = None

    @property
    def available(self) -> bool:
        return self._downSince is None

    def _call(self, name: str, *args):
        local = getattr(self.local, name)
        if self._downSince is not None:
            if self.clock.seconds() < self._retryAt:
                self.stats.fallbacks += 1
                return local(*args)
            # This call probes Redis; until it is answered, the others stay local.
            self._retryAt = self.clock.seconds() + self.retryInterval
            revive = getattr(self.remote, "revive", None)
            if revive is not None and revive():
                self.log.info("shared state (Redis): connecting afresh")
        self.stats.calls += 1
        result = defer.Deferred()
        # One timer for all calls in flight (they expire in the order they were made), rather
        # than one per call: a login's share of Redis stays small.
        self._pending.append((self.clock.seconds() + self.timeout, result, local, args))
        self._inFlight += 1
        if self._timer is None:
            self._timer = self.clock.callLater(self.timeout, self._sweep)
        try:
            remote = getattr(self.remote, name)(*args)
        except Exception:
            remote = defer.fail(Failure())
        remote.addBoth(self._answered, result, local, args)
        return result

    def _answered(self, value, result, local, args):
        if result.called:
            self.stats.lateReplies += 1
            return None
        self._inFlight -= 1
        if not self._inFlight:
            # Nothing left to time out: no timer left behind either.
            self._pending.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        if isinstance(value, Failure):
            self._unavailable(value.getErrorMessage() or value.type.__name__)
            self.stats.fallbacks += 1
            local(*args).chainDeferred(result)
        else:
            if self._downSince is not None:
                self._backUp()
            result.callback(value)
        return None

    def _sweep(self) -> None:
        self._timer = None
        pending, now = self._pending, self.clock.seconds()
        expired = []
        while pending and (pending[0][1].called or pending[0][0] <= now):
            entry = pending.popleft()
            if not entry[1].called:
                expired.append(entry)
        if expired:
            # Timers run before the reactor reads its sockets: on a busy node the replies may be
            # waiting unread.  One more turn reads them; only then is Redis too slow.
            self.clock.callLater(0, self._expire, expired)
        if pending:
            self._timer = self.clock.callLater(max(0.0, pending[0][0] - now), self._sweep)

    def _expire(self, expired) -> None:
        for _, result, local, args in expired:
            if result.called:
                continue
            self._inFlight -= 1
            self._unavailable(f"no answer within {self.timeout * 1000:g} ms")
            self.stats.fallbacks += 1
            local(*args).chainDeferred(result)

    def _unavailable(self, why: str) -> None:
        now = self.clock.seconds()
        self._retryAt = now + self.retryInterval
        if self._downSince is not None:
            return
        self._downSince = now
        self.stats.available = False
        self.stats.outages += 1
        self.log.warn(
            "shared state (Redis) unavailable: {why}; decisions are local until it answers again",
            why=why,
        )
        failover = getattr(self.remote, "failover", None)
        if failover is not None:
            failover()

    def _backUp(self) -> None:
        if self._downSince is None:
            return
        self.log.info(
            "shared state (Redis) available again after {seconds:.1f} s",
            seconds=self.clock.seconds() - self._downSince,
        )
        self._downSince = None
        self.stats.available = True

    def loginFailed(self, userKey, addressKey, digest):
        return self._call("loginFailed", userKey, addressKey, digest)

    def loginSucceeded(self, userKey, addressKey):
        return self._call("loginSucceeded", userKey, addressKey)

    def acquire(self, key, limit, token):
        return self._call("acquire", key, limit, token)

    def release(self, key, token):
        return self._call("release", key, token)

    def hit(self, key, window):
        return self._call("hit", key, window)

    def revoke(self, key, expiresAt):
        # Recorded locally too: while Redis is away this node still refuses the token.
        self.local.revoke(key, expiresAt)
        return self._call("revoke", key, expiresAt)

    def isRevoked(self, key):
        return self._call("isRevoked", key)
