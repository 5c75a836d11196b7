"""
The pool's path of one try without an endpoint (an IP backend without implicit TLS): the
connection's factory is the try itself, one timer bounds the connect, and cancelling a session's
connect abandons it without trying another member.
"""

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from casd.testing import acceptBackend, failBackend
from tests.test_connector import Hello, PoolTestMixin
from tests.test_retry import RETRY_CONFIG


class DirectConnectTests(PoolTestMixin, SynchronousTestCase):
    def test_factoryBuildsTheDialogue(self):
        """
        No endpoint and no wrapping protocol: the factory given to C{connectTCP} builds the
        backend dialogue itself, and the connector has no timer of its own beside the pool's.
        """
        self.connect()
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[0]
        self.assertIsNone(timeout)
        self.assertEqual(self.connectTimeouts(), [4.0])
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.assertIsInstance(protocol, Hello)
        self.assertEqual(protocol.target.server, "m1")

    def test_connectTimerHandedToTheDialogue(self):
        """
        Connected, the connect timer goes on as the dialogue's one timer: the same
        L{DelayedCall}, reset to the banner timeout, and it fails the dialogue (not the
        connect) when it runs; no second timer is armed.
        """
        d = self.connect(self.route("m1"))
        (timer,) = self.reactor.getDelayedCalls()
        self.assertEqual(self.connectTimeouts(), [4.0])
        dialogue, transport = acceptBackend(self.reactor)
        self.assertEqual(self.reactor.getDelayedCalls(), [timer])
        self.assertEqual(self.connectTimeouts(), [2.0])
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertIn("no greeting in time", str(self.failureResultOf(d).value))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.connectedHosts(), ["192.0.2.11"])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_handedTimerCancelledOnLogin(self):
        """
        The handed-over timer ends with the dialogue: logged in, no timer is left, and the
        connect timeout never fires later.
        """
        d = self.connect()
        self.accept()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancelledBeforeBuildProtocol(self):
        """
        A try cancelled before its connection was built gets no dialogue, and its connect timer
        is cancelled, not handed on.
        """
        d = self.connect()
        host, port, factory = self.reactor.tcpClients[0][:3]
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertIsNone(factory.buildProtocol(IPv4Address("TCP", host, port)))
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cancelWhileConnecting(self):
        d = self.connect()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.connectedHosts(), ["192.0.2.11"])  # no other member tried
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertTrue(self.member("m1").up)

    def test_cancelWhileLoggingIn(self):
        d = self.connect()
        dialogue, transport = acceptBackend(self.reactor)
        dialogue.dataReceived(b"HELLO\r\n")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.connectedHosts(), ["192.0.2.11"])
        self.assertEqual(self.member("m1").sessions, set())



class CancelRetryTests(PoolTestMixin, SynchronousTestCase):
    config = RETRY_CONFIG

    def test_cancelDuringRetryPause(self):
        d = self.connect(self.route("m1"))
        failBackend(self.reactor)
        self.assertNoResult(d)
        self.assertEqual(self.connectTimeouts(), [0.05])  # the pause before the retry
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.tcpClients), 1)
