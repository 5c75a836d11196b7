"""
Tests for L{casd.session.loginpath}: a cached login with its route at hand goes to the pool
without a L{Deferred} (L{Router.locateNow}, L{BackendConnector.connectThen}) and ends as the
L{Deferred} way does; and for those two callback paths themselves.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.failures import BackendUnavailable
from casd.routing.router import Route, defaultRouter
from casd.testing import acceptBackend, makeContext
from protocols.imap import imap
from tests.test_imap import CachedContextMixin, IMAPTestMixin
from tests.test_router_sync import Later, Now


class CallbackLoginTests(CachedContextMixin, IMAPTestMixin, SynchronousTestCase):
    """
    The second login of a user (the credential cache's) takes the callback path.
    """

    def setUp(self):
        super().setUp()
        # The first login fills the cache (the Deferred way).
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        self.backendLogin()
        self.deferredCalls = []
        connector, router = self.context.connector, self.context.router
        for owner, name in ((connector, "connect"), (router, "locate")):
            self.patch(owner, name, self.recording(getattr(owner, name), name))

    def recording(self, method, name):
        def record(*args, **kw):
            self.deferredCalls.append(name)
            return method(*args, **kw)

        return record

    def test_noDeferredWay(self):
        """
        The route at hand goes to the pool's callback path: neither the router's nor the pool's
        L{Deferred} API is used, and the session goes on to the relay with the command the
        client pipelined behind its login.
        """
        self.connect(1)
        self.assertIsNone(self.server.login(b"b", self.credentials()))
        self.send(b"c SELECT INBOX\r\n")
        backend, bt, _ = self.backendLogin()
        self.assertEqual(self.deferredCalls, [])
        self.assertEqual(self.transport.value(), b"b OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")
        self.assertEqual(bt.value(), b"c SELECT INBOX\r\n")
        self.assertEqual((self.server.result, self.server.backend), ("proxy", "mbx(192.0.2.10:143)"))

    def credentials(self, password=b"secret"):
        from casd.auth.sasl import makeCredentials

        return makeCredentials(b"alice", password)

    def test_backendRefusalThenNextCommand(self):
        """
        A backend refusal on the callback path is worded as on the other, and the commands held
        behind the login run after it.
        """
        self.connect(1)
        self.send(b"b LOGIN alice secret\r\nc NOOP\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] Dovecot ready.\r\n")
        backend.dataReceived(b"I OK ID completed.\r\nA NO [AUTHENTICATIONFAILED] nope\r\n")
        self.assertEqual(self.deferredCalls, [])
        said = self.transport.value()
        self.assertIn(b"b NO [AUTHENTICATIONFAILED]", said)
        self.assertIn(b"c OK NOOP completed", said)
        self.assertLess(said.index(b"b NO"), said.index(b"c OK"))
        self.assertIsNone(self.server.relay)

    def test_noMemberAvailableAtOnce(self):
        """
        With every member drained, the pool's callback path fails before C{connectThen}
        returns: the client hears C{UNAVAILABLE} and the next command runs.
        """
        self.context.connector.draining = frozenset(["mbx"])
        self.connect(1)
        said = self.send(b"b LOGIN alice secret\r\nc NOOP\r\n")
        self.assertIn(b"b NO [UNAVAILABLE]", said)
        self.assertIn(b"c OK NOOP completed", said)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # the first login's only
        self.assertEqual(self.server.result, "BackendUnavailable")

    def test_clientGoneBeforeBackend(self):
        """
        A client that left while its backend session was being opened: the backend connection
        is closed, nothing is written and no relay starts.
        """
        self.connect(1)
        self.send(b"b LOGIN alice secret\r\n")
        self.transport.clear()
        self.server.connectionLost(Failure(ConnectionError("gone")))
        backend, bt, _ = self.backendLogin()
        self.assertTrue(bt.disconnecting)
        self.assertEqual(self.transport.value(), b"")
        self.assertIsNone(self.server.relay)

    def test_routeFailureRendered(self):
        """
        A locator that raises: the failure is worded, and the session is not relayed.
        """
        self.context.router.locators = (Now("x", [], BackendUnavailable("nowhere")),)
        self.connect(1)
        said = self.send(b"b LOGIN alice secret\r\n")
        self.assertIn(b"b NO [UNAVAILABLE]", said)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_routeLaterTakesTheDeferredWay(self):
        """
        A locator that answers later: the login waits for it, then connects.
        """
        later = Later("directory", [])
        self.context.router.locators = (later,)
        self.connect(1)
        self.send(b"b LOGIN alice secret\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)
        route = defaultRouter(self.context.config).locateNow(UserRecord(login="alice"), imap)
        later.pending[0].callback(route)
        self.backendLogin()
        self.assertEqual(self.deferredCalls, ["connect"])
        self.assertEqual(self.transport.value(), b"b OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n")

    def test_successHookFailureLogged(self):
        """
        An exception in the protocol's success hook is logged, and further commands are not
        left held.
        """
        self.connect(1)

        def broken(token, dialogue):
            raise RuntimeError("broken hook")

        self.server.loginSucceeded = broken
        self.send(b"b LOGIN alice secret\r\n")
        self.backendLogin()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertFalse(self.server._busy)


class LocateNowTests(SynchronousTestCase):
    def setUp(self):
        from tests.test_router import CONFIG

        self.context = makeContext(MemoryReactorClock(), config=CONFIG.replace('map_file = "MAP"', ""))
        self.router = self.context.router
        self.user = UserRecord(login="zed", mailHost="solo")

    def test_routeAtHand(self):
        """
        A route the locators have at hand comes back as the L{Route} itself, the same as
        L{locate}'s, with the proxy TTL passed on.
        """
        route = self.router.locateNow(self.user, imap, ttl=3)
        self.assertIsInstance(route, Route)
        self.assertEqual(route, self.successResultOf(self.router.locate(self.user, imap, ttl=3)))
        self.assertEqual(route.proxyTTL, 2)

    def test_failureRaised(self):
        self.router.locators = (Now("x", [], BackendUnavailable("nowhere")),)
        self.assertRaises(BackendUnavailable, self.router.locateNow, self.user, imap)
        self.failureResultOf(self.router.locate(self.user, imap), BackendUnavailable)

    def test_laterAnswer(self):
        later = Later("x", [])
        self.router.locators = (later,)
        d = self.router.locateNow(self.user, imap)
        self.assertIsInstance(d, defer.Deferred)
        route = Route((), "test", "solo")
        later.pending[0].callback(route)
        self.assertEqual(self.successResultOf(d).group, "solo")


class ConnectThenTests(SynchronousTestCase):
    def setUp(self):
        from tests.test_imap import CONFIG

        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, users={"alice": "secret"}, config=CONFIG)
        self.route = self.context.router.locateNow(UserRecord(login="alice"), imap)
        self.outcomes = []

    def connectThen(self):
        from protocols.imap import IMAPBackend

        user = UserRecord(login="alice")
        self.context.connector.connectThen(
            self.route,
            lambda target: IMAPBackend(target, None, user, None, self.context),
            lambda dialogue: self.outcomes.append(("ok", dialogue)),
            lambda failure: self.outcomes.append(("failed", failure)),
        )

    def test_noMember(self):
        """
        No member to try: C{failed} is called at once with L{BackendUnavailable}.
        """
        self.context.connector.draining = frozenset(["mbx"])
        self.connectThen()
        ((what, failure),) = self.outcomes
        self.assertEqual(what, "failed")
        self.assertIsInstance(failure, Failure)
        self.assertIsInstance(failure.value, BackendUnavailable)

    def test_connectTimeout(self):
        """
        A member that does not answer in time: after C{max_tries} members or the failover
        time, C{failed} is called once.
        """
        self.connectThen()
        self.assertEqual(self.outcomes, [])
        self.reactor.advance(60)
        self.assertEqual([o[0] for o in self.outcomes], ["failed"])
        self.assertIsInstance(self.outcomes[0][1].value, BackendUnavailable)
        self.reactor.advance(60)
        self.assertEqual(len(self.outcomes), 1)
