"""
L{casd.routing.router.Router.locate} without a generator: fired at once when every locator
answers at once, and the same chain when one answers later.
"""

from zope.interface import implementer

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.failures import BackendUnavailable
from casd.interfaces import ILocator
from casd.routing.router import Route, Router, defaultRouter
from protocols.imap import imap
from tests.test_router import RoutingTestMixin


@implementer(ILocator)
class Later:
    """
    A locator that answers when the test says so.
    """

    def __init__(self, name, asked):
        self.name, self.asked = name, asked
        self.pending = []

    def locate(self, user, protocol):
        self.asked.append(self.name)
        d = defer.Deferred()
        self.pending.append(d)
        return d


@implementer(ILocator)
class Now:
    def __init__(self, name, asked, answer):
        self.name, self.asked, self.answer = name, asked, answer

    def locate(self, user, protocol):
        self.asked.append(self.name)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class SynchronousAnswerTests(RoutingTestMixin, SynchronousTestCase):
    def test_firedAtOnce(self):
        """
        A map, hash or default route is at hand: the L{Deferred} has fired when C{locate}
        returns, with the proxy TTL passed on.
        """
        router = defaultRouter(self.config())
        d = router.locate(UserRecord(login="alice"), imap, ttl=3)
        self.assertTrue(d.called)
        route = self.successResultOf(d)
        self.assertEqual(route.group, "dag")
        self.assertEqual(route.proxyTTL, 2)

    def test_failureIsADeferred(self):
        """
        A locator's exception, expected or not, is a failed L{Deferred}, never raised.
        """
        asked = []
        d = Router([Now("a", asked, ValueError("bug"))]).locate(UserRecord(login="x"), imap)
        self.failureResultOf(d, ValueError)
        d = Router([Now("a", asked, None)]).locate(UserRecord(login="x"), imap)
        self.failureResultOf(d, BackendUnavailable)
        router = defaultRouter(self.config())
        self.failureResultOf(router.locate(UserRecord(login="x"), imap, ttl=1), BackendUnavailable)


class LaterAnswerTests(SynchronousTestCase):
    def test_laterNoneAsksTheRest(self):
        asked = []
        route = Route((), "found")
        first, second = Later("a", asked), Later("b", asked)
        router = Router([first, second, Now("c", asked, route), Now("d", asked, None)])
        d = router.locate(UserRecord(login="x"), imap)
        self.assertNoResult(d)
        self.assertEqual(asked, ["a"])
        first.pending[0].callback(None)
        self.assertNoResult(d)
        self.assertEqual(asked, ["a", "b"])
        second.pending[0].callback(None)
        self.assertIs(self.successResultOf(d), route)
        self.assertEqual(asked, ["a", "b", "c"])

    def test_laterRouteStops(self):
        asked = []
        route = Route((), "found")
        first = Later("a", asked)
        d = Router([first, Now("b", asked, None)]).locate(UserRecord(login="x"), imap)
        first.pending[0].callback(route)
        self.assertIs(self.successResultOf(d), route)
        self.assertEqual(asked, ["a"])

    def test_laterFailureStops(self):
        asked = []
        first = Later("a", asked)
        d = Router([first, Now("b", asked, Route((), "no"))]).locate(UserRecord(login="x"), imap)
        first.pending[0].errback(BackendUnavailable("down"))
        self.failureResultOf(d, BackendUnavailable)
        self.assertEqual(asked, ["a"])


class KeptRouteTests(RoutingTestMixin, SynchronousTestCase):
    def test_sameRouteForEveryone(self):
        """
        A route to a server or a group in preference order is built and checked once.
        """
        router = defaultRouter(self.config())
        a = self.successResultOf(router.locate(UserRecord(login="alice"), imap))
        b = self.successResultOf(router.locate(UserRecord(login="ALICE"), imap))
        self.assertIs(a, b)
        self.assertEqual(a.group, "dag")
        # Another TTL, another route.
        c = self.successResultOf(router.locate(UserRecord(login="alice"), imap, ttl=3))
        self.assertEqual((c.proxyTTL, c.targets), (2, a.targets))

    def test_hashedGroupsPerUser(self):
        router = defaultRouter(self.config())
        orders = {
            tuple(t.server for t in self.locate(router, UserRecord(login=f"user{i}", mailHost="pool")).targets)
            for i in range(20)
        }
        self.assertGreater(len(orders), 1)

    def test_siteOfTheUserStillApplies(self):
        """
        A user the directory places in another site gets that site's treatment, whatever
        route others got before.
        """
        router = defaultRouter(self.config())
        self.locate(router, UserRecord(login="x", mailHost="m1"))
        route = self.locate(router, UserRecord(login="x", mailHost="m1", site="west"))
        self.assertEqual(route.kind, "cas")
        self.refused(router, UserRecord(login="x", mailHost="m1", site="north"))

    def test_reloadForgets(self):
        router = defaultRouter(self.config())
        self.assertEqual(self.locate(router, UserRecord(login="zed@nowhere")).group, "pool")
        router.reconfigure(self.config(**{'hash_group = "pool"': ""}))
        self.assertEqual(self.locate(router, UserRecord(login="zed@nowhere")).group, "solo")
        router.reconfigure(self.config(**{'hash_group = "pool"': "", 'default_backend = "solo"': 'default_backend = "dag"'}))
        self.assertEqual(self.locate(router, UserRecord(login="zed@nowhere")).group, "dag")


class FrontendTests(RoutingTestMixin, SynchronousTestCase):
    """
    The frontend connects at once with a route at hand, and waits for one that comes later.
    """

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        from casd.testing import makeContext
        from tests.test_router import CONFIG

        self.reactor = MemoryReactorClock()
        users = {"zed": ("pw", UserRecord(login="zed", mailHost="solo"))}
        self.context = makeContext(self.reactor, users=users, config=CONFIG.replace('map_file = "MAP"', ""))

    def login(self):
        from casd.testing import connectFrontend

        # The trusted listener: plaintext LOGIN allowed.
        server, transport = connectFrontend(imap, self.context, 1, peer=("192.0.2.99", 4000))
        server.dataReceived(b"a LOGIN zed pw\r\n")
        return server, transport

    def test_routeAtHandConnectsAtOnce(self):
        self.login()
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["192.0.2.1"])

    def test_routeLaterConnectsThen(self):
        from casd.testing import acceptBackend

        asked = []
        later = Later("directory", asked)
        self.context.router.locators = (later,)
        server, transport = self.login()
        self.assertEqual(self.reactor.tcpClients, [])
        route = self.successResultOf(
            defaultRouter(self.context.config).locate(UserRecord(login="zed", mailHost="solo"), imap)
        )
        later.pending[0].callback(route)
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["192.0.2.1"])
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n")
        self.assertIn(b"ID (", bt.value())

    def test_routeFailureRendered(self):
        self.context.router.locators = (Now("x", [], BackendUnavailable("nowhere")),)
        server, transport = self.login()
        self.assertIn(b"a NO [UNAVAILABLE]", transport.value())
        self.assertEqual(self.reactor.tcpClients, [])


class ChainTests(RoutingTestMixin, SynchronousTestCase):
    def test_idleLocatorsLeftOut(self):
        """
        Without a map, a hash group or a default, those locators are not asked at all.
        """
        from casd.routing.router import DefaultBackendLocator, MailHostLocator, locatorsFor

        config = self.config(
            mapText="# empty\n", **{'hash_group = "pool"': "", 'default_backend = "solo"': ""}
        )
        self.assertEqual([type(l) for l in locatorsFor(config)], [MailHostLocator])
        config = self.config(mapText="# empty\n", **{'hash_group = "pool"': ""})
        self.assertEqual(
            [type(l) for l in locatorsFor(config)], [MailHostLocator, DefaultBackendLocator]
        )
        router = defaultRouter(config)
        self.assertEqual(self.locate(router, UserRecord(login="zed")).group, "solo")
        self.assertEqual(self.locate(router, UserRecord(login="zed", mailHost="m2")).group, "m2")
