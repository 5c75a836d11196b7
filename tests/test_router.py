"""
Mailbox location: the locator chain, groups, the static map, rendezvous hashing, sites, the proxy
TTL and the self check.
"""

from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.config import ConfigError, parseConfig
from casd.failures import BackendUnavailable
from casd.interfaces import ILocator
from casd.service.discovery import discoverProtocols
from casd.routing.router import (
    DefaultBackendLocator,
    HashLocator,
    MailHostLocator,
    Redirected,
    Route,
    Router,
    StaticMapLocator,
    defaultRouter,
    listenerAddress,
    rendezvousOrder,
)
from casd.testing import acceptBackend, connectFrontend, makeContext
from protocols.imap import imap

CONFIG = """
[server]
site = "east"
trusted_networks = ["10.0.0.0/8"]

[routing]
default_backend = "solo"
hash_group = "pool"
map_file = "MAP"

[backends.solo]
host = "192.0.2.1"
[backends.solo.imap]
tls = "none"
[backends.m1]
host = "192.0.2.11"
[backends.m2]
host = "192.0.2.12"
[backends.m3]
host = "192.0.2.13"
[backends.west-cas]
host = "198.51.100.1"
site = "west"
[backends.west-cas.imap]
port = 1143
tls = "none"
[backends.west-mbx]
host = "198.51.100.20"
site = "west"

[groups.dag]
members = ["m1", "m2", "m3"]
[groups.pool]
members = ["m1", "m2", "m3"]
balance = "hash"
[groups.westdag]
members = ["west-mbx"]

[sites.west]
cas = "west-cas"
[sites.north]
action = "refuse"
[sites.south]
action = "redirect"
redirect_url = "imap://imap.south.example/"

[imap]
[[imap.listen]]
endpoint = "tcp:1143"
[[imap.listen]]
endpoint = "tcp:1144"
trusted = true
"""

MAP = """
# user or domain -> server or group
alice        dag
bob@example.com  m2      # by address
example.org  solo
"""


class RoutingTestMixin:
    def writeMap(self, text=MAP):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def config(self, text=CONFIG, mapText=MAP, **replace):
        text = text.replace('"MAP"', repr(self.writeMap(mapText)).replace("'", '"'))
        for old, new in replace.items():
            text = text.replace(old, new)
        return parseConfig(text, "test.toml", discoverProtocols().values())

    def locate(self, router, user, ttl=None):
        return self.successResultOf(router.locate(user, imap, ttl=ttl))

    def refused(self, router, user, ttl=None, kind=BackendUnavailable):
        return self.failureResultOf(router.locate(user, imap, ttl=ttl), kind).value


def hosts(route):
    return [t.host for t in route.targets]


class LocatorChainTests(RoutingTestMixin, SynchronousTestCase):
    def setUp(self):
        self.router = defaultRouter(self.config())

    def test_interfaces(self):
        for kind in (MailHostLocator, StaticMapLocator, HashLocator, DefaultBackendLocator):
            verifyObject(ILocator, kind(self.router.config))

    def test_defaultOrder(self):
        self.assertEqual(
            [type(l) for l in self.router.locators],
            [MailHostLocator, StaticMapLocator, HashLocator, DefaultBackendLocator],
        )

    def test_mailhostFirst(self):
        """
        The directory attribute wins over the map file entry for the same user.
        """
        route = self.locate(self.router, UserRecord(login="alice", mailHost="m3"))
        self.assertEqual(hosts(route), ["192.0.2.13"])
        self.assertIn("mailhost attribute", route.reason)

    def test_mapWhenNoMailhost(self):
        route = self.locate(self.router, UserRecord(login="alice"))
        self.assertEqual(hosts(route), ["192.0.2.11", "192.0.2.12", "192.0.2.13"])
        self.assertEqual(route.group, "dag")
        self.assertIn("map file entry 'alice'", route.reason)
        self.assertIn("preference order", route.reason)

    def test_hashWhenNotMapped(self):
        route = self.locate(self.router, UserRecord(login="zed"))
        self.assertEqual(route.group, "pool")
        self.assertIn("rendezvous", route.reason)
        self.assertEqual(sorted(hosts(route)), ["192.0.2.11", "192.0.2.12", "192.0.2.13"])

    def test_defaultLast(self):
        router = defaultRouter(self.config(**{'hash_group = "pool"': ""}))
        route = self.locate(router, UserRecord(login="zed"))
        self.assertEqual((route.group, hosts(route)), ("solo", ["192.0.2.1"]))
        self.assertIn("default backend", route.reason)

    def test_configuredOrder(self):
        router = defaultRouter(self.config(**{'hash_group = "pool"': 'locators = ["map", "mailhost"]'}))
        route = self.locate(router, UserRecord(login="alice", mailHost="m3"))
        self.assertEqual(route.group, "dag")
        # Neither hash nor default is in the chain: an unplaced user has no route.
        self.assertIn("no route", str(self.refused(router, UserRecord(login="zed"))))

    def test_fallThroughAndStop(self):
        """
        C{None} is "not mine": the next locator is asked.  A failure is "mine, but unavailable":
        the chain stops there.
        """
        asked = []

        @implementer(ILocator)
        class Fixed:
            def __init__(self, name, answer):
                self.name, self.answer = name, answer

            def locate(self, user, protocol):
                asked.append(self.name)
                if isinstance(self.answer, Exception):
                    raise self.answer
                return defer.succeed(self.answer)

        route = Route((), "third")
        router = Router([Fixed("a", None), Fixed("b", None), Fixed("c", route), Fixed("d", None)])
        self.assertIs(self.locate(router, UserRecord(login="x")), route)
        self.assertEqual(asked, ["a", "b", "c"])
        del asked[:]
        router = Router([Fixed("a", BackendUnavailable("down")), Fixed("b", route)])
        self.refused(router, UserRecord(login="x"))
        self.assertEqual(asked, ["a"])

    def test_mailhostGroup(self):
        route = self.locate(self.router, UserRecord(login="x", mailHost="dag"))
        self.assertEqual(hosts(route), ["192.0.2.11", "192.0.2.12", "192.0.2.13"])

    def test_mailhostHashedGroup(self):
        """
        A group with C{balance = "hash"} is ordered for each user, whoever names it.
        """
        for login in ("u1", "u2", "u3", "u4"):
            route = self.locate(self.router, UserRecord(login=login, mailHost="pool"))
            order = rendezvousOrder(login, [("m1", 1), ("m2", 1), ("m3", 1)])
            self.assertEqual([t.server for t in route.targets], order)

    def test_mailhostBareHost(self):
        route = self.locate(self.router, UserRecord(login="x", mailHost="mbx9.example.net"))
        self.assertEqual(hosts(route), ["mbx9.example.net"])
        self.assertEqual(route.targets[0].port, 143)

    def test_mapByAddressAndDomain(self):
        route = self.locate(self.router, UserRecord(login="b", address="Bob@Example.com"))
        self.assertEqual(route.group, "m2")
        route = self.locate(self.router, UserRecord(login="carol@example.org"))
        self.assertEqual(route.group, "solo")
        self.assertIn("'example.org'", route.reason)

    def test_mapErrors(self):
        for text, expected in (
            ("alice\n", ":1: expected USER-OR-DOMAIN"),
            ("alice nowhere\n", "got 'nowhere'"),
            ("alice dag\nALICE m1\n", ":2: 'alice' is mapped twice"),
        ):
            e = self.assertRaises(ConfigError, self.config, mapText=text)
            self.assertEqual(e.key, "routing.map_file")
            self.assertIn(expected, str(e))


class HashingTests(SynchronousTestCase):
    keys = [f"user{i}@example.com" for i in range(3000)]

    def firsts(self, members):
        return {k: rendezvousOrder(k, members)[0] for k in self.keys}

    def test_stable(self):
        members = [(n, 1) for n in "abcde"]
        self.assertEqual(rendezvousOrder("u", members), rendezvousOrder("u", list(reversed(members))))
        self.assertEqual(self.firsts(members), self.firsts(members))

    def test_balanced(self):
        shares = list(self.firsts([(n, 1) for n in "abcde"]).values())
        for n in "abcde":
            self.assertLess(abs(shares.count(n) / len(shares) - 0.2), 0.03)

    def test_removingMovesOnlyThatShare(self):
        before = self.firsts([(n, 1) for n in "abcde"])
        after = self.firsts([(n, 1) for n in "abde"])
        moved = [k for k in self.keys if before[k] != after[k]]
        self.assertTrue(moved)
        self.assertEqual({before[k] for k in moved}, {"c"})
        self.assertEqual(len(moved), list(before.values()).count("c"))
        # Each moved user goes where it would fail over to: its second choice.
        for k in moved:
            self.assertEqual(after[k], rendezvousOrder(k, [(n, 1) for n in "abcde"])[1])

    def test_addingMovesOnlyToTheNewMember(self):
        before = self.firsts([(n, 1) for n in "abcde"])
        after = self.firsts([(n, 1) for n in "abcdef"])
        moved = [k for k in self.keys if before[k] != after[k]]
        self.assertEqual({after[k] for k in moved}, {"f"})
        self.assertLess(abs(len(moved) / len(self.keys) - 1 / 6), 0.03)

    def test_weights(self):
        shares = list(self.firsts([("a", 1), ("b", 1), ("c", 2)]).values())
        self.assertLess(abs(shares.count("c") / len(shares) - 0.5), 0.04)

    def test_groupUsesServerNamesAndBackendLogin(self):
        """
        A user is hashed by the mailbox's backend login, so every protocol and every login alias
        of one mailbox lands on the same member.
        """
        config = parseConfig(CONFIG.replace('map_file = "MAP"', ""), "t.toml", discoverProtocols().values())
        router = defaultRouter(config)
        a = router.locate(UserRecord(login="alias1", backendLogin="mbox@example.com"), imap)
        b = router.locate(UserRecord(login="ALIAS2", backendLogin="MBOX@example.com"), imap)
        a, b = self.successResultOf(a), self.successResultOf(b)
        self.assertEqual(a.targets, b.targets)
        order = rendezvousOrder("mbox@example.com", [("m1", 1), ("m2", 1), ("m3", 1)])
        self.assertEqual([t.server for t in a.targets], order)


class SiteTests(RoutingTestMixin, SynchronousTestCase):
    def setUp(self):
        self.router = defaultRouter(self.config())

    def test_localSite(self):
        route = self.locate(self.router, UserRecord(login="x", mailHost="m1", site="east"))
        self.assertEqual((route.kind, hosts(route)), ("backend", ["192.0.2.11"]))

    def test_userInOtherSiteProxied(self):
        route = self.locate(self.router, UserRecord(login="x", mailHost="m1", site="west"))
        self.assertEqual(route.kind, "cas")
        self.assertEqual(route.site, "west")
        self.assertEqual(hosts(route), ["198.51.100.1"])
        self.assertEqual(route.targets[0].port, 1143)
        self.assertIn("directory site 'west'", route.reason)

    def test_groupInOtherSite(self):
        """
        No site attribute: the site of the group the locators chose decides.
        """
        route = self.locate(self.router, UserRecord(login="x", mailHost="westdag"))
        self.assertEqual((route.kind, route.site, hosts(route)), ("cas", "west", ["198.51.100.1"]))
        self.assertIn("group westdag", route.reason)

    def test_refuse(self):
        e = self.refused(self.router, UserRecord(login="x", site="north"))
        self.assertIn("refused by [sites.north]", str(e))
        self.assertTrue(e.temporary)

    def test_redirect(self):
        e = self.refused(self.router, UserRecord(login="x", site="south"), kind=Redirected)
        self.assertEqual(e.url, "imap://imap.south.example/")
        self.assertIsInstance(e, BackendUnavailable)

    def test_unknownSite(self):
        e = self.refused(self.router, UserRecord(login="x", site="mars"))
        self.assertIn("no [sites.mars]", str(e))

    def test_noLocalSite(self):
        """
        A node with no site of its own does no site routing.
        """
        router = defaultRouter(
            self.config(**{'site = "east"': ""})
        )
        route = self.locate(router, UserRecord(login="x", mailHost="m1", site="west"))
        self.assertEqual((route.kind, hosts(route)), ("backend", ["192.0.2.11"]))

    def test_configErrors(self):
        for replace, key in (
            ({'cas = "west-cas"': 'cas = "nope"'}, "sites.west.cas"),
            ({'redirect_url = "imap://imap.south.example/"': ""}, "sites.south.redirect_url"),
            ({"[sites.north]": "[sites.east]"}, "sites.east"),
            ({'members = ["west-mbx"]': 'members = ["west-mbx", "zz"]'}, "groups.westdag.members"),
            ({'members = ["west-mbx"]': "members = []"}, "groups.westdag.members"),
            ({"[groups.westdag]": "[groups.m1]"}, "groups.m1"),
            ({'hash_group = "pool"': 'hash_group = "m1"'}, "routing.hash_group"),
            ({'default_backend = "solo"': 'default_backend = "x"'}, "routing.default_backend"),
            ({'hash_group = "pool"': 'locators = ["mailhost", "dns"]'}, "routing.locators"),
        ):
            e = self.assertRaises(ConfigError, self.config, **replace)
            self.assertEqual(e.key, key)


class TTLAndSelfTests(RoutingTestMixin, SynchronousTestCase):
    def setUp(self):
        self.router = defaultRouter(self.config())

    def test_defaultTTL(self):
        self.assertEqual(self.locate(self.router, UserRecord(login="zed")).proxyTTL, 4)

    def test_incomingTTLCountsDown(self):
        self.assertEqual(self.locate(self.router, UserRecord(login="zed"), ttl=3).proxyTTL, 2)

    def test_spentTTLRefused(self):
        for ttl in (1, 0):
            e = self.refused(self.router, UserRecord(login="zed"), ttl=ttl)
            self.assertIn("looping", str(e))

    def test_routeBackAtThisNode(self):
        """
        Another site's casd configured at this node's own listener is a temporary failure, not a
        connection to itself.
        """
        router = defaultRouter(self.config(**{'host = "198.51.100.1"': 'host = "127.0.0.1"'}))
        e = self.refused(router, UserRecord(login="x", site="west"))
        self.assertIn("points back at this node", str(e))

    def test_selfMemberSkipped(self):
        events = []
        config = self.config(
            **{
                '[backends.m2]\nhost = "192.0.2.12"': '[backends.m2]\nhost = "127.0.0.1"\n'
                "[backends.m2.imap]\nport = 1144"
            }
        )
        self.patch(Router, "log", Logger(observer=events.append))
        router = defaultRouter(config)
        for _ in range(2):
            route = self.locate(router, UserRecord(login="x", mailHost="dag"))
            self.assertEqual(hosts(route), ["192.0.2.11", "192.0.2.13"])
            self.assertIn("m2(127.0.0.1:1144) skipped: this node", route.reason)
        self.assertEqual(len([e for e in events if e["log_level"] == LogLevel.warn]), 1)

    def test_ownHostnameIsSelf(self):
        router = defaultRouter(
            self.config(
                **{
                    'site = "east"': 'site = "east"\nhostname = "cas.east.test"',
                    'host = "198.51.100.1"': 'host = "CAS.east.test"',
                }
            )
        )
        self.assertIn("points back", str(self.refused(router, UserRecord(login="x", site="west"))))

    def test_otherPortIsNotSelf(self):
        router = defaultRouter(self.config(**{'host = "198.51.100.1"': 'host = "127.0.0.1"', "port = 1143": "port = 1145"}))
        self.assertEqual(self.locate(router, UserRecord(login="x", site="west")).kind, "cas")

    def test_listenerAddress(self):
        for endpoint, expected in (
            ("tcp:143", ("", 143)),
            ("tcp:1143:interface=127.0.0.1", ("127.0.0.1", 1143)),
            ("tcp:port=993:interface=0.0.0.0", ("", 993)),
            ("haproxy:tcp:144", ("", 144)),
            ("ssl:993:privateKey=a.pem:certKey=b.pem", ("", 993)),
            ("tcp6:143:interface=\\:\\:1", ("::1", 143)),
            ("unix:/run/casd.sock", None),
        ):
            self.assertEqual(listenerAddress(endpoint), expected, endpoint)


class IMAPProxyTTLTests(RoutingTestMixin, SynchronousTestCase):
    """
    x-proxy-ttl in IMAP ID: taken from trusted clients only, counted down towards the backend.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        text = CONFIG.replace('map_file = "MAP"', "")
        users = {"zed": ("pw", UserRecord(login="zed", mailHost="solo"))}
        self.context = makeContext(self.reactor, users=users, config=text)

    def login(self, listener, ttl):
        server, transport = connectFrontend(imap, self.context, listener, peer=("192.0.2.99", 4000))
        server.dataReceived(b'i ID ("x-proxy-ttl" "%d")\r\na LOGIN zed pw\r\n' % ttl)
        return server, transport

    def idSent(self):
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR] hi\r\n")
        return bt.value().split(b"\r\n")[0]

    def test_trustedClientTTL(self):
        server, _ = self.login(1, 3)
        self.assertEqual(server.proxyTTL, 3)
        self.assertIn(b'"x-proxy-ttl" "2"', self.idSent())

    def test_untrustedClientTTLIgnored(self):
        server, transport = connectFrontend(imap, self.context, 0, peer=("192.0.2.99", 4000))
        server.client = server.client.withTLS()
        server.dataReceived(b'i ID ("x-proxy-ttl" "3")\r\na LOGIN zed pw\r\n')
        self.assertIsNone(server.proxyTTL)
        self.assertIn(b'"x-proxy-ttl" "4"', self.idSent())

    def test_loopRefusedWithoutConnecting(self):
        server, transport = self.login(1, 1)
        self.assertIn(b"a NO [UNAVAILABLE]", transport.value())
        self.assertEqual(self.reactor.tcpClients, [])
