# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
The login penalty of an array: L{LoginPenalty}'s rules, counted in the shared state.

A failure is counted by one call to the store, which answers with the address's count (so the
delay escalates whichever node the attacker tries) and any lockout.  A success is one call too,
which clears the failures unless the user or address is locked out somewhere in the array; then
the login is refused although the password was right.  Lockouts the store reports are
remembered here until they end, so this node refuses the next attempt before any directory is
asked, as a single node does.  A successful login with a warm credential cache therefore costs
one round trip to the store, and a refused one at most one.
"""

from __future__ import annotations

from collections import OrderedDict

from casd.auth.penalty import RECENT, LoginPenalty
from casd.state import PenaltyReply
from casd.state.keys import KeyMaker


class SharedLoginPenalty(LoginPenalty):
    """
    A L{LoginPenalty} whose counts live in an L{casd.interfaces.ISharedState}.

    L{failed} returns a L{Deferred} of the delay and L{succeeded} a L{Deferred} of why the login
    must still be refused (or C{None}); L{locked} and L{currentDelay} answer from what this node
    learnt, at once.

    @ivar state: the L{casd.interfaces.ISharedState}.
    @ivar keys: the L{KeyMaker} that makes names unreadable to the store.
    """

    #: A success must still be asked of the array (a lockout elsewhere refuses it), so the
    #: authenticator's synchronous lane (L{Authenticator.loginNow}) is closed.
    asynchronous = True

    def __init__(self, clock, state, keys: KeyMaker, **kwargs) -> None:
        super().__init__(clock, **kwargs)
        self.state = state
        self.keys = keys
        self._locks: OrderedDict[str, float] = OrderedDict()
        self._counts: OrderedDict[str, int] = OrderedDict()

    @classmethod
    def fromConfig(cls, clock, auth, state=None, keys=None) -> SharedLoginPenalty:
        return cls(clock, state, keys, **cls.rulesOf(auth))

    def storeSettings(self) -> dict:
        """
        The rules the store's scripts apply, as L{casd.state.redis.RedisState} takes them.
        """
        return {
            "expiry": self.expiry,
            "userLockout": self.userLockout,
            "addressLockout": self.addressLockout,
            "lockoutDuration": self.lockoutDuration,
            "recent": RECENT,
        }

    # -- keys and what this node learnt ------------------------------------------------------

    def _userKey(self, username: str) -> str:
        return self.keys.key("u", username.lower())

    def _addressKey(self, client) -> str | None:
        return None if client.trusted else self.keys.key("a", self.addressKey(client.peerHost))

    def _remember(self, table: OrderedDict, key: str, value) -> None:
        table[key] = value
        table.move_to_end(key)
        while len(table) > self.maxEntries:
            table.popitem(last=False)

    def _lockedFor(self, key: str | None, now: float) -> float:
        if key is None:
            return 0.0
        until = self._locks.get(key)
        if until is None:
            return 0.0
        if until <= now:
            del self._locks[key]
            return 0.0
        return until - now

    def _learn(self, reply: PenaltyReply, userKey: str, addressKey: str | None) -> None:
        now = self.clock.seconds()
        if reply.userLockedFor:
            self._remember(self._locks, userKey, now + reply.userLockedFor)
        if addressKey is not None:
            if reply.addressLockedFor:
                self._remember(self._locks, addressKey, now + reply.addressLockedFor)
            if reply.addressCount:
                self._remember(self._counts, addressKey, reply.addressCount)
            else:
                self._counts.pop(addressKey, None)

    def _delayForCount(self, count: int) -> float:
        if not count or not self.initialDelay:
            return 0.0
        return min(self.initialDelay * 2 ** (count - 1), self.maxDelay)

    @staticmethod
    def _reason(what: str, seconds: float) -> str:
        return f"{what} locked out for {seconds:.0f} s after repeated failures (array-wide)"

    # -- the three events --------------------------------------------------------------------

    def locked(self, username: str, client) -> str | None:
        now = self.clock.seconds()
        seconds = self._lockedFor(self._userKey(username), now)
        if seconds:
            return self._reason("user", seconds)
        seconds = self._lockedFor(self._addressKey(client), now)
        if seconds:
            return self._reason(f"address {self.addressKey(client.peerHost)}", seconds)
        return None

    def currentDelay(self, client) -> float:
        key = self._addressKey(client)
        return 0.0 if key is None else self._delayForCount(self._counts.get(key, 0))

    def failed(self, username: str, password: bytes, client):
        """
        @return: a L{Deferred} firing with the delay before the failure may be answered.
        """
        userKey, addressKey = self._userKey(username), self._addressKey(client)
        d = self.state.loginFailed(userKey, addressKey, self.keys.tag(username, password))

        def counted(reply):
            now = self.clock.seconds()
            known = self._lockedFor(userKey, now) or self._lockedFor(addressKey, now)
            self._learn(reply, userKey, addressKey)
            if (reply.userLockedFor or reply.addressLockedFor) and not known:
                # Once per lockout and node, not for every attempt while it lasts.
                self.log.warn(
                    "login failures of {user!r} from {client}: locked out array-wide",
                    user=username.lower(),
                    client=self.addressKey(client.peerHost),
                )
            return 0.0 if addressKey is None else self._delayForCount(reply.addressCount)

        return d.addCallback(counted)

    def succeeded(self, username: str, client):
        """
        @return: a L{Deferred} firing with why the login must be refused after all (a lockout
            elsewhere in the array), or C{None}.
        """
        userKey, addressKey = self._userKey(username), self._addressKey(client)
        d = self.state.loginSucceeded(userKey, addressKey)

        def cleared(reply):
            self._learn(reply, userKey, addressKey)
            if reply.userLockedFor:
                return self._reason("user", reply.userLockedFor)
            if reply.addressLockedFor:
                return self._reason(f"address {self.addressKey(client.peerHost)}", reply.addressLockedFor)
            self._locks.pop(userKey, None)
            return None

        return d.addCallback(cleared)

    def stats(self) -> dict[str, int]:
        now = self.clock.seconds()
        return {
            "addresses": len(self._counts),
            "users": 0,
            "lockedAddresses": 0,
            "lockedUsers": 0,
            "lockouts": sum(1 for until in self._locks.values() if until > now),
        }
