# -*- test-case-name: tests.test_loginpath,tests.test_imap,tests.test_pop3 -*-
"""
The login path of a front end (L{casd.session.frontend.FrontendProtocol}): authenticate, locate
the mailbox, open and log in a backend session, then the relay.

A login whose credentials the credential cache answers and whose route the locators have at
hand takes no L{Deferred}: the router's L{casd.routing.router.Router.locateNow} and the pool's
L{casd.pool.connector.BackendConnector.connectThen} report through plain callbacks.  Every
other login (a directory to ask, a locator that answers later, a per-user session limit) goes
the L{Deferred} way, L{proxyLogin}, with the same outcome.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.python.failure import Failure

from casd.failures import CASFailure, Throttled
from casd.routing.router import Route


class LoginPath:
    """
    A mixin of L{casd.session.frontend.FrontendProtocol}: it uses C{context}, C{section},
    C{descriptor}, C{client}, C{proxyTTL}, C{connected}, C{_closing}, C{_slot}, C{log},
    L{wait}, L{_release}, L{loginSucceeded}, L{loginFailed}, L{startRelay} and
    L{makeDialogue}.
    """

    #: The token of the login under way on the callback path (L{login}).
    _loginToken = None

    def login(self, token, credentials) -> defer.Deferred | None:
        """
        Log in with C{credentials}, holding further commands until it is done; then
        L{loginSucceeded} and the relay, or L{loginFailed}.

        @param token: passed back to the hooks (e.g. the IMAP tag).
        @return: a L{Deferred} that fires when it is done; C{None} when the login took the
            callback path (a cached success and a route at hand), which ends the same way.
        """
        context = self.context
        limited = getattr(self.section, "max_sessions_per_user", 0) and context.state is not None
        found = None
        if not limited:
            found = context.authenticator.loginNowMemo(credentials, self.client)
        if found is not None:
            # A cached success: route and connect without a Deferred when the route is at hand.
            self.user = user = found[0]

            def makeDialogue(target):
                return self.makeDialogue(target, user, credentials)

            try:
                route = context.router.locateNow(user, self.descriptor, ttl=self.proxyTTL)
            except Exception:
                d = defer.fail()
            else:
                if isinstance(route, Route):
                    self._busy = True
                    self._loginToken = token
                    context.connector.connectThen(
                        route, makeDialogue, self._backendLoggedIn, self._backendFailed
                    )
                    return None
                d = route.addCallback(context.connector.connect, makeDialogue)
                d.addCallback(self._connected)
        elif limited:
            d = self.proxyLogin(credentials)
        else:
            d = context.authenticator.login(credentials, self.client)
            d.addCallback(self._authenticated, credentials)
        d.addCallbacks(
            self._loginSucceeded, self._loginFailed, callbackArgs=(token,), errbackArgs=(token,)
        )
        return self.wait(d)

    def _backendLoggedIn(self, dialogue) -> None:
        # The callback path's success (L{_connected}, L{_loginSucceeded}, then L{wait}'s end).
        if not self.connected or self._closing:
            dialogue.transport.loseConnection()
        else:
            self.backend = dialogue.target.label
            try:
                self._loginSucceeded(dialogue, self._loginToken)
            except Exception:
                self.log.failure("login succeeded, then failed unexpectedly")
        self._release()

    def _backendFailed(self, failure) -> None:
        # The callback path's failure (L{_loginFailed}, then L{wait}'s end).
        try:
            self._loginFailed(failure, self._loginToken)
        except Exception:
            self.log.failure("login failure not reported")
        self._release()

    def _loginSucceeded(self, dialogue, token) -> None:
        self.loginSucceeded(token, dialogue)
        self.startRelay(dialogue)

    def _loginFailed(self, failure, token) -> None:
        if failure.check(_ClientGone) or self._closing:
            return
        if not failure.check(CASFailure):
            self.log.failure("login failed unexpectedly", failure)
        self.result = type(failure.value).__name__
        self._releaseSlot()
        self.loginFailed(token, failure.value)

    def proxyLogin(self, credentials):
        """
        The shared path: authenticate, locate the mailbox, open and log in a backend session.

        @return: a L{Deferred} firing with the logged-in L{casd.session.dialogue.BackendDialogue}, or
            failing with a L{casd.failures.CASFailure} for the protocol to render.
        """
        authenticator = self.context.authenticator
        user = authenticator.loginNow(credentials, self.client)  # a cached success: at once
        if user is not None:
            return self._authenticated(user, credentials)
        d = authenticator.login(credentials, self.client)  # plain callbacks, no inlineCallbacks
        d.addCallback(self._authenticated, credentials)
        return d

    def _authenticated(self, user, credentials):
        self.user = user
        limit = getattr(self.section, "max_sessions_per_user", 0)
        state = self.context.state
        if limit and state is not None:
            # Counted array-wide with [state] backend = "redis" (casd/state/sessions.py).
            d = state.sessions.acquire(self.descriptor.name, user.login, limit)
            d.addCallback(self._slotAnswered, user, credentials, limit)
            return d
        return self._route(user, credentials)

    def _slotAnswered(self, token, user, credentials, limit):
        if token is None:
            raise Throttled(f"{user.login!r} already has {limit} {self.descriptor.name} session(s)")
        self._slot = token
        if not self.connected or self._closing:
            self._releaseSlot()
            raise _ClientGone()
        return self._route(user, credentials)

    def _releaseSlot(self) -> None:
        token, self._slot = self._slot, None
        if token is not None:
            self.context.state.sessions.release(token)

    def _route(self, user, credentials):
        context = self.context
        d = context.router.locate(user, self.descriptor, ttl=self.proxyTTL)

        def makeDialogue(target):
            return self.makeDialogue(target, user, credentials)

        if d.called and not isinstance(d.result, Failure):
            # The route was at hand: to the pool at once, no callback returning a Deferred.
            d = context.connector.connect(d.result, makeDialogue)
        else:
            d.addCallback(context.connector.connect, makeDialogue)
        d.addCallback(self._connected)
        return d

    def _connected(self, dialogue):
        if not self.connected or self._closing:
            dialogue.transport.loseConnection()
            raise _ClientGone()
        self.backend = dialogue.target.describe()
        return dialogue


class _ClientGone(Exception):
    """
    The client left while its backend session was being opened.
    """
