# -*- test-case-name: tests.test_auth -*-
"""
Several checkers as one: local accounts in the users file first, then the directory.

L{twisted.cred.portal.Portal} keeps one checker per credentials interface (a second registration
replaces the first), so checkers are chained here and the portal sees one.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.internet import defer

from casd.auth import UnknownUser
from casd.interfaces import IUserDirectory, IUserRecordChecker


@implementer(ICredentialsChecker, IUserRecordChecker, IUserDirectory)
class CheckerChain:
    """
    Asks each checker in turn while they answer L{UnknownUser}; a wrong password, a success or
    directory trouble ends the chain.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, checkers) -> None:
        if not checkers:
            raise ValueError("a chain needs at least one checker")
        self.checkers = tuple(checkers)

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        for checker in self.checkers[:-1]:
            try:
                return (yield checker.requestAvatarId(credentials))
            except UnknownUser:
                continue
        return (yield self.checkers[-1].requestAvatarId(credentials))

    @defer.inlineCallbacks
    def lookup(self, name: str):
        for checker in self.checkers:
            lookup = getattr(checker, "lookup", None)
            if lookup is None:
                continue
            record = yield lookup(name)
            if record is not None:
                return record
        return None

    def close(self):
        closers = [getattr(c, "close", None) for c in self.checkers]
        return defer.DeferredList(
            [defer.maybeDeferred(c) for c in closers if c is not None], consumeErrors=True
        )
