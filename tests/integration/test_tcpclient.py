"""
The backend pool's own TCP client (L{casd.pool.tcpclient.LeanClient}) over real loopback
sockets and the real reactor: it connects, carries bytes both ways, reports refusals and local
shortages as Twisted's client does, and closes with a FIN the peer sees.
"""

import errno
import socket

from twisted.internet import defer, error, reactor
from twisted.internet.task import deferLater
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.trial.unittest import TestCase

from casd.pool import tcpclient
from casd.pool.health import isLocalExhaustion
from tests.support.procs import freePort


class Greeter(Protocol):
    """
    Speaks first, echoes, and reports how the connection ended.
    """

    def connectionMade(self):
        self.transport.write(b"* HELLO\r\n")

    def dataReceived(self, data):
        self.transport.write(data)

    def connectionLost(self, reason):
        self.factory.lost.callback(reason.value)


class Client(Protocol):
    def connectionMade(self):
        self.factory.made.callback(self)

    def dataReceived(self, data):
        self.factory.received.append(data)
        if b"ECHO" in b"".join(self.factory.received):
            self.factory.echoed.callback(b"".join(self.factory.received))


class Recorder(ClientFactory):
    def __init__(self):
        self.made = defer.Deferred()
        self.failed = defer.Deferred()
        self.echoed = defer.Deferred()
        self.received = []

    def buildProtocol(self, addr):
        p = Client()
        p.factory = self
        return p

    def clientConnectionFailed(self, connector, reason):
        self.failed.callback(reason.value)


class LeanClientTests(TestCase):
    timeout = 10

    def listen(self):
        server = Factory.forProtocol(Greeter)
        server.lost = defer.Deferred()
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port, server

    def connect(self, port):
        factory = Recorder()
        connector = tcpclient.connectBackend(reactor, "127.0.0.1", port, factory, 4)
        self.addCleanup(connector.disconnect)
        return connector, factory

    @defer.inlineCallbacks
    def test_bytesBothWays(self):
        port, server = self.listen()
        connector, factory = self.connect(port)
        self.assertIsInstance(connector, tcpclient.LeanConnector)
        self.assertIsInstance(connector.transport, tcpclient.LeanClient)
        self.assertEqual((connector.getDestination().host, connector.getDestination().port), ("127.0.0.1", port))
        client = yield factory.made
        transport = client.transport
        # Connected: reading, and no longer waiting to write.
        self.assertIn(transport, reactor.getReaders())
        self.assertNotIn(transport, reactor.getWriters())
        self.assertEqual(transport.logPrefix(), "Client,client")
        self.assertEqual(transport.socket.gettimeout(), 0.0)
        transport.write(b"ECHO\r\n")
        received = yield factory.echoed
        self.assertEqual(received, b"* HELLO\r\nECHO\r\n")
        transport.loseConnection()
        reason = yield server.lost
        # Closed without shutdown(): the peer still sees an orderly end.
        self.assertIsInstance(reason, error.ConnectionDone)

    @defer.inlineCallbacks
    def test_refused(self):
        connector, factory = self.connect(freePort())
        reason = yield factory.failed
        self.assertIsInstance(reason, error.ConnectionRefusedError)

    @defer.inlineCallbacks
    def test_outOfDescriptors(self):
        """
        A socket that cannot be made fails the attempt on the next iteration with Twisted's
        C{ConnectBindError}, which the pool knows for casd's own shortage.
        """

        def noSocket(self):
            raise OSError(errno.EMFILE, "Too many open files")

        self.patch(tcpclient.LeanClient, "createInternetSocket", noSocket)
        connector, factory = self.connect(freePort())
        self.assertFalse(factory.failed.called)
        reason = yield factory.failed
        self.assertIsInstance(reason, error.ConnectBindError)
        self.assertTrue(isLocalExhaustion(reason))

    @defer.inlineCallbacks
    def test_stopConnecting(self):
        """
        The pool's connect timeout stops an attempt under way: the failure is reported at once.
        """
        port, server = self.listen()
        connector, factory = self.connect(port)  # under way until the next reactor iteration
        connector.stopConnecting()
        self.assertTrue(factory.failed.called)  # at once
        reason = yield factory.failed
        self.assertIsInstance(reason, error.UserError)
        self.assertRaises(error.NotConnectingError, connector.stopConnecting)

    @defer.inlineCallbacks
    def test_lostReachesFactory(self):
        port, server = self.listen()
        connector, factory = self.connect(port)
        lost = []
        factory.clientConnectionLost = lambda c, reason: lost.append((c, reason.value))
        client = yield factory.made
        connector.disconnect()
        yield server.lost
        while not lost:
            yield deferLater(reactor, 0.01)
        self.assertIs(lost[0][0], connector)
        self.assertIsInstance(lost[0][1], error.ConnectionDone)

    def test_socketNonBlocking(self):
        skt = tcpclient.LeanClient.createInternetSocket(None)
        self.addCleanup(skt.close)
        self.assertEqual(skt.gettimeout(), 0.0)
        self.assertFalse(skt.get_inheritable())
        self.assertEqual(skt.type, socket.SOCK_STREAM)
