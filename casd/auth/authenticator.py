# -*- test-case-name: tests.test_auth -*-
"""
The shared login path: credentials from any protocol -> one avatar, or one failure of the shared
vocabulary.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin, UnhandledCredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

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

    #: Told of every login's verdict when set (L{casd.service.metrics.Metrics}).
    metrics = None

    def __init__(self, portal: Portal, clock, failureDelay: float = 2.0, penalty=None) -> None:
        """
        @param failureDelay: the first delay of the default penalty, when C{penalty} is not given.
        @param penalty: a L{LoginPenalty}, or the array's L{casd.state.penalty.SharedLoginPenalty}
            (its C{failed} and C{succeeded} answer with L{Deferred}s).
        """
        self.portal = portal
        self.clock = clock
        if penalty is None:
            penalty = LoginPenalty(clock, initialDelay=failureDelay)
        self.penalty = penalty
        # The fast lane of loginNow: the portal's password checker when it can answer from its
        # cache synchronously (a CachingChecker), else None.
        checker = portal.checkers.get(IUsernamePassword)
        self._cached = checker if hasattr(checker, "cachedSuccess") else None

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
        if self.metrics is None:
            return self._loginPath(credentials, client)
        started = self.clock.seconds()
        d = self._loginPath(credentials, client)
        d.addBoth(self._observed, started)
        return d

    def _observed(self, result, started):
        self.metrics.loginFinished(started, result if isinstance(result, Failure) else None)
        return result

    def _loginPath(self, credentials, client):
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

    def loginNow(self, credentials, client):
        """
        The login answered synchronously, when the credential cache holds a success for these
        very credentials: no L{Deferred}, no timer, no thread, not even the portal; the same
        rules as L{login} (lockouts, empty passwords, foreign authorisation identities and
        disabled accounts are left to it).  A login storm's logins mostly take this lane; not with
        the array's shared penalty, whose verdict on a success is asked of Redis.

        @return: the L{IMailboxUser}, or C{None} when the login must go through L{login}.
        """
        found = self.loginNowMemo(credentials, client)
        return found[0] if found is not None else None

    def loginNowMemo(self, credentials, client):
        """
        L{loginNow}, with a memo that L{loginAgain} takes to answer the same credentials again
        (the next request of an HTTP connection carrying the same C{Authorization}) without
        digesting them.

        @return: C{(avatar, memo)}, or C{None} when the login must go through L{login}.
        """
        checker = self._cached
        penalty = self.penalty
        idle = getattr(penalty, "idle", False)
        if (
            checker is None
            or getattr(penalty, "asynchronous", False)
            or not credentials.password
            or (credentials.authzid and credentials.authzid != credentials.username)
            or not IUsernamePassword.providedBy(credentials)
            or (not idle and penalty.locked(credentials.username, client))
        ):
            return None
        found = checker.cachedSuccessEntry(credentials)
        if found is None:
            return None
        avatarId, entry = found
        avatar = self.portal.realm.requestAvatar(avatarId, client, IMailboxUser)[1]
        if avatar.disabled:
            return None  # refused, logged and penalised by login()
        if not idle:
            penalty.succeeded(credentials.username, client)
        if self.metrics is not None:
            self.metrics.loginFinished(self.clock.seconds(), None)
        return avatar, (checker, credentials.username, entry, avatar)

    def loginAgain(self, memo, client):
        """
        The login of L{loginNowMemo}'s credentials again, while the credential cache still holds
        the very success that answered them: the same rules as L{loginNow} (the same checker, no
        shared penalty, no lockout since, the cache answering), without the digest.

        @param memo: the memo L{loginNowMemo} returned.
        @return: the L{IMailboxUser}, or C{None} when the login must go through L{login}.
        """
        checker, username, entry, avatar = memo
        penalty = self.penalty
        idle = getattr(penalty, "idle", False)
        if (
            checker is not self._cached
            or getattr(penalty, "asynchronous", False)
            or (not idle and penalty.locked(username, client))
            or not checker.stillCached(username, entry)
        ):
            return None
        if not idle:
            penalty.succeeded(username, client)
        if self.metrics is not None:
            self.metrics.loginFinished(self.clock.seconds(), None)
        return avatar

    def _succeeded(self, avatar, credentials, client):
        verdict = self.penalty.succeeded(credentials.username, client)
        if isinstance(verdict, defer.Deferred):
            # The array's penalty (casd/state/penalty.py): a lockout elsewhere still refuses.
            return verdict.addCallback(self._stillLocked, avatar, credentials, client)
        return avatar

    def _stillLocked(self, reason, avatar, credentials, client):
        if not reason:
            return avatar
        self.log.warn(
            "login of {user!r} from {client} refused: {reason}",
            user=credentials.username,
            client=client.peerHost,
            reason=reason,
        )
        d = self._wait(self.penalty.currentDelay(client))
        d.addCallback(lambda _: defer.fail(Throttled(reason)))
        return d

    def _refused(self, failure, credentials, client):
        if failure.check(AuthenticationFailed):
            delay = self.penalty.failed(credentials.username, credentials.password, client)
            if isinstance(delay, defer.Deferred):
                return delay.addCallback(self._answerFailure, failure, credentials, client)
            return self._answerFailure(delay, failure, credentials, client)
        if failure.check(DirectoryUnavailable):
            self.log.warn(
                "authentication of {user!r} from {client} failed temporarily: {reason}",
                user=credentials.username,
                client=client.peerHost,
                reason=str(failure.value),
            )
        return failure

    def _answerFailure(self, delay, failure, credentials, client):
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
