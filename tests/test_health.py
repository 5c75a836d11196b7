"""
Backend health: HAProxy-style rise/fall, the active checker on a fake reactor, the protocols'
probes, and the SIGHUP reload that re-reads the routing and backend sections.
"""

import os
import signal

import attr

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.service.reload import ReloadService
from casd.auth import UserRecord
from casd.config import parseConfig
from casd.pool.health import UP, HealthChecker, HealthProbe, Member, probeMember
from casd.service.discovery import discoverProtocols
from casd.routing.router import BackendTarget
from casd.testing import connectFrontend, makeContext
from protocols.imap import imap

CONFIG = """
[routing]
default_backend = "dag"

[health]
interval = 10.0
timeout = 2.0
rise = 2
fall = 3

[backends.m1]
host = "192.0.2.11"
[backends.m1.imap]
tls = "none"
[backends.m2]
host = "192.0.2.12"
[backends.m2.imap]
tls = "none"
[backends.unchecked]
host = "192.0.2.13"
health_check = false

[groups.dag]
members = ["m1", "m2"]

[imap]
[[imap.listen]]
endpoint = "tcp:1143"

[pop3]
enabled = false
[managesieve]
enabled = false
"""


def settings(**overrides):
    values = parseConfig("", "t", ()).health.asDict()
    values.update(overrides)
    from casd.config import Values

    return Values(values)


class MemberTests(SynchronousTestCase):
    def setUp(self):
        self.clock = MemoryReactorClock()
        self.events = []
        self.patch(Member, "log", Logger(observer=self.events.append))
        target = BackendTarget("m1", "192.0.2.11", 143, "none", "m1")
        self.member = Member(target, self.clock, settings(rise=2, fall=3))

    def states(self, results):
        out = []
        for ok in results:
            self.member.checked(ok, "" if ok else "refused")
            out.append(self.member.state)
        return out

    def test_startsUp(self):
        self.assertEqual(self.member.state, UP)
        self.assertTrue(self.member.available())

    def test_fall(self):
        self.assertEqual(self.states([False, False, False, False]), ["UP", "UP", "DOWN", "DOWN"])
        self.assertFalse(self.member.available())

    def test_intermittentFailuresStayUp(self):
        self.assertEqual(self.states([False, False, True, False, False, True]), ["UP"] * 6)

    def test_rise(self):
        self.states([False] * 3)
        self.assertEqual(self.states([True, False, True, True, True]), ["DOWN"] * 3 + ["UP"] * 2)

    def test_changesLoggedOnce(self):
        self.states([False] * 6 + [True] * 5 + [False] * 5)
        messages = [e["log_format"].split(":")[0] for e in self.events]
        self.assertEqual(
            messages, ["backend {member} is DOWN", "backend {member} is UP", "backend {member} is DOWN"]
        )
        self.assertIn("3 failed checks, last: refused", self.events[0]["reason"])


class ProbeTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        from twisted.internet.endpoints import TCP4ClientEndpoint

        self.endpoint = TCP4ClientEndpoint(self.reactor, "192.0.2.11", 143, timeout=2)

    def answer(self, probe=imap.healthProbe, data=None):
        d = probeMember(self.reactor, self.endpoint, probe, 2.0)
        factory = self.reactor.tcpClients[-1][2]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.11", 143))
        transport = StringTransport()
        self.protocol.makeConnection(transport)
        if data is not None:
            self.protocol.dataReceived(data)
        return d, transport

    def test_imapProbe(self):
        self.assertEqual(imap.healthProbe, HealthProbe(expect=b"* OK", quit=b"h LOGOUT\r\n"))

    def test_goodGreeting(self):
        d, transport = self.answer(data=b"* OK [CAPABILITY IMAP4rev1] Dovecot ready.\r\n")
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(transport.value(), b"h LOGOUT\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_greetingInPieces(self):
        d, transport = self.answer(data=b"* o")
        self.assertNoResult(d)
        self.protocol.dataReceived(b"k ready\r\n")
        self.assertIsNone(self.successResultOf(d))

    def test_badGreeting(self):
        d, transport = self.answer(data=b"* BYE Too many connections\r\n")
        self.assertIn("unexpected greeting", self.successResultOf(d))

    def test_silence(self):
        d, transport = self.answer()
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(self.successResultOf(d), "no answer within 2s")
        self.assertTrue(transport.disconnected)

    def test_refused(self):
        d = probeMember(self.reactor, self.endpoint, imap.healthProbe, 2.0)
        self.reactor.tcpClients[-1][2].clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.assertIn("connect failed", self.successResultOf(d))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_connectTimeout(self):
        d = probeMember(self.reactor, self.endpoint, imap.healthProbe, 2.0)
        self.reactor.advance(2.0)
        self.assertEqual(self.successResultOf(d), "no answer within 2s")
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)

    def test_requestFirst(self):
        probe = HealthProbe(expect=b"HTTP/1.1 200", send=b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        d, transport = self.answer(probe=probe, data=b"HTTP/1.1 200 OK\r\n")
        self.assertTrue(transport.value().startswith(b"GET /health"))
        self.assertIsNone(self.successResultOf(d))

    def test_connectOnly(self):
        d, transport = self.answer(probe=None)
        self.assertIsNone(self.successResultOf(d))

    def test_casdPassesItsOwnProbe(self):
        """
        Another site's casd is checked like a mailbox server: its greeting passes the IMAP probe.
        """
        context = makeContext(MemoryReactorClock())
        server, transport = connectFrontend(imap, context)
        d, _ = self.answer(data=transport.value())
        self.assertIsNone(self.successResultOf(d))


class CheckerTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, config=CONFIG)
        self.events = []
        self.patch(Member, "log", Logger(observer=self.events.append))
        self.checker = HealthChecker(
            self.reactor, self.context.connector, self.context.config, self.context.protocols
        )

    def member(self, name):
        from casd.routing.router import targetFor

        return self.context.connector.member(targetFor(self.context.config.backends[name], imap))

    def respond(self, index, data):
        host, port, factory = self.reactor.tcpClients[index][:3]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = StringTransport()
        protocol.makeConnection(transport)
        if data:
            protocol.dataReceived(data)
        return transport

    def test_plannedChecks(self):
        """
        Every server with C{health_check}, for each enabled protocol.
        """
        planned = self.checker.plannedChecks(self.context.config)
        self.assertEqual(sorted(planned), [("192.0.2.11", 143), ("192.0.2.12", 143)])
        disabled = parseConfig(
            CONFIG.replace("[health]", "[health]\nenabled = false"), "t", discoverProtocols().values()
        )
        self.assertEqual(self.checker.plannedChecks(disabled), {})

    def start(self):
        """
        Start checking; the first member's first check comes after half the interval.
        """
        self.checker.startService()
        self.assertEqual(self.reactor.tcpClients, [])
        self.reactor.advance(5.0)

    def test_spreadAndInterval(self):
        self.start()
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["192.0.2.11"])
        self.reactor.advance(1.0)
        self.respond(0, b"* OK hi\r\n")
        self.reactor.advance(4.0)
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["192.0.2.11", "192.0.2.12"])
        self.reactor.advance(5.9)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.reactor.advance(0.1)  # m1: 10 s after its check ended
        self.assertEqual(self.reactor.tcpClients[-1][0], "192.0.2.11")
        self.assertTrue(self.member("m1").activelyChecked)
        self.assertFalse(self.member("unchecked").activelyChecked)

    def test_fallAndRise(self):
        self.start()
        for _ in range(3):
            index = max(i for i, c in enumerate(self.reactor.tcpClients) if c[0] == "192.0.2.11")
            self.respond(index, b"* BYE busy\r\n")
            self.reactor.advance(10.0)
        self.assertFalse(self.member("m1").up)
        for _ in range(2):
            index = max(i for i, c in enumerate(self.reactor.tcpClients) if c[0] == "192.0.2.11")
            self.respond(index, b"* OK hi\r\n")
            self.reactor.advance(10.0)
        self.assertTrue(self.member("m1").up)
        self.assertEqual([e["log_format"].split(":")[0] for e in self.events if "192.0.2.11" in e["member"]],
                         ["backend {member} is DOWN", "backend {member} is UP"])

    def test_silentMemberTimesOut(self):
        self.start()
        transport = self.respond(0, b"")
        self.reactor.advance(2.0)
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.member("m1")._bad, 1)

    def test_reconfigure(self):
        self.start()
        m2 = self.member("m2")
        text = CONFIG.replace('members = ["m1", "m2"]', 'members = ["m1"]').replace(
            '[backends.m2]\nhost = "192.0.2.12"\n[backends.m2.imap]\ntls = "none"\n', ""
        ).replace("[groups.dag]", '[backends.m3]\nhost = "192.0.2.14"\n[backends.m3.imap]\ntls = "none"\n[groups.dag]')
        self.checker.reconfigure(parseConfig(text, "t", discoverProtocols().values()))
        self.assertFalse(m2.activelyChecked)
        self.reactor.advance(10.0)
        checked = {c[0] for c in self.reactor.tcpClients}
        self.assertNotIn("192.0.2.12", checked)
        self.assertIn("192.0.2.14", checked)

    def test_stopCancelsEverything(self):
        """
        Stopping leaves nothing behind: no timer, and checks in flight are abandoned with their
        connections.
        """
        self.start()
        transport = self.respond(0, b"")  # m1: connected, no greeting yet
        self.reactor.advance(1.0)
        self.checker.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.member("m1")._bad, 0)

    def test_stopWhileConnecting(self):
        self.start()
        self.checker.stopService()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_implicitTLSProbedOverTLS(self):
        from casd.tls import ClientTLS
        from tests.support.certs import CertificateAuthority

        ca = CertificateAuthority.create(self.mktemp())
        self.context.connector.clientTLS = ClientTLS(ca.caPath)
        text = CONFIG.replace('[backends.m1.imap]\ntls = "none"', '[backends.m1.imap]\ntls = "implicit"\nport = 993')
        self.checker.reconfigure(parseConfig(text, "t", discoverProtocols().values()))
        self.start()
        host, port, factory = self.reactor.tcpClients[0][:3]
        self.assertEqual((host, port), ("192.0.2.11", 993))
        self.assertIsInstance(factory._wrappedFactory, TLSMemoryBIOFactory)


class FakeSignals:
    SIGHUP = signal.SIGHUP

    def __init__(self):
        self.handlers = {self.SIGHUP: signal.SIG_DFL}

    def signal(self, number, handler):
        old, self.handlers[number] = self.handlers[number], handler
        return old

    def getsignal(self, number):
        return self.handlers[number]


class FakeThreadReactor(MemoryReactorClock):
    def callFromThread(self, f, *args):
        self.callLater(0, f, *args)


RELOAD_CONFIG = """
[routing]
default_backend = "dag"
[backend]
drain_close_period = 4.0
[backends.m1]
host = "192.0.2.11"
[backends.m1.imap]
tls = "none"
[backends.m2]
host = "192.0.2.12"
[backends.m2.imap]
tls = "none"
[groups.dag]
members = ["m1", "m2"]
"""


class ReloadTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeThreadReactor()
        self.path = os.path.abspath(self.mktemp())
        self.write(RELOAD_CONFIG)
        context = makeContext(self.reactor, config=RELOAD_CONFIG)
        # As if the node had read its configuration from this file.
        config = parseConfig(RELOAD_CONFIG, self.path, context.protocols.values())
        self.context = attr.evolve(context, config=config)
        self.signals = FakeSignals()
        self.checker = HealthChecker(self.reactor, self.context.connector, self.context.config, self.context.protocols)
        self.service = ReloadService(self.reactor, self.context, self.checker, signals=self.signals)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text)

    def locate(self, login="u"):
        d = self.context.router.locate(UserRecord(login=login), imap)
        return [t.server for t in self.successResultOf(d).targets]

    def test_sighupReloads(self):
        handler = self.signals.getsignal(signal.SIGHUP)
        self.assertNotEqual(handler, signal.SIG_DFL)
        self.write(RELOAD_CONFIG.replace('members = ["m1", "m2"]', 'members = ["m2", "m1"]'))
        handler(signal.SIGHUP, None)
        self.assertEqual(self.locate(), ["m1", "m2"])  # not yet: the reactor does it
        self.reactor.advance(0)
        self.assertEqual(self.locate(), ["m2", "m1"])

    def test_drainByReload(self):
        self.write(RELOAD_CONFIG.replace('host = "192.0.2.11"', 'host = "192.0.2.11"\ndrain = true'))
        self.assertTrue(self.service.reload())
        self.assertEqual(self.context.connector.draining, {"m1"})
        self.write(RELOAD_CONFIG)
        self.assertTrue(self.service.reload())
        self.assertEqual(self.context.connector.draining, frozenset())

    def test_badFileChangesNothing(self):
        events = []
        self.patch(ReloadService, "log", Logger(observer=events.append))
        self.write(RELOAD_CONFIG.replace('members = ["m1", "m2"]', 'members = ["m1", "nope"]'))
        self.assertFalse(self.service.reload())
        self.assertEqual(self.locate(), ["m1", "m2"])
        self.assertIn("not reloaded", events[0]["log_format"])
        self.assertIn("groups.dag.members", events[0]["reason"])

    def test_restartOnlySectionsNamed(self):
        events = []
        self.patch(ReloadService, "log", Logger(observer=events.append))
        self.write(RELOAD_CONFIG + '\n[server]\nhostname = "other"\n')
        self.assertTrue(self.service.reload())
        self.assertIn("server need a restart", events[0]["stale"])

    def test_stopRestoresHandler(self):
        self.service.stopService()
        self.assertEqual(self.signals.getsignal(signal.SIGHUP), signal.SIG_DFL)
        self.assertFalse(self.service.reload())
