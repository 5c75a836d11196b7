"""
Small writes held until the end of the reactor's turn (L{casd.session.heldwrites}), on a private
epoll reactor with the lean dispatch and real loopback TCP connections.
"""

from __future__ import annotations

import socket

from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.main import CONNECTION_DONE
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.service.leanpoll import leanDispatch
from casd.session import heldwrites, relay
from casd.session.heldwrites import HOLD_LIMIT, holdList
from casd.session.relay import _closeNow, writeThrough


class Keep(protocol.Protocol):
    lost = None

    def connectionLost(self, reason):
        self.lost = reason


class CountingSocket:
    """
    A socket's C{send} counted; everything else goes to the socket.
    """

    def __init__(self, sock):
        self._sock = sock
        self.sends = []

    def send(self, data):
        self.sends.append(bytes(data))
        return self._sock.send(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


class HeldWritesTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = self.newReactor()
        self.assertTrue(leanDispatch(self.reactor))
        self.known = []

    def newReactor(self):
        """
        A private epoll reactor, its connections closed after the test.
        """
        reactor = EPollReactor()

        def close():
            for selectable in reactor.removeAll():
                selectable.connectionLost(Failure(ConnectionDone()))
            reactor.waker.connectionLost(None)
            reactor._poller.close()

        self.addCleanup(close)
        return reactor

    def connect(self):
        """
        A loopback TCP connection: the accepted side's transport (write-through) and the peer's
        blocking socket.
        """
        factory = protocol.Factory.forProtocol(Keep)
        port = self.reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        peer.settimeout(5)
        for _ in range(50):
            self.reactor.doIteration(0.05)
            servers = [
                s for s in self.reactor.getReaders()
                if s is not port and hasattr(s, "protocol") and s not in self.known
            ]
            if servers:
                break
        [transport] = servers
        self.known.append(transport)
        writeThrough(transport)
        transport.socket = CountingSocket(transport.socket)
        return transport, peer

    def pending(self, peer):
        """
        What the peer can read without waiting.
        """
        peer.setblocking(False)
        try:
            return peer.recv(1 << 20)
        except BlockingIOError:
            return b""
        finally:
            peer.settimeout(5)

    def test_heldUntilTheTurnEnds(self):
        """
        Small writes wait for the end of the turn, without registering for writing, then go
        out in order in one C{send}.
        """
        transport, peer = self.connect()
        transport.write(b"one ")
        transport.write(b"two")
        self.assertEqual(self.pending(peer), b"")
        self.assertEqual(transport.socket.sends, [])
        self.assertNotIn(transport, self.reactor.getWriters())
        self.assertEqual(holdList(self.reactor), [transport])
        self.reactor.doIteration(0)
        self.assertEqual(transport.socket.sends, [b"one two"])
        self.assertEqual(peer.recv(100), b"one two")
        self.assertEqual(holdList(self.reactor), [])
        self.assertFalse(transport.casdHeldNow)

    def test_batchBounded(self):
        """
        When L{HOLD_BATCH} connections hold bytes, they are sent at once: a long turn does not
        keep every write for its end.
        """
        self.patch(heldwrites, "HOLD_BATCH", 2)
        self.patch(relay, "HOLD_BATCH", 2)
        first, firstPeer = self.connect()
        second, secondPeer = self.connect()
        first.write(b"1")
        self.assertEqual(self.pending(firstPeer), b"")
        second.write(b"2")
        self.assertEqual(firstPeer.recv(10), b"1")
        self.assertEqual(secondPeer.recv(10), b"2")
        self.assertEqual(holdList(self.reactor), [])

    def test_startTLSAfterHeld(self):
        """
        A write held before C{startTLS()} goes out in clear, first; writes after it go through
        TLS, never held in clear behind it (STARTTLS's "OK, begin TLS" then the session).
        """
        import os

        from twisted.internet import ssl

        from tests.support.certs import selfSigned

        certPath, keyPath = selfSigned(os.path.abspath(self.mktemp()), ["127.0.0.1"], "held")
        with open(certPath, "rb") as c, open(keyPath, "rb") as k:
            options = ssl.PrivateCertificate.loadPEM(c.read() + k.read()).options()
        transport, peer = self.connect()
        transport.write(b"a OK begin TLS\r\n")
        transport.startTLS(options)
        transport.write(b"secret after TLS")
        self.reactor.doIteration(0)
        self.assertEqual(peer.recv(100), b"a OK begin TLS\r\n")
        self.assertEqual(self.pending(peer), b"")
        self.assertNotIn(b"secret", b"".join(transport.socket.sends))

    def test_largeSentAtOnce(self):
        """
        A write of L{HOLD_LIMIT} bytes or more goes to the socket at once.
        """
        transport, peer = self.connect()
        data = b"x" * HOLD_LIMIT
        transport.write(data)
        self.assertEqual(transport.socket.sends, [data])
        self.assertEqual(holdList(self.reactor), [])

    def test_orderKeptWithLargeAfterHeld(self):
        """
        A large write after a held one in the same turn follows it.
        """
        transport, peer = self.connect()
        large = b"y" * HOLD_LIMIT
        transport.write(b"head")
        transport.write(large)
        self.reactor.doIteration(0)
        received = b""
        while len(received) < len(large) + 4:
            received += peer.recv(1 << 20)
        self.assertEqual(received, b"head" + large)

    def test_loseConnectionAfterHeld(self):
        """
        C{loseConnection()} after a held write sends the bytes, then closes.
        """
        transport, peer = self.connect()
        transport.write(b"bye\r\n")
        transport.loseConnection()
        for _ in range(5):
            self.reactor.doIteration(0)
        self.assertEqual(peer.recv(100), b"bye\r\n")
        self.assertEqual(peer.recv(100), b"")

    def test_closeNowSendsHeldFirst(self):
        """
        The relay's immediate close (L{_closeNow}) sends what the transport holds first, then
        closes at once.
        """
        transport, peer = self.connect()
        transport.socket = transport.socket._sock  # the real one, which the close needs
        transport.write(b"last words")
        self.assertEqual(self.pending(peer), b"")
        self.assertTrue(_closeNow(transport))
        self.assertFalse(transport.connected)
        self.assertEqual(peer.recv(100), b"last words")
        self.assertEqual(peer.recv(100), b"")
        self.reactor.doIteration(0)  # the hold list still names it: skipped
        self.assertEqual(holdList(self.reactor), [])

    def test_heldSentBeforeADisconnect(self):
        """
        A transport that wrote in this turn and is then disconnected by the reactor (its peer
        closed) sends what it holds first.
        """
        transport, peer = self.connect()

        def readThenEnd():
            transport.write(b"answer")
            return CONNECTION_DONE

        transport.doRead = readThenEnd
        peer.shutdown(socket.SHUT_WR)
        for _ in range(5):
            self.reactor.doIteration(0.01)
            if not transport.connected:
                break
        self.assertFalse(transport.connected)
        self.assertEqual(peer.recv(100), b"answer")

    def test_notHeldWithoutLeanDispatch(self):
        """
        On a reactor without casd's lean dispatch (nothing would send held bytes), writes go to
        the socket at once.
        """
        self.reactor = plain = self.newReactor()
        transport, peer = self.connect()
        transport.write(b"now")
        self.assertEqual(transport.socket.sends, [b"now"])
        self.assertIsNone(holdList(plain))
        self.assertEqual(peer.recv(100), b"now")
