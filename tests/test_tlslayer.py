"""
casd's TLS layer (casd.tlslayer): Twisted's TLS protocol with its interface declarations made
once, for listeners, STARTTLS and backend connections.
"""

import socket

from zope.interface import directlyProvidedBy, implementer, providedBy

from twisted.internet import tcp
from twisted.internet.defer import succeed
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import policies
from twisted.protocols import tls as twistedTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase

from casd import tlslayer
from casd.session.tlsrelay import wholeChunks
from casd.tlslayer import TLSFactory, TLSProtocol, changedInTwisted, startTLS, wrapClientTLS
from tests.test_tlsrelay import Collector, _options


@implementer(ITLSTransport, ITCPTransport, ISystemHandle, IPushProducer, IConsumer)
class ManyInterfaces(StringTransport):
    """
    A transport with as many interfaces as a TCP connection's.
    """


class DeclarationTests(SynchronousTestCase):
    def setUp(self):
        self.serverOptions, self.clientOptions = _options(self.mktemp())
        self.clock = Clock()
        self.calls = []
        for module in (twistedTLS, policies):
            original = module.directlyProvides

            def counting(*args, _original=original):
                self.calls.append(args)
                return _original(*args)

            self.patch(module, "directlyProvides", counting)

    def connect(self, factoryClass, transport, connectWrapped=True):
        factory = factoryClass(self.serverOptions, False, Factory.forProtocol(Collector), self.clock)
        if connectWrapped:
            protocol = factory.buildProtocol(None)
        else:
            protocol = factory.protocol(factory, Collector(), False)
        protocol.makeConnection(transport)
        return protocol

    def test_twistedSourcesUnchanged(self):
        """
        If this fails after a Twisted upgrade: compare the functions named with
        C{TLSProtocol.makeConnection} and C{casd.tlslayer.startTLS}, bring the copies up to date
        and their hashes (C{casd.tlslayer.COPIED}) with them.
        """
        self.assertEqual(changedInTwisted(), [])

    def test_sameDeclarationsAsTwisted(self):
        """
        A layer that connects its protocol provides all of the transport's interfaces; a
        STARTTLS layer (which does not) the transport's last one, as with Twisted's own code.
        """
        for connectWrapped in (True, False):
            theirs = self.connect(TLSMemoryBIOFactory, ManyInterfaces(), connectWrapped)
            ours = self.connect(TLSFactory, ManyInterfaces(), connectWrapped)
            self.assertIsInstance(ours, TLSProtocol)
            self.assertEqual(list(directlyProvidedBy(ours)), list(directlyProvidedBy(theirs)))
            self.assertEqual(list(providedBy(ours)), list(providedBy(theirs)))
        self.assertEqual(list(directlyProvidedBy(ours)), [list(providedBy(ManyInterfaces()))[-1]])
        self.assertTrue(ITCPTransport.providedBy(self.connect(TLSFactory, ManyInterfaces())))

    def test_declaredOnce(self):
        """
        No C{directlyProvides} per connection: the declaration is shared.
        """
        first = self.connect(TLSFactory, ManyInterfaces())
        second = self.connect(TLSFactory, ManyInterfaces())
        self.assertEqual(self.calls, [])
        self.assertIs(first.__provides__, second.__provides__)
        # Twisted's own: once per interface, then once more for the protocol wrapper.
        self.connect(TLSMemoryBIOFactory, ManyInterfaces())
        self.assertEqual(len(self.calls), len(list(providedBy(ManyInterfaces()))) + 1)

    def test_tableBounded(self):
        self.patch(tlslayer, "_DECLARATIONS", {})
        for i in range(300):
            tlslayer._DECLARATIONS[i] = None
        self.connect(TLSFactory, ManyInterfaces())
        self.assertEqual(len(tlslayer._DECLARATIONS), 1)

    def test_wholeChunksKeepsTheLayer(self):
        """
        The relay's whole-chunk writes apply to casd's layer too (else every small write would
        wait for Twisted's aggregation timer).
        """
        protocol = self.connect(TLSFactory, ManyInterfaces())
        self.assertTrue(wholeChunks(protocol))
        self.assertIsInstance(protocol, TLSProtocol)


class FakeEndpoint:
    def __init__(self):
        self.factories = []

    def connect(self, factory):
        self.factories.append(factory)
        protocol = factory.buildProtocol(None)
        return succeed(protocol)


class ClientEndpointTests(SynchronousTestCase):
    def test_wrapClientTLS(self):
        """
        Implicit TLS towards a backend: a client-side L{TLSFactory}, the application's protocol
        handed back (as Twisted's C{wrapClientTLS} does).
        """
        _, clientOptions = _options(self.mktemp())
        endpoint = FakeEndpoint()
        app = Collector()
        result = self.successResultOf(
            wrapClientTLS(clientOptions, endpoint).connect(Factory.forProtocol(lambda: app))
        )
        self.assertIs(result, app)
        (factory,) = endpoint.factories
        self.assertIsInstance(factory, TLSFactory)
        self.assertIs(factory.protocol, TLSProtocol)


class StartTLSTests(SynchronousTestCase):
    """
    STARTTLS on real TCP transports (a socket pair, a private reactor): casd's side with
    L{startTLS}, the peer with Twisted's own.
    """

    def setUp(self):
        self.serverOptions, self.clientOptions = _options(self.mktemp())
        self.reactor = EPollReactor()
        self.addCleanup(self._closeReactor)
        a, b = socket.socketpair()
        self.serverApp, self.clientApp = Collector(), Collector()
        self.server = tcp.Server(a, self.serverApp, ("127.0.0.1", 2), None, 1, self.reactor)
        self.client = tcp.Server(b, self.clientApp, ("127.0.0.1", 1), None, 2, self.reactor)
        self.client._tlsClientDefault = True
        for transport, app in ((self.server, self.serverApp), (self.client, self.clientApp)):
            app.makeConnection(transport)

    def _closeReactor(self):
        for transport in (self.server, self.client):
            transport.stopReading()
            transport.stopWriting()
            transport.socket.close()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def spin(self, until):
        for _ in range(200):
            if until():
                return
            self.reactor.doIteration(0.01)
        self.fail("nothing happened")

    def test_startTLS(self):
        startTLS(self.server, self.serverOptions)
        self.client.startTLS(self.clientOptions)
        self.assertIsInstance(self.server.protocol, TLSProtocol)
        self.assertTrue(self.server.TLS)
        self.assertTrue(ISSLTransport.providedBy(self.server))
        self.assertEqual(
            list(directlyProvidedBy(self.server)), list(directlyProvidedBy(self.client))
        )
        self.assertEqual(
            list(providedBy(self.server.protocol)), list(providedBy(self.client.protocol))
        )
        # Twisted holds small writes for its global reactor's next iteration: none here.
        wholeChunks(self.server)
        wholeChunks(self.client)
        self.server.write(b"* OK over TLS\r\n")
        self.client.write(b"a LOGIN u p\r\n")
        self.spin(lambda: self.serverApp.received and self.clientApp.received)
        self.assertEqual(b"".join(self.clientApp.received), b"* OK over TLS\r\n")
        self.assertEqual(b"".join(self.serverApp.received), b"a LOGIN u p\r\n")
        self.assertIs(self.server.getHandle(), self.server.protocol._tlsConnection)
        self.assertEqual(self.server.getPeerCertificate, self.server.protocol.getPeerCertificate)

    def test_producerKept(self):
        """
        A producer registered before STARTTLS is registered again after it, as Twisted does.
        """
        producer = StringTransport()
        self.server.registerProducer(producer, True)
        startTLS(self.server, self.serverOptions)
        self.assertIs(self.server.protocol._producer._producer, producer)

    def test_factoryShared(self):
        """
        One STARTTLS factory per (options, side), not one per connection.
        """
        startTLS(self.server, self.serverOptions)
        self.assertIs(
            tlslayer._startTLSFactory(self.serverOptions, False), self.server.protocol.factory
        )
        self.assertIsNot(tlslayer._startTLSFactory(self.serverOptions, True), self.server.protocol.factory)

    def test_otherTransportsStartTLSThemselves(self):
        transport = StringTransport()
        started = []
        transport.startTLS = started.append
        startTLS(transport, self.serverOptions)
        self.assertEqual(started, [self.serverOptions])
