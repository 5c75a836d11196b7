"""
The PROXY protocol listener's trust: a header is believed only from the listener's
C{proxy_trusted} senders.  Driven through the real IMAP front end on a StringTransport, so that
what a forged header would buy (plaintext login, no penalty, a believed ID) is what is checked.
"""

from ipaddress import ip_network

from twisted.internet.address import IPv4Address
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.service.proxyproto import LOGGED_PEERS, ProxyProtocolFactory, listenerEndpoint
from casd.testing import TLSStringTransport, acceptBackend, makeContext
from protocols.imap import imap

CONFIG = """
[server]
trusted_networks = ["10.0.0.0/8"]

[auth]
failure_delay = 2.0

[routing]
default_backend = "mbx"

[backends.mbx]
host = "192.0.2.10"
[backends.mbx.imap]
tls = "none"

[[imap.listen]]
endpoint = "haproxy:tcp:2143"
proxy_trusted = ["203.0.113.0/28"]
name = "behind-lb"
"""

#: The load balancer casd trusts, and a stranger.
BALANCER = ("203.0.113.1", 40000)
STRANGER = ("198.51.100.7", 40000)
#: A header claiming a client inside [server] trusted_networks.
FORGED = b"PROXY TCP4 10.1.2.3 192.0.2.1 5555 143\r\n"


class ProxyTrustTests(SynchronousTestCase):
    def setUp(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        from twisted.internet.testing import MemoryReactorClock

        self.reactor = MemoryReactorClock()
        self.context = makeContext(
            self.reactor,
            users={"alice": ("secret", UserRecord(login="alice", backendLogin="alice"))},
            config=CONFIG,
        )
        self.section = self.context.config.protocols["imap"]
        self.listener = self.section.listeners[0]

    def wrap(self, untrusted="close"):
        factory = imap.buildFactory(self.context, self.section, self.listener)
        return ProxyProtocolFactory(
            factory, self.reactor, self.listener.proxyTrusted, untrusted, self.listener.name
        )

    def connect(self, peer, untrusted="close", factory=None):
        factory = factory or self.wrap(untrusted)
        proto = factory.buildProtocol(IPv4Address("TCP", *peer))
        transport = TLSStringTransport(
            hostAddress=IPv4Address("TCP", "192.0.2.1", 2143), peerAddress=IPv4Address("TCP", *peer)
        )
        proto.makeConnection(transport)
        return proto, transport

    def warnings(self):
        return [e for e in self.events if "proxy_trusted" in e.get("log_format", "")]

    def test_configurationReachesTheFactory(self):
        endpoint, factory = listenerEndpoint(self.reactor, self.listener, object())
        self.assertIsInstance(factory, ProxyProtocolFactory)
        self.assertEqual(factory.trusted, (ip_network("203.0.113.0/28"),))
        self.assertEqual(factory.untrusted, "close")

    def test_noTrustedSendersRefused(self):
        """
        The wrapper itself refuses to believe everyone: a listener without proxy_trusted (one
        built around the configuration check) is an error, not an open door.
        """
        import attr

        bare = attr.evolve(self.listener, proxyTrusted=())
        self.assertRaises(ValueError, listenerEndpoint, self.reactor, bare, object())

    def test_untrustedSenderClosed(self):
        """
        A stranger's forged header is never read: the connection is closed at once, nothing is
        sent, no session starts; the stranger is logged once, however often it comes back.
        """
        factory = self.wrap("close")
        for _ in range(3):
            proto, transport = self.connect(STRANGER, factory=factory)
            proto.dataReceived(FORGED + b"a LOGIN alice secret\r\n")
            self.assertTrue(transport.disconnecting)
            self.assertEqual(transport.value(), b"")
            self.assertFalse(proto._started)
        self.assertEqual(self.reactor.tcpClients, [])
        warnings = self.warnings()
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["peer"], "198.51.100.7")
        self.assertEqual(warnings[0]["listener"], "behind-lb")

    def test_untrustedSenderIgnoredGetsNoTrust(self):
        """
        With proxy_untrusted = "ignore", the forged header is read and thrown away: the session
        runs with the stranger's own address, untrusted: no plaintext LOGIN, the login penalty
        applies, and its ID claims are not forwarded.
        """
        proto, transport = self.connect(STRANGER, "ignore")
        proto.dataReceived(FORGED)
        server = proto.wrappedProtocol
        self.assertEqual((server.client.peerHost, server.client.trusted), ("198.51.100.7", False))
        self.assertEqual(proto.getPeer().host, "198.51.100.7")
        greeting = transport.value()
        self.assertIn(b"LOGINDISABLED", greeting)
        transport.clear()
        proto.dataReceived(b"a LOGIN alice secret\r\n")
        self.assertIn(b"a NO [PRIVACYREQUIRED]", transport.value())
        self.assertEqual(self.reactor.tcpClients, [])
        # Over TLS (as STARTTLS would give), a wrong password waits out the penalty.
        server.client = server.client.withTLS()
        transport.clear()
        proto.dataReceived(b"b LOGIN alice wrong\r\n")
        self.assertEqual(transport.value(), b"")
        self.reactor.advance(2.1)
        self.assertIn(b"b NO [AUTHENTICATIONFAILED]", transport.value())
        # Its claims in ID are not believed, and the backend hears the stranger's address.
        proto.dataReceived(b'c ID ("x-originating-ip" "10.9.9.9" "x-session-id" "forged")\r\n')
        self.assertEqual(server.client.peerHost, "198.51.100.7")
        self.reactor.advance(10)
        proto.dataReceived(b"d LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        sent = bt.value()
        self.assertIn(b'"x-originating-ip" "198.51.100.7"', sent)
        self.assertNotIn(b"10.9.9.9", sent)
        self.assertNotIn(b"10.1.2.3", sent)
        self.assertNotIn(b"forged", sent)
        self.assertEqual(len(self.warnings()), 1)

    def test_trustedSenderBelieved(self):
        """
        The load balancer's header is believed: the client is the one it names, trusted here
        because 10.1.2.3 is in [server] trusted_networks (plaintext login, ID forwarded).
        """
        proto, transport = self.connect(BALANCER)
        self.assertEqual(transport.value(), b"")  # the session starts after the header
        proto.dataReceived(FORGED)
        server = proto.wrappedProtocol
        self.assertEqual((server.client.peerHost, server.client.trusted), ("10.1.2.3", True))
        self.assertNotIn(b"LOGINDISABLED", transport.value())
        proto.dataReceived(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n")
        self.assertIn(b'"x-originating-ip" "10.1.2.3"', bt.value())
        self.assertEqual(self.warnings(), [])

    def test_trustedSenderUntrustedClient(self):
        proto, transport = self.connect(BALANCER, "ignore")
        proto.dataReceived(b"PROXY TCP4 198.51.100.50 192.0.2.1 5555 143\r\n")
        server = proto.wrappedProtocol
        self.assertEqual((server.client.peerHost, server.client.trusted), ("198.51.100.50", False))
        self.assertIn(b"LOGINDISABLED", transport.value())

    def test_loggedPeersBounded(self):
        factory = self.wrap("close")
        for i in range(LOGGED_PEERS + 50):
            self.connect((f"198.51.{i // 250}.{i % 250}", 1), factory=factory)
        self.assertEqual(len(factory._logged), LOGGED_PEERS)
        self.assertEqual(len(self.warnings()), LOGGED_PEERS + 50)
