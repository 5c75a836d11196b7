# -*- test-case-name: tests.test_auth,tests.test_cache_outage -*-
"""
Assembling the authentication layer from the configuration: the checkers (users file, then LDAP),
chained, behind the credential cache, in one portal, with the login penalty.

    checker = CachingChecker(CheckerChain([UsersFileChecker, LDAPChecker]))
    authenticator = Authenticator(Portal(MailboxRealm(), [checker]), penalty=LoginPenalty)
"""

from __future__ import annotations

from twisted.application import service
from twisted.cred.portal import Portal
from twisted.internet import defer

from casd.auth.authenticator import Authenticator, MailboxRealm
from casd.auth.cache import CachingChecker, CredentialCache
from casd.auth.chain import CheckerChain
from casd.auth.penalty import LoginPenalty
from casd.config import ConfigError


def buildCheckers(config, reactor, runInThread, ldapEndpointFor=None) -> list:
    """
    The configured checkers, in the order they are asked.

    @param ldapEndpointFor: for tests: C{callable(LDAPURL) -> IStreamClientEndpoint}.
    @raise ConfigError: when a file the configuration names is unusable.
    """
    checkers = []
    if config.auth.users_file:
        from casd.auth.usersfile import UsersFileChecker, UsersFileError

        try:
            checkers.append(UsersFileChecker(config.auth.users_file, runInThread, reactor))
        except UsersFileError as e:
            raise ConfigError(config.path, "auth.users_file", str(e)) from None
    if config.ldap.urls:
        from casd.auth.ldap import SettingProblem, checkerFromConfig

        try:
            checkers.append(checkerFromConfig(config.ldap, reactor, ldapEndpointFor))
        except SettingProblem as e:
            raise ConfigError(config.path, f"ldap.{e.key}", e.message) from None
    if not checkers:
        raise ConfigError(config.path, "auth", "expected a checker: set auth.users_file or ldap.urls")
    return checkers


def wrapCheckers(checkers, config, clock):
    """
    One checker for the portal: the chain of C{checkers} behind the credential cache (unless
    C{[auth] cache_ttl} and C{cache_negative_ttl} are both 0).

    @return: the checker; it also provides L{casd.interfaces.IUserDirectory}.
    """
    checker = checkers[0] if len(checkers) == 1 else CheckerChain(checkers)
    auth = config.auth
    if auth.cache_ttl > 0 or auth.cache_negative_ttl > 0:
        cache = CredentialCache(clock, auth.cache_ttl, auth.cache_negative_ttl, auth.cache_size)
        checker = CachingChecker(checker, cache, serveDuringOutage=auth.cache_during_outage)
    return checker


def buildAuthenticator(checker, config, clock, state=None) -> Authenticator:
    """
    The shared login path over C{checker}, with the penalty C{[auth]} configures.

    @param state: the L{casd.state.service.StateService}: with C{[state] backend = "redis"} the
        penalty is the array's.
    """
    portal = Portal(MailboxRealm(), [checker])
    penalty = state.penalty(config.auth) if state is not None else None
    if penalty is None:
        penalty = LoginPenalty.fromConfig(clock, config.auth)
    return Authenticator(portal, clock, penalty=penalty)


def buildAuthentication(config, reactor, runInThread, ldapEndpointFor=None, state=None):
    """
    @param state: see L{buildAuthenticator}.
    @return: C{(authenticator, directory, checkers)}: the login path, the one checker behind it
        (cached; for look-ups without a password) and the raw checkers.
    @raise ConfigError: when a file the configuration names is unusable.
    """
    checkers = buildCheckers(config, reactor, runInThread, ldapEndpointFor)
    directory = wrapCheckers(checkers, config, reactor)
    return buildAuthenticator(directory, config, reactor, state), directory, checkers


class AuthResourcesService(service.Service):
    """
    Closes the checkers' connections (LDAP) when casd stops.
    """

    name = "auth-resources"

    def __init__(self, checkers) -> None:
        self.checkers = list(checkers)

    def stopService(self):
        super().stopService()
        closers = [getattr(c, "close", None) for c in self.checkers]
        return defer.DeferredList(
            [defer.maybeDeferred(c) for c in closers if c is not None], consumeErrors=True
        )
