# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
The shared state in Redis, through txredisapi (Twisted-native: the reactor never waits on it).

Every decision is one Lua script, so it is atomic across nodes and costs one round trip; every
key expires (failures after C{[auth] penalty_expiry}, lockouts after C{lockout_duration},
session slots after their lease, counters after their window, revocations at their end).
The scripts take the time from Redis (C{TIME}), so the nodes' clocks need not agree.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from zope.interface import implementer

from casd.interfaces import ISharedState
from casd.state import PenaltyReply

# KEYS: the user's key, then (unless the client is trusted) the address's key.
# ARGV: the credential tag, expiry ms, user threshold, address threshold, lockout ms, recent.
# Per key: BASE:n the distinct failures, BASE:r the recent tags, BASE:L the lockout.
FAILED = """
local function count(base, tag, expiry, threshold, lockMs, recent)
  local locked = redis.call('PTTL', base .. ':L')
  local n
  if redis.call('LPOS', base .. ':r', tag) then
    n = tonumber(redis.call('GET', base .. ':n') or '0')
  else
    redis.call('LPUSH', base .. ':r', tag)
    redis.call('LTRIM', base .. ':r', 0, recent - 1)
    n = redis.call('INCR', base .. ':n')
  end
  local keep = expiry
  if locked > 0 then
    keep = locked
  elseif threshold > 0 and n >= threshold then
    redis.call('SET', base .. ':L', '1', 'PX', lockMs)
    locked = lockMs
    keep = lockMs
  else
    locked = 0
  end
  redis.call('PEXPIRE', base .. ':n', keep)
  redis.call('PEXPIRE', base .. ':r', keep)
  return {n, locked}
end
local expiry, lockMs, recent = tonumber(ARGV[2]), tonumber(ARGV[5]), tonumber(ARGV[6])
local u = count(KEYS[1], ARGV[1], expiry, tonumber(ARGV[3]), lockMs, recent)
local a = {0, 0}
if #KEYS > 1 then
  a = count(KEYS[2], ARGV[1], expiry, tonumber(ARGV[4]), lockMs, recent)
end
return {u[1], a[1], u[2], a[2]}
"""

# KEYS as for FAILED.  A lockout survives a right password; otherwise the failures are cleared.
SUCCEEDED = """
local u = redis.call('PTTL', KEYS[1] .. ':L')
local a = -2
if #KEYS > 1 then a = redis.call('PTTL', KEYS[2] .. ':L') end
if u > 0 or a > 0 then return {math.max(u, 0), math.max(a, 0)} end
redis.call('DEL', KEYS[1] .. ':n', KEYS[1] .. ':r')
if #KEYS > 1 then redis.call('DEL', KEYS[2] .. ':n', KEYS[2] .. ':r') end
return {0, 0}
"""

# KEYS: the slot set.  ARGV: limit, token, lease ms.  A slot is a member whose score is the end
# of its lease; a node renews the leases of its open sessions, so a node that dies (kill -9)
# frees its slots when their leases end.
ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[2]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 1
end
return 0
"""

# KEYS: the counter.  ARGV: the window in ms.
HIT = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1])) end
return n
"""


class _Script:
    """
    A Lua script run by its SHA1 (C{EVALSHA}: the script's text crosses the wire once), loaded
    again when a server answers C{NOSCRIPT} (after a restart or a failover).
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    def __call__(self, connection, keys, args):
        d = connection.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)
        d.addErrback(self._reload, connection, keys, args)
        return d

    def _reload(self, failure, connection, keys, args):
        if "NOSCRIPT" not in str(failure.value):
            return failure
        return connection.execute_command("EVAL", self.text, len(keys), *keys, *args)


class RedisURLError(ValueError):
    """
    A C{[state] urls} entry is not a C{redis://} or C{rediss://} URL.
    """


def parseURL(url: str) -> dict:
    """
    @return: C{host}, C{port}, C{db}, C{tls} and C{password} (C{None} when the URL has none) of
        a C{redis://[:PASSWORD@]HOST[:PORT][/DB]} or C{rediss://} (TLS) URL.
    @raise RedisURLError: when it is not one.
    """
    # An error never repeats a password given in the URL.
    shown = repr(re.sub(r"//[^/@]*@", "//(credentials)@", url))
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise RedisURLError(f"expected redis://HOST[:PORT][/DB], got {shown} ({e})") from None
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise RedisURLError(f"expected redis://HOST[:PORT][/DB] or rediss://..., got {shown}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise RedisURLError(f"expected a database number after the /, got {shown}")
    return {
        "host": parts.hostname,
        "port": port or 6379,
        "db": int(path) if path else 0,
        "tls": parts.scheme == "rediss",
        "password": unquote(parts.password) if parts.password else None,
    }


def connect(url: str, password=None, tlsOptions=None, connectTimeout=2.0, replyTimeout=2.0):
    """
    A lazy, self-reconnecting txredisapi connection to C{url}.

    @param password: the password (C{[state] password_file}); else the URL's.
    @param tlsOptions: C{callable(host) -> IOpenSSLClientConnectionCreator} for C{rediss://}.
    """
    import txredisapi

    where = parseURL(url)
    tls = tlsOptions(where["host"]) if where["tls"] and tlsOptions is not None else where["tls"]
    connection = txredisapi.lazyConnectionPool(
        host=where["host"],
        port=where["port"],
        # No SELECT for database 0 (the default): one command less on every (re)connection.
        dbid=where["db"] or None,
        poolsize=1,
        reconnect=True,
        password=password or where["password"],
        ssl_context_factory=tls,
        connectTimeout=connectTimeout,
        replyTimeout=replyTimeout,
        convertNumbers=True,
    )
    # A failed connection set-up (AUTH refused, or the link lost during it) fails this Deferred,
    # which nobody else waits on; the fallback logs the outage once instead.
    connection._connected.addErrback(lambda f: None)
    return connection


def _givenUp(connection) -> bool:
    """
    Whether txredisapi stopped reconnecting C{connection} on its own: it does so for good when
    a connection's set-up (C{AUTH}, C{SELECT}) fails, even when the link was only lost meanwhile
    (a Redis restarting).  Private attributes of txredisapi 1.6, read defensively.
    """
    factory = getattr(connection, "_factory", None)
    return bool(
        factory is not None
        and getattr(factory, "stopped", False)
        and not getattr(factory, "disconnectCalled", False)
    )


_FAILED, _SUCCEEDED, _ACQUIRE, _HIT = (_Script(t) for t in (FAILED, SUCCEEDED, ACQUIRE, HIT))


@implementer(ISharedState)
class RedisState:
    """
    L{ISharedState} in Redis.

    @ivar connections: one lazy connection per configured server; the first is used until
        L{failover} moves on to the next (a replica promoted by Sentinel, say).
    @ivar makers: one C{callable() -> connection} per server, for L{revive}.
    """

    def __init__(
        self,
        connections,
        makers=(),
        expiry: float = 900.0,
        userLockout: int = 0,
        addressLockout: int = 0,
        lockoutDuration: float = 900.0,
        recent: int = 8,
        lease: float = 60.0,
    ) -> None:
        self.connections = list(connections)
        self.makers = list(makers)
        self.current = 0
        self._penaltyArgs = (
            int(expiry * 1000),
            userLockout,
            addressLockout,
            int(lockoutDuration * 1000),
            recent,
        )
        self.leaseMs = int(lease * 1000)

    @property
    def connection(self):
        return self.connections[self.current]

    def failover(self) -> None:
        """
        Use the next configured server from now on.
        """
        if self.connections:
            self.current = (self.current + 1) % len(self.connections)

    def revive(self) -> bool:
        """
        Replace the current connection if txredisapi gave it up (see L{_givenUp}).

        @return: whether it was replaced.
        """
        if not self.connections or not self.makers or not _givenUp(self.connection):
            return False
        self.connections[self.current] = self.makers[self.current]()
        return True

    def _keys(self, userKey, addressKey):
        return [userKey] if addressKey is None else [userKey, addressKey]

    def loginFailed(self, userKey, addressKey, digest):
        d = _FAILED(
            self.connection, self._keys(userKey, addressKey), [digest, *self._penaltyArgs]
        )
        d.addCallback(
            lambda r: PenaltyReply(
                userCount=int(r[0]),
                addressCount=int(r[1]),
                userLockedFor=int(r[2]) / 1000.0,
                addressLockedFor=int(r[3]) / 1000.0,
            )
        )
        return d

    def loginSucceeded(self, userKey, addressKey):
        d = _SUCCEEDED(self.connection, self._keys(userKey, addressKey), [])
        d.addCallback(
            lambda r: PenaltyReply(userLockedFor=int(r[0]) / 1000.0, addressLockedFor=int(r[1]) / 1000.0)
        )
        return d

    def acquire(self, key, limit, token):
        d = _ACQUIRE(self.connection, [key], [limit, token, self.leaseMs])
        d.addCallback(lambda r: bool(int(r)))
        return d

    def release(self, key, token):
        d = self.connection.zrem(key, token)
        d.addCallback(lambda _: None)
        return d

    def hit(self, key, window):
        d = _HIT(self.connection, [key], [int(window * 1000)])
        d.addCallback(int)
        return d

    def revoke(self, key, expiresAt):
        # PXAT is the absolute end, so an entry never outlives the token it revokes.
        d = self.connection.execute_command("SET", key, "1", "PXAT", int(expiresAt * 1000))
        d.addCallback(lambda _: None)
        return d

    def isRevoked(self, key):
        d = self.connection.exists(key)
        d.addCallback(lambda r: bool(int(r)))
        return d

    def ping(self):
        """
        @return: a L{Deferred} firing once the current server answered a C{PING}.
        """
        return self.connection.ping()

    def close(self):
        """
        Disconnect from every server.
        """
        return defer.DeferredList(
            [defer.maybeDeferred(c.disconnect) for c in self.connections], consumeErrors=True
        )
