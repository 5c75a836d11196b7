# -*- test-case-name: tests.test_state,tests.test_state_redis -*-
"""
Revoked tokens (forms cookies after logoff), shared by the array: the HTTP front end's
C{IRevocationSet} over the shared state, so that a cookie revoked through one node is refused by
all.  Token IDs are HMAC-ed before they are stored; an entry lives until the token's own end.
"""

from __future__ import annotations

from zope.interface import classImplements

from casd import interfaces
from casd.state.keys import KeyMaker


class RevocationSet:
    """
    @ivar state: the L{casd.interfaces.ISharedState} (Redis with its local fallback, or local).
    """

    def __init__(self, state, keys: KeyMaker) -> None:
        self.state = state
        self.keys = keys

    def add(self, tokenId: str, expiresAt: float):
        """
        @return: a L{Deferred} firing with C{None} once recorded (locally too while Redis is away).
        """
        return self.state.revoke(self.keys.key("r", tokenId), expiresAt)

    def contains(self, tokenId: str):
        """
        @return: a L{Deferred} firing with whether C{tokenId} was revoked.
        """
        return self.state.isRevoked(self.keys.key("r", tokenId))


# The interface arrives with the HTTP front end; until then this is a plain class.
if hasattr(interfaces, "IRevocationSet"):
    classImplements(RevocationSet, interfaces.IRevocationSet)
