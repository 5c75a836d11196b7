# -*- test-case-name: tests.test_hashing -*-
"""
Password hashes in Dovecot's C{{SCHEME}hash} notation.

Verification is CPU work (bcrypt, argon2): callers run L{verify} in a thread pool, never on the
reactor thread.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

import bcrypt

# libc's crypt(3) (libxcrypt) for SHA-crypt: the stdlib's crypt module, kept as a package since
# Python 3.13 removed it (and 3.11 and 3.12 deprecate it).
import crypt_r


class UnknownScheme(ValueError):
    """
    The hash names a scheme casd does not know.
    """


def _shaCrypt(password: bytes, hashed: str) -> bool:
    result = crypt_r.crypt(password.decode("utf-8", "surrogateescape"), hashed)
    return result is not None and hmac.compare_digest(result, hashed)


def _ssha(digest, password: bytes, hashed: str) -> bool:
    raw = base64.b64decode(hashed)
    size = digest().digest_size
    expected, salt = raw[:size], raw[size:]
    return hmac.compare_digest(digest(password + salt).digest(), expected)


def _argon2(password: bytes, hashed: str) -> bool:
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    try:
        return PasswordHasher().verify(hashed, password)
    except (VerificationError, InvalidHashError):
        return False


def _bcrypt(password: bytes, hashed: str) -> bool:
    try:
        return bcrypt.checkpw(password[:72], hashed.encode("ascii"))
    except ValueError:
        return False


_VERIFIERS = {
    "BLF-CRYPT": _bcrypt,
    "BCRYPT": _bcrypt,
    "SHA512-CRYPT": _shaCrypt,
    "SHA256-CRYPT": _shaCrypt,
    "SSHA": lambda p, h: _ssha(hashlib.sha1, p, h),
    "SSHA256": lambda p, h: _ssha(hashlib.sha256, p, h),
    "SSHA512": lambda p, h: _ssha(hashlib.sha512, p, h),
    "ARGON2ID": _argon2,
    "PLAIN": lambda p, h: hmac.compare_digest(p, h.encode("utf-8")),
    "CLEAR": lambda p, h: hmac.compare_digest(p, h.encode("utf-8")),
}

SCHEMES = tuple(_VERIFIERS)


def splitScheme(stored: str) -> tuple[str, str]:
    """
    Split C{{SCHEME}hash}.  A bare C{$2b$}/C{$6$}/C{$5$}/C{$argon2id$} hash is recognised by its
    prefix.

    @raise UnknownScheme: when the scheme is missing or unknown.
    """
    if stored.startswith("{"):
        end = stored.find("}")
        if end > 1:
            scheme = stored[1:end].upper()
            if scheme in _VERIFIERS:
                return scheme, stored[end + 1 :]
        raise UnknownScheme(stored[: max(end, 0) + 1][:32])
    for prefix, scheme in (
        ("$2", "BLF-CRYPT"),
        ("$6$", "SHA512-CRYPT"),
        ("$5$", "SHA256-CRYPT"),
        ("$argon2id$", "ARGON2ID"),
    ):
        if stored.startswith(prefix):
            return scheme, stored
    raise UnknownScheme("(no {SCHEME} prefix)")


def verify(stored: str, password: bytes) -> bool:
    """
    Check C{password} against the stored hash.  Blocking: run it in a thread.
    """
    scheme, hashed = splitScheme(stored)
    return bool(_VERIFIERS[scheme](password, hashed))


def makeHash(scheme: str, password: bytes, rounds: int | None = None) -> str:
    """
    Hash C{password} for a users file.

    @param scheme: one of L{SCHEMES}.
    @return: C{{SCHEME}hash}.
    """
    scheme = scheme.upper()
    if scheme in ("BLF-CRYPT", "BCRYPT"):
        hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds or 12)).decode("ascii")
    elif scheme in ("SHA512-CRYPT", "SHA256-CRYPT"):
        method = "$6$" if scheme == "SHA512-CRYPT" else "$5$"
        salt = base64.b64encode(os.urandom(12), b"./").decode("ascii")
        setting = f"{method}rounds={rounds}${salt}" if rounds else f"{method}{salt}"
        hashed = crypt_r.crypt(password.decode("utf-8", "surrogateescape"), setting)
    elif scheme.startswith("SSHA"):
        digest = {"SSHA": hashlib.sha1, "SSHA256": hashlib.sha256, "SSHA512": hashlib.sha512}[scheme]
        salt = os.urandom(8)
        hashed = base64.b64encode(digest(password + salt).digest() + salt).decode("ascii")
    elif scheme == "ARGON2ID":
        from argon2 import PasswordHasher

        hashed = PasswordHasher().hash(password)
    elif scheme in ("PLAIN", "CLEAR"):
        hashed = password.decode("utf-8")
    else:
        raise UnknownScheme(scheme)
    return "{" + scheme + "}" + hashed
