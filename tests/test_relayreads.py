"""
The relay's direct reads: a relayed plain TCP transport's C{doRead} is the relay's own (Twisted's
C{doRead} and C{_dataReceived} with the relay's counter and write inline), over real loopback
sockets, and Twisted's path when its source is not the one the relay repeats.
"""

from twisted.internet import defer, task
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import ClientCreator, Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from casd.session import relay as relayModule
from casd.session.relay import Relay, _DirectRead, readPathMatches
from tests.test_relay import Side, _OneShot, splice


class Peer(Protocol):
    """
    One end outside casd: keeps what it receives and how its connection ended.
    """

    def __init__(self):
        self.received = []
        self.lost = []

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)


async def _until(condition, tries=400):
    from twisted.internet import reactor

    for _ in range(tries):
        if condition():
            return
        await task.deferLater(reactor, 0.01, lambda: None)


class DirectReadTests(TestCase):
    """
    client peer <-> (casd's front transport, relay, casd's backend transport) <-> backend peer,
    all on the real reactor.
    """

    @defer.inlineCallbacks
    def relayed(self):
        from twisted.internet import reactor

        backendPeer, clientPeer = Peer(), Peer()
        backendPort = reactor.listenTCP(0, _OneShot(backendPeer), interface="127.0.0.1")
        self.addCleanup(backendPort.stopListening)
        casdFront, casdBack = Side("client"), Side("backend")
        frontPort = reactor.listenTCP(0, _OneShot(casdFront), interface="127.0.0.1")
        self.addCleanup(frontPort.stopListening)
        yield ClientCreator(reactor, lambda: clientPeer).connectTCP(
            "127.0.0.1", frontPort.getHost().port
        )
        yield ClientCreator(reactor, lambda: casdBack).connectTCP(
            "127.0.0.1", backendPort.getHost().port
        )
        yield defer.Deferred.fromCoroutine(
            _until(lambda: casdFront.transport is not None and backendPeer.transport is not None)
        )
        ended = []
        relay = Relay(casdFront, casdBack, reactor, 1000.0, ended.append)
        relay.start()
        return relay, clientPeer, backendPeer, ended

    @defer.inlineCallbacks
    def bothWaysThenClose(self):
        relay, clientPeer, backendPeer, ended = yield self.relayed()
        upload = b"".join(bytes([65 + i % 26]) * 1000 for i in range(300))
        download = b"".join(bytes([97 + i % 26]) * 5000 for i in range(400))
        clientPeer.transport.write(upload)
        backendPeer.transport.write(download)
        yield defer.Deferred.fromCoroutine(
            _until(
                lambda: sum(map(len, backendPeer.received)) >= len(upload)
                and sum(map(len, clientPeer.received)) >= len(download)
            )
        )
        self.assertEqual(b"".join(backendPeer.received), upload)
        self.assertEqual(b"".join(clientPeer.received), download)
        self.assertEqual((relay.bytesIn, relay.bytesOut), (len(upload), len(download)))
        sides = (relay.client, relay.server)
        reads = [type(getattr(side.__dict__.get("doRead"), "__self__", None)) for side in sides]
        # The client leaves: the relay ends and closes the backend's connection.
        clientPeer.transport.loseConnection()
        yield defer.Deferred.fromCoroutine(_until(lambda: backendPeer.lost))
        yield defer.Deferred.fromCoroutine(_until(lambda: relay.client is None))
        self.assertEqual(ended, ["client closed"])
        self.assertTrue(backendPeer.lost[0].check(ConnectionDone))
        # Both connections gone: the relay let go of the transports and took its reads back
        # (no cycle left for the garbage collector).
        self.assertEqual((relay.frontend, relay.backend, relay.server), (None, None, None))
        for side in sides:
            self.assertNotIn("doRead", side.__dict__)
        return reads

    def test_readPathPinned(self):
        """
        Twisted's C{doRead} and C{_dataReceived} are those the relay's reads repeat: a Twisted
        whose read path changed fails here (and the relay uses Twisted's own path then).
        """
        self.assertTrue(readPathMatches())

    @defer.inlineCallbacks
    def test_readsThroughTheRelay(self):
        relay, clientPeer, backendPeer, ended = yield self.relayed()
        fromClient, fromBackend = relay.client.doRead.__self__, relay.server.doRead.__self__
        self.assertIsInstance(fromClient, _DirectRead)
        self.assertEqual((fromClient.transport, fromClient.sink), (relay.client, relay.server))
        self.assertEqual((fromBackend.transport, fromBackend.sink), (relay.server, relay.client))
        self.assertEqual((fromClient.inbound, fromBackend.inbound), (True, False))
        clientPeer.transport.loseConnection()
        yield defer.Deferred.fromCoroutine(_until(lambda: backendPeer.lost))

    @defer.inlineCallbacks
    def test_bothWaysThenClose(self):
        reads = yield self.bothWaysThenClose()
        self.assertEqual(reads, [_DirectRead, _DirectRead])

    @defer.inlineCallbacks
    def test_twistedPathWhenItDiffers(self):
        """
        When Twisted's read path is not the pinned one, relayed transports keep Twisted's
        C{doRead}, and relay the same.
        """
        self.patch(relayModule, "_DIRECT", False)
        reads = yield self.bothWaysThenClose()
        self.assertEqual(reads, [type(None), type(None)])

    def test_otherTransportsKeepTheirs(self):
        """
        A transport that is not plain TCP (here a test transport with TLS) is not given a
        C{doRead}: its bytes reach the relay through its protocol as before.
        """
        clock, front, back, ft, bt, relay, ended = splice()
        relay.start()
        self.assertNotIn("doRead", ft.__dict__)
        self.assertNotIn("doRead", bt.__dict__)
        front.dataReceived(b"a1 NOOP\r\n")
        self.assertEqual(bt.value(), b"a1 NOOP\r\n")

    @defer.inlineCallbacks
    def test_ownReadKept(self):
        """
        A transport whose C{doRead} is already someone else's keeps it: the relay repeats only
        Twisted's.
        """
        from twisted.internet import reactor

        backendPeer = Peer()
        backendPort = reactor.listenTCP(0, _OneShot(backendPeer), interface="127.0.0.1")
        self.addCleanup(backendPort.stopListening)
        casdBack = Side("backend")
        yield ClientCreator(reactor, lambda: casdBack).connectTCP(
            "127.0.0.1", backendPort.getHost().port
        )
        transport = casdBack.transport
        own = transport.doRead
        transport.doRead = own
        front, ft = Side("client"), StringTransport()
        front.makeConnection(ft)
        relay = Relay(front, casdBack, task.Clock(), 1000.0, lambda why: None)
        relay.start()
        self.assertIs(transport.__dict__["doRead"], own)
        transport.loseConnection()
        yield defer.Deferred.fromCoroutine(_until(lambda: backendPeer.lost))


class PlainReadTests(TestCase):
    """
    casd's write-through transports read with L{relayModule._readNow} (Twisted's C{doRead} and
    C{_dataReceived} in one) before the relay too.
    """

    def test_pinnedAndUsed(self):
        from casd.pool.tcpclient import LeanClient

        self.assertTrue(readPathMatches())
        self.assertIs(relayModule.PLAIN_READ, relayModule._readNow)
        for kind in (relayModule._WriteThroughServer, relayModule._WriteThroughClient, LeanClient):
            self.assertIs(kind.doRead, relayModule._readNow)

    @defer.inlineCallbacks
    def test_bytesThenEnd(self):
        """
        Bytes reach the protocol as they come; the peer's close is the protocol's
        C{connectionLost} with C{ConnectionDone}.
        """
        from twisted.internet import reactor

        casdSide = Peer()
        port = reactor.listenTCP(0, _OneShot(casdSide), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = Peer()
        yield ClientCreator(reactor, lambda: peer).connectTCP("127.0.0.1", port.getHost().port)
        yield defer.Deferred.fromCoroutine(_until(lambda: casdSide.transport is not None))
        relayModule.writeThrough(casdSide.transport)
        self.assertIs(type(casdSide.transport), relayModule._WriteThroughServer)
        read = []
        original = relayModule._readNow

        def counted(transport):
            read.append(transport)
            return original(transport)

        self.patch(relayModule._WriteThroughServer, "doRead", counted)
        peer.transport.write(b"a1 LOGIN user pass\r\n")
        yield defer.Deferred.fromCoroutine(_until(lambda: casdSide.received))
        self.assertEqual(b"".join(casdSide.received), b"a1 LOGIN user pass\r\n")
        peer.transport.loseConnection()
        yield defer.Deferred.fromCoroutine(_until(lambda: casdSide.lost))
        self.assertTrue(casdSide.lost[0].check(ConnectionDone))
        self.assertIn(casdSide.transport, read)


class _Socket:
    """
    A socket whose reads return C{size} bytes when asked for more, else fill the buffer.
    """

    def __init__(self):
        self.short = None

    def recv(self, size):
        return b"x" * (self.short if self.short is not None else size)


class _Source:
    """
    The least of a plain TCP transport that L{_DirectRead} reads.
    """

    def __init__(self):
        self.socket = _Socket()
        self.bufferSize = relayModule.RELAY_READ_SIZE
        self.paused = 0

    def pauseProducing(self):
        self.paused += 1


class _Counts:
    bytesIn = bytesOut = 0


class GrowingReadTests(TestCase):
    def setUp(self):
        self.source = _Source()
        self.sink = StringTransport()
        self.reader = _DirectRead(_Counts(), self.source, self.sink, False)

    def test_fullReadsGrow(self):
        """
        Each read that fills the buffer doubles the next, up to L{RELAY_MAX_READ}; the bytes go
        to the other side whole and are counted.
        """
        sizes = []
        for _ in range(5):
            sizes.append(self.source.bufferSize)
            self.reader.doRead()
        base = relayModule.RELAY_READ_SIZE
        self.assertEqual(sizes, [base, 2 * base, 4 * base, 8 * base, 8 * base])
        self.assertEqual(relayModule.RELAY_MAX_READ, 8 * base)
        self.assertEqual(self.reader.relay.bytesOut, sum(sizes))
        self.assertEqual(len(self.sink.value()), sum(sizes))

    def test_shortReadKeeps(self):
        """
        A read that does not fill the buffer leaves its size alone.
        """
        self.source.socket.short = 10
        self.reader.doRead()
        self.assertEqual(self.source.bufferSize, relayModule.RELAY_READ_SIZE)

    def test_pauseShrinks(self):
        """
        When the other side falls behind (it pauses this one), reads go back to
        L{RELAY_READ_SIZE}, and the source is paused.
        """
        self.reader.doRead()
        self.reader.doRead()
        self.reader.pauseProducing()
        self.assertEqual(self.source.bufferSize, relayModule.RELAY_READ_SIZE)
        self.assertEqual(self.source.paused, 1)
