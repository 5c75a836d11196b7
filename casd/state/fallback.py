"""
Redis first, this node's memory when Redis does not answer in time.

Every decision waits at most C{timeout} (50 ms by default) for Redis; then it is taken from the
local state, the outage begins (one warning), and for C{retryInterval} seconds every decision is
local at once.  Then one call tries Redis again; its answer ends the outage (one line), and the
shared state is authoritative again: what was counted locally meanwhile stays local, so the
array re-converges as the shared keys fill again.  A reply that comes too late is dropped, never
cancelled: txredisapi matches replies to requests by order on the connection.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from casd.interfaces import ISharedState
from casd.state import StateStats


class _TimedOut(Exception):
    pass


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
        self.stats.calls += 1
        try:
            remote = getattr(self.remote, name)(*args)
        except Exception:
            remote = defer.fail(Failure())
        result = defer.Deferred()
        timer = self.clock.callLater(self.timeout, self._expired, result, name, local, args)

        def answered(value):
            if result.called:
                self.stats.lateReplies += 1
                return None
            timer.cancel()
            if isinstance(value, Failure):
                self._unavailable(value.getErrorMessage() or value.type.__name__)
                self.stats.fallbacks += 1
                local(*args).chainDeferred(result)
            else:
                self._backUp()
                result.callback(value)
            return None

        remote.addBoth(answered)
        return result

    def _expired(self, result, name, local, args) -> None:
        if result.called:
            return
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
