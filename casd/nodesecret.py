# -*- test-case-name: tests.test_nodesecret -*-
"""
The node secret of C{twistd cas --workers N}: what lets the workers of one node agree on the keys
that are otherwise random per process.

The parent (L{casd.service.workers}) makes 32 random bytes once, when it is built, and keeps them
in its memory for its life, so a worker it restarts gets the same.  Each worker reads them from an
inherited pipe at its start (L{secretPipe}, L{readSecretPipe}: never its arguments, its
environment, a file or a log) and derives its keys with HKDF-SHA256, one C{info} label a key
(L{FORMS_COOKIE_KEY}, L{ROUTE_COOKIE_KEY}, L{TLS_TICKET_KEY}): a key learnt from one use says nothing about another,
nor about the secret.  Keys configured in files (C{[http] forms_key_files},
C{route_cookie_key_file}, C{[tls] ticket_keys}) win over derived ones; a single process (no workers) installs no
secret and keeps its own random keys.

The worker installs its secret here (L{install}) before it builds its service tree; the protocols
ask for a key with L{derivedKey}, which is L{None} in a single process.
"""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: Bytes of a node secret.
SECRET_SIZE = 32

#: HKDF C{info} labels, one per derived key.
FORMS_COOKIE_KEY = b"casd node: forms cookie key (AES-256-GCM) v1"
ROUTE_COOKIE_KEY = b"casd node: routing cookie key (HMAC-SHA256) v1"
#: 80 bytes: a TLS session-ticket key's name, HMAC key and AES key (L{casd.ticketkeys}).
TLS_TICKET_KEY = b"casd node: TLS session ticket key v1"


class NodeSecretError(ValueError):
    """
    The secret pipe did not hold a secret (the message never quotes what it held).
    """


class NodeSecret:
    """
    The 32 bytes every worker of a node shares; never in a C{repr}, a log or an error.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes) -> None:
        if not isinstance(secret, bytes) or len(secret) != SECRET_SIZE:
            raise NodeSecretError(f"a node secret is {SECRET_SIZE} bytes")
        self._secret = secret

    @classmethod
    def generate(cls) -> "NodeSecret":
        return cls(os.urandom(SECRET_SIZE))

    def derive(self, label: bytes, length: int = 32) -> bytes:
        """
        @param label: the key's HKDF C{info} label (one per use).
        @return: C{length} bytes, the same for the same secret and label.
        """
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=label).derive(self._secret)

    def __repr__(self) -> str:
        return "<NodeSecret>"


def secretPipe(secret: NodeSecret) -> int:
    """
    A pipe holding C{secret}, its writing end closed: the parent hands the reading end to one
    worker (as one of its C{childFDs}) and closes it once the worker is started.

    @return: the reading end.
    """
    readEnd, writeEnd = os.pipe()
    try:
        # 32 bytes are below PIPE_BUF: written at once, never blocking.
        os.write(writeEnd, secret._secret)
    finally:
        os.close(writeEnd)
    return readEnd


def readSecretPipe(fd: int) -> NodeSecret:
    """
    Read a node secret from C{fd} up to its end of file, and close it.

    @raise NodeSecretError: when the pipe did not hold exactly one secret.
    """
    data = b""
    try:
        while len(data) <= SECRET_SIZE:
            chunk = os.read(fd, SECRET_SIZE + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as e:
        raise NodeSecretError(f"the node secret pipe could not be read ({e.strerror})") from None
    finally:
        try:
            os.close(fd)
        except OSError:
            pass
    return NodeSecret(data)


# -- the process's node secret ----------------------------------------------------------------

_installed: dict = {"secret": None, "relay": None}


def install(secret: NodeSecret | None, relay=None) -> None:
    """
    Make C{secret} this process's node secret (a worker, before it builds its service tree), and
    C{relay} its revocation relay (L{casd.service.nodeshare.WorkerRevocations}), or neither
    (L{None}: a single process; tests).
    """
    _installed["secret"] = secret
    _installed["relay"] = relay


def derivedKey(label: bytes, length: int = 32) -> bytes | None:
    """
    @return: the key for C{label} derived from this process's node secret, or L{None} when the
        process has none (a single process: the caller makes its own random key).
    """
    secret = _installed["secret"]
    return None if secret is None else secret.derive(label, length)


def revocationRelay():
    """
    @return: the worker's revocation relay, or L{None} (no workers).
    """
    return _installed["relay"]
