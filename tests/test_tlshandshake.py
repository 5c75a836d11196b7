"""
casd's TLS layer on a login's path: the handshake driven without an exception per step
(casd.tlslayer.handshake), writes before it kept without asking OpenSSL, the connection closed
once this side's close_notify is out, and at once when a relay ends (closeTLSNow).
"""

import socket
import types

from OpenSSL import SSL

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd import tlslayer
from casd.config import TLSConfig
from casd.session.relay import _closeNow, writeThrough
from casd.session.tlsrelay import closeTLSNow, wholeChunks
from casd.tls import ALPNRefused, ServerTLS
from casd.tlslayer import TLSFactory, changedInPyOpenSSL, handshake
from tests.support.certs import CertificateAuthority
from tests.test_tlslayer import Counting, _casdOptions, _records
from tests.test_tlsrelay import pump


class Greeter(Counting):
    """
    A server protocol that greets as casd's frontends do: in C{connectionMade}, before the
    handshake, through whole-chunk writes.
    """

    def connectionMade(self):
        wholeChunks(self.transport)
        self.transport.write(b"* OK ready\r\n")


class HandshakeTests(SynchronousTestCase):
    def setUp(self):
        directory = self.mktemp()
        ca = CertificateAuthority.create(directory)
        certPath, keyPath = ca.issue(["mail.example.com"], "server")
        self.tls = ServerTLS(TLSConfig(certificate=certPath, key=keyPath, minimumVersion="TLSv1.2", sni=()))
        with open(ca.caPath, "rb") as f:
            self.trust = Certificate.loadPEM(f.read())
        self.clock = Clock()

    def connect(self, serverApp, clientApp, alpn=("imap",), clientALPN=None):
        descriptor = types.SimpleNamespace(name="imap", alpnProtocols=alpn)
        serverFactory = TLSFactory(
            self.tls.optionsFor(descriptor), False, Factory.forProtocol(lambda: serverApp), self.clock
        )
        kwargs = {"acceptableProtocols": clientALPN} if clientALPN else {}
        clientOptions = optionsForClientTLS("mail.example.com", self.trust, **kwargs)
        clientFactory = TLSMemoryBIOFactory(
            clientOptions, True, Factory.forProtocol(lambda: clientApp), self.clock
        )
        server, client = serverFactory.buildProtocol(None), clientFactory.buildProtocol(None)
        serverWire, clientWire = StringTransport(), StringTransport()
        server.makeConnection(serverWire)
        client.makeConnection(clientWire)
        return server, serverWire, client, clientWire

    def test_pyOpenSSLSourcesUnchanged(self):
        """
        If this fails after a pyOpenSSL upgrade: compare the functions named with
        C{casd.tlslayer.handshake}, bring it up to date and the hashes
        (C{casd.tlslayer.COPIED_PYOPENSSL}) with it.
        """
        self.assertEqual(changedInPyOpenSSL(), [])

    def test_stepsWithoutExceptions(self):
        """
        Each step of a server handshake: C{False} while OpenSSL waits for the client, C{True} at
        the end, and never pyOpenSSL's C{do_handshake} (whose C{WantReadError} is the cost).
        """
        steps = []
        original = handshake

        def recording(connection):
            steps.append(original(connection))
            return steps[-1]

        self.patch(tlslayer, "handshake", recording)
        throughPyOpenSSL = []
        doHandshake = SSL.Connection.do_handshake

        def recordingPyOpenSSL(connection):
            throughPyOpenSSL.append(connection)
            return doHandshake(connection)

        self.patch(SSL.Connection, "do_handshake", recordingPyOpenSSL)
        serverApp, clientApp = Counting(), Counting()
        server, serverWire, client, clientWire = self.connect(
            serverApp, clientApp, clientALPN=[b"imap"]
        )
        pump(server, serverWire, client, clientWire, self.clock)
        self.assertTrue(server._handshakeDone)
        # The client is Twisted's own layer, through pyOpenSSL; the server never is.
        self.assertIn(client._tlsConnection, throughPyOpenSSL)
        self.assertNotIn(server._tlsConnection, throughPyOpenSSL)
        self.assertEqual(steps, [False, False, True])
        self.assertEqual(server.negotiatedProtocol, b"imap")
        server.write(b"hello")
        pump(server, serverWire, client, clientWire, self.clock)
        self.assertEqual(b"".join(clientApp.received), b"hello")

    def test_refusedALPNRaisesAsPyOpenSSL(self):
        """
        A client offering only another protocol's ALPN id: the handshake fails with the ALPN
        callback's own exception (pyOpenSSL's order: the callback helpers' problems first),
        the connection ends with it as the reason, and the client gets an alert.
        """
        serverApp, clientApp = Counting(), Counting()
        server, serverWire, client, clientWire = self.connect(
            serverApp, clientApp, clientALPN=[b"http/1.1"]
        )
        server.dataReceived(clientWire.value())
        self.assertTrue(server._lostTLSConnection)
        self.assertIsInstance(server._reason.value, ALPNRefused)
        self.assertTrue(serverWire.value(), "no alert sent")
        self.assertTrue(serverWire.disconnecting)

    def test_callbackProblemComesFirst(self):
        """
        A problem a callback left is raised even when OpenSSL only wants to read, as
        pyOpenSSL's C{_raise_ssl_error} does.
        """
        serverApp, clientApp = Counting(), Counting()
        server, serverWire, client, clientWire = self.connect(serverApp, clientApp)
        connection = server._tlsConnection
        helper = connection._context._alpn_select_helper
        self.assertIsNotNone(helper)
        problem = ValueError("left by a callback")
        helper._problems.append(problem)
        self.addCleanup(helper._problems.clear)
        with self.assertRaises(ValueError) as raised:
            handshake(connection)
        self.assertIs(raised.exception, problem)

    def test_junkEndsTheHandshake(self):
        """
        Bytes that are not TLS: the handshake fails with pyOpenSSL's C{Error}, no exception
        leaves C{dataReceived}, nothing reaches the protocol.
        """
        serverApp = Counting()
        server, serverWire, _, _ = self.connect(serverApp, Counting())
        server.dataReceived(b"a LOGIN user secret\r\n")
        self.assertTrue(server._lostTLSConnection)
        self.assertIsInstance(server._reason.value, SSL.Error)
        self.assertEqual(serverApp.received, [])
        self.assertTrue(serverWire.disconnecting)

    def test_greetingKeptForAfterTheHandshake(self):
        """
        A greeting written before the handshake is kept (not handed to C{SSL_write}) and
        reaches the client once it is done, ahead of anything written later.
        """
        sends = []
        self.patch(SSL.Connection, "send", lambda self, data: sends.append(data))
        serverApp, clientApp = Greeter(), Counting()
        server, serverWire, client, clientWire = self.connect(serverApp, clientApp)
        self.assertEqual(server._appSendBuffer, [b"* OK ready\r\n"])
        clientHello = clientWire.value()
        self.assertTrue(clientHello)
        self.assertEqual(serverWire.value(), b"")
        pump(server, serverWire, client, clientWire, self.clock)
        server.write(b"* BYE\r\n")
        pump(server, serverWire, client, clientWire, self.clock)
        self.assertEqual(b"".join(clientApp.received), b"* OK ready\r\n* BYE\r\n")
        self.assertEqual(server._appSendBuffer, [])
        self.assertEqual(sends, [])

    def test_emptyWriteBeforeHandshakeKeepsNothing(self):
        """
        An empty write before the handshake keeps nothing: C{loseConnection} then aborts, as
        with nothing written (Twisted's rule for a connection whose handshake is not done).
        """
        server, serverWire, _, _ = self.connect(Counting(), Counting())
        wholeChunks(server)
        server.write(b"")
        self.assertEqual(server._appSendBuffer, [])
        server.loseConnection()
        self.assertTrue(serverWire.disconnecting)


class PromptCloseTests(SynchronousTestCase):
    """
    The side that ends TLS closes once its close_notify is written, without waiting for the
    peer's (L{TLSProtocol._shutdownTLS}).
    """

    def setUp(self):
        self.clock = Clock()
        self.serverOptions, self.clientOptions = _casdOptions(self.mktemp())

    def connect(self, serverApp, clientApp, serverFactoryClass=TLSFactory, clientFactoryClass=TLSFactory):
        serverFactory = serverFactoryClass(
            self.serverOptions, False, Factory.forProtocol(lambda: serverApp), self.clock
        )
        clientFactory = clientFactoryClass(
            self.clientOptions, True, Factory.forProtocol(lambda: clientApp), self.clock
        )
        server, client = serverFactory.buildProtocol(None), clientFactory.buildProtocol(None)
        serverWire, clientWire = StringTransport(), StringTransport()
        server.makeConnection(serverWire)
        client.makeConnection(clientWire)
        return server, serverWire, client, clientWire

    def assertClosesFirst(self, closing, closingWire, closingApp, peer, peerWire, peerApp):
        pump(closing, closingWire, peer, peerWire, self.clock)
        closing.write(b"* BYE logging out\r\n")
        closing.loseConnection()
        # Closed at once: the peer's close_notify is not waited for.
        self.assertTrue(closingWire.disconnecting)
        self.assertTrue(closing._lostTLSConnection)
        wire = closingWire.value()
        closingWire.clear()
        peer.dataReceived(wire)
        # The peer got the data, then a clean end of TLS (close_notify), and answers it.
        self.assertEqual(b"".join(peerApp.received), b"* BYE logging out\r\n")
        self.assertTrue(peer._lostTLSConnection)
        self.assertIsNone(peer._reason)
        self.assertTrue(peerWire.value(), "the peer did not answer the close_notify")
        # The answer is not read (the transport stopped reading); the protocol is told of a
        # clean end, the transport's reason, as after an answered close_notify.
        closing.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(closingApp.lost), 1)
        self.assertIsInstance(closingApp.lost[0].value, ConnectionDone)

    def test_serverClosesFirst(self):
        serverApp, clientApp = Counting(), Counting()
        server, serverWire, client, clientWire = self.connect(serverApp, clientApp)
        self.assertClosesFirst(server, serverWire, serverApp, client, clientWire, clientApp)

    def test_clientClosesFirst(self):
        """
        A backend connection casd ends (its client contexts do not ignore an end of stream
        without close_notify, so a read at C{connectionLost} would have ended in an error).
        """
        serverApp, clientApp = Counting(), Counting()
        server, serverWire, client, clientWire = self.connect(serverApp, clientApp)
        self.assertClosesFirst(client, clientWire, clientApp, server, serverWire, serverApp)

    def test_peerClosesFirst(self):
        """
        The peer's close_notify: answered, then the connection closed (Twisted's way).
        """
        serverApp, clientApp = Counting(), Counting()
        server, serverWire, client, clientWire = self.connect(
            serverApp, clientApp, clientFactoryClass=TLSMemoryBIOFactory
        )
        pump(server, serverWire, client, clientWire, self.clock)
        client.loseConnection()
        self.assertFalse(clientWire.disconnecting)  # Twisted's layer waits for the answer
        server.dataReceived(clientWire.value())
        self.assertTrue(serverWire.disconnecting)
        self.assertIsNone(server._reason)
        client.dataReceived(serverWire.value())
        self.assertTrue(clientWire.disconnecting)

    def test_beforeTheHandshakeWaitsForIt(self):
        """
        Closed with a greeting kept for after the handshake: the handshake, the greeting and
        the close_notify go out, then the connection closes.
        """
        serverApp, clientApp = Greeter(), Counting()
        server, serverWire, client, clientWire = self.connect(
            serverApp, clientApp, clientFactoryClass=TLSMemoryBIOFactory
        )
        server.loseConnection()
        self.assertFalse(serverWire.disconnecting)
        pump(server, serverWire, client, clientWire, self.clock)
        self.assertTrue(serverWire.disconnecting)
        self.assertEqual(b"".join(clientApp.received), b"* OK ready\r\n")
        self.assertTrue(client._lostTLSConnection)
        self.assertIsNone(client._reason)

    def test_abortedConnectionAborts(self):
        serverApp, clientApp = Counting(), Counting()
        server, serverWire, client, clientWire = self.connect(serverApp, clientApp)
        pump(server, serverWire, client, clientWire, self.clock)
        aborted = []
        serverWire.abortConnection = lambda: aborted.append(True)
        server.abortConnection()
        self.assertEqual(aborted, [True])
        self.assertFalse(serverWire.disconnecting)


class _Port:
    """
    What a L{tcp.Server} asks of its listening port.
    """

    _realPortNumber = 993

    def logPrefix(self):
        return "test"


class _Full:
    """
    A socket whose send buffer is full.
    """

    def __init__(self, real):
        self._real = real

    def send(self, data):
        return 0

    def __getattr__(self, name):
        return getattr(self._real, name)


def _connectedPair(case):
    """
    Set C{case}'s clock, applications, a casd server layer and a Twisted client layer over
    string transports, the handshake done.
    """
    case.clock = Clock()
    serverOptions, clientOptions = _casdOptions(case.mktemp())
    case.serverApp, case.clientApp = Counting(), Counting()
    serverFactory = TLSFactory(serverOptions, False, Factory.forProtocol(lambda: case.serverApp), case.clock)
    clientFactory = TLSMemoryBIOFactory(
        clientOptions, True, Factory.forProtocol(lambda: case.clientApp), case.clock
    )
    case.server, case.client = serverFactory.buildProtocol(None), clientFactory.buildProtocol(None)
    case.serverWire, case.clientWire = StringTransport(), StringTransport()
    case.server.makeConnection(case.serverWire)
    case.client.makeConnection(case.clientWire)
    pump(case.server, case.serverWire, case.client, case.clientWire, case.clock)


class CloseNowTests(SynchronousTestCase):
    """
    L{closeTLSNow}: a relayed TLS client connection ended at once, its close_notify written
    through, its socket closed, its protocol told, before it returns.
    """

    def setUp(self):
        _connectedPair(self)
        wholeChunks(self.server)
        # The handshake done, the server's layer now over an accepted TCP connection: one end
        # of a socket pair, the client reading the other.
        ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        ours.setblocking(False)
        self.reactor = MemoryReactor()
        self.tcp = tcp.Server(ours, self.server, ("127.0.0.1", 50000), _Port(), 1, self.reactor)
        self.server.transport = self.tcp
        writeThrough(self.server)
        self.addCleanup(lambda: self.tcp.connected and self.tcp.connectionLost(Failure(ConnectionDone())))

    def peerReceived(self) -> bytes:
        self.peer.settimeout(5)
        received = b""
        while True:
            chunk = self.peer.recv(65536)
            if not chunk:
                return received
            received += chunk

    def test_closedAtOnce(self):
        self.server.write(b"* BYE\r\n")
        self.assertTrue(closeTLSNow(self.server, _closeNow))
        # Closed: the protocol told (a clean end), the socket closed, out of the reactor.
        self.assertEqual(len(self.serverApp.lost), 1)
        self.assertIsInstance(self.serverApp.lost[0].value, ConnectionDone)
        self.assertTrue(self.tcp.disconnected)
        self.assertNotIn(self.tcp, self.reactor.readers)
        self.assertNotIn(self.tcp, self.reactor.writers)
        # The peer read the data, then a close_notify, then the end of the stream (no reset).
        self.client.dataReceived(self.peerReceived())
        self.assertEqual(b"".join(self.clientApp.received), b"* BYE\r\n")
        self.assertTrue(self.client._lostTLSConnection)
        self.assertIsNone(self.client._reason)
        # Nothing more from the layer: it is closed.
        self.server.loseConnection()
        self.server.write(b"late")
        self.assertEqual(len(self.serverApp.lost), 1)

    def test_bytesQueuedFlushedFirst(self):
        """
        With bytes still queued below: the close_notify queued behind them, the TCP connection
        left to flush and close (its C{loseConnection}); the caller is told it did not close.
        """
        self.tcp.dataBuffer = b"queued"
        self.assertFalse(closeTLSNow(self.server, _closeNow))
        self.assertTrue(self.server.disconnecting)
        self.assertTrue(self.tcp.disconnecting)
        self.assertTrue(self.tcp._tempDataLen)  # the close_notify, behind them
        self.assertEqual(self.serverApp.lost, [])
        self.server.loseConnection()  # the relay's next step: nothing more
        self.assertEqual(self.serverApp.lost, [])

    def test_switchedOnce(self):
        """
        Asked again (the relay's start), L{wholeChunks} leaves a switched layer as it is.
        """
        switched = type(self.server)
        self.assertFalse(wholeChunks(self.server))
        self.assertIs(type(self.server), switched)
        self.server.write(b"x" * 100000)
        self.peer.settimeout(5)
        while len(b"".join(self.clientApp.received)) < 100000:
            self.client.dataReceived(self.peer.recv(200000))
        self.assertEqual(b"".join(self.clientApp.received), b"x" * 100000)

    def test_notWithAProducer(self):
        self.server.registerProducer(Counting(), True)
        self.assertFalse(closeTLSNow(self.server, _closeNow))
        self.server.unregisterProducer()
        self.assertTrue(closeTLSNow(self.server, _closeNow))

    def test_notBeforeTheHandshake(self):
        self.server._handshakeDone = False
        self.assertFalse(closeTLSNow(self.server, _closeNow))
        self.assertFalse(self.tcp.disconnecting)

    def test_notOtherTransports(self):
        self.assertFalse(closeTLSNow(self.tcp, _closeNow))
        self.assertFalse(closeTLSNow(StringTransport(), _closeNow))
        self.assertFalse(self.tcp.disconnecting)

    def test_closeNotifyNotTakenWholeIsFlushedFirst(self):
        """
        When the kernel does not take the close_notify whole, the TCP connection flushes it,
        then closes (its own C{loseConnection}); the caller is told it did not close.
        """
        self.tcp.socket = _Full(self.tcp.socket)
        self.assertFalse(closeTLSNow(self.server, _closeNow))
        self.assertTrue(self.server.disconnecting)
        self.assertTrue(self.tcp.disconnecting)
        self.assertTrue(self.tcp._tempDataLen)  # queued by Twisted
        self.assertEqual(self.serverApp.lost, [])


class AggregatorTests(SynchronousTestCase):
    """
    L{TLSProtocol} makes Twisted's write aggregator only on a first write: a layer switched to
    whole-chunk writes before it (every casd session's) never has one; any other aggregates as
    L{BufferingTLSTransport} does.
    """

    def setUp(self):
        _connectedPair(self)

    def pump(self):
        pump(self.server, self.serverWire, self.client, self.clientWire, self.clock)

    def test_unswitchedAggregates(self):
        """
        Small writes are held for the next reactor iteration and go out together, in order,
        C{writeSequence} among them.
        """
        self.server.write(b"a")
        self.server.writeSequence([b"b", b"c"])
        self.server.write(b"d")
        self.assertEqual(self.serverWire.value(), b"")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(0)
        wire = self.serverWire.value()
        self.assertEqual(len(_records(wire)), 1)
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), b"abcd")

    def test_loseConnectionFlushesWhatIsHeld(self):
        self.server.write(b"* BYE\r\n")
        self.server.loseConnection()
        self.assertTrue(self.serverWire.disconnecting)
        self.client.dataReceived(self.serverWire.value())
        self.assertEqual(b"".join(self.clientApp.received), b"* BYE\r\n")
        self.assertTrue(self.client._lostTLSConnection)
        self.assertIsNone(self.client._reason)

    def test_switchedMakesNone(self):
        """
        Switched before any write: no aggregator and no per-connection C{write} attribute;
        writes go out at once; the end of the connection closes the shared empty one.
        """
        self.assertTrue(wholeChunks(self.server))
        self.server.write(b"* OK\r\n")
        self.assertNotIn("_aggregator", self.server.__dict__)
        self.assertTrue(self.serverWire.value())
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), b"* OK\r\n")
        self.server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.serverApp.lost), 1)
        self.serverWire.clear()  # the answer to the end of stream: a close_notify
        self.server.write(b"late")  # dropped, as after Twisted's connectionLost
        self.assertEqual(self.serverWire.value(), b"")

    def test_writtenThenSwitched(self):
        """
        A write held by the aggregator, then the switch: the held bytes go first.
        """
        self.server.write(b"first ")
        self.assertTrue(wholeChunks(self.server))
        self.server.write(b"second")
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), b"first second")
