"""
The lean accept of TCP listening ports (casd.service.leanaccept), on a private epoll reactor
(never the global one), against Twisted's own C{tcp.Port} on the same reactor.
"""

import socket
from errno import ECONNABORTED

from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from casd.service.leanaccept import LeanPort, acceptMatches, leanAccept
from tests.test_leanpoll import EPollMixin


class Recorder(Protocol):
    def __init__(self):
        self.received = []
        self.made = []

    def connectionMade(self):
        self.made.append(self.transport)

    def dataReceived(self, data):
        self.received.append(data)


class Recorders(Factory):
    def __init__(self):
        self.built = []
        self.addresses = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        p = Recorder()
        self.built.append(p)
        return p


class _Refusing(Factory):
    def buildProtocol(self, addr):
        return None


class LeanAcceptTests(EPollMixin, SynchronousTestCase):
    def setUp(self):
        self.setUpReactor()
        self.assertTrue(leanAccept(self.reactor))

    def listen(self, factory, port=None, interface="127.0.0.1"):
        port = port or self.reactor.listenTCP(0, factory, interface=interface)
        self.addCleanup(self._stop, port)
        return port

    def _stop(self, port):
        if port.connected:
            port.connectionLost(None)

    def connect(self, port, count=1, family=socket.AF_INET, host="127.0.0.1"):
        clients = []
        for _ in range(count):
            c = socket.socket(family, socket.SOCK_STREAM)
            c.connect((host, port.getHost().port))
            self.addCleanup(c.close)
            clients.append(c)
        return clients

    def turn(self, condition):
        for _ in range(200):
            if condition():
                return
            self.reactor.doIteration(0.01)
        self.fail("condition not met")

    def test_pinned(self):
        """
        If this fails after a Twisted upgrade: compare C{tcp.Port.doRead} and the C{tcp.Server}
        construction with L{casd.service.leanaccept}, bring the copy and its hash up to date.
        """
        self.assertTrue(acceptMatches())

    def test_installed(self):
        self.assertIsInstance(self.listen(Factory.forProtocol(Protocol)), LeanPort)

    def test_sameTransportAsTwisted(self):
        """
        A connection accepted by a L{LeanPort} gets a C{tcp.Server} like the one Twisted's own
        port builds: the same attributes, registered for reading, a non-blocking socket.
        """
        lean, twisted = Recorders(), Recorders()
        leanPort = self.listen(lean)
        twistedPort = self.listen(
            twisted, tcp.Port(0, twisted, interface="127.0.0.1", reactor=self.reactor)
        )
        twistedPort.startListening()
        self.assertNotIsInstance(twistedPort, LeanPort)
        (a,) = self.connect(leanPort)
        (b,) = self.connect(twistedPort)
        self.turn(lambda: lean.built and twisted.built)
        ours, theirs = lean.built[0].transport, twisted.built[0].transport
        self.assertIs(type(ours), tcp.Server)
        self.assertEqual((lean.built[0].made, lean.built[0].connected), ([ours], 1))
        self.assertEqual(lean.addresses, [ours.getPeer()])
        self.assertEqual(ours.getPeer().port, a.getsockname()[1])
        self.assertEqual(ours.getHost().port, leanPort.getHost().port)
        for name in ("sessionno", "hostname", "connected", "disconnected", "_tempDataLen",
                     "_tempDataBuffer", "dataBuffer", "producer", "protocol"):
            if name != "protocol":
                self.assertEqual(getattr(ours, name), getattr(theirs, name), name)
        self.assertEqual(ours.logstr, f"Recorder,0,127.0.0.1")
        self.assertEqual(theirs.logstr, f"Recorder,0,127.0.0.1")
        self.assertEqual(repr(ours), f"<Recorder #0 on {leanPort.getHost().port}>")
        self.assertEqual(ours.logPrefix(), theirs.logPrefix())
        self.assertEqual(set(vars(ours)) - {"repstr"}, set(vars(theirs)) - {"repstr"})
        self.assertEqual(ours.socket.gettimeout(), 0.0)
        self.assertEqual(ours.socket.family, socket.AF_INET)
        self.assertEqual(ours.socket.type, socket.SOCK_STREAM)
        self.assertIn(ours, self.reactor.getReaders())
        self.assertNotIn(ours, self.reactor.getWriters())
        # Bytes both ways.
        a.sendall(b"hello")
        self.turn(lambda: lean.built[0].received)
        self.assertEqual(lean.built[0].received, [b"hello"])
        ours.write(b"back")
        self.turn(lambda: not ours.dataBuffer and not ours._tempDataLen)
        self.assertEqual(a.recv(10), b"back")

    def test_protocolsOfOtherKinds(self):
        """
        Protocols that are no L{Protocol} (twisted.web's HTTP channel, without a C{logPrefix}),
        or have no instance dictionary, get the log prefix Twisted's own port gives them.
        """
        from twisted.web.http import HTTPFactory

        class Slotted:
            __slots__ = ("transport", "connected", "factory")

            def makeConnection(self, transport):
                self.transport = transport

            def dataReceived(self, data):
                pass

            def connectionLost(self, reason):
                pass

        for factory, prefix in (
            (HTTPFactory(), "_GenericHTTPChannelProtocol"),
            (Factory.forProtocol(Slotted), "Slotted"),
        ):
            built = []
            original = factory.buildProtocol
            factory.buildProtocol = lambda addr: built.append(original(addr)) or built[-1]
            port = self.listen(factory)
            self.connect(port)
            port.doRead()
            transport = getattr(built[0], "_channel", built[0]).transport  # HTTP: its proxy's
            self.assertEqual(transport.logstr, f"{prefix},0,127.0.0.1")
            transport.loseConnection()

    def test_severalInOneWakeUp(self):
        """
        Connections waiting together are all accepted in one wake-up, numbered in order.
        """
        factory = Recorders()
        port = self.listen(factory)
        self.connect(port, 3)
        port.doRead()
        self.assertEqual([p.transport.sessionno for p in factory.built], [0, 1, 2])
        self.assertEqual(port.numberAccepts, 3)

    def test_refusedByTheFactory(self):
        """
        A factory that builds no protocol: the connection is closed.
        """
        port = self.listen(_Refusing())
        (c,) = self.connect(port)
        port.doRead()
        c.settimeout(5)
        self.assertEqual(c.recv(10), b"")
        self.assertEqual(port.sessionno, 0)

    def test_ipv6(self):
        try:
            probe = socket.socket(socket.AF_INET6)
            probe.bind(("::1", 0))
            probe.close()
        except OSError:
            raise self.skipTest("no IPv6 loopback")  # the machine's, not casd's
        factory = Recorders()
        port = self.listen(factory, interface="::1")
        self.connect(port, family=socket.AF_INET6, host="::1")
        port.doRead()
        transport = factory.built[0].transport
        self.assertEqual(transport.getPeer().host, "::1")
        self.assertEqual(transport.hostname, "::1")
        self.assertEqual(transport.socket.family, socket.AF_INET6)

    def test_acceptErrorsAreTwisteds(self):
        """
        An accept error other than "no more" hands the wake-up to Twisted's own C{doRead}.
        """
        port = self.listen(Recorders())
        listener = port.socket

        class Failing:
            family, type, proto = listener.family, listener.type, listener.proto

            def _accept(self):
                raise OSError(ECONNABORTED, "aborted")

        port.socket = Failing()
        self.addCleanup(setattr, port, "socket", listener)
        handed = []
        self.patch(tcp.Port, "doRead", lambda self: handed.append(self))
        port.doRead()
        self.assertEqual(handed, [port])

    def test_otherTransportsTwistedsWay(self):
        """
        A port with a transport class of its own builds it the usual way.
        """

        class Own(tcp.Server):
            pass

        made = []

        class OwnMaking(Recorder):
            def makeConnection(self, transport):
                made.append(transport)
                super().makeConnection(transport)

        factory = Recorders()
        factory.buildProtocol = lambda addr: factory.built.append(OwnMaking()) or factory.built[-1]
        port = self.listen(factory)
        port.transport = Own
        self.connect(port)
        port.doRead()
        self.assertIs(type(factory.built[0].transport), Own)
        self.assertEqual(made, [factory.built[0].transport])
        self.assertEqual(factory.built[0].transport.logstr, "OwnMaking,0,127.0.0.1")

    def test_otherReactorsLeftAlone(self):
        reactor = MemoryReactor()
        self.assertFalse(leanAccept(reactor))
        self.assertNotIn("listenTCP", vars(reactor))
