# -*- test-case-name: tests.test_auth,tests.test_cache_outage -*-
"""
The credential cache, shared by every checker: a login storm (thousands of logins a minute at
Monday 9:00, clients reconnecting every few minutes) must not become as many LDAP binds or bcrypt
verifications.

A success is remembered for C{ttl} seconds under the user's name together with a keyed digest of
the password (HMAC-SHA256 with a key drawn at random when the process starts and never written
anywhere): a later login is answered from the cache only with the very same password, so a changed
password can never ride on a stale success, and the cache holds nothing an attacker could test
passwords against offline without the process's memory.  A refusal is remembered briefly
(C{negativeTTL}) under name and digest, so a client repeating a wrong password does not hammer the
directory.  Directory trouble is never cached.  Concurrent identical logins share one check.

The cache is bounded (least recently used entries go first) and keeps hit and miss counters.

Trade-offs, documented for operators: after a password change the I{old} password keeps working
until its cached success expires (at most C{ttl} seconds), as with Dovecot's auth cache; a deleted
or disabled account keeps logging in, and a look-up keeps finding it, for as long.

While the directory fails (the last query to it failed with anything but a refusal),
L{CachingChecker} answers from cached successes only when C{serveDuringOutage} is set
(C{[auth] cache_during_outage}): users who logged in within C{ttl} keep working through a
directory outage.  Without it, every login during an outage goes to the directory and gets its
temporary failure; the cache answers again once the directory does.
"""

from __future__ import annotations

import hmac
import os
from collections import OrderedDict

from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from casd.interfaces import IUserDirectory, IUserRecordChecker


def credentialDigest(key: bytes, username: str, password: bytes) -> bytes:
    """
    A keyed digest of a login and password: equal for equal inputs within one process, useless
    without C{key}.
    """
    message = username.lower().encode("utf-8", "surrogatepass") + b"\x00" + password
    # hmac.digest: one call into OpenSSL's HMAC, the same bytes as hmac.new(...).digest().
    return hmac.digest(key, message, "sha256")


class CredentialCache:
    """
    Remembers login results.

    @ivar hits: logins answered from a cached success.
    @ivar negativeHits: logins answered from a cached refusal.
    @ivar misses: logins that went to the checker.
    @ivar coalesced: logins that waited for an identical login already in progress.
    @ivar evictions: entries dropped to stay within C{maxSize}.
    """

    def __init__(
        self,
        clock,
        ttl: float = 300.0,
        negativeTTL: float = 20.0,
        maxSize: int = 100_000,
        key: bytes | None = None,
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.negativeTTL = negativeTTL
        self.maxSize = maxSize
        self._key = key if key is not None else os.urandom(32)
        # ("+", name) -> (digest, result, expiry); ("-", name, digest) -> (reason, expiry);
        # ("?", name) -> (record or None, expiry) for look-ups without a password.
        self._entries: OrderedDict = OrderedDict()
        self.hits = self.negativeHits = self.misses = self.coalesced = self.evictions = 0
        self.lookupHits = self.lookupMisses = 0

    def __repr__(self) -> str:
        return f"<CredentialCache size={len(self._entries)} hits={self.hits} misses={self.misses}>"

    def digest(self, username: str, password: bytes) -> bytes:
        return credentialDigest(self._key, username, password)

    def stats(self) -> dict[str, int]:
        """
        @return: the counters and the current size, for monitoring and tests.
        """
        return {
            "size": len(self._entries),
            "hits": self.hits,
            "negativeHits": self.negativeHits,
            "misses": self.misses,
            "coalesced": self.coalesced,
            "evictions": self.evictions,
            "lookupHits": self.lookupHits,
            "lookupMisses": self.lookupMisses,
        }

    def _get(self, key):
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[-1] <= self.clock.seconds():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def _put(self, key, *value) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.maxSize:
            self._entries.popitem(last=False)
            self.evictions += 1

    def get(self, username: str, password: bytes, digest: bytes | None = None):
        """
        @return: C{(True, avatarId)} for a cached success with this password, C{(False, reason)}
            for a cached refusal, or C{None}.
        """
        name = username.lower()
        digest = digest or self.digest(username, password)
        positive = self._get(("+", name))
        if positive is not None and hmac.compare_digest(positive[0], digest):
            return True, positive[1]
        negative = self._get(("-", name, digest))
        if negative is not None:
            return False, negative[0]
        return None

    def success(self, username: str, password: bytes):
        """
        The cached success for this name and password, if any: the synchronous question of the
        login path's fast lane (L{CachingChecker.cachedSuccess}).  Counts nothing.

        @return: the avatar ID, or C{None}.
        """
        found = self.successEntry(username, password)
        return found[0] if found is not None else None

    def successEntry(self, username: str, password: bytes):
        """
        Like L{success}, with the cache's entry itself, for L{holds}.

        @return: C{(avatarId, entry)}, or C{None}.
        """
        # _get() inline: this is every cached login's question.
        entries = self._entries
        key = ("+", username.lower())
        positive = entries.get(key)
        if positive is None:
            return None
        if positive[-1] <= self.clock.seconds():
            del entries[key]
            return None
        entries.move_to_end(key)
        if hmac.compare_digest(positive[0], self.digest(username, password)):
            return positive[1], positive
        return None

    def holds(self, username: str, entry) -> bool:
        """
        Whether the success C{entry} (from L{successEntry}) is still the cached one for
        C{username}: not expired, not replaced (another password, a refusal of this one), not
        evicted or dropped.  Asks no digest: a caller that saw the same credentials answered
        by C{entry} knows they are still answered.
        """
        return self._get(("+", username.lower())) is entry

    def putSuccess(self, username: str, digest: bytes, avatarId) -> None:
        if self.ttl > 0:
            name = username.lower()
            self._entries.pop(("-", name, digest), None)
            self._put(("+", name), digest, avatarId, self.clock.seconds() + self.ttl)

    def putFailure(self, username: str, digest: bytes, reason: str) -> None:
        if self.negativeTTL > 0:
            self._put(("-", username.lower(), digest), reason, self.clock.seconds() + self.negativeTTL)

    def getLookup(self, name: str):
        """
        @return: C{(record or None,)} when cached, else C{None}.
        """
        entry = self._get(("?", name.lower()))
        return None if entry is None else (entry[0],)

    def putLookup(self, name: str, record) -> None:
        ttl = self.ttl if record is not None else self.negativeTTL
        if ttl > 0:
            self._put(("?", name.lower()), record, self.clock.seconds() + ttl)

    def clear(self) -> None:
        self._entries.clear()


@implementer(ICredentialsChecker, IUserRecordChecker, IUserDirectory)
class CachingChecker:
    """
    Puts a L{CredentialCache} in front of a checker (and of its look-ups).

    @ivar serveDuringOutage: whether cached successes and look-ups answer while the directory
        fails (C{[auth] cache_during_outage}).
    @ivar directoryFailing: whether the last query to the checker failed with anything but a
        refusal; the next one that does not clears it.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(self, checker, cache: CredentialCache, serveDuringOutage: bool = True) -> None:
        self.checker = checker
        self.cache = cache
        self.serveDuringOutage = serveDuringOutage
        self.directoryFailing = False
        self._inFlight: dict[bytes, list[defer.Deferred]] = {}

    def _cacheAnswers(self) -> bool:
        return self.serveDuringOutage or not self.directoryFailing

    def _observe(self, result):
        """
        Follow the directory's state from the result of a query to it.
        """
        failing = isinstance(result, Failure) and not result.check(UnauthorizedLogin)
        if failing and not self.directoryFailing:
            self.directoryFailing = True
            self.log.warn(
                "directory failing ({reason}): {what}",
                reason=result.getErrorMessage() or result.type.__name__,
                what="logins and look-ups cached within cache_ttl are answered from the cache"
                if self.serveDuringOutage
                else "the cache does not answer until it is back (cache_during_outage = false)",
            )
        elif not failing and self.directoryFailing:
            self.directoryFailing = False
            self.log.info("directory answering again")
        return result

    def requestAvatarId(self, credentials):
        cache = self.cache
        username, password = credentials.username, credentials.password
        digest = cache.digest(username, password)
        cached = cache.get(username, password, digest) if self._cacheAnswers() else None
        if cached is not None:
            ok, value = cached
            if ok:
                cache.hits += 1
                return defer.succeed(value)
            cache.negativeHits += 1
            return defer.fail(UnauthorizedLogin(f"{value} (cached)"))
        waiters = self._inFlight.get(digest)
        if waiters is not None:
            cache.coalesced += 1
            waiter = defer.Deferred()
            waiters.append(waiter)
            return waiter
        cache.misses += 1
        self._inFlight[digest] = []

        def done(result):
            waiters = self._inFlight.pop(digest, [])
            if isinstance(result, Failure):
                if result.check(UnauthorizedLogin):
                    cache.putFailure(username, digest, str(result.value) or "refused")
                for waiter in waiters:
                    waiter.errback(result)
            else:
                cache.putSuccess(username, digest, result)
                for waiter in waiters:
                    waiter.callback(result)
            return result

        d = defer.maybeDeferred(self.checker.requestAvatarId, credentials)
        return d.addBoth(self._observe).addBoth(done)

    def cachedSuccess(self, credentials):
        """
        The avatar ID of a success the cache holds for C{credentials}, answered at once (no
        L{Deferred}, no checker): what L{casd.auth.authenticator.Authenticator.loginNow} asks.
        A hit is counted; anything else (a miss, a cached refusal) counts nothing and is left to
        L{requestAvatarId}.

        @return: the avatar ID, or C{None} (also while the directory fails and the cache must not
            answer: C{cache_during_outage = false}).
        """
        found = self.cachedSuccessEntry(credentials)
        return found[0] if found is not None else None

    def cachedSuccessEntry(self, credentials):
        """
        L{cachedSuccess}, with the cache's entry for L{stillCached}.

        @return: C{(avatarId, entry)}, or C{None}.
        """
        if self.directoryFailing and not self.serveDuringOutage:  # not _cacheAnswers()
            return None
        found = self.cache.successEntry(credentials.username, credentials.password)
        if found is not None:
            self.cache.hits += 1
        return found

    def stillCached(self, username: str, entry) -> bool:
        """
        Whether the cache would still answer the credentials that C{entry} answered (the same
        rules as L{cachedSuccess}: not while it must not answer), counted as a hit.
        """
        if not self._cacheAnswers() or not self.cache.holds(username, entry):
            return False
        self.cache.hits += 1
        return True

    def lookup(self, name: str):
        cached = self.cache.getLookup(name) if self._cacheAnswers() else None
        if cached is not None:
            self.cache.lookupHits += 1
            return defer.succeed(cached[0])
        self.cache.lookupMisses += 1

        def found(record):
            self.cache.putLookup(name, record)
            return record

        d = defer.maybeDeferred(self.checker.lookup, name).addBoth(self._observe)
        return d.addCallback(found)

    def close(self):
        close = getattr(self.checker, "close", None)
        return close() if close is not None else defer.succeed(None)
