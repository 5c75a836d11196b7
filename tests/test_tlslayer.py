"""
casd's TLS layer (casd.tlslayer): Twisted's TLS protocol with its interface declarations made
once, for listeners, STARTTLS and backend connections.
"""

import os
import socket
import types

from OpenSSL.SSL import Error
from zope.interface import directlyProvidedBy, implementer, providedBy

from twisted.internet import tcp
from twisted.internet.defer import succeed
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IConsumer,
    IPushProducer,
    ISSLTransport,
    ISystemHandle,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import policies
from twisted.protocols import tls as twistedTLS
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd import tlslayer
from casd.config import TLSConfig
from casd.tls import ServerTLS
from casd.session.tlsrelay import _WholeChunkWrites, wholeChunks
from casd.tlslayer import TLSFactory, TLSProtocol, changedInTwisted, startTLS, wrapClientTLS
from tests.support.certs import CertificateAuthority
from tests.test_tlsrelay import Collector, _options, pump


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
        self.assertIsInstance(protocol, _WholeChunkWrites)
        self.assertNotIn("write", vars(protocol))  # not the aggregator's any more


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

    def test_throughAWrapper(self):
        """
        Behind a wrapper that forwards C{startTLS} (the PROXY protocol's), TLS starts on the TCP
        transport below, over the wrapper, as Twisted's would.
        """
        wrapper = ForwardingWrapper(policies.WrappingFactory(Factory()), self.serverApp)
        self.server.protocol = wrapper
        wrapper.makeConnection(self.server)
        startTLS(wrapper, self.serverOptions)
        self.assertIsInstance(self.server.protocol, TLSProtocol)
        self.assertIs(self.server.protocol.wrappedProtocol, wrapper)

    def test_otherTransportsStartTLSThemselves(self):
        transport = StringTransport()
        started = []
        transport.startTLS = started.append
        startTLS(transport, self.serverOptions)
        self.assertEqual(started, [self.serverOptions])


def _records(wire: bytes) -> list[int]:
    """
    @return: the offsets in C{wire} where each TLS record ends.
    """
    ends, offset = [], 0
    while offset + 5 <= len(wire):
        offset += 5 + int.from_bytes(wire[offset + 3 : offset + 5], "big")
        ends.append(offset)
    return ends


class Counting(Collector):
    def __init__(self):
        super().__init__()
        self.lost = []

    def connectionLost(self, reason):
        self.lost.append(reason)


def _casdOptions(directory):
    """
    @return: casd's own server options for an IMAP listener (its contexts: ALPN policy, groups,
        no renegotiation, ...) and client options that trust them.
    """
    ca = CertificateAuthority.create(directory)
    certPath, keyPath = ca.issue(["mail.example.com"], "server")
    descriptor = types.SimpleNamespace(name="imap", alpnProtocols=("imap",))
    server = ServerTLS(TLSConfig(certificate=certPath, key=keyPath, minimumVersion="TLSv1.2", sni=()))
    with open(ca.caPath, "rb") as f:
        client = optionsForClientTLS("mail.example.com", Certificate.loadPEM(f.read()))
    return server.optionsFor(descriptor), client


class ReceiveTests(SynchronousTestCase):
    """
    The receive side of L{TLSProtocol}: everything OpenSSL can decrypt is delivered at once,
    nothing is left behind (a stall), the end of TLS comes after the data before it.
    """

    def setUp(self):
        serverOptions, clientOptions = _casdOptions(self.mktemp())
        self.clock = Clock()
        self.serverApp, self.clientApp = Counting(), Counting()
        serverFactory = TLSFactory(
            serverOptions, False, Factory.forProtocol(lambda: self.serverApp), self.clock
        )
        clientFactory = TLSMemoryBIOFactory(
            clientOptions, True, Factory.forProtocol(lambda: self.clientApp), self.clock
        )
        self.server = serverFactory.buildProtocol(None)
        self.client = clientFactory.buildProtocol(None)
        self.serverWire, self.clientWire = StringTransport(), StringTransport()
        self.server.makeConnection(self.serverWire)
        self.client.makeConnection(self.clientWire)
        pump(self.server, self.serverWire, self.client, self.clientWire, self.clock)
        self.assertTrue(self.server._handshakeDone and self.client._handshakeDone)
        self.assertEqual(self.server._tlsConnection.get_protocol_version_name(), "TLSv1.3")
        wholeChunks(self.client)

    def sent(self, *chunks) -> bytes:
        for chunk in chunks:
            self.client.write(chunk)
        wire = self.clientWire.value()
        self.clientWire.clear()
        return wire

    def test_oneDeliveryPerRead(self):
        chunk = os.urandom(256 * 1024)
        self.server.dataReceived(self.sent(chunk))
        self.assertEqual(self.serverApp.received, [chunk])

    def test_noStallAtAnySplit(self):
        """
        Fed in pieces of every size, the server has delivered, at the end of each record, the
        plaintext of every record so far (TLS 1.3 with an AEAD: 17 bytes of overhead each).
        """
        plain = os.urandom(35000)
        wire = self.sent(plain[:10], plain[10:20000], plain[20000:])
        ends = _records(wire)
        self.assertEqual(ends[-1], len(wire))
        for size in (1, 7, 5 + 16384 + 17, 3000, 65536):
            del self.serverApp.received[:]
            # A fresh server for each split would need a fresh handshake: replay the same
            # records on this one instead is impossible (sequence numbers), so send them again.
            if size != 1:
                wire = self.sent(plain[:10], plain[10:20000], plain[20000:])
                ends = _records(wire)
            fed = 0
            while fed < len(wire):
                piece = wire[fed : fed + size]
                fed += len(piece)
                self.server.dataReceived(piece)
                complete = [end for end in ends if end <= fed]
                expected = sum(
                    (end - start) - 5 - 17 for start, end in zip([0] + ends, complete)
                )
                self.assertEqual(len(b"".join(self.serverApp.received)), expected, (size, fed))
            self.assertEqual(b"".join(self.serverApp.received), plain)

    def test_dataThenCloseNotify(self):
        """
        Data and the peer's close_notify in one read: the data first, then the end.
        """
        self.client.write(b"a LOGOUT\r\n")
        self.client.loseConnection()
        self.server.dataReceived(self.clientWire.value())
        self.assertEqual(self.serverApp.received, [b"a LOGOUT\r\n"])
        self.assertTrue(self.server._lostTLSConnection)
        # The server answered the close_notify and closed its side.
        self.assertTrue(self.serverWire.disconnecting)

    def test_directReadsAsPyOpenSSL(self):
        """
        With C{SSL_read} called directly: an incomplete record delivers nothing, its last byte
        delivers it, and the peer's close_notify ends TLS cleanly (pyOpenSSL's
        C{ZeroReturnError}: the protocol's reason is the transport's, not a TLS error).
        """
        wire = self.sent(b"a NOOP\r\n")
        self.server.dataReceived(wire[:-1])
        self.assertEqual(self.serverApp.received, [])
        self.server.dataReceived(wire[-1:])
        self.assertEqual(self.serverApp.received, [b"a NOOP\r\n"])
        self.client.loseConnection()
        self.server.dataReceived(self.clientWire.value())
        self.assertTrue(self.server._lostTLSConnection)
        self.assertIsNone(self.server._reason)

    def test_bufferFullDeliversAndGoesOn(self):
        """
        More records in one read than the decryption buffer holds: delivered in order, in as
        few calls as the buffer allows.
        """
        chunks = [os.urandom(256 * 1024) for _ in range(3)]
        self.server.dataReceived(self.sent(*chunks))
        self.assertEqual(b"".join(self.serverApp.received), b"".join(chunks))
        self.assertEqual(len(self.serverApp.received), 3)

    def test_lostDuringHandshakeReadsThroughPyOpenSSL(self):
        """
        The connection lost before the handshake finished: the read at the end goes through
        pyOpenSSL (its callbacks may still be running), and ends cleanly.
        """
        serverOptions, _ = _options(self.mktemp())
        app = Counting()
        factory = TLSFactory(serverOptions, False, Factory.forProtocol(lambda: app), self.clock)
        server = factory.buildProtocol(None)
        server.makeConnection(StringTransport())
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(app.received, [])
        self.assertEqual(len(app.lost), 1)

    def test_corruptRecordEndsTheConnection(self):
        """
        A record that does not decrypt: the connection ends with an error, no data delivered,
        no exception out of C{dataReceived}.
        """
        wire = bytearray(self.sent(b"a LOGIN u secret\r\n"))
        wire[-3] ^= 0xFF
        self.server.dataReceived(bytes(wire))
        self.assertEqual(self.serverApp.received, [])
        self.assertTrue(self.server._lostTLSConnection)
        self.assertIsInstance(self.server._reason.value, Error)

    def test_abortedNotDelivered(self):
        self.server.abortConnection()
        self.server.dataReceived(self.sent(b"late"))
        self.assertEqual(self.serverApp.received, [])

    def test_pyOpenSSLPrivateStateStillThere(self):
        """
        What L{TLSProtocol}'s reads rely on; if this fails after a pyOpenSSL upgrade, read its
        C{Connection.__init__} and adapt C{casd.tlslayer}.
        """
        connection = self.server._tlsConnection
        for name in ("_into_ssl", "_from_ssl", "_ssl"):
            self.assertIsNotNone(getattr(connection, name, None), name)
        self.assertTrue(callable(getattr(connection, "_raise_ssl_error", None)))
        self.assertEqual(tlslayer._held(connection._from_ssl, tlslayer._NULL), 0)
        self.assertEqual(tlslayer.drain(connection), b"")  # no WantReadError
        connection.send(b"y")
        record = tlslayer.drain(connection)
        self.assertEqual(len(record), 5 + 1 + 17)  # header, byte, TLS 1.3 AEAD overhead
        self.assertEqual(tlslayer.drain(connection), b"")
        connection.send(b"x")  # a record in the outgoing BIO, not yet written
        held = tlslayer._held(connection._from_ssl, tlslayer._NULL)
        self.assertGreater(held, 1)
        self.serverWire.clear()
        self.server._flushSendBIO()
        self.assertEqual(len(self.serverWire.value()), held)
        self.assertEqual(tlslayer._held(connection._from_ssl, tlslayer._NULL), 0)


class ForwardingWrapper(policies.ProtocolWrapper):
    """
    A protocol wrapper such as the PROXY protocol's: C{startTLS} is its transport's.
    """
