"""
C{[backends.NAME] protocols}: a backend declares the protocols it serves; only those are
health-checked and routed to it (issue 15, defect 8).
"""

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.config import ConfigError, parseConfig
from casd.failures import BackendUnavailable
from casd.pool.health import HealthChecker
from casd.routing import router as routerModule
from casd.routing.router import defaultRouter
from casd.service.discovery import discoverProtocols
from casd.testing import makeContext

CONFIG = """
[routing]
default_backend = "dag"

[backends.mbx]
host = "192.0.2.11"
protocols = ["imap", "pop3"]
[backends.mta]
host = "192.0.2.12"
protocols = ["smtp", "submission"]
[backends.all]
host = "192.0.2.13"

[groups.dag]
members = ["mta", "mbx"]
[groups.mtas]
members = ["mta"]

[imap]
[[imap.listen]]
endpoint = "tcp:1143"
[pop3]
enabled = true
[[pop3.listen]]
endpoint = "tcp:1110"
[managesieve]
enabled = true
[[managesieve.listen]]
endpoint = "tcp:4190"
"""


def parse(text=CONFIG):
    return parseConfig(text, "t.toml", discoverProtocols().values())


class ConfigTests(SynchronousTestCase):
    def test_defaultEveryProtocol(self):
        """
        Without C{protocols} a server serves every protocol (C{["*"]}), as before the key.
        """
        server = parse().backends["all"]
        self.assertIsNone(server.serves)
        for name in discoverProtocols():
            self.assertTrue(server.servesProtocol(name))

    def test_declared(self):
        server = parse().backends["mbx"]
        self.assertEqual(server.serves, frozenset({"imap", "pop3"}))
        self.assertTrue(server.servesProtocol("imap"))
        self.assertFalse(server.servesProtocol("managesieve"))
        self.assertFalse(server.servesProtocol("smtp"))

    def test_unknownProtocol(self):
        e = self.assertRaises(
            ConfigError, parse, CONFIG.replace('["imap", "pop3"]', '["imap", "imaps"]')
        )
        self.assertIn("backends.mbx.protocols", str(e))
        self.assertIn("'imaps'", str(e))

    def test_empty(self):
        e = self.assertRaises(ConfigError, parse, CONFIG.replace('["imap", "pop3"]', "[]"))
        self.assertIn("backends.mbx.protocols", str(e))

    def test_tableOfProtocolNotServed(self):
        """
        A C{[backends.NAME.PROTOCOL]} table for a protocol the server does not serve is a
        mistake the operator must hear of.
        """
        text = CONFIG.replace(
            '[backends.mta]', '[backends.mbx.managesieve]\nport = 4190\n[backends.mta]'
        )
        e = self.assertRaises(ConfigError, parse, text)
        self.assertIn("backends.mbx.managesieve", str(e))


class HealthTests(SynchronousTestCase):
    def test_onlyServedProtocolsProbed(self):
        """
        Each server is probed only for the enabled protocols it serves: no probe of a mailbox
        server's port 25 nor of an MTA's IMAP port.
        """
        reactor = MemoryReactorClock()
        context = makeContext(reactor, config=CONFIG)
        checker = HealthChecker(reactor, context.connector, context.config, context.protocols)
        planned = sorted(checker.plannedChecks(context.config))
        self.assertEqual(
            planned,
            [
                ("192.0.2.11", 110),
                ("192.0.2.11", 143),
                ("192.0.2.13", 110),
                ("192.0.2.13", 143),
                ("192.0.2.13", 4190),
            ],
        )

    def test_probesMatchPlan(self):
        reactor = MemoryReactorClock()
        context = makeContext(reactor, config=CONFIG)
        checker = HealthChecker(reactor, context.connector, context.config, context.protocols)
        checker.startService()
        self.addCleanup(checker.stopService)
        reactor.advance(context.config.health.interval)
        probed = sorted((host, port) for host, port, *_ in reactor.tcpClients)
        self.assertEqual(probed, sorted(checker.plannedChecks(context.config)))
        self.assertNotIn(("192.0.2.12", 143), probed)


class RoutingTests(SynchronousTestCase):
    def setUp(self):
        self.router = defaultRouter(parse())
        self.protocols = discoverProtocols()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.patch(routerModule, "_servesNoneWarned", set())

    def locate(self, user, protocol):
        return self.router.locate(user, self.protocols[protocol])

    def test_groupSkipsMembersNotServing(self):
        """
        A group's route lists only the members that serve the session's protocol.
        """
        user = UserRecord("alice")
        route = self.successResultOf(self.locate(user, "imap"))
        self.assertEqual([t.server for t in route.targets], ["mbx"])
        route = self.successResultOf(self.locate(user, "submission"))
        self.assertEqual([t.server for t in route.targets], ["mta"])

    def test_noMemberServes(self):
        """
        A route whose members serve none of the session's protocol gives the unavailable failure,
        with one clear warning however many sessions hit it.
        """
        user = UserRecord("alice", mailHost="mtas")
        for _ in range(3):
            failure = self.failureResultOf(self.locate(user, "imap"), BackendUnavailable)
            self.assertIn("group mtas", str(failure.value))
            self.assertIn("serves imap", str(failure.value))
        warnings = [
            e for e in self.events if "[backends.NAME] protocols" in e.get("log_format", "")
        ]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["protocol"], "imap")
        self.assertIn("group mtas", warnings[0]["problem"])

    def test_serverNotServing(self):
        user = UserRecord("alice", mailHost="mta")
        failure = self.failureResultOf(self.locate(user, "pop3"), BackendUnavailable)
        self.assertIn("server mta", str(failure.value))
        route = self.successResultOf(self.locate(UserRecord("bob", mailHost="all"), "pop3"))
        self.assertEqual([t.server for t in route.targets], ["all"])
