"""
The one shared authentication layer: credentials from every protocol go through one
L{twisted.cred.portal.Portal}; checkers return L{UserRecord}s; the realm makes them avatars.
"""

from __future__ import annotations

from attrs import field, frozen
from zope.interface import implementer

from casd.interfaces import IMailboxUser


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
