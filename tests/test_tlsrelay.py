"""
The TLS side of the relay (casd.session.tlsrelay): whole chunks through OpenSSL, in memory (two
TLS layers over StringTransports, pumped by hand), and the private Twisted state it relies on.
"""

import os

from OpenSSL.SSL import Error

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from casd.session import tlsrelay
from casd.session.relay import writeThrough
from casd.session.tlsrelay import _WholeChunkBufferingTLS, tlsLayer, wholeChunks
from tests.support.certs import CertificateAuthority


class Collector(Protocol):
    def __init__(self):
        self.received = []

    def dataReceived(self, data):
        self.received.append(data)


class CountingTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, data):
        self.writes += 1
        super().write(data)


def _options(directory):
    ca = CertificateAuthority.create(directory)
    certPath, keyPath = ca.issue(["mail.example.com"], "server")
    with open(certPath, "rb") as f, open(keyPath, "rb") as g:
        server = PrivateCertificate.loadPEM(f.read() + g.read()).options()
    with open(ca.caPath, "rb") as f:
        client = optionsForClientTLS("mail.example.com", Certificate.loadPEM(f.read()))
    return server, client


def pump(server, serverWire, client, clientWire, clock):
    """
    Move bytes both ways between two TLS layers over StringTransports until neither side has
    anything more to say (bounded).
    """
    for _ in range(100):
        clock.advance(0)
        a, b = clientWire.value(), serverWire.value()
        if not a and not b:
            return
        clientWire.clear()
        serverWire.clear()
        if a:
            server.dataReceived(a)
        if b:
            client.dataReceived(b)
    raise AssertionError("the TLS layers kept talking")


class WholeChunkTests(SynchronousTestCase):
    def setUp(self):
        self.serverOptions, self.clientOptions = _options(self.mktemp())
        self.clock = Clock()
        self.serverApp, self.clientApp = Collector(), Collector()
        serverFactory = TLSMemoryBIOFactory(
            self.serverOptions, False, Factory.forProtocol(lambda: self.serverApp), self.clock
        )
        clientFactory = TLSMemoryBIOFactory(
            self.clientOptions, True, Factory.forProtocol(lambda: self.clientApp), self.clock
        )
        self.server = serverFactory.buildProtocol(None)
        self.client = clientFactory.buildProtocol(None)
        self.serverWire, self.clientWire = CountingTransport(), CountingTransport()
        self.server.makeConnection(self.serverWire)
        self.client.makeConnection(self.clientWire)
        self.pump()
        self.assertTrue(self.server._handshakeDone and self.client._handshakeDone)

    def pump(self):
        pump(self.server, self.serverWire, self.client, self.clientWire, self.clock)

    def test_itIsBufferingTLSTransport(self):
        """
        What Twisted builds for every TLS connection; wholeChunks switches it.
        """
        self.assertIs(type(self.server), BufferingTLSTransport)
        self.assertIs(tlsLayer(self.server), self.server)
        self.assertTrue(wholeChunks(self.server))
        self.assertIs(type(self.server), _WholeChunkBufferingTLS)
        self.assertFalse(wholeChunks(StringTransport()))

    def test_writeThroughSwitchesTLS(self):
        """
        L{writeThrough}, which the frontend, the backend dialogue and the relay call on their
        transports, switches a TLS layer too: a TLS login's replies are not held for a timer.
        """
        writeThrough(self.server)
        self.assertIs(type(self.server), _WholeChunkBufferingTLS)
        self.server.write(b"* OK ready\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), b"* OK ready\r\n")

    def test_chunkWrittenWhole(self):
        wholeChunks(self.server)
        chunk = os.urandom(256 * 1024)
        self.serverWire.writes = 0
        self.server.write(chunk)
        # Sixteen 16 KiB records, one write to the transport; nothing waits for a timer.
        self.assertEqual(self.serverWire.writes, 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.server.write(b"* 1 EXISTS\r\n")
        self.assertEqual(self.serverWire.writes, 2)
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), chunk + b"* 1 EXISTS\r\n")

    def test_oneSSLWritePerChunk(self):
        """
        After the first chunk (pyOpenSSL allows partial writes: OpenSSL stops after a record,
        and casd then turns that off), a chunk is one C{SSL_write}, not one per 16 KiB record.
        """
        wholeChunks(self.server)
        sends = []
        original = tlsrelay._SSL_write

        def send(ssl, data, size):
            sends.append(size)
            return original(ssl, data, size)

        self.patch(tlsrelay, "_SSL_write", send)
        first, second = os.urandom(256 * 1024), os.urandom(256 * 1024)
        self.server.write(first)
        self.assertEqual(sends, [256 * 1024, 256 * 1024 - 16384])
        del sends[:]
        self.server.write(second)
        self.assertEqual(sends, [256 * 1024])
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), first + second)

    def test_failedWriteEndsTheConnection(self):
        """
        C{SSL_write} called directly fails as pyOpenSSL's C{send} would (here: after a TLS
        shutdown), and the connection ends, without an exception out of C{write}.
        """
        wholeChunks(self.server)
        self.server._tlsConnection.shutdown()
        self.assertRaises(Error, self.server._tlsConnection.send, b"x")
        self.server.write(b"* BYE\r\n")
        self.assertTrue(self.server._lostTLSConnection)
        self.assertIsInstance(self.server._reason.value, Error)

    def test_smallWriteNotHeld(self):
        """
        Twisted holds writes under 64 KB for the next reactor iteration; a relay's are sent now.
        """
        self.server.write(b"before\r\n")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        wholeChunks(self.server)  # the held write goes first
        self.server.write(b"* 2 EXISTS\r\n")
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), b"before\r\n* 2 EXISTS\r\n")

    def test_manyChunksInOrderBothWays(self):
        wholeChunks(self.server)
        wholeChunks(self.client)
        down = [os.urandom(n) for n in (1, 70000, 262144, 16384, 3)]
        up = [os.urandom(n) for n in (5, 100000, 2)]
        for a, b in zip(down, up + [b""] * 2):
            self.server.write(a)
            if b:
                self.client.write(b)
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), b"".join(down))
        self.assertEqual(b"".join(self.serverApp.received), b"".join(up))

    def test_writeSequenceInOrder(self):
        """
        C{writeSequence} (Twisted's HTTP server writes chunked bodies with it) goes out at once
        too, in order with the writes around it, nothing held for a timer.
        """
        wholeChunks(self.server)
        self.server.write(b"HTTP/1.1 200 OK\r\n\r\n")
        self.server.writeSequence([b"5\r\n", b"hello", b"\r\n"])
        self.server.write(b"0\r\n\r\n")
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.pump()
        self.assertEqual(
            b"".join(self.clientApp.received), b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )

    def test_afterLoseConnectionDropped(self):
        wholeChunks(self.server)
        self.server.loseConnection()
        self.server.write(b"late")
        self.pump()
        self.assertEqual(b"".join(self.clientApp.received), b"")

    def test_twistedPrivateStateStillThere(self):
        """
        What casd.session.tlsrelay relies on.  If this fails after a Twisted upgrade, read the new
        TLSMemoryBIOProtocol._write and adapt _WholeChunkWrites (or drop it).
        """
        for name in ("_write", "_bufferedWrite", "_tlsShutdownFinished", "_flushSendBIO"):
            self.assertTrue(callable(getattr(TLSMemoryBIOProtocol, name, None)), name)
        for name in ("_tlsConnection", "_lostTLSConnection", "_producer", "disconnecting", "_handshakeDone"):
            self.assertTrue(hasattr(self.server, name), name)
        self.assertTrue(callable(getattr(self.server._aggregator, "flush", None)))
        # BufferingTLSTransport's write is its aggregator's, set per instance.
        self.assertIn("write", self.server.__dict__)
