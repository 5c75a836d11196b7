"""
The lean accept and set-up of client connections (casd.service.leanaccept), on a private epoll
reactor (never the global one) and real loopback sockets.
"""

import errno
import hashlib
import inspect
import socket

from twisted.internet import tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import serverFromString
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import SynchronousTestCase

from casd.service import leanaccept
from casd.service.leanaccept import LeanPort, acceptMatches, adoptStreamPort, leanAccept, leanListening


class Recorder(Protocol):
    def __init__(self):
        self.received = []
        self.made = []
        self.lost = []

    def connectionMade(self):
        self.made.append(self.transport)

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason):
        self.lost.append(reason)


class OwnMakeConnection(Recorder):
    """
    A protocol with its own C{makeConnection} (as protocol wrappers have).
    """

    def makeConnection(self, transport):
        self.own = transport
        Protocol.makeConnection(self, transport)


class OwnLogPrefix(Recorder):
    def logPrefix(self):
        return "own-prefix"


class Recording(Factory):
    def __init__(self, protocol=Recorder, refuse=False):
        self.protocol = protocol
        self.refuse = refuse
        self.addresses = []
        self.built = []

    def buildProtocol(self, addr):
        self.addresses.append(addr)
        if self.refuse:
            return None
        p = self.protocol()
        p.factory = self
        self.built.append(p)
        return p


class EPollCase(SynchronousTestCase):
    def setUp(self):
        self.reactor = EPollReactor()
        self.addCleanup(self._closeReactor)

    def _closeReactor(self):
        for selectable in self.reactor.removeAll():
            sock = getattr(selectable, "socket", None)
            if sock is not None:
                sock.close()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def listen(self, factory, portClass=LeanPort, interface="127.0.0.1"):
        port = portClass(0, factory, 50, interface, self.reactor)
        port.startListening()
        return port

    def connect(self, port, family=socket.AF_INET):
        client = socket.socket(family, socket.SOCK_STREAM)
        self.addCleanup(client.close)
        client.connect((port.getHost().host, port.getHost().port))
        return client


class PinTests(SynchronousTestCase):
    def test_twistedCodeUnchanged(self):
        """
        If this fails after a Twisted (or Python) upgrade: compare the new C{Port.doRead},
        C{_accept}, C{Server.__init__} and the rest of L{leanaccept._pinned} with
        L{LeanPort.doRead}, bring it in line, and update L{leanaccept.ACCEPT_SHA256}.
        """
        source = "".join(inspect.getsource(f) for f in leanaccept._pinned())
        self.assertEqual(hashlib.sha256(source.encode("utf-8")).hexdigest(), leanaccept.ACCEPT_SHA256)
        self.assertTrue(acceptMatches())

    def test_otherReactorsListenAsTwistedDoes(self):
        """
        Only Twisted's epoll reactor gets the lean port; any other is given back as it is.
        """
        memory = MemoryReactor()
        self.assertIs(leanListening(memory), memory)
        self.assertIs(leanaccept.leanPortClass(memory), tcp.Port)

    def test_changedTwistedListensAsTwistedDoes(self):
        """
        A Twisted whose code differs from the pinned code keeps its own port.
        """
        self.patch(leanaccept, "ACCEPT_SHA256", "0" * 64)
        self.patch(leanaccept, "_known", [])
        reactor = EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        self.assertIs(leanaccept.leanPortClass(reactor), tcp.Port)
        self.assertIs(leanListening(reactor), reactor)


class AcceptTests(EPollCase):
    def test_transportAsTwistedBuildsIt(self):
        """
        The transport of an accepted connection is a L{tcp.Server} with the same attributes,
        of the same values and types, as Twisted's own accept gives one.
        """
        factory = Recording()
        port = self.listen(factory)
        self.connect(port)
        port.doRead()
        self.connect(port)
        tcp.Port.doRead(port)  # Twisted's own, on the same port
        lean, twisted = (p.transport for p in factory.built)
        self.assertIs(type(lean), tcp.Server)
        self.assertEqual(sorted(vars(lean)), sorted(vars(twisted)))
        for name, value in vars(twisted).items():
            self.assertIs(type(getattr(lean, name)), type(value), name)
        for name in ("reactor", "server", "_tempDataBuffer", "_tempDataLen", "connected", "hostname"):
            self.assertEqual(getattr(lean, name), getattr(twisted, name), name)
        self.assertEqual(lean.sessionno, 0)
        self.assertEqual(twisted.sessionno, 1)
        self.assertEqual(lean.logstr, f"Recorder,0,{lean.client[0]}")
        self.assertEqual(repr(lean), f"<Recorder #0 on {port.getHost().port}>")
        self.assertEqual(lean.fileno(), lean.socket.fileno())
        self.assertFalse(lean.socket.getblocking())
        # The socket object as socket.accept() makes it.
        self.assertIs(type(lean.socket), socket.socket)
        for name in ("_io_refs", "_closed", "family", "type", "proto"):
            self.assertEqual(getattr(lean.socket, name), getattr(twisted.socket, name), name)
        self.assertEqual(lean.socket.gettimeout(), twisted.socket.gettimeout())
        self.assertEqual(lean.socket.getpeername(), lean.client)
        self.assertEqual(lean.socket.family, socket.AF_INET)
        self.assertEqual(lean.socket.type, socket.SOCK_STREAM)
        self.assertEqual(lean.getPeer(), twisted.getPeer().__class__("TCP", *lean.client))
        self.assertEqual(lean.getHost(), port.getHost())
        self.assertEqual(port.sessionno, 2)

    def test_peerAddress(self):
        """
        The factory is given the peer's L{IPv4Address}, equal (and hashing equal) to one built
        the usual way.
        """
        factory = Recording()
        port = self.listen(factory)
        client = self.connect(port)
        port.doRead()
        [peer] = factory.addresses
        expected = IPv4Address("TCP", *client.getsockname())
        self.assertIs(type(peer), IPv4Address)
        self.assertEqual(peer, expected)
        self.assertEqual(hash(peer), hash(expected))
        self.assertEqual(repr(peer), repr(expected))

    def test_connectedAndReading(self):
        """
        The protocol is connected to its transport, and the transport is registered for
        reading: bytes the client sends reach the protocol through the reactor.
        """
        factory = Recording()
        port = self.listen(factory)
        client = self.connect(port)
        port.doRead()
        [protocol] = factory.built
        self.assertEqual(protocol.made, [protocol.transport])
        self.assertEqual(protocol.connected, 1)
        transport = protocol.transport
        self.assertIn(transport.fileno(), self.reactor._reads)
        self.assertIs(self.reactor._selectables[transport.fileno()], transport)
        self.assertIn(transport, self.reactor.getReaders())
        client.sendall(b"hello")
        for _ in range(50):
            if protocol.received:
                break
            self.reactor.doIteration(0.1)
        self.assertEqual(b"".join(protocol.received), b"hello")
        transport.write(b"back")
        for _ in range(50):
            if not transport.dataBuffer and not transport._tempDataLen:
                break
            self.reactor.doIteration(0.1)
        self.assertEqual(client.recv(10), b"back")

    def test_instanceMethodsCalled(self):
        """
        C{logPrefix} and C{makeConnection} set on the protocol instance are called, as Twisted
        calls them.
        """
        made = []

        class Build(Recording):
            def buildProtocol(self, addr):
                p = Recording.buildProtocol(self, addr)
                p.logPrefix = lambda: "instance-prefix"
                p.makeConnection = made.append
                return p

        factory = Build()
        port = self.listen(factory)
        self.connect(port)
        port.doRead()
        [protocol] = factory.built
        self.assertEqual(len(made), 1)
        self.assertTrue(made[0].logstr.startswith("instance-prefix,0,"))
        self.assertEqual(protocol.made, [])

    def test_ownMakeConnectionCalled(self):
        """
        A protocol with its own C{makeConnection} gets it called.
        """
        factory = Recording(OwnMakeConnection)
        port = self.listen(factory)
        self.connect(port)
        port.doRead()
        [protocol] = factory.built
        self.assertIs(protocol.own, protocol.transport)
        self.assertEqual(protocol.made, [protocol.transport])

    def test_ownLogPrefix(self):
        """
        A protocol's own C{logPrefix} names the transport's log prefix, as Twisted's does.
        """
        factory = Recording(OwnLogPrefix)
        port = self.listen(factory)
        self.connect(port)
        port.doRead()
        [protocol] = factory.built
        self.assertTrue(protocol.transport.logPrefix().startswith("own-prefix,0,"))
        self.assertEqual(repr(protocol.transport), f"<OwnLogPrefix #0 on {port.getHost().port}>")

    def test_protocolsOfOtherKinds(self):
        """
        Protocols that are no L{Protocol} (twisted.web's HTTP channel, without a C{logPrefix}:
        the admin listener's) or have no instance dictionary get the log prefix Twisted's own
        port gives them.
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
            # Its timers on this test's reactor, not the global one (where they would outlive
            # this synchronous test and make the next asynchronous one unclean).
            (HTTPFactory(reactor=self.reactor), "_GenericHTTPChannelProtocol"),
            (Factory.forProtocol(Slotted), "Slotted"),
        ):
            built = []
            original = factory.buildProtocol
            factory.buildProtocol = lambda addr, original=original, built=built: built.append(original(addr)) or built[-1]
            port = self.listen(factory)
            self.connect(port)
            port.doRead()
            transport = getattr(built[0], "_channel", built[0]).transport  # HTTP: its proxy's
            self.assertEqual(transport.logstr, f"{prefix},0,127.0.0.1")
            transport.loseConnection()

    def test_wrapperLogPrefix(self):
        """
        A protocol wrapper's log prefix (TLS, PROXY) is the one Twisted's C{_getLogPrefix}
        gives: the wrapped protocol's, then the wrapper's class; a wrapped protocol with a
        C{logPrefix} of its own is asked for it.
        """
        for inner, expected in ((Recorder, "Recorder (Wrapper)"), (OwnLogPrefix, "own-prefix (Wrapper)")):

            class Wrapper(ProtocolWrapper):
                pass

            class Wrapping(WrappingFactory):
                protocol = Wrapper

            factory = Wrapping(Recording(inner))
            port = self.listen(factory)
            self.connect(port)
            port.doRead()
            [wrapper] = factory.protocols
            self.assertEqual(wrapper.transport.logstr, f"{expected},0,127.0.0.1")
            self.assertEqual(wrapper.transport.logstr.split(",")[0], wrapper.transport._getLogPrefix(wrapper))
            self.assertEqual(repr(wrapper.transport), f"<Wrapper #0 on {port.getHost().port}>")

    def test_refusedConnectionClosed(self):
        """
        A factory that returns C{None} gets the connection closed, and no session number used.
        """
        factory = Recording(refuse=True)
        port = self.listen(factory)
        client = self.connect(port)
        port.doRead()
        self.assertEqual(len(factory.addresses), 1)
        self.assertEqual(port.sessionno, 0)
        client.settimeout(5)
        self.assertEqual(client.recv(10), b"")
        self.assertEqual(self.reactor._reads, {self.reactor.waker.fileno(), port.fileno()})

    def test_numberAcceptsAdapts(self):
        """
        As Twisted's: at most C{numberAccepts} per wake-up; reaching it raises it by 20,
        otherwise it becomes what was accepted (at least 1).
        """
        factory = Recording()
        port = self.listen(factory)
        for _ in range(3):
            self.connect(port)
        port.numberAccepts = 2
        port.doRead()
        self.assertEqual(len(factory.built), 2)
        self.assertEqual(port.numberAccepts, 22)
        port.doRead()
        self.assertEqual(len(factory.built), 3)
        self.assertEqual(port.numberAccepts, 1)
        port.doRead()  # nothing there
        self.assertEqual(port.numberAccepts, 1)

    def test_ipv6Peer(self):
        """
        An IPv6 listener gives L{IPv6Address}es and IPv6 transports, as Twisted's.
        """
        factory = Recording()
        try:
            port = self.listen(factory, interface="::1")
        except Exception:
            raise self.skipTest("no IPv6 loopback")  # pragma: no cover
        client = self.connect(port, socket.AF_INET6)
        port.doRead()
        [peer] = factory.addresses
        self.assertEqual(peer, IPv6Address("TCP", "::1", client.getsockname()[1], 0, 0))
        transport = factory.built[0].transport
        self.assertIs(transport._addressType, IPv6Address)
        self.assertEqual(transport.getPeer(), peer)

    def test_otherTransportClass(self):
        """
        A port whose C{transport} is another class builds it through its constructor.
        """

        class Marked(tcp.Server):
            pass

        factory = Recording()
        port = self.listen(factory)
        port.transport = Marked
        self.connect(port)
        port.doRead()
        [protocol] = factory.built
        self.assertIs(type(protocol.transport), Marked)
        self.assertIn(protocol.transport, self.reactor.getReaders())

    def test_failingProtocolLogged(self):
        """
        An exception in the set-up is logged, as Twisted's C{log.deferr()} does, and the port
        keeps listening.
        """

        class Failing(Recorder):
            def connectionMade(self):
                raise RuntimeError("boom")

        factory = Recording(Failing)
        port = self.listen(factory)
        self.connect(port)
        port.doRead()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn(port.fileno(), self.reactor._reads)


class FakeListener:
    """
    A listening socket whose C{accept()} fails with the given errors, one per call, then
    has nothing more.
    """

    family = socket.AF_INET
    type = socket.SOCK_STREAM
    proto = 0

    def __init__(self, errors, accepted=()):
        self.errors = list(errors)
        self.accepted = list(accepted)
        self.calls = 0

    def _accept(self):
        self.calls += 1
        if self.errors:
            raise OSError(self.errors.pop(0), "fake")
        raise BlockingIOError(errno.EAGAIN, "fake")

    def accept(self):
        # Twisted's _accept (the EMFILE recovery) calls this.
        self.calls += 1
        if self.accepted:
            return self.accepted.pop(0)
        raise BlockingIOError(errno.EAGAIN, "fake")


class FakeReservation:
    def __init__(self):
        self.released = 0

    def available(self):
        return True

    def __enter__(self):
        self.released += 1

    def __exit__(self, *exc):
        return None


class ClosableSocket:
    closed = False

    def close(self):
        self.closed = True


class AcceptErrorTests(EPollCase):
    def setUp(self):
        super().setUp()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.factory = Recording()
        self.port = self.listen(self.factory)
        self.real = self.port.socket
        self.addCleanup(setattr, self.port, "socket", self.real)

    def messages(self):
        # Twisted's namespace for the port's class (its Logger is a descriptor).
        namespace = self.port._logger.namespace
        return [e.get("log_format", "") for e in self.events if e.get("log_namespace") == namespace]

    def test_resourceErrorsLogged(self):
        """
        C{ENFILE}, C{ENOBUFS}, C{ENOMEM} and C{ECONNABORTED} end the loop with Twisted's message
        (its buffering logger, its namespace).
        """
        for code in (errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED):
            self.port._kinds = (socket.AF_INET, socket.SOCK_STREAM, 0)
            self.port.socket = FakeListener([code])
            del self.events[:]
            self.port.doRead()
            self.assertEqual(self.messages(), ["Could not accept new connection ({acceptError})"])
            [event] = [e for e in self.events if "acceptError" in e]
            self.assertEqual(event["acceptError"], errno.errorcode[code])
            self.assertEqual(self.port.socket.calls, 1)
            self.assertEqual(self.port.numberAccepts, 1)

    def test_epermRetried(self):
        """
        C{EPERM} (netfilter) goes on to the next accept.
        """
        self.port._kinds = (socket.AF_INET, socket.SOCK_STREAM, 0)
        self.port.socket = FakeListener([errno.EPERM, errno.EPERM])
        self.port.doRead()
        self.assertEqual(self.port.socket.calls, 3)
        self.assertEqual(self.messages(), [])

    def test_emfileReleasesReservedDescriptor(self):
        """
        C{EMFILE} with the reserved descriptor available: it is released, what can then be
        accepted is closed, each logged, as Twisted does.
        """
        reservation = FakeReservation()
        self.patch(tcp, "_reservedFD", reservation)
        doomed = ClosableSocket()
        self.port._kinds = (socket.AF_INET, socket.SOCK_STREAM, 0)
        self.port.socket = FakeListener([errno.EMFILE], accepted=[(doomed, ("192.0.2.1", 4000))])
        self.port.doRead()
        self.assertEqual(reservation.released, 1)
        self.assertTrue(doomed.closed)
        self.assertEqual(
            self.messages(),
            [
                "EMFILE encountered; releasing reserved file descriptor.",
                "EMFILE recovery: Closed socket from {address}",
                "Re-reserving EMFILE recovery file descriptor.",
            ],
        )
        self.assertEqual(self.factory.built, [])

    def test_unknownErrorLoggedAsFailure(self):
        """
        Any other error of C{accept()} is logged as a failure (C{log.deferr()}), and
        C{numberAccepts} is left as it was, as in Twisted.
        """
        self.port._kinds = (socket.AF_INET, socket.SOCK_STREAM, 0)
        self.port.socket = FakeListener([errno.EINVAL])
        self.port.numberAccepts = 7
        self.port.doRead()
        [failure] = self.flushLoggedErrors(OSError)
        self.assertEqual(failure.value.errno, errno.EINVAL)
        self.assertEqual(self.port.numberAccepts, 7)


class InstallTests(EPollCase):
    def test_serverFromStringListensLean(self):
        """
        A C{tcp:} endpoint made with L{leanListening}'s reactor listens with a L{LeanPort},
        which accepts.
        """
        endpoint = serverFromString(leanListening(self.reactor), "tcp:0:interface=127.0.0.1")
        factory = Recording()
        ports = []
        endpoint.listen(factory).addCallback(ports.append)
        [port] = ports
        self.assertIs(type(port), LeanPort)
        self.assertIs(port.reactor, self.reactor)
        self.connect(port)
        port.doRead()
        self.assertEqual(len(factory.built), 1)

    def test_adoptedSocket(self):
        """
        A listening socket adopted (a worker's) is a L{LeanPort} on a duplicate, which accepts.
        """
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.setblocking(False)
        factory = Recording()
        port = adoptStreamPort(self.reactor, listener.fileno(), socket.AF_INET, factory)
        self.assertIs(type(port), LeanPort)
        self.assertNotEqual(port.fileno(), listener.fileno())
        self.connect(port)
        port.doRead()
        self.assertEqual(len(factory.built), 1)

    def test_wholeReactor(self):
        """
        L{leanAccept} makes a reactor's own C{listenTCP} and C{adoptStreamPort} give
        L{LeanPort}s; another reactor is left alone.
        """
        self.assertTrue(leanAccept(self.reactor))
        port = self.reactor.listenTCP(0, Recording(), interface="127.0.0.1")
        self.assertIs(type(port), LeanPort)
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        listener.setblocking(False)
        adopted = self.reactor.adoptStreamPort(listener.fileno(), socket.AF_INET, Recording())
        self.assertIs(type(adopted), LeanPort)
        memory = MemoryReactor()
        self.assertFalse(leanAccept(memory))
        self.assertNotIn("listenTCP", vars(memory))

    def test_adoptedElsewhereAsTwisted(self):
        """
        Another reactor adopts with its own C{adoptStreamPort}.
        """
        memory = MemoryReactor()
        memory.adoptStreamPort = lambda fd, family, factory: ("adopted", fd, family, factory)
        self.assertEqual(adoptStreamPort(memory, 7, socket.AF_INET, "f"), ("adopted", 7, socket.AF_INET, "f"))
