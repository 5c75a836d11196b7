"""
The end of a relayed plain TCP connection in one step (L{casd.session.teardown}), over real
loopback sockets on the epoll reactor, and Twisted's path when its source differs.
"""

from zope.interface import implementer

from twisted.internet import defer, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientCreator, ClientFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from casd.pool import tcpclient
from casd.session import relay as relayModule
from casd.session import teardown
from casd.session.relay import Relay, _DirectRead
from tests.test_relay import Recording, _OneShot
from tests.test_relayreads import Peer, _until


@implementer(IHalfCloseableProtocol)
class HalfCloseable(Recording):
    """
    A client side that takes half-closes, as casd's frontend does.
    """

    def readConnectionLost(self):
        self.record.append("client read closed")
        self.relay.clientReadClosed()

    def writeConnectionLost(self):
        self.record.append("client write closed")


class _Recorder(ClientFactory):
    def __init__(self, protocol):
        self.protocol = protocol
        self.lost = []

    def buildProtocol(self, addr):
        return self.protocol

    def clientConnectionLost(self, connector, reason):
        self.lost.append(reason)


class TeardownTests(TestCase):
    """
    client peer <-> (casd's client side, relay, casd's backend side) <-> backend peer.
    """

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.disconnected = []
        original = reactor._disconnectSelectable

        def recorded(selectable, why, isRead):
            self.disconnected.append(selectable)
            return original(selectable, why, isRead)

        reactor._disconnectSelectable = recorded
        self.addCleanup(delattr, reactor, "_disconnectSelectable")

    async def _connected(self, condition):
        await _until(condition)
        self.assertTrue(condition())

    @defer.inlineCallbacks
    def relayed(self, clientSide=Recording, lean=False):
        reactor = self.reactor
        record = []
        backendPeer, clientPeer = Peer(), Peer()
        backendPort = reactor.listenTCP(0, _OneShot(backendPeer), interface="127.0.0.1")
        self.addCleanup(backendPort.stopListening)
        front, back = clientSide("client", record), Recording("backend", record)
        frontPort = reactor.listenTCP(0, _OneShot(front), interface="127.0.0.1")
        self.addCleanup(frontPort.stopListening)
        yield ClientCreator(reactor, lambda: clientPeer).connectTCP(
            "127.0.0.1", frontPort.getHost().port
        )
        factory = _Recorder(back)
        if lean:
            tcpclient.connectBackend(reactor, "127.0.0.1", backendPort.getHost().port, factory, 4)
        else:
            yield ClientCreator(reactor, lambda: back).connectTCP(
                "127.0.0.1", backendPort.getHost().port
            )
        yield defer.Deferred.fromCoroutine(
            self._connected(
                lambda: front.transport is not None
                and back.transport is not None
                and backendPeer.transport is not None
            )
        )
        relay = Relay(front, back, reactor, 1000.0, lambda why: record.append(f"ended: {why}"))
        relay.start()
        # casd's two transports, kept: the relay lets go of them once both are gone.
        self.client, self.server = relay.client, relay.server
        self.addCleanup(lambda: clientPeer.transport and clientPeer.transport.abortConnection())
        return record, relay, clientPeer, backendPeer, factory

    def casdSides(self, relay):
        """
        @return: which of casd's two sides the reactor disconnected (the peers are in this
            process too).
        """
        return [s for s in self.disconnected if s is self.client or s is self.server]

    def assertGone(self, transport, fd):
        """
        C{transport} is closed and out of the reactor: nothing of it left registered.
        """
        self.assertTrue(transport.disconnected)
        self.assertFalse(transport.connected)
        self.assertIsNone(transport.producer)
        self.assertNotIn(fd, self.reactor._selectables)
        self.assertNotIn(fd, self.reactor._reads)
        self.assertNotIn(fd, self.reactor._writes)
        self.assertFalse(hasattr(transport, "socket"))

    def test_pinned(self):
        """
        Twisted's teardown is the one L{teardown.dropNow} repeats: a Twisted whose teardown
        changed fails here (and the relay goes Twisted's way then).
        """
        self.assertTrue(teardown.matches())

    @defer.inlineCallbacks
    def backendCloses(self, lean=False):
        record, relay, clientPeer, backendPeer, factory = yield self.relayed(lean=lean)
        client, server = relay.client, relay.server
        fds = client.fileno(), server.fileno()
        sockets = client.socket, server.socket
        backendPeer.transport.write(b"* BYE\r\n")
        backendPeer.transport.loseConnection()
        yield defer.Deferred.fromCoroutine(_until(lambda: clientPeer.lost))
        # The backend's goodbye reached the client, then the end of the stream.
        self.assertEqual(b"".join(clientPeer.received), b"* BYE\r\n")
        self.assertTrue(clientPeer.lost[0].check(ConnectionDone))
        self.assertEqual(
            record,
            ["backend lost: ConnectionDone", "ended: backend closed", "client lost: ConnectionDone"],
        )
        self.assertGone(client, fds[0])
        self.assertGone(server, fds[1])
        self.assertEqual([s.fileno() for s in sockets], [-1, -1])
        self.assertEqual(relay._aborts, {})
        return relay, factory

    @defer.inlineCallbacks
    def test_backendClosesEndsBothAtOnce(self):
        """
        The backend's end of stream ends its side in the relay's read (the reactor's
        C{_disconnectSelectable} is not involved), the client side at once after it: both
        sockets closed, nothing left in the reactor, each protocol told C{ConnectionDone}.
        """
        relay, factory = yield self.backendCloses()
        self.assertEqual(self.casdSides(relay), [])

    @defer.inlineCallbacks
    def test_clientConnectorTold(self):
        """
        A backend connection of casd's own (L{tcpclient.LeanClient}) ended this way tells its
        connector, hence the pool's factory, as Twisted's client does.
        """
        relay, factory = yield self.backendCloses(lean=True)
        self.assertIsInstance(self.server, tcpclient.LeanClient)
        self.assertEqual(len(factory.lost), 1)
        self.assertTrue(factory.lost[0].check(ConnectionDone))
        self.assertEqual(self.casdSides(relay), [])

    @defer.inlineCallbacks
    def test_writingSideLeftToTheReactor(self):
        """
        A side registered for writing too when its peer's end of stream is read is left to the
        reactor (which would otherwise go on to its C{doWrite} for the same event): the read
        reports the end, the transport is still whole, and the reactor's own disconnection
        ends the session as usual.
        """
        import select

        record, relay, clientPeer, backendPeer, factory = yield self.relayed(lean=True)
        server = relay.server
        server.stopReading()
        backendPeer.transport.loseConnection()
        yield defer.Deferred.fromCoroutine(
            _until(lambda: select.select([server.socket], [], [], 0)[0])
        )
        server.startReading()
        server.startWriting()
        why = server.doRead()
        self.assertIsInstance(why, ConnectionDone)
        self.assertTrue(hasattr(server, "socket"))
        self.assertEqual(record, [])
        self.reactor._disconnectSelectable(server, why, True)
        yield defer.Deferred.fromCoroutine(_until(lambda: clientPeer.lost))
        self.assertEqual(
            record,
            ["backend lost: ConnectionDone", "ended: backend closed", "client lost: ConnectionDone"],
        )
        self.assertEqual(len(factory.lost), 1)

    @defer.inlineCallbacks
    def test_producerStopped(self):
        """
        A producer registered with a side that ends is told to stop, as by Twisted, unless it is
        one of the relay's own (whose C{stopProducing} does nothing: not called).
        """
        stopped = []

        class Producer:
            def stopProducing(self):
                stopped.append("other")

        self.patch(_DirectRead, "stopProducing", lambda self: stopped.append("relay's"))
        record, relay, clientPeer, backendPeer, factory = yield self.relayed()
        relay.server.producer = Producer()
        backendPeer.transport.loseConnection()
        yield defer.Deferred.fromCoroutine(_until(lambda: clientPeer.lost))
        self.assertEqual(stopped, ["other"])
        self.assertIsNone(self.server.producer)
        self.assertIsNone(self.client.producer)

    @defer.inlineCallbacks
    def test_twistedPathWhenItDiffers(self):
        """
        With a Twisted whose teardown is not the pinned one, the same end goes through the
        reactor's C{_disconnectSelectable}.
        """
        self.patch(teardown, "_KNOWN", [False])
        relay, factory = yield self.backendCloses(lean=True)
        self.assertEqual(self.casdSides(relay), [self.server])
        self.assertEqual(len(factory.lost), 1)

    @defer.inlineCallbacks
    def test_halfCloseKept(self):
        """
        A client side whose protocol takes half-closes hears of the client's end of stream by
        C{readConnectionLost}, as from Twisted's reactor, and stays connected: the relay passes
        the half-close on to the backend, whose close (the peer here takes no half-close) then
        ends the session.
        """
        record, relay, clientPeer, backendPeer, factory = yield self.relayed(HalfCloseable)
        clientPeer.transport.loseWriteConnection()
        yield defer.Deferred.fromCoroutine(_until(lambda: clientPeer.lost))
        self.assertEqual(
            record,
            [
                "client read closed",
                "backend lost: ConnectionDone",
                "ended: backend closed",
                "client lost: ConnectionDone",
            ],
        )
        self.assertTrue(backendPeer.lost)
        # The client's end of stream went the reactor's way (readConnectionLost).
        self.assertEqual(self.casdSides(relay), [self.client])

    @defer.inlineCallbacks
    def test_producersAreTheReaders(self):
        """
        Each plain side's producer for flow control is the other side's reader, set without
        Twisted's C{registerProducer} calls, and streaming.
        """
        record, relay, clientPeer, backendPeer, factory = yield self.relayed()
        fromClient, fromBackend = relay.client.doRead.__self__, relay.server.doRead.__self__
        self.assertIsInstance(fromClient, _DirectRead)
        self.assertIs(relay.server.producer, fromClient)
        self.assertIs(relay.client.producer, fromBackend)
        self.assertTrue(relay.server.streamingProducer)
        self.assertTrue(relay.client.streamingProducer)
        fromBackend.pauseProducing()
        self.assertNotIn(relay.server, self.reactor.getReaders())
        fromBackend.resumeProducing()
        self.assertIn(relay.server, self.reactor.getReaders())
        self.assertTrue(relayModule.flowPathMatches())
        clientPeer.transport.loseConnection()
        yield defer.Deferred.fromCoroutine(_until(lambda: backendPeer.lost))


class RelayedTests(SynchronousTestCase):
    def test_kindsRegistered(self):
        """
        casd's write-through transports and its backend client are ended this way.
        """
        self.assertEqual(teardown._KINDS[relayModule._WriteThroughServer], False)
        self.assertEqual(teardown._KINDS[relayModule._WriteThroughClient], True)
        self.assertEqual(teardown._KINDS[tcpclient.LeanClient], True)

    def test_shutdownRefused(self):
        """
        A transport that shuts its socket down before closing it (Twisted's own) is refused.
        """
        self.assertRaises(TypeError, teardown.relayed, tcp.Server, False)
        self.assertRaises(TypeError, teardown.relayed, relayModule._WriteThroughServer, True)
        self.assertNotIn(tcp.Server, teardown._KINDS)

    def test_unknownLeftAlone(self):
        """
        A transport of another kind is not touched.
        """

        class Other:
            connected = 1

        other = Other()
        self.assertFalse(teardown.dropNow(other, None))
        self.assertEqual(other.connected, 1)
