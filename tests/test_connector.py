"""
The backend pool on a fake reactor: preference order, DOWN members skipped, failover bounded in
tries and time, every timeout enforced, passive circuit breaking, drain.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.pool.connector import BackendConnector
from casd.session.dialogue import BackendDialogue
from casd.config import parseConfig
from casd.failures import AuthenticationFailed, BackendUnavailable
from casd.pool.health import Member
from casd.service.discovery import discoverProtocols
from casd.routing.router import Route, routeTo
from casd.testing import acceptBackend, failBackend, makeContext
from protocols.imap import imap

CONFIG = """
[routing]
default_backend = "dag"

[backend]
connect_timeout = 4.0
tls_timeout = 3.0
banner_timeout = 2.0
reply_timeout = 6.0
max_tries = 3
failover_timeout = 30.0
# Retrying members that refused: tests/test_retry.py.
connect_retry_time = 0.0

[health]
fall = 2
rise = 2
passive_fall = 2
passive_recovery = 60.0

[backends.m1]
host = "192.0.2.11"
[backends.m1.imap]
tls = "none"
[backends.m2]
host = "192.0.2.12"
[backends.m2.imap]
tls = "none"
[backends.m3]
host = "192.0.2.13"
[backends.m3.imap]
tls = "none"
[backends.slow]
host = "192.0.2.14"
connect_timeout = 0.5
banner_timeout = 0.25
[backends.slow.imap]
tls = "none"

[groups.dag]
members = ["m1", "m2", "m3"]
"""


class Hello(BackendDialogue):
    """
    A stub protocol: greeting C{HELLO}, then C{LOGIN} answered C{OK}, C{NO} (the user's
    credentials refused) or anything else (a temporary failure).
    """

    def dialogue(self):
        self.expectLine(self.greeting)

    def greeting(self, line):
        if line != b"HELLO":
            raise self.fail("bad greeting")
        self.command(b"LOGIN", self.replied)

    def replied(self, line):
        if line == b"NO":
            raise self.fail("refused", authFailed=True)
        if line != b"OK":
            raise self.fail("temporary")
        self.succeed()


class PoolTestMixin:
    config = CONFIG

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, config=self.config)
        self.connector = self.context.connector
        self.user = UserRecord(login="alice")
        self.events = []
        self.patch(Member, "log", Logger(observer=self.events.append))
        self.patch(BackendConnector, "log", Logger(observer=self.events.append))

    def route(self, name="dag"):
        return routeTo(self.context.config, name, self.user, imap, "test")

    def connect(self, route=None):
        route = route or self.route()
        return self.connector.connect(
            route, lambda target: Hello(target, None, self.user, None, self.context)
        )

    def connectedHosts(self):
        return [c[0] for c in self.reactor.tcpClients]

    def connectTimeouts(self):
        """
        The seconds left on the timers armed (the connect timeout, while connecting).
        """
        now = self.reactor.seconds()
        return [c.getTime() - now for c in self.reactor.getDelayedCalls()]

    def accept(self, reply=b"OK"):
        dialogue, transport = acceptBackend(self.reactor)
        dialogue.dataReceived(b"HELLO\r\n")
        if reply is not None:
            dialogue.dataReceived(reply + b"\r\n")
        return dialogue, transport

    def member(self, name):
        return self.connector.member(routeTo(self.context.config, name, self.user, imap, "").targets[0])

    def logged(self, text):
        return [e for e in self.events if text in e["log_format"]]


class FailoverTests(PoolTestMixin, SynchronousTestCase):
    def test_preferenceOrder(self):
        d = self.connect()
        self.assertEqual(self.connectedHosts(), ["192.0.2.11"])
        dialogue, _ = self.accept()
        self.assertIs(self.successResultOf(d), dialogue)

    def test_failoverOnRefused(self):
        d = self.connect()
        failBackend(self.reactor)
        self.assertEqual(self.connectedHosts(), ["192.0.2.11", "192.0.2.12"])
        self.assertNoResult(d)
        dialogue, _ = self.accept()
        self.assertEqual(self.successResultOf(d).target.server, "m2")

    def test_downMemberGetsNoSession(self):
        m1 = self.member("m1")
        m1.checked(False, "x")
        m1.checked(False, "x")
        self.assertFalse(m1.up)
        self.connect()
        self.assertEqual(self.connectedHosts(), ["192.0.2.12"])

    def test_allDownFailsAtOnce(self):
        for name in ("m1", "m2", "m3"):
            for _ in range(2):
                self.member(name).checked(False, "x")
        e = self.failureResultOf(self.connect(), BackendUnavailable).value
        self.assertIn("no member of dag available", str(e))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_maxTries(self):
        self.connector.settings = parseConfig(
            CONFIG.replace("max_tries = 3", "max_tries = 2"), "t", discoverProtocols().values()
        ).backend
        d = self.connect()
        failBackend(self.reactor)
        failBackend(self.reactor)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertIn("2 of 3 available members tried", str(self.failureResultOf(d).value))

    def test_connectTimeout(self):
        d = self.connect()
        self.assertEqual(self.connectTimeouts(), [4.0])
        self.reactor.advance(3.9)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.reactor.advance(0.1)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.connectedHosts(), ["192.0.2.11", "192.0.2.12"])
        self.accept()
        self.successResultOf(d)

    def test_timeoutsFollowNewSettings(self):
        """
        The timeouts of a target are taken from the settings in force: new settings (a reload)
        give the next try their connect timeout.
        """
        d = self.connect()
        self.assertEqual(self.connectTimeouts(), [4.0])
        self.reactor.advance(100)
        self.failureResultOf(d, BackendUnavailable)
        self.connector.reconfigure(
            parseConfig(CONFIG.replace("connect_timeout = 4.0", "connect_timeout = 7.0"), "t", discoverProtocols().values())
        )
        self.connect()
        self.assertEqual(self.connectTimeouts(), [7.0])

    def test_perServerTimeouts(self):
        d = self.connect(self.route("slow"))
        self.assertEqual(self.connectTimeouts(), [0.5])
        dialogue, transport = acceptBackend(self.reactor)
        self.reactor.advance(0.25)
        self.assertIn("no greeting in time", str(self.failureResultOf(d).value))
        self.assertTrue(transport.disconnecting)

    def test_bannerAndReplyTimeouts(self):
        """
        The greeting has C{banner_timeout}, each later reply C{reply_timeout}.
        """
        d = self.connect(self.route("m1"))
        dialogue, _ = acceptBackend(self.reactor)
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertIn("no greeting in time", str(self.failureResultOf(d).value))

        d = self.connect(self.route("m1"))
        dialogue, _ = self.accept(reply=None)
        self.reactor.advance(5.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertIn("no reply in time", str(self.failureResultOf(d).value))

    def test_failoverTimeBudget(self):
        """
        All tries of one session share C{failover_timeout}: a member that takes the session's
        time is abandoned when it is spent, and no further member is tried.
        """
        self.connector.settings = parseConfig(
            CONFIG.replace("failover_timeout = 30.0", "failover_timeout = 5.0"),
            "t",
            discoverProtocols().values(),
        ).backend
        d = self.connect()
        self.reactor.advance(4.0)  # m1's connect timed out
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.connectTimeouts(), [1.0])  # only what is left
        dialogue, transport = acceptBackend(self.reactor)
        dialogue.dataReceived(b"HELLO\r\n")  # greeted: waits for the login reply (6 s)...
        self.reactor.advance(0.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)  # ...but the session's 5 s are spent
        self.assertIn("failover time spent", str(self.failureResultOf(d).value))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_authenticationFailureIsNotFailedOver(self):
        d = self.connect()
        self.accept(reply=b"NO")
        self.failureResultOf(d, AuthenticationFailed)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_temporaryLoginFailureFailsOver(self):
        d = self.connect()
        self.accept(reply=b"TEMP")
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.accept()
        self.assertEqual(self.successResultOf(d).target.server, "m2")

    def test_proxyTTLReachesDialogue(self):
        d = self.connect(Route(self.route().targets, "t", proxyTTL=3))
        dialogue, _ = self.accept()
        self.assertEqual(self.successResultOf(d).proxyTTL, 3)


class CircuitBreakerTests(PoolTestMixin, SynchronousTestCase):
    def test_connectErrorsTakeMemberDown(self):
        """
        C{passive_fall} failed connections take a member DOWN at once, logged once; later
        sessions go straight to the next member.
        """
        for _ in range(2):
            d = self.connect()
            failBackend(self.reactor)
            self.accept()
            self.successResultOf(d)
        self.assertFalse(self.member("m1").up)
        self.assertEqual(len(self.logged("is DOWN")), 1)
        before = len(self.reactor.tcpClients)
        self.connect()
        self.assertEqual(self.connectedHosts()[before:], ["192.0.2.12"])

    def test_successResetsCount(self):
        for reply in ("refuse", "ok", "refuse"):
            d = self.connect(self.route("m1"))
            if reply == "refuse":
                failBackend(self.reactor)
                self.failureResultOf(d)
            else:
                self.accept()
        self.assertTrue(self.member("m1").up)

    def test_noGreetingCounts(self):
        for _ in range(2):
            d = self.connect(self.route("m1"))
            acceptBackend(self.reactor)
            self.reactor.advance(2.0)
            self.failureResultOf(d)
        self.assertFalse(self.member("m1").up)

    def test_loginRefusalDoesNotCount(self):
        """
        A failure after the greeting is about the user, not the member.
        """
        for _ in range(3):
            d = self.connect(self.route("m1"))
            self.accept(reply=b"TEMP")
            self.failureResultOf(d)
        self.assertTrue(self.member("m1").up)
        self.assertEqual(self.logged("is DOWN"), [])

    def test_halfOpenRecovery(self):
        """
        A member no active check watches is tried again after C{passive_recovery}: a good
        connection brings it back, a failed one starts the wait again.
        """
        for _ in range(2):
            d = self.connect(self.route("m1"))
            failBackend(self.reactor)
            self.failureResultOf(d, BackendUnavailable)
        m1 = self.member("m1")
        self.assertFalse(m1.available())
        self.reactor.advance(60)
        self.assertTrue(m1.available())
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        self.failureResultOf(d, BackendUnavailable)
        self.assertFalse(m1.available())
        self.reactor.advance(60)
        d = self.connect(self.route("m1"))
        self.accept()
        self.successResultOf(d)
        self.assertTrue(m1.up)
        self.assertEqual(len(self.logged("is UP")), 1)

    def test_activelyCheckedWaitsForRise(self):
        m1 = self.member("m1")
        m1.activelyChecked = True
        for _ in range(2):
            d = self.connect(self.route("m1"))
            failBackend(self.reactor)
            self.failureResultOf(d, BackendUnavailable)
        self.reactor.advance(600)
        self.assertFalse(m1.available())
        m1.checked(True)
        self.assertFalse(m1.up)
        m1.checked(True)
        self.assertTrue(m1.available())


class DrainTests(PoolTestMixin, SynchronousTestCase):
    def openSessions(self, server, count):
        sessions = []
        for _ in range(count):
            d = self.connect(self.route(server))
            dialogue, transport = self.accept()
            self.successResultOf(d)
            sessions.append(transport)
        return sessions

    def test_drainedGetsNoNewSessions(self):
        self.connector.setDraining({"m1"})
        self.connect()
        self.assertEqual(self.connectedHosts(), ["192.0.2.12"])
        self.assertEqual(len(self.logged("is draining")), 1)
        self.assertEqual(self.connector.state(self.route("m1").targets[0]), "draining")

    def test_drainedAloneFailsAtOnce(self):
        self.connector.setDraining({"m1"})
        e = self.failureResultOf(self.connect(self.route("m1")), BackendUnavailable).value
        self.assertIn("draining", str(e))

    def test_existingSessionsContinue(self):
        sessions = self.openSessions("m1", 2)
        self.connector.setDraining({"m1"})
        self.reactor.advance(1000)
        self.assertFalse(any(t.disconnecting for t in sessions))

    def test_spreadClose(self):
        """
        With a close period, a drained member's sessions are closed one at a time, oldest
        first, evenly over the period; other members' sessions are left alone.
        """
        sessions = self.openSessions("m1", 4)
        others = self.openSessions("m2", 2)
        self.connector.setDraining({"m1"}, closePeriod=8.0)
        closed = []
        for _ in range(4):
            self.reactor.advance(2.0)
            closed.append([t.disconnecting for t in sessions].count(True))
        self.assertEqual(closed, [1, 2, 3, 4])
        self.assertTrue(sessions[0].disconnecting)
        self.assertFalse(any(t.disconnecting for t in others))

    def test_undrainStopsClosing(self):
        sessions = self.openSessions("m1", 4)
        self.connector.setDraining({"m1"}, closePeriod=8.0)
        self.reactor.advance(2.0)
        self.connector.setDraining(set())
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual([t.disconnecting for t in sessions].count(True), 1)
        self.connect()
        self.assertEqual(self.connectedHosts()[-1], "192.0.2.11")
        self.assertEqual(len(self.logged("no longer draining")), 1)

    def test_sessionsTracked(self):
        d = self.connect(self.route("m1"))
        dialogue, transport = self.accept()
        self.successResultOf(d)
        self.assertEqual(self.connector.sessionsOf("m1"), [dialogue])
        dialogue.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.connector.sessionsOf("m1"), [])

    def test_reconfigureFromConfig(self):
        """
        A reloaded configuration with C{drain = true} drains the server, closing its sessions
        over C{drain_close_period}.
        """
        sessions = self.openSessions("m1", 2)
        text = CONFIG.replace('[backends.m1]\nhost = "192.0.2.11"', '[backends.m1]\nhost = "192.0.2.11"\ndrain = true')
        text = text.replace("max_tries = 3", "max_tries = 3\ndrain_close_period = 10.0")
        config = parseConfig(text, "t", discoverProtocols().values())
        self.connector.reconfigure(config)
        self.assertEqual(self.connector.draining, {"m1"})
        self.reactor.advance(10)
        self.assertTrue(all(t.disconnecting for t in sessions))
        self.assertIs(self.member("m2").settings, config.health)

    def test_drainAtStartup(self):
        text = CONFIG.replace('[backends.m2]\nhost = "192.0.2.12"', '[backends.m2]\nhost = "192.0.2.12"\ndrain = true')
        context = makeContext(self.reactor, config=text)
        self.assertEqual(context.connector.draining, {"m2"})


class BackendDeathTests(PoolTestMixin, SynchronousTestCase):
    """
    A backend that dies mid-session closes the client promptly, whatever the client does next.
    """

    def relayed(self, clientTransport=None):
        from casd.session.relay import Relay
        from casd.testing import TLSStringTransport
        from twisted.internet.protocol import Protocol

        d = self.connect(self.route("m1"))
        dialogue, backendTransport = self.accept()
        self.successResultOf(d)
        client = Protocol()
        clientTransport = clientTransport or TLSStringTransport()
        client.makeConnection(clientTransport)
        ended = []
        relay = Relay(client, dialogue, self.reactor, 100.0, ended.append)
        relay.start()
        return relay, dialogue, clientTransport, backendTransport, ended

    def test_backendDeathClosesClient(self):
        relay, dialogue, clientTransport, backendTransport, ended = self.relayed()
        dialogue.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(clientTransport.disconnecting)
        self.assertEqual(ended, ["backend closed"])
        self.assertEqual(self.connector.sessionsOf("m1"), [])

    def test_clientHalfCloseAfterBackendDied(self):
        """
        The client's FIN arriving after the backend went must not touch the dead backend
        transport (a real one has no file descriptor any more).
        """
        relay, dialogue, clientTransport, backendTransport, ended = self.relayed()
        backendTransport.loseWriteConnection = lambda: self.fail("wrote to a dead backend")
        dialogue.connectionLost(Failure(ConnectionDone()))
        relay.clientReadClosed()
        self.assertEqual(ended, ["backend closed"])

    def test_tlsClientClosed(self):
        """
        A TLS transport (a client after STARTTLS) closes only once no producer is registered
        with it: the relay unregisters the dead backend first.
        """
        from casd.testing import TLSStringTransport

        class TLSLike(TLSStringTransport):
            closeAsked = False

            def loseConnection(self):
                self.closeAsked = True
                if self.producer is None:
                    TLSStringTransport.loseConnection(self)

            def unregisterProducer(self):
                TLSStringTransport.unregisterProducer(self)
                if self.closeAsked:
                    TLSStringTransport.loseConnection(self)

        relay, dialogue, clientTransport, backendTransport, ended = self.relayed(TLSLike())
        self.assertIsNotNone(clientTransport.producer)
        dialogue.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(clientTransport.disconnecting)
