# -*- test-case-name: tests.test_auth -*-
"""
The one shared authentication layer: credentials from every protocol go through one
L{twisted.cred.portal.Portal}; checkers return L{UserRecord}s; the realm makes them avatars.
"""

from __future__ import annotations

from attrs import field, frozen
from zope.interface import implementer

from twisted.cred.error import UnauthorizedLogin

from casd.interfaces import IMailboxUser


class UnknownUser(UnauthorizedLogin):
    """
    A checker does not know this login: the next checker of a L{casd.auth.chain.CheckerChain}
    may.  Any other L{UnauthorizedLogin} (a wrong password) ends the chain.
    """


@implementer(IMailboxUser)
@frozen
class UserRecord:
    """
    What the directory says about a user; also the avatar (L{IMailboxUser}).

    @ivar policy: per-user policy attributes as sorted C{(key, value)} pairs (hashable).
    """

    login: str
    address: str = ""
    backendLogin: str = ""
    mailHost: str = ""
    site: str = ""
    disabled: bool = False
    policy: tuple[tuple[str, str], ...] = field(default=(), converter=lambda p: tuple(sorted(p)))

    @property
    def loginForBackend(self) -> str:
        return self.backendLogin or self.login
