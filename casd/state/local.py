# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
The shared state kept in this node's memory: the default, and the fallback while Redis is away.
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet import defer
from zope.interface import implementer

from casd.auth.penalty import LoginPenalty
from casd.interfaces import ISharedState
from casd.state import PenaltyReply

#: Keys remembered for sessions, rate counters and revocations before the oldest go.
MAX_KEYS = 100_000


@implementer(ISharedState)
class LocalState:
    """
    L{ISharedState} in memory, with the same rules as the Redis scripts: the penalty tables are a
    L{LoginPenalty}'s (keyed by the opaque keys it is given), session slots are leases, counters
    live for one window.

    @ivar penalty: the L{LoginPenalty} whose tables count failures.
    """

    def __init__(self, clock, penalty: LoginPenalty | None = None, lease: float = 60.0) -> None:
        self.clock = clock
        self.penalty = penalty if penalty is not None else LoginPenalty(clock)
        self.lease = lease
        self._slots: OrderedDict[str, dict[str, float]] = OrderedDict()
        self._hits: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._revoked: OrderedDict[str, float] = OrderedDict()

    # -- penalties ---------------------------------------------------------------------------

    def _lockedFor(self, state, now: float) -> float:
        return max(0.0, state.lockedUntil - now) if state is not None and state.lockedUntil else 0.0

    def loginFailed(self, userKey, addressKey, digest):
        p = self.penalty
        now = self.clock.seconds()
        user = p._state(p._users, userKey, now)
        p._count(user, digest, now, p.userLockout, "user")
        address = None
        if addressKey is not None:
            address = p._state(p._addresses, addressKey, now)
            p._count(address, digest, now, p.addressLockout, "address")
        return defer.succeed(
            PenaltyReply(
                userCount=user.count,
                addressCount=address.count if address is not None else 0,
                userLockedFor=self._lockedFor(user, now),
                addressLockedFor=self._lockedFor(address, now),
            )
        )

    def loginSucceeded(self, userKey, addressKey):
        p = self.penalty
        now = self.clock.seconds()
        user = p._fresh(p._users.get(userKey), now)
        address = p._fresh(p._addresses.get(addressKey), now) if addressKey is not None else None
        reply = PenaltyReply(
            userLockedFor=self._lockedFor(user, now), addressLockedFor=self._lockedFor(address, now)
        )
        if not (reply.userLockedFor or reply.addressLockedFor):
            p._users.pop(userKey, None)
            if addressKey is not None:
                p._addresses.pop(addressKey, None)
        return defer.succeed(reply)

    # -- session slots -----------------------------------------------------------------------

    def acquire(self, key, limit, token):
        now = self.clock.seconds()
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = {}
            while len(self._slots) > MAX_KEYS:
                self._slots.popitem(last=False)
        for t in [t for t, deadline in slots.items() if deadline <= now]:
            del slots[t]
        if token in slots or len(slots) < limit:
            slots[token] = now + self.lease
            return defer.succeed(True)
        return defer.succeed(False)

    def release(self, key, token):
        slots = self._slots.get(key)
        if slots is not None:
            slots.pop(token, None)
            if not slots:
                del self._slots[key]
        return defer.succeed(None)

    # -- counters and revocations ------------------------------------------------------------

    def hit(self, key, window):
        now = self.clock.seconds()
        start, count = self._hits.get(key, (now, 0))
        if now - start >= window:
            start, count = now, 0
        self._hits[key] = (start, count + 1)
        self._hits.move_to_end(key)
        while len(self._hits) > MAX_KEYS:
            self._hits.popitem(last=False)
        return defer.succeed(count + 1)

    def revoke(self, key, expiresAt):
        self._revoked[key] = expiresAt
        self._revoked.move_to_end(key)
        while len(self._revoked) > MAX_KEYS:
            self._revoked.popitem(last=False)
        return defer.succeed(None)

    def isRevoked(self, key):
        expiresAt = self._revoked.get(key)
        if expiresAt is not None and expiresAt <= self.clock.seconds():
            del self._revoked[key]
            expiresAt = None
        return defer.succeed(expiresAt is not None)
