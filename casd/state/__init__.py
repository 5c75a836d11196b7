# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
The state an array of casd nodes shares (L{casd.interfaces.ISharedState}): login penalties and
lockouts, per-user session counts, rate counters, revoked tokens.

  - L{casd.state.local.LocalState}: this node's memory (C{[state] backend = "local"}, the
    default; also the fallback when Redis does not answer).
  - L{casd.state.redis.RedisState}: Redis, through txredisapi, one atomic Lua script per
    decision.
  - L{casd.state.fallback.FallbackState}: Redis first, the local state when Redis does not answer
    within C{[state] timeout}; one warning per outage, counted in L{StateStats}.
"""

from __future__ import annotations

from attrs import define, frozen


@frozen
class PenaltyReply:
    """
    What the store says after a login's outcome was recorded.

    @ivar userCount: the user's distinct recent failures.
    @ivar addressCount: the address's distinct recent failures (0 for a trusted client).
    @ivar userLockedFor: seconds the user stays locked out (0: not locked).
    @ivar addressLockedFor: seconds the address stays locked out (0: not locked).
    """

    userCount: int = 0
    addressCount: int = 0
    userLockedFor: float = 0.0
    addressLockedFor: float = 0.0


@define
class StateStats:
    """
    Counters and gauges of the shared state, for the metrics endpoint.

    @ivar backend: C{"local"} or C{"redis"}.
    @ivar available: C{False} while Redis is unreachable and decisions are local.
    @ivar outages: outages begun since start.
    @ivar fallbacks: decisions taken locally because Redis did not answer in time.
    @ivar calls: calls sent to Redis.
    @ivar lateReplies: Redis replies that came after the decision had been taken locally.
    """

    backend: str = "local"
    available: bool = True
    outages: int = 0
    fallbacks: int = 0
    calls: int = 0
    lateReplies: int = 0

    def asDict(self) -> dict:
        return {
            "backend": self.backend,
            "available": self.available,
            "outages": self.outages,
            "fallbacks": self.fallbacks,
            "calls": self.calls,
            "lateReplies": self.lateReplies,
        }
