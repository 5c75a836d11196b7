# -*- test-case-name: tests.test_auth -*-
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
from casd.auth.penalty import LoginPenalty
from casd.failures import AuthenticationFailed, CASFailure, DirectoryUnavailable, Throttled
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
    Logs users in through the portal and applies the shared rules: a locked-out user or address is
    refused before any checker runs (L{Throttled}), empty passwords and foreign authorisation
    identities are refused likewise, disabled accounts are refused with the ordinary wording (the
    log says why), a failed login is answered after the L{LoginPenalty}'s growing delay (trusted
    clients excepted), and any error other than a refusal is a temporary L{DirectoryUnavailable},
    never a bad password.

    @ivar penalty: the L{LoginPenalty}.
    """

    log = Logger()

    def __init__(self, portal: Portal, clock, failureDelay: float = 2.0, penalty=None) -> None:
        """
        @param failureDelay: the first delay of the default penalty, when C{penalty} is not given.
        @param penalty: a L{LoginPenalty}.
        """
        self.portal = portal
        self.clock = clock
        if penalty is None:
            penalty = LoginPenalty(clock, initialDelay=failureDelay)
        self.penalty = penalty

    @property
    def failureDelay(self) -> float:
        return self.penalty.initialDelay

    def _wait(self, delay: float):
        return task.deferLater(self.clock, delay, lambda: None) if delay > 0 else defer.succeed(None)

    def login(self, credentials, client):
        """
        @param credentials: L{casd.auth.sasl.Credentials}.
        @param client: the L{casd.session.clientinfo.ClientInfo}.
        @return: a L{Deferred} firing with the L{IMailboxUser}, or failing with a
            L{casd.failures.CASFailure}.
        """
        # Plain callbacks rather than inlineCallbacks: this runs for every login.
        locked = self.penalty.locked(credentials.username, client)
        if locked:
            self.log.warn(
                "login of {user!r} from {client} refused: {reason}",
                user=credentials.username,
                client=client.peerHost,
                reason=locked,
            )
            d = self._wait(self.penalty.currentDelay(client))
            d.addCallback(lambda _: defer.fail(Throttled(locked)))
            return d
        d = self._login(credentials, client)
        d.addCallbacks(
            self._succeeded,
            self._refused,
            callbackArgs=(credentials, client),
            errbackArgs=(credentials, client),
        )
        return d

    def _succeeded(self, avatar, credentials, client):
        self.penalty.succeeded(credentials.username, client)
        return avatar

    def _refused(self, failure, credentials, client):
        if failure.check(AuthenticationFailed):
            delay = self.penalty.failed(credentials.username, credentials.password, client)
            self.log.info(
                "authentication failed for {user!r} from {client}: {reason} (answered after"
                " {delay:g} s)",
                user=credentials.username,
                client=client.peerHost,
                reason=str(failure.value),
                delay=delay,
            )
            d = self._wait(delay)
            d.addCallback(lambda _: failure)
            return d
        if failure.check(DirectoryUnavailable):
            self.log.warn(
                "authentication of {user!r} from {client} failed temporarily: {reason}",
                user=credentials.username,
                client=client.peerHost,
                reason=str(failure.value),
            )
        return failure

    def _login(self, credentials, client):
        if not credentials.password:
            return defer.fail(AuthenticationFailed("empty password"))
        if credentials.authzid and credentials.authzid != credentials.username:
            return defer.fail(AuthenticationFailed("authorisation identity not allowed"))
        d = self.portal.login(credentials, client, IMailboxUser)
        d.addCallbacks(self._avatar, self._portalError, errbackArgs=(credentials,))
        return d

    def _avatar(self, result):
        avatar = result[1]
        if avatar.disabled:
            raise AuthenticationFailed("account disabled")
        return avatar

    def _portalError(self, failure, credentials):
        if failure.check(UnauthorizedLogin, UnhandledCredentials):
            raise AuthenticationFailed(str(failure.value) or "refused")
        if failure.check(CASFailure):
            return failure
        self.log.failure(
            "authentication of {user!r} could not complete", failure, user=credentials.username
        )
        raise DirectoryUnavailable("directory error")
