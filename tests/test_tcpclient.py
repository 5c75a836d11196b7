"""
The backend pool's own TCP client (L{casd.pool.tcpclient}): when it is used and when Twisted's
C{connectTCP} is.  Its work over real sockets: C{tests.integration.test_tcpclient}.
"""

from twisted.internet.protocol import ClientFactory
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.pool import tcpclient


class PinTests(SynchronousTestCase):
    def test_twistedMatches(self):
        """
        L{tcpclient.LeanClient} stands in for parts of Twisted's TCP client: after a Twisted
        upgrade this fails until they were compared again and L{tcpclient.TWISTED_SHA256}
        updated (meanwhile the pool falls back to C{connectTCP}).
        """
        self.assertTrue(tcpclient.twistedMatches())

    def test_changedTwistedFallsBack(self):
        self.patch(tcpclient, "TWISTED_SHA256", "0" * 64)
        self.assertFalse(tcpclient.twistedMatches())


class FallbackTests(SynchronousTestCase):
    def test_otherReactorsGetConnectTCP(self):
        """
        A reactor that is not a POSIX one (here a test reactor) gets C{connectTCP}, with no
        timeout of its own: the pool bounds the attempt.
        """
        reactor = MemoryReactorClock()
        factory = ClientFactory()
        connector = tcpclient.connectBackend(reactor, "192.0.2.1", 143, factory, 4)
        self.assertEqual(reactor.tcpClients, [("192.0.2.1", 143, factory, None, None)])
        self.assertIs(connector, reactor.connectors[0])

    def test_ipv6GetsConnectTCP(self):
        from twisted.internet import reactor

        factory = ClientFactory()
        calls = []
        self.patch(reactor, "connectTCP", lambda *a, **kw: calls.append((a, kw)) or "c")
        self.assertEqual(tcpclient.connectBackend(reactor, "::1", 143, factory, 6), "c")
        self.assertEqual(calls, [(("::1", 143, factory), {"timeout": None})])


class WriteThroughTests(SynchronousTestCase):
    def test_plainTCPToTheRelay(self):
        """
        L{tcpclient.LeanClient} writes through from the start: L{writeThrough} leaves its class
        as it is, in its fast lane (no TLS check, no class swap), and the relay may close it at
        once; a class that does not write through cannot be declared so.
        """
        from twisted.internet import tcp

        from casd.session import relay

        self.assertIn(tcpclient.LeanClient, relay._PLAIN_TCP)
        self.assertRaises(TypeError, relay.writesThrough, type("Slow", (tcp.Client,), {}))
