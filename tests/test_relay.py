"""
The relay: bytes both ways, flow control, half-close, idle timeout, prompt close.
"""

import os

from twisted.internet import defer, task, tcp
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from casd.session.relay import Relay, writeThrough
from casd.testing import TLSStringTransport
from tests.test_imap import IMAPTestMixin


class Side(Protocol):
    relay = None

    def __init__(self, role="client"):
        self.role = role

    def dataReceived(self, data):
        raise AssertionError("the relay should have taken over")

    def connectionLost(self, reason):
        if self.relay is not None:
            getattr(self.relay, self.role + "Lost")(reason)


def splice(idle=100.0):
    clock = MemoryReactorClock()
    front, back = Side("client"), Side("backend")
    ft, bt = TLSStringTransport(), TLSStringTransport()
    front.makeConnection(ft)
    back.makeConnection(bt)
    ended = []
    relay = Relay(front, back, clock, idle, ended.append)
    return clock, front, back, ft, bt, relay, ended


class RelayTests(SynchronousTestCase):
    def test_bothWaysWithLeftovers(self):
        clock, front, back, ft, bt, relay, ended = splice()
        relay.start(fromClient=b"pipelined\r\n", fromBackend=b"* 1 EXISTS\r\n")
        front.dataReceived(b"abc")
        back.dataReceived(b"xyz")
        self.assertEqual(bt.value(), b"pipelined\r\nabc")
        self.assertEqual(ft.value(), b"* 1 EXISTS\r\nxyz")
        self.assertEqual((relay.bytesIn, relay.bytesOut), (14, 15))

    def test_producersRegistered(self):
        clock, front, back, ft, bt, relay, ended = splice()
        relay.start()
        self.assertIs(ft.producer.transport, bt)
        self.assertTrue(ft.streaming)
        self.assertIs(bt.producer.transport, ft)
        # Flow control: a consumer that cannot keep up pauses the other side, and resumes it.
        ft.producer.pauseProducing()
        self.assertEqual(bt.producerState, "paused")
        ft.producer.resumeProducing()
        self.assertEqual(bt.producerState, "producing")

    def test_idleTimeout(self):
        clock, front, back, ft, bt, relay, ended = splice(idle=100)
        relay.start()
        clock.pump([1] * 60)
        front.dataReceived(b"x")
        clock.pump([1] * 99)
        self.assertEqual(ended, [])
        clock.pump([1] * 30)
        self.assertEqual(ended, ["idle timeout"])
        self.assertTrue(ft.disconnecting)
        self.assertTrue(bt.disconnecting)

    def test_backendGoneClosesClient(self):
        clock, front, back, ft, bt, relay, ended = splice()
        relay.start()
        relay.backendLost(Failure(ConnectionDone()))
        self.assertTrue(ft.disconnecting)
        self.assertEqual(ended, ["backend closed"])
        # A client that never reads is aborted after the grace period: nothing hangs.
        clock.advance(relay.closeGrace + 1)
        self.assertTrue(ft.disconnected)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_abortTimerCancelledWhenGone(self):
        clock, front, back, ft, bt, relay, ended = splice()
        relay.start()
        relay.clientLost(Failure(ConnectionDone()))
        relay.backendLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_halfClose(self):
        clock, front, back, ft, bt, relay, ended = splice()
        relay.start()
        relay.clientReadClosed()
        self.assertTrue(bt.writeClosed)
        self.assertFalse(bt.disconnecting)
        back.dataReceived(b"still flowing")
        self.assertEqual(ft.value(), b"still flowing")
        relay.backendReadClosed()
        self.assertTrue(ft.writeClosed)
        self.assertEqual(ended, ["closed"])


class Source(Protocol):
    """
    Writes a large amount as soon as it can, honouring pauses.
    """

    def __init__(self, total):
        self.total = total
        self.sent = 0
        self.paused = False

    def connectionMade(self):
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self):
        self.paused = False
        while not self.paused and self.sent < self.total:
            self.transport.write(b"x" * 65536)
            self.sent += 65536

    def pauseProducing(self):
        self.paused = True

    def stopProducing(self):
        pass


class Sink(Protocol):
    def __init__(self):
        self.received = 0

    def dataReceived(self, data):
        self.received += len(data)

    def connectionLost(self, reason):
        pass


class FlowControlTests(TestCase):
    """
    Over real loopback sockets: a client that stops reading makes the relay stop reading the
    backend, so casd holds a bounded amount, and everything arrives once the client reads again.
    """

    total = 48 * 1024 * 1024

    @defer.inlineCallbacks
    def test_slowReaderPausesWriter(self):
        from twisted.internet import reactor

        source = Source(self.total)
        sourcePort = reactor.listenTCP(0, _OneShot(source), interface="127.0.0.1")
        self.addCleanup(sourcePort.stopListening)
        casdFront, casdBack = Side("client"), Side("backend")
        frontPort = reactor.listenTCP(0, _OneShot(casdFront), interface="127.0.0.1")
        self.addCleanup(frontPort.stopListening)
        sink = Sink()
        yield ClientCreator(reactor, lambda: sink).connectTCP("127.0.0.1", frontPort.getHost().port)
        sink.transport.pauseProducing()
        yield ClientCreator(reactor, lambda: casdBack).connectTCP("127.0.0.1", sourcePort.getHost().port)
        while casdFront.transport is None:
            yield task.deferLater(reactor, 0.01, lambda: None)
        relay = Relay(casdFront, casdBack, reactor, 1000.0, lambda why: None)
        relay.start()
        yield task.deferLater(reactor, 1.0, lambda: None)
        front = casdFront.transport
        held = len(front.dataBuffer) + front._tempDataLen
        self.assertLess(source.sent, self.total)
        self.assertTrue(source.paused)
        # casd holds about one read, not what the backend wanted to send.
        self.assertLess(held, 2 * 1024 * 1024)
        sink.transport.resumeProducing()
        for _ in range(600):
            if sink.received >= self.total:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(sink.received, self.total)
        sink.transport.loseConnection()
        casdBack.transport.loseConnection()
        source.transport.loseConnection()
        yield task.deferLater(reactor, 0.05, lambda: None)


class _OneShot(Factory):
    noisy = False

    def __init__(self, protocol):
        self.protocol_ = protocol

    def buildProtocol(self, addr):
        return self.protocol_


class WriteThroughTests(TestCase):
    """
    L{writeThrough}: with nothing queued a write is sent at once; otherwise Twisted's queue keeps
    the order.  And the relay skips the endpoint's forwarding wrapper.
    """

    @defer.inlineCallbacks
    def connectedPair(self):
        from twisted.internet import reactor

        server = Sink()
        port = reactor.listenTCP(0, _OneShot(server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = yield endpoint.connect(_OneShot(Side("backend")))
        while server.transport is None:
            yield task.deferLater(reactor, 0.01, lambda: None)
        return client, server

    @defer.inlineCallbacks
    def closePair(self, client, server):
        from twisted.internet import reactor

        client.transport.loseConnection()
        server.transport.loseConnection()
        yield task.deferLater(reactor, 0.05, lambda: None)

    def test_otherTransportsUntouched(self):
        transport = TLSStringTransport()
        writeThrough(transport)
        self.assertIs(type(transport), TLSStringTransport)

    @defer.inlineCallbacks
    def test_sentAtOnce(self):
        client, server = yield self.connectedPair()
        transport = client.transport
        writeThrough(transport)
        self.assertIsInstance(transport, tcp.Client)
        transport.write(b"hello")
        # Nothing was queued for the next reactor iteration: it is in the kernel already.
        self.assertEqual((transport.dataBuffer, transport._tempDataLen), (b"", 0))
        self.assertFalse(transport in transport.reactor.getWriters())
        yield self.closePair(client, server)

    @defer.inlineCallbacks
    def test_orderKeptWhenQueued(self):
        from twisted.internet import reactor

        client, server = yield self.connectedPair()
        transport = client.transport
        writeThrough(transport)
        server.transport.pauseProducing()
        chunks = [bytes([65 + i % 26]) * 300000 for i in range(40)]
        for chunk in chunks:
            transport.write(chunk)
        # The kernel took only part of it: the rest waits in Twisted's queue, in order.
        self.assertGreater(len(transport.dataBuffer) + transport._tempDataLen, 0)
        received = []
        server.dataReceived = received.append
        server.transport.resumeProducing()
        for _ in range(400):
            if sum(map(len, received)) >= 40 * 300000:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(b"".join(received), b"".join(chunks))
        yield self.closePair(client, server)

    @defer.inlineCallbacks
    def test_wrapperBypassed(self):
        client, server = yield self.connectedPair()
        front, ft = Side("client"), TLSStringTransport()
        front.makeConnection(ft)
        relay = Relay(front, client, task.Clock(), 100.0, lambda why: None)
        relay.start()
        wrapper = client.transport.protocol
        self.assertIsNot(wrapper, client)
        self.assertEqual(wrapper.dataReceived, relay.fromBackend)
        wrapper.dataReceived(b"from the backend")
        self.assertEqual(ft.value(), b"from the backend")
        self.assertEqual(relay.bytesOut, 16)
        yield self.closePair(client, server)

    @defer.inlineCallbacks
    def test_startTLSAfterWriteThrough(self):
        """
        After C{startTLS()} on a write-through transport (IMAP STARTTLS towards a backend),
        writes go through TLS, never straight to the socket.
        """
        from twisted.internet import reactor, ssl

        from tests.support.certs import selfSigned

        certPath, keyPath = selfSigned(os.path.abspath(self.mktemp()), ["127.0.0.1"], "relay")
        with open(certPath, "rb") as c, open(keyPath, "rb") as k:
            pem = c.read() + k.read()
        serverOptions = ssl.PrivateCertificate.loadPEM(pem).options()
        client, server = yield self.connectedPair()
        received = []
        server.dataReceived = received.append
        server.transport.startTLS(serverOptions)
        writeThrough(client.transport)
        client.transport.startTLS(ssl.CertificateOptions(verify=False))
        greeting = []
        client.dataReceived = greeting.append
        server.transport.write(b"* OK over TLS\r\n")
        for _ in range(250):
            if greeting:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        # The handshake is over and nothing is queued: a write-through send would go out now.
        self.assertEqual((client.transport.dataBuffer, client.transport._tempDataLen), (b"", 0))
        client.transport.write(b"a LOGIN alice secret\r\n")
        for _ in range(250):
            if b"".join(received) == b"a LOGIN alice secret\r\n":
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(b"".join(received), b"a LOGIN alice secret\r\n")
        yield self.closePair(client, server)


class Recording(Side):
    """
    A relay side that records when its connection was lost, in a shared list.
    """

    def __init__(self, role, record):
        super().__init__(role)
        self.record = record

    def connectionLost(self, reason):
        self.record.append(f"{self.role} lost: {reason.type.__name__}")
        super().connectionLost(reason)


class CloseNowTests(TestCase):
    """
    When one side is gone, the other side, a plain TCP connection with nothing queued, closes at
    once: its protocol's C{connectionLost} runs before the relay's end returns, the socket is out
    of the reactor, and the peer sees the end of the stream.
    """

    @defer.inlineCallbacks
    def pair(self, record, role):
        """
        A casd-side protocol on a real loopback connection, and its peer.
        """
        from twisted.internet import reactor

        peer = Sink()
        lost = []
        peer.connectionLost = lost.append
        port = reactor.listenTCP(0, _OneShot(peer), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        side = Recording(role, record)
        yield ClientCreator(reactor, lambda: side).connectTCP("127.0.0.1", port.getHost().port)
        while peer.transport is None:
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.addCleanup(peer.transport.loseConnection)
        return side, peer, lost

    @defer.inlineCallbacks
    def waitFor(self, condition):
        from twisted.internet import reactor

        for _ in range(250):
            if condition():
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail("condition not met")

    @defer.inlineCallbacks
    def relayed(self):
        record = []
        front, frontPeer, frontLost = yield self.pair(record, "client")
        back, backPeer, backLost = yield self.pair(record, "backend")
        relay = Relay(front, back, task.Clock(), 100.0, lambda why: record.append(f"ended: {why}"))
        relay.start()
        return record, relay, (front, frontPeer, frontLost), (back, backPeer, backLost)

    @defer.inlineCallbacks
    def test_backendGoneClosesClientAtOnce(self):
        from twisted.internet import reactor

        record, relay, (front, frontPeer, frontLost), (back, backPeer, backLost) = yield self.relayed()
        transport = front.transport
        closedWhenEnded = []
        backendLost = relay.backendLost

        def observed(reason):
            backendLost(reason)
            closedWhenEnded.append(transport.disconnected)

        relay.backendLost = observed
        # The backend's end, as its connection reports it (Twisted first tells the client
        # transport, its producer, to lose its connection).
        back.transport.loseConnection()
        yield self.waitFor(lambda: closedWhenEnded)
        # The client side closed before the relay's end returned, after the end was reported
        # (the session line is written with the result).
        self.assertEqual(closedWhenEnded, [True])
        self.assertEqual(
            record, ["backend lost: ConnectionDone", "ended: backend closed", "client lost: ConnectionDone"]
        )
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(relay._aborts, {})
        yield self.waitFor(lambda: frontLost)

    @defer.inlineCallbacks
    def test_noLoseConnectionFirst(self):
        """
        The client side is not asked to lose its connection (arming it for writing) before the
        relay closes it: the lost backend's transport does not stop its producer, the client
        side, on its own.
        """
        record, relay, (front, frontPeer, frontLost), (back, backPeer, backLost) = yield self.relayed()
        transport = front.transport
        asked = []
        transport.loseConnection = lambda *a: asked.append(a)
        back.transport.loseConnection()
        yield self.waitFor(lambda: "client lost: ConnectionDone" in record)
        self.assertEqual(asked, [])
        self.assertTrue(transport.disconnected)
        yield self.waitFor(lambda: frontLost)

    @defer.inlineCallbacks
    def test_lastWordsThenEnd(self):
        """
        The backend's goodbye and its end of stream, sent together, reach the client in that
        order: every byte, then the end.
        """
        record, relay, (front, frontPeer, frontLost), (back, backPeer, backLost) = yield self.relayed()
        received = []
        frontPeer.dataReceived = received.append
        backPeer.transport.write(b"* BYE Logging out\r\nz OK Logout completed.\r\n")
        backPeer.transport.loseConnection()
        yield self.waitFor(lambda: frontLost)
        self.assertEqual(b"".join(received), b"* BYE Logging out\r\nz OK Logout completed.\r\n")
        self.assertTrue(frontLost[0].check(ConnectionDone))
        self.assertIn("ended: backend closed", record)

    @defer.inlineCallbacks
    def test_directEnd(self):
        """
        The relay's end with the client transport untouched: closed before C{_end} returns.
        """
        from twisted.internet import reactor

        record, relay, (front, frontPeer, frontLost), (back, backPeer, backLost) = yield self.relayed()
        transport = front.transport
        relay.backendLost(Failure(ConnectionDone()))
        self.assertEqual(record, ["ended: backend closed", "client lost: ConnectionDone"])
        self.assertTrue(transport.disconnected)
        self.assertNotIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        yield self.waitFor(lambda: frontLost)
        back.transport.loseConnection()
        yield self.waitFor(lambda: backLost)

    @defer.inlineCallbacks
    def test_queuedBytesFlushedFirst(self):
        """
        A client side with bytes still queued is not closed at once: they are flushed first, with
        the abort timer as the bound.
        """
        record, relay, (front, frontPeer, frontLost), (back, backPeer, backLost) = yield self.relayed()
        transport = front.transport
        frontPeer.transport.pauseProducing()
        written = 0
        while not (transport.dataBuffer or transport._tempDataLen):
            transport.write(b"x" * 1024 * 1024)
            written += 1024 * 1024
        relay.backendLost(Failure(ConnectionDone()))
        self.assertEqual(record, ["ended: backend closed"])
        self.assertFalse(transport.disconnected)
        self.assertIn("client", relay._aborts)
        frontPeer.transport.resumeProducing()
        yield self.waitFor(lambda: frontLost)
        self.assertEqual(frontPeer.received, written)
        self.assertEqual(record[-1], "client lost: ConnectionDone")
        back.transport.loseConnection()
        yield self.waitFor(lambda: backLost)


class TimerHandOverTests(SynchronousTestCase):
    """
    L{Relay.start}'s C{timer}: the frontend's session timer, taken over for the first idle check.
    """

    def started(self, due):
        clock, front, back, ft, bt, relay, ended = splice(idle=100)
        timer = clock.callLater(due, lambda: relay.checkIdle())
        relay.start(timer=timer)
        return clock, relay, timer, ended

    def test_reusedWhenDueSooner(self):
        """
        A timer due before the first check (25 s for a 100 s idle timeout) is pushed to it: still
        one timer, and the idle time-out is what it is without one.
        """
        clock, relay, timer, ended = self.started(10)
        self.assertIs(relay._idle, timer)
        self.assertEqual(clock.getDelayedCalls(), [timer])
        self.assertEqual(timer.getTime(), 25)
        clock.pump([1] * 124)
        self.assertEqual(ended, [])
        clock.pump([1] * 2)
        self.assertEqual(ended, ["idle timeout"])
        self.assertNotIn(timer, clock.getDelayedCalls())

    def test_sameAsWithoutTimer(self):
        """
        The idle checks happen at the same times with and without a timer handed over.
        """
        results = []
        for due in (None, 10):
            clock, front, back, ft, bt, relay, ended = splice(idle=100)
            relay.start(timer=None if due is None else clock.callLater(due, lambda: relay.checkIdle()))
            times = []
            for second in range(1, 300):
                clock.advance(1)
                if second in (30, 60):
                    front.dataReceived(b"x")
                if ended and not times:
                    times.append(second)
            results.append(times)
        self.assertEqual(results[0], results[1])
        self.assertEqual(len(results[0]), 1)

    def test_cancelledWhenDueLater(self):
        """
        A timer due after the first check is cancelled (moving a timer sooner searches the
        reactor's heap) and a new one takes its place.
        """
        clock, relay, timer, ended = self.started(60)
        self.assertTrue(timer.cancelled)
        self.assertIsNot(relay._idle, timer)
        self.assertEqual([c.getTime() for c in clock.getDelayedCalls()], [25])

    def test_endCancelsIt(self):
        clock, relay, timer, ended = self.started(10)
        relay.clientLost(Failure(ConnectionDone()))
        self.assertTrue(timer.cancelled)
        self.assertNotIn(timer, clock.getDelayedCalls())


class SessionTimerTests(IMAPTestMixin, SynchronousTestCase):
    """
    The frontend hands its session timer (the time allowed before login) to the relay.
    """

    config = IMAPTestMixin.config.replace("idle_timeout = 100.0", "idle_timeout = 1000.0")

    def test_handedOver(self):
        self.connect(1)
        timer = self.server._preauth
        self.send(b"a LOGIN alice secret\r\n")
        self.backendLogin()
        relay = self.server.relay
        self.assertIs(relay._idle, timer)
        self.assertFalse(timer.cancelled)
        # Past the 30 s allowed before login: the relayed session goes on.
        self.reactor.advance(31)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.server.result, "proxy")
        # The first check a quarter of the idle time-out after the login, then four quiet ones.
        self.reactor.pump([50] * 24)
        self.assertEqual(self.server.result, "proxy")
        self.reactor.pump([50] * 2)
        self.assertEqual(self.server.result, "proxy(idle timeout)")
        self.assertTrue(self.transport.disconnecting)


class NoShutdownTests(TestCase):
    """
    casd's TCP connections close without C{shutdown()} (Twisted's C{_shouldShutdown}): the peer
    still reads everything and then the end of the stream.
    """

    def test_twistedStillHasTheSwitch(self):
        """
        The attribute casd sets is Twisted's: a Twisted without it fails here, not silently.
        """
        from twisted.internet.tcp import Connection, _SocketCloser

        from casd.session.relay import _WriteThroughClient, _WriteThroughServer

        self.assertTrue(issubclass(Connection, _SocketCloser))
        self.assertIs(_SocketCloser._shouldShutdown, True)
        self.assertIn("_shouldShutdown", Connection._closeSocket.__code__.co_names)
        self.assertFalse(_WriteThroughServer._shouldShutdown)
        self.assertFalse(_WriteThroughClient._shouldShutdown)

    @defer.inlineCallbacks
    def test_peerReadsAllThenEnd(self):
        from twisted.internet import reactor

        server = Sink()
        ended = []
        server.connectionLost = ended.append
        port = reactor.listenTCP(0, _OneShot(server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", port.getHost().port)
        writeThrough(client.transport)
        self.assertFalse(client.transport._shouldShutdown)
        client.transport.write(b"y" * 100000)
        client.transport.loseConnection()
        for _ in range(250):
            if ended:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(server.received, 100000)
        self.assertTrue(ended[0].check(ConnectionDone))
