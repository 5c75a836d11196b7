# -*- test-case-name: tests.test_smtp,tests.test_smtpmx,tests.test_submission -*-
"""
The steps of a session one by one, for front ends that do not log in and relay in one go: a
protocol that authenticates once and routes each transaction (SMTP submission), or routes each
recipient (port 25), or authenticates each request (HTTP).  Authentication, location and the
connection to a route are separate seams here, so a protocol never calls the directory, the
router or the pool itself.
"""

from __future__ import annotations

from twisted.internet import defer

from casd.failures import BackendUnavailable, CASFailure, DirectoryUnavailable


class SessionSteps:
    """
    A mixin of L{casd.session.frontend.FrontendProtocol}: it uses C{context}, C{descriptor},
    C{client}, C{user}, C{result}, C{proxyTTL}, C{backend}, C{log}, C{connected},
    C{_closing} and L{makeDialogue}.
    """

    def authenticate(self, credentials) -> defer.Deferred:
        """
        Authenticate only: no route is located and no backend session opened (submission
        authenticates at AUTH and routes each transaction).  With the shared failure handling:
        C{result} names the failure for the session log, and an unexpected error is logged.

        @return: a L{Deferred} firing with the L{casd.interfaces.IMailboxUser} (also set as
            C{self.user}), or failing for the protocol to word with L{renderFailure}.
        """
        d = authenticateOnly(self.context, credentials, self.client)
        d.addCallbacks(self._authenticatedOnly, self._authenticationFailed)
        return d

    def _authenticatedOnly(self, user):
        self.user = user
        return user

    def _authenticationFailed(self, failure):
        if not failure.check(CASFailure):
            self.log.failure("authentication failed unexpectedly", failure)
        self.result = type(failure.value).__name__
        return failure

    def routeFor(self, user) -> defer.Deferred:
        """
        @return: a L{Deferred} firing with C{user}'s L{casd.routing.router.Route} for this
            protocol, or failing with a L{casd.failures.CASFailure}.
        """
        return self.context.router.locate(user, self.descriptor, ttl=self.proxyTTL)

    def locateRecipient(self, address: str, lookup=None) -> defer.Deferred:
        """
        Where mail for C{address} goes: the directory's user, then the router's route.

        @param lookup: C{callable(address) -> Deferred[user or None]} to look up in instead of
            the context's directory (e.g. through a protocol's own, shorter-lived cache).
        @return: a L{Deferred} firing with C{(user, route)}, or C{None} for an address the
            directory does not know; failing with L{casd.failures.DirectoryUnavailable} (no
            answer, or no directory) or another L{casd.failures.CASFailure} (no route).
        """
        return locateRecipient(self.context, self.descriptor, address, lookup)

    def routeAvailable(self, route) -> bool:
        """
        Whether the pool would try a member of C{route} now (see
        L{casd.pool.connector.BackendConnector.available}); opens no connection.
        """
        return self.context.connector.available(route)

    def connectRoute(self, route) -> defer.Deferred:
        """
        Open a logged-in backend session along C{route} for C{self.user} (L{makeDialogue} with
        no credentials: the protocol's dialogue passes the user on its own way).

        @return: a L{Deferred} firing with the L{casd.session.dialogue.BackendDialogue},
            failing with a L{casd.failures.CASFailure} (also when the client left meanwhile).
        """
        d = self.context.connector.connect(
            route, lambda target: self.makeDialogue(target, self.user, None)
        )
        d.addCallback(self._routeConnected)
        return d

    def _routeConnected(self, dialogue):
        if not self.connected or self._closing:
            dialogue.transport.loseConnection()
            raise BackendUnavailable("the client left")
        self.backend = dialogue.target.describe()
        return dialogue


def authenticateOnly(context, credentials, client) -> defer.Deferred:
    """
    The shared authentication step alone (penalty, cache, directory): for front ends that
    locate and connect separately, or never (HTTP's local services).

    @return: a L{Deferred} firing with the L{casd.interfaces.IMailboxUser}.
    """
    return context.authenticator.login(credentials, client)


def locateRecipient(context, descriptor, address: str, lookup=None) -> defer.Deferred:
    """
    See L{FrontendProtocol.locateRecipient}.
    """
    if lookup is None:
        directory = context.directory
        if directory is None:
            return defer.fail(DirectoryUnavailable("no directory to look recipients up in"))
        lookup = directory.lookup

    def found(user):
        if user is None:
            return None
        return context.router.locate(user, descriptor).addCallback(lambda route: (user, route))

    return defer.maybeDeferred(lookup, address).addCallback(found)
