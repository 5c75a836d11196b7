# -*- test-case-name: tests.test_pinned -*-
"""
Pins on the pieces of Twisted that casd repeats in leaner form (the lean dispatch, main loop and
accept, the relay's reads and teardown, the backend's TCP client): a copy is used only while the
source it stands in for is the one it was written against, told by a SHA-256 of that source.
"""

from __future__ import annotations

import hashlib
import inspect


def sourceSha256(pinned) -> str | None:
    """
    @param pinned: a callable returning the functions, methods or classes, in a fixed order (a
        callable, so that one missing from another Twisted is an answer, not an import error).
    @return: the SHA-256 (hex) of their sources one after the other, or C{None} when one is
        missing or has no source to read.
    """
    try:
        source = "".join(inspect.getsource(o) for o in pinned())
    except (OSError, TypeError, AttributeError):
        return None
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def sourceMatches(sha256: str, pinned) -> bool:
    """
    @return: whether the sources C{pinned} returns hash to C{sha256} (L{sourceSha256}).
    """
    return sourceSha256(pinned) == sha256
