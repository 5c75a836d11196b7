# -*- test-case-name: tests.test_http_cookies -*-
"""
The forms-login session cookie: sealed with AES-GCM under a key list the array shares.

A cookie holds the user (the directory's L{casd.auth.UserRecord}, so that a request needs no
directory look-up), a random token ID, the issue time, the time of the last user activity and the
public/private choice.  It is encrypted and authenticated: a client can neither read nor change it.
Any node holding the same key files reads any node's cookie, so an array needs no affinity.

Keys: the first key of the list seals, every key opens (each sealed cookie names its key by a short
ID derived from the key).  Rotation without logging anyone out: add the new key I{second} on every
node, then, once every node has it, move it first; drop the old key after the longest inactivity
limit has passed.

Expiry is by inactivity: a cookie whose last activity is older than the public or private limit is
refused.  Only foreground requests slide the last activity forward (see L{isBackground}), and only
once per C{refreshAfter} seconds, so most responses carry no C{Set-Cookie}.  Logoff adds the token
ID to an L{casd.interfaces.IRevocationSet} until the moment the cookie would have expired anyway.

The cookie value is a credential: it is never logged, never put in an error, never forwarded to a
backend (L{stripCookies}).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import re
from typing import Iterable, Sequence

from attrs import evolve, frozen
from zope.interface import implementer

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.internet import defer

from casd import nodesecret
from casd.keyfiles import keyLines
from casd.auth import UserRecord
from casd.interfaces import IRevocationSet
from casd.service.nodeshare import RelayedRevocationSet

#: The format byte at the start of every sealed value.
_VERSION = b"\x01"
_KEY_ID_LEN = 4
_NONCE_LEN = 12

#: Default inactivity limits, in seconds (Exchange's C{PublicTimeout} and C{PrivateTimeout}).
PUBLIC_TIMEOUT = 15 * 60
PRIVATE_TIMEOUT = 8 * 3600

#: Requests whose path and query match one of these are background requests by default: they
#: keep a session alive only as long as the user is active elsewhere.  Roundcube's refresh and
#: keep-alive, OWA's notification channel and unread-count polls.
DEFAULT_BACKGROUND_PATTERNS = (
    r"[?&]_action=(?:refresh|keep-alive)(?:&|$)",
    r"/ev\.owa(?:[/?]|$)",
    r"[?&]action=(?:GetUnreadCount|Ping|KeepAlive)(?:&|$)",
)


class CookieKeyError(ValueError):
    """
    A key file could not be read or holds no valid key.  The message names the file and line,
    never the key material.
    """


def keyID(key: bytes) -> bytes:
    """
    @return: the short public ID of C{key}: it tells which key sealed a cookie without revealing
        anything about the key.
    """
    return hmac.new(key, b"casd forms cookie key id", hashlib.sha256).digest()[:_KEY_ID_LEN]


def _b64decode(text: str) -> bytes:
    text = text.strip()
    padded = text + "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(padded.encode("ascii"))
        return base64.b64decode(padded.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise ValueError("not base64") from e


def readKeyFile(path: str) -> list[bytes]:
    """
    Read one key file: one key per line, base64 of 16, 24 or 32 random bytes (C{openssl rand
    -base64 32}); blank lines and lines starting with C{#} are ignored.

    @raise CookieKeyError: when the file cannot be read or a line is not a key.
    """
    keys = []
    for number, line in keyLines(path, lambda why: CookieKeyError(f"{path}: {why}")):
        try:
            key = _b64decode(line)
        except ValueError:
            raise CookieKeyError(f"{path}, line {number}: not a base64 key") from None
        if len(key) not in (16, 24, 32):
            raise CookieKeyError(
                f"{path}, line {number}: a key must be 16, 24 or 32 bytes, not {len(key)}"
            )
        keys.append(key)
    if not keys:
        raise CookieKeyError(f"{path}: no key in the cookie key file")
    return keys


class CookieKeys:
    """
    The key list: the first key seals, every key opens.
    """

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise CookieKeyError("the cookie key list is empty")
        self._sealer = (keyID(keys[0]), AESGCM(keys[0]))
        self._openers = {}
        for key in keys:
            self._openers.setdefault(keyID(key), AESGCM(key))

    @classmethod
    def fromFiles(cls, paths: Iterable[str]) -> "CookieKeys":
        """
        Keys from key files, in order (the first key of the first file seals).
        """
        keys: list[bytes] = []
        for path in paths:
            keys.extend(readKeyFile(path))
        return cls(keys)

    @classmethod
    def generate(cls) -> "CookieKeys":
        """
        One fresh random key: for a single node without key files (cookies die with the process).
        """
        return cls([AESGCM.generate_key(bit_length=256)])

    @classmethod
    def forNode(cls) -> "CookieKeys":
        """
        The node's key when no key file is configured: under C{--workers N}, derived from the
        node secret (L{casd.nodesecret}), so every worker of the node opens every other's
        cookies; in a single process, L{generate}'s.
        """
        key = nodesecret.derivedKey(nodesecret.FORMS_COOKIE_KEY)
        return cls.generate() if key is None else cls([key])

    def seal(self, plaintext: bytes, aad: bytes) -> str:
        """
        @return: the sealed value, URL-safe base64 without padding (a valid cookie value).
        """
        kid, aead = self._sealer
        nonce = os.urandom(_NONCE_LEN)
        header = _VERSION + kid
        sealed = header + nonce + aead.encrypt(nonce, plaintext, header + aad)
        return base64.urlsafe_b64encode(sealed).rstrip(b"=").decode("ascii")

    def open(self, value: str, aad: bytes) -> bytes | None:
        """
        @return: the plaintext, or C{None} when C{value} is malformed, tampered with or sealed
            with a key not in the list.
        """
        try:
            raw = _b64decode(value)
        except ValueError:
            return None
        header = raw[: 1 + _KEY_ID_LEN]
        if len(raw) < 1 + _KEY_ID_LEN + _NONCE_LEN + 16 or header[:1] != _VERSION:
            return None
        aead = self._openers.get(header[1:])
        if aead is None:
            return None
        nonce = raw[len(header) : len(header) + _NONCE_LEN]
        try:
            return aead.decrypt(nonce, raw[len(header) + _NONCE_LEN :], header + aad)
        except InvalidTag:
            return None


@frozen
class FormsSession:
    """
    What a forms cookie says.

    @ivar user: the authenticated user (the avatar the request goes on with).
    @ivar tokenId: random, unique per logon; the revocation key.
    @ivar issuedAt: POSIX time of the logon.
    @ivar lastActivity: POSIX time of the last foreground request.
    @ivar public: C{True} for "this is a public or shared computer" (the short limit).
    """

    user: UserRecord
    tokenId: str
    issuedAt: int
    lastActivity: int
    public: bool

    def toBytes(self) -> bytes:
        u = self.user
        return json.dumps(
            {
                "t": self.tokenId,
                "i": self.issuedAt,
                "a": self.lastActivity,
                "p": 1 if self.public else 0,
                "u": [u.login, u.address, u.backendLogin, u.mailHost, u.site],
                "y": [list(pair) for pair in u.policy],
            },
            separators=(",", ":"),
        ).encode("utf-8")

    @classmethod
    def fromBytes(cls, data: bytes) -> "FormsSession | None":
        try:
            d = json.loads(data)
            login, address, backendLogin, mailHost, site = (str(x) for x in d["u"])
            user = UserRecord(
                login=login,
                address=address,
                backendLogin=backendLogin,
                mailHost=mailHost,
                site=site,
                policy=[(str(k), str(v)) for k, v in d.get("y", ())],
            )
            return cls(user, str(d["t"]), int(d["i"]), int(d["a"]), bool(d["p"]))
        except (ValueError, KeyError, TypeError):
            return None


@frozen
class CookieCheck:
    """
    The verdict on a request's cookie.

    @ivar state: C{"valid"}, C{"absent"}, C{"invalid"} (unreadable: tampered, unknown key,
        garbage), C{"expired"} or C{"revoked"}.
    @ivar session: the L{FormsSession} when C{valid} (and, for information, when C{expired} or
        C{revoked}); else C{None}.
    """

    state: str
    session: FormsSession | None = None

    @property
    def valid(self) -> bool:
        return self.state == "valid"


@implementer(IRevocationSet)
class MemoryRevocationSet:
    """
    The local L{IRevocationSet}: a dict in this process, for a single node (or as the fallback
    when the shared store is unreachable).  Entries are dropped once expired.
    """

    def __init__(self, clock) -> None:
        self._clock = clock
        self._entries: dict[str, float] = {}
        self._sweepAt = 64

    def add(self, tokenId, expiresAt):
        self._entries[tokenId] = max(expiresAt, self._entries.get(tokenId, 0))
        if len(self._entries) >= self._sweepAt:
            now = self._clock.seconds()
            self._entries = {t: e for t, e in self._entries.items() if e > now}
            self._sweepAt = max(64, 2 * len(self._entries))
        return defer.succeed(None)

    def contains(self, tokenId):
        expiresAt = self._entries.get(tokenId)
        if expiresAt is not None and expiresAt <= self._clock.seconds():
            del self._entries[tokenId]
            expiresAt = None
        return defer.succeed(expiresAt is not None)

    def __len__(self) -> int:
        return len(self._entries)


def nodeRevocations(revocations: IRevocationSet, shared: bool) -> IRevocationSet:
    """
    @param revocations: the process's revocation set.
    @param shared: whether it is the array's already (C{[state]} in Redis).
    @return: C{revocations}, or under C{--workers N} with a set of its own, one whose logoffs
        reach every worker of the node (L{casd.service.nodeshare}).
    """
    relay = nodesecret.revocationRelay()
    if shared or relay is None:
        return revocations
    return RelayedRevocationSet(revocations, relay)


def cookieValues(headerValues: Iterable[bytes], name: str) -> list[str]:
    """
    @param headerValues: the request's C{Cookie} header values.
    @return: the values of every cookie called C{name}, in order.
    """
    found = []
    for header in headerValues:
        for part in header.decode("latin-1").split(";"):
            key, sep, value = part.strip().partition("=")
            if sep and key == name:
                found.append(value.strip().strip('"'))
    return found


def stripCookies(headerValue: bytes, names: Iterable[str]) -> bytes | None:
    """
    Remove casd's own cookies from a C{Cookie} header before the request goes to a backend.

    @return: the remaining header value, or C{None} when nothing remains.
    """
    names = set(names)
    kept = [
        part.strip()
        for part in headerValue.split(b";")
        if part.strip() and part.strip().partition(b"=")[0].decode("latin-1").strip() not in names
    ]
    return b"; ".join(kept) or None


def compileBackground(patterns: Iterable[str]) -> re.Pattern:
    """
    One regular expression from the configured background patterns (searched, not matched, in
    the request's path and query).
    """
    patterns = list(patterns)
    if not patterns:
        return re.compile(r"(?!)")
    return re.compile("|".join(f"(?:{p})" for p in patterns))


def isBackground(request, patterns: re.Pattern, longPoll: bool = False) -> bool:
    """
    Tell a background request (which must not keep a session alive) from user activity.

    A request is background when any of these holds:
      - the vdir treats it as a long poll (C{longPoll});
      - its path and query match one of the vdir's background patterns
        (L{DEFAULT_BACKGROUND_PATTERNS} unless configured);
      - it is a browser prefetch (C{Sec-Purpose} or C{Purpose} containing C{prefetch});
      - it carries C{X-CAS-Background: 1} (a web application may mark its own polls).
    Everything else is foreground.

    @param request: the L{twisted.web.iweb.IRequest}.
    """
    if longPoll:
        return True
    if patterns.search(request.uri.decode("latin-1")):
        return True
    headers = request.requestHeaders
    for name in (b"sec-purpose", b"purpose"):
        for value in headers.getRawHeaders(name, ()):
            if b"prefetch" in value.lower():
                return True
    return headers.getRawHeaders(b"x-cas-background", [b""])[0].strip() == b"1"


class SessionCookies:
    """
    Issues, reads, slides and revokes forms-login cookies.

    @ivar name: the cookie's name (C{__Host-} names require C{Secure}, C{Path=/} and no
        C{Domain}, so that no other host can set or shadow it).
    """

    def __init__(
        self,
        keys: CookieKeys,
        clock,
        revocations: IRevocationSet | None = None,
        publicTimeout: float = PUBLIC_TIMEOUT,
        privateTimeout: float = PRIVATE_TIMEOUT,
        refreshAfter: float = 60,
        maxSkew: float = 300,
        name: str = "__Host-casd",
    ) -> None:
        """
        @param clock: an L{twisted.internet.interfaces.IReactorTime}.
        @param revocations: where logoffs are recorded; a L{MemoryRevocationSet} by default.
        @param refreshAfter: a foreground request re-issues the cookie only when its last
            activity is at least this old.
        @param maxSkew: how far in the future a cookie's times may lie (clock skew between
            array members) before it is refused.
        """
        self.keys = keys
        self.clock = clock
        self.revocations = revocations if revocations is not None else MemoryRevocationSet(clock)
        self.publicTimeout = publicTimeout
        self.privateTimeout = privateTimeout
        self.refreshAfter = refreshAfter
        self.maxSkew = maxSkew
        self.name = name

    def _aad(self) -> bytes:
        return self.name.encode("latin-1")

    def timeout(self, session: FormsSession) -> float:
        return self.publicTimeout if session.public else self.privateTimeout

    def expiresAt(self, session: FormsSession) -> float:
        """
        @return: when C{session} stops being accepted unless it is used in the foreground.
        """
        return session.lastActivity + self.timeout(session)

    def issue(self, user: UserRecord, public: bool) -> FormsSession:
        """
        A new session for a user who just logged on.
        """
        now = int(self.clock.seconds())
        tokenId = base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")
        return FormsSession(user, tokenId, now, now, bool(public))

    def seal(self, session: FormsSession) -> str:
        return self.keys.seal(session.toBytes(), self._aad())

    def setCookie(self, session: FormsSession) -> bytes:
        """
        @return: the C{Set-Cookie} header value carrying C{session}: a browser-session cookie
            (no C{Max-Age}: closing the browser ends it; the server enforces the limits).
        """
        return (
            f"{self.name}={self.seal(session)}; Path=/; Secure; HttpOnly; SameSite=Lax"
        ).encode("ascii")

    def clearCookie(self) -> bytes:
        """
        @return: the C{Set-Cookie} header value that deletes the cookie.
        """
        return (
            f"{self.name}=; Path=/; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Secure;"
            " HttpOnly; SameSite=Lax"
        ).encode("ascii")

    def check(self, request) -> defer.Deferred:
        """
        Read and judge the request's cookie.

        @return: a L{Deferred} firing with a L{CookieCheck}.
        """
        values = cookieValues(request.requestHeaders.getRawHeaders(b"cookie", ()), self.name)
        if not values:
            return defer.succeed(CookieCheck("absent"))
        now = self.clock.seconds()
        best = CookieCheck("invalid")
        for value in values:
            plain = self.keys.open(value, self._aad())
            session = FormsSession.fromBytes(plain) if plain is not None else None
            if session is None:
                continue
            if session.lastActivity > now + self.maxSkew or session.issuedAt > now + self.maxSkew:
                continue
            if now >= self.expiresAt(session):
                best = CookieCheck("expired", session)
                continue
            d = self.revocations.contains(session.tokenId)
            d.addCallback(
                lambda revoked, s=session: CookieCheck("revoked", s) if revoked else CookieCheck("valid", s)
            )
            return d
        return defer.succeed(best)

    def touch(self, session: FormsSession, background: bool) -> FormsSession | None:
        """
        Slide the inactivity limit after a foreground request.

        @return: the refreshed session to send back in a C{Set-Cookie}, or C{None} when the
            cookie should stay as it is (a background request, or a recent refresh).
        """
        if background:
            return None
        now = int(self.clock.seconds())
        if now - session.lastActivity < self.refreshAfter:
            return None
        return evolve(session, lastActivity=now)

    def revoke(self, session: FormsSession) -> defer.Deferred:
        """
        Refuse C{session}'s token from now on (logoff), on every node sharing the revocation set.
        """
        now = self.clock.seconds()
        # No copy of this cookie can have a later last activity than now.
        return self.revocations.add(session.tokenId, now + self.timeout(session) + self.maxSkew)
