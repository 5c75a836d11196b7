# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
Opaque store keys: nothing a user typed (a name, an address, a password, a cookie) reaches the
shared store; it sees HMACs made with the array secret every node is given.
"""

from __future__ import annotations

import hashlib
import hmac

#: The shortest array secret accepted, in bytes.
MIN_SECRET = 32


class SecretError(ValueError):
    """
    The array secret file is unusable.
    """


def readSecret(path: str) -> bytes:
    """
    Read the array secret: the whole file (binary or text, surrounding white space dropped).

    @raise SecretError: when the file cannot be read or is too short.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise SecretError(f"expected a readable file: {e.strerror}") from None
    if len(secret) < MIN_SECRET:
        raise SecretError(
            f"expected at least {MIN_SECRET} bytes of secret (e.g. head -c 48 /dev/urandom |"
            " base64), got {len(secret)}"
        )
    return secret


class KeyMaker:
    """
    Turns names into store keys and credentials into short, keyed tags.
    """

    #: Keys remembered, so that a login's several look-ups of one name cost one HMAC.
    CACHE = 10_000

    def __init__(self, secret: bytes, prefix: str = "casd:") -> None:
        self._secret = secret
        self.prefix = prefix
        self._cache: dict[tuple[str, str], str] = {}

    def _mac(self, value: str) -> str:
        # 128 bits: collisions are out of reach, and the key stays short.
        return hmac.new(
            self._secret, value.encode("utf-8", "surrogatepass"), hashlib.sha256
        ).hexdigest()[:32]

    def key(self, kind: str, value: str) -> str:
        """
        @param kind: the key's family, e.g. C{"u"} (a user's penalty), C{"s:pop3"}.
        @param value: what the key is about (a user name, an address network).
        """
        key = self._cache.get((kind, value))
        if key is None:
            if len(self._cache) >= self.CACHE:
                self._cache.clear()
            # The braces make it a Redis Cluster hash tag: a key and its suffixes share a slot.
            key = self._cache[(kind, value)] = f"{self.prefix}{kind}:{{{self._mac(value)}}}"
        return key

    def tag(self, username: str, password: bytes) -> str:
        """
        A 64-bit tag of a login and password: tells a repeated wrong password from a new one and
        is useless without the secret.
        """
        message = username.lower().encode("utf-8", "surrogatepass") + b"\x00" + password
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:16]
