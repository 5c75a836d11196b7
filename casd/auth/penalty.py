# -*- test-case-name: tests.test_auth -*-
"""
Brute-force defence, in the spirit of Dovecot's auth penalty.

  - A failed login is answered after a delay that grows with the failures of the client's address
    (an IPv6 address counts by its prefix, C{/64} by default): C{initialDelay} for the first,
    doubling with each further one up to C{maxDelay} (2, 4, 8, 15, 15 ... seconds by default).
    The delay is a timer (the caller waits on L{twisted.internet.task.deferLater}); the reactor
    never blocks.
  - The same wrong password for the same user repeated (a client retrying with a stale saved
    password) does not escalate: only distinct failures count.
  - Past C{addressLockout} distinct failures an address is locked out, past C{userLockout} a user
    name is, for C{lockoutDuration} seconds: logins are then refused before any directory sees
    them (which also keeps Active Directory's own lockout from locking the real user out).
  - Trusted clients (C{[server] trusted_networks}, trusted listeners) get no delay and no address
    accounting, since one of them speaks for many users; the per-user lockout still applies.
  - A success clears the address's and the user's penalty.  Failures older than C{expiry} seconds
    are forgotten.  The tables are bounded (least recently failing entries go first).

Lockout is a denial-of-service lever (anyone can lock a user name out by failing on purpose):
the thresholds are generous by default and can be set to 0 to disable it.
"""

from __future__ import annotations

import ipaddress
import os
from collections import OrderedDict, deque

from twisted.logger import Logger

from casd.auth.cache import credentialDigest
from casd.net import parseAddress

#: Distinct recent failures remembered per address and per user, to spot repeats.
RECENT = 8


class _State:
    __slots__ = ("count", "last", "lockedUntil", "recent")

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.lockedUntil = 0.0
        self.recent: deque = deque(maxlen=RECENT)


class LoginPenalty:
    """
    Failure accounting per address and per user.
    """

    log = Logger()

    def __init__(
        self,
        clock,
        initialDelay: float = 2.0,
        maxDelay: float = 15.0,
        ipv4Prefix: int = 32,
        ipv6Prefix: int = 64,
        expiry: float = 900.0,
        userLockout: int = 0,
        addressLockout: int = 0,
        lockoutDuration: float = 900.0,
        maxEntries: int = 100_000,
        key: bytes | None = None,
    ) -> None:
        self.clock = clock
        self.initialDelay = initialDelay
        self.maxDelay = max(maxDelay, initialDelay)
        self.ipv4Prefix = ipv4Prefix
        self.ipv6Prefix = ipv6Prefix
        self.expiry = expiry
        self.userLockout = userLockout
        self.addressLockout = addressLockout
        self.lockoutDuration = lockoutDuration
        self.maxEntries = maxEntries
        self._key = key if key is not None else os.urandom(32)
        self._addresses: OrderedDict[str, _State] = OrderedDict()
        self._users: OrderedDict[str, _State] = OrderedDict()

    @classmethod
    def fromConfig(cls, clock, auth) -> LoginPenalty:
        """
        @param auth: the validated C{[auth]} section.
        """
        return cls(clock, **cls.rulesOf(auth))

    @staticmethod
    def rulesOf(auth) -> dict:
        """
        @return: the keyword arguments of the penalty's rules in the C{[auth]} section.
        """
        return dict(
            initialDelay=auth.failure_delay,
            maxDelay=auth.failure_delay_max,
            ipv4Prefix=auth.penalty_ipv4_prefix,
            ipv6Prefix=auth.penalty_ipv6_prefix,
            expiry=auth.penalty_expiry,
            userLockout=auth.user_lockout_threshold,
            addressLockout=auth.address_lockout_threshold,
            lockoutDuration=auth.lockout_duration,
            maxEntries=auth.penalty_max_entries,
        )

    #: host -> ((IPv4 prefix, IPv6 prefix), key): L{addressKey}'s answers (parsing an address
    #: and its network is about 75 Python calls; every login of an untrusted client asks).
    _addressKeys = None
    _ADDRESS_KEYS_MAX = 4096

    def addressKey(self, host: str) -> str:
        """
        The key an address counts under: its network of the configured prefix length.
        """
        prefixes = (self.ipv4Prefix, self.ipv6Prefix)
        known = self._addressKeys
        if known is None:
            known = self._addressKeys = {}
        else:
            found = known.get(host)
            if found is not None and found[0] == prefixes:
                return found[1]
        ip = parseAddress(host)
        if ip is None:
            key = host
        else:
            prefix = prefixes[0] if ip.version == 4 else prefixes[1]
            key = str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        if len(known) >= self._ADDRESS_KEYS_MAX:
            known.clear()
        known[host] = (prefixes, key)
        return key

    # -- tables -----------------------------------------------------------------------------

    def _fresh(self, state: _State | None, now: float) -> _State | None:
        """
        Forget what expired: a lockout past its end, failures older than C{expiry}.
        """
        if state is None:
            return None
        if state.lockedUntil and state.lockedUntil <= now:
            state.lockedUntil = 0.0
            state.count = 0
            state.recent.clear()
        if state.count and now - state.last > self.expiry and not state.lockedUntil:
            state.count = 0
            state.recent.clear()
        return state

    def _state(self, table: OrderedDict, key: str, now: float) -> _State:
        state = self._fresh(table.get(key), now)
        if state is None:
            state = table[key] = _State()
        table.move_to_end(key)
        while len(table) > self.maxEntries:
            table.popitem(last=False)
        return state

    def _delayOf(self, state: _State | None) -> float:
        if state is None or not state.count or not self.initialDelay:
            return 0.0
        return min(self.initialDelay * 2 ** (state.count - 1), self.maxDelay)

    @property
    def idle(self) -> bool:
        """
        Whether no user and no address has a failure remembered: L{locked} is then C{None} and
        L{succeeded} has nothing to reset (a login's fast lane skips both, and the address
        parsing they do).
        """
        return not self._users and not self._addresses

    # -- the three events -------------------------------------------------------------------

    def locked(self, username: str, client) -> str | None:
        """
        @return: why a login must be refused before it is checked, or C{None}.
        """
        now = self.clock.seconds()
        user = self._fresh(self._users.get(username.lower()), now)
        if user is not None and user.lockedUntil:
            return f"user locked out for {user.lockedUntil - now:.0f} s after repeated failures"
        if not client.trusted:
            address = self._fresh(self._addresses.get(self.addressKey(client.peerHost)), now)
            if address is not None and address.lockedUntil:
                return (
                    f"address {self.addressKey(client.peerHost)} locked out for"
                    f" {address.lockedUntil - now:.0f} s after repeated failures"
                )
        return None

    def currentDelay(self, client) -> float:
        """
        The delay a failure from C{client} would be answered after now, without counting one.
        """
        if client.trusted:
            return 0.0
        now = self.clock.seconds()
        return self._delayOf(self._fresh(self._addresses.get(self.addressKey(client.peerHost)), now))

    def _count(self, state: _State, digest: bytes, now: float, threshold: int, what: str) -> None:
        state.last = now
        if digest in state.recent:
            return
        state.recent.append(digest)
        state.count += 1
        if threshold and state.count >= threshold and not state.lockedUntil:
            state.lockedUntil = now + self.lockoutDuration
            self.log.warn(
                "{what} locked out for {duration:g} s after {count} failed logins",
                what=what,
                duration=self.lockoutDuration,
                count=state.count,
            )

    def failed(self, username: str, password: bytes, client) -> float:
        """
        Count a failed login.

        @return: the delay, in seconds, before the failure may be answered.
        """
        now = self.clock.seconds()
        digest = credentialDigest(self._key, username, password)
        user = self._state(self._users, username.lower(), now)
        self._count(user, digest, now, self.userLockout, f"user {username.lower()!r}")
        if client.trusted:
            return 0.0
        key = self.addressKey(client.peerHost)
        address = self._state(self._addresses, key, now)
        self._count(address, digest, now, self.addressLockout, f"address {key}")
        return self._delayOf(address)

    def succeeded(self, username: str, client) -> None:
        """
        A login succeeded: its user and address start afresh.
        """
        self._users.pop(username.lower(), None)
        if not client.trusted:
            self._addresses.pop(self.addressKey(client.peerHost), None)

    def stats(self) -> dict[str, int]:
        now = self.clock.seconds()
        return {
            "addresses": len(self._addresses),
            "users": len(self._users),
            "lockedAddresses": sum(1 for s in self._addresses.values() if s.lockedUntil > now),
            "lockedUsers": sum(1 for s in self._users.values() if s.lockedUntil > now),
        }
