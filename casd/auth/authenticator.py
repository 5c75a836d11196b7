"""
The shared login path: credentials from any protocol -> one avatar, or one failure of the shared
vocabulary.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.logger import Logger

from casd.auth import UserRecord
from casd.failures import AuthenticationFailed, CASFailure, DirectoryUnavailable
from casd.interfaces import IMailboxUser


@implementer(IRealm)
class MailboxRealm:
    """
    Turns the L{UserRecord} a checker returns into the session's L{IMailboxUser} avatar.
    """

    def requestAvatar(self, avatarId, mind, *interfaces):
        if IMailboxUser not in interfaces:
            raise NotImplementedError("casd's realm only provides IMailboxUser")
        if not isinstance(avatarId, UserRecord):
            avatarId = UserRecord(login=avatarId.decode() if isinstance(avatarId, bytes) else avatarId)
        return IMailboxUser, avatarId, lambda: None


class Authenticator:
    """
    Logs users in through the portal and applies the shared rules: empty passwords and foreign
    authorisation identities are refused before any checker runs, disabled accounts are refused,
    a failed login is answered after C{failureDelay} seconds (trusted clients excepted), and any
    error other than a refusal is a temporary L{DirectoryUnavailable}, never a bad password.
    """

    log = Logger()

    def __init__(self, portal: Portal, clock, failureDelay: float = 2.0) -> None:
        self.portal = portal
        self.clock = clock
        self.failureDelay = failureDelay

    @defer.inlineCallbacks
    def login(self, credentials, client):
        """
        @param credentials: L{casd.sasl.Credentials}.
        @param client: the L{casd.clientinfo.ClientInfo}.
        @return: a L{Deferred} firing with the L{IMailboxUser}, or failing with a
            L{casd.failures.CASFailure}.
        """
        try:
            avatar = yield self._login(credentials, client)
        except AuthenticationFailed as e:
            self.log.info(
                "authentication failed for {user!r} from {client}: {reason}",
                user=credentials.username,
                client=client.peerHost,
                reason=str(e),
            )
            if self.failureDelay and not client.trusted:
                yield task.deferLater(self.clock, self.failureDelay, lambda: None)
            raise
        return avatar

    @defer.inlineCallbacks
    def _login(self, credentials, client):
        if not credentials.password:
            raise AuthenticationFailed("empty password")
        if credentials.authzid and credentials.authzid != credentials.username:
            raise AuthenticationFailed("authorisation identity not allowed")
        try:
            _, avatar, _ = yield self.portal.login(credentials, client, IMailboxUser)
        except (UnauthorizedLogin, UnhandledCredentials) as e:
            raise AuthenticationFailed(str(e) or "refused") from None
        except CASFailure:
            raise
        except Exception:
            self.log.failure("authentication of {user!r} could not complete", user=credentials.username)
            raise DirectoryUnavailable("directory error") from None
        if avatar.disabled:
            raise AuthenticationFailed("account disabled")
        return avatar
