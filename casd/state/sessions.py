# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
Per-user session limits (C{max_sessions_per_user}), counted in the shared state so that they
hold across an array: a POP3 user's second session is refused with C{-ERR [IN-USE]} whichever
node it reaches.
"""

from __future__ import annotations

import itertools
import os

from twisted.internet import defer
from twisted.logger import Logger

#: The limit passed when renewing a slot this node already holds: it is never refused.
_RENEW = 2**31 - 1


class SessionLimiter:
    """
    Takes and gives back per-user session slots, and renews the leases of the slots this node
    holds (L{renew}, every third of the lease), so that a node that dies frees its slots.

    @ivar state: the L{casd.interfaces.ISharedState}.
    @ivar keys: the L{casd.state.keys.KeyMaker}.
    """

    log = Logger()

    def __init__(self, state, keys) -> None:
        self.state = state
        self.keys = keys
        self._node = os.urandom(6).hex()
        self._serial = itertools.count(1)
        self._held: dict[str, str] = {}

    def acquire(self, protocol: str, username: str, limit: int):
        """
        @return: a L{Deferred} firing with a token for L{release} when a slot was free, else
            C{None}.
        """
        key = self.keys.key(f"s:{protocol}", username.lower())
        token = f"{self._node}:{next(self._serial)}"

        def answered(taken):
            if not taken:
                return None
            self._held[token] = key
            return token

        return self.state.acquire(key, limit, token).addCallback(answered)

    def release(self, token: str) -> None:
        key = self._held.pop(token, None)
        if key is not None:
            self.state.release(key, token).addErrback(
                lambda f: self.log.failure("could not release a session slot", f)
            )

    def held(self) -> int:
        return len(self._held)

    def renew(self):
        """
        Extend the lease of every slot this node holds.
        """
        calls = [self.state.acquire(key, _RENEW, token) for token, key in list(self._held.items())]
        return defer.DeferredList(calls, consumeErrors=True)
