"""
L{casd.session.clientinfo}: the client connection's description, read from the transport, and
session ids.
"""

import base64
import os
import random

from twisted.internet import defer, task
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from casd.session import clientinfo
from casd.session.clientinfo import ClientInfo, newSessionId
from casd.session.relay import writeThrough
from casd.session.tlsrelay import TLS_LAYERS


class _Listener:
    name = "imap-1"
    trusted = False


class _Keep(Factory):
    def __init__(self):
        self.protocols = []

    def buildProtocol(self, addr):
        p = Protocol()
        self.protocols.append(p)
        return p


class FromTransportTests(TestCase):
    """
    On a plain IPv4 connection the addresses are read without building Twisted's address
    objects: the same values as C{getPeer()} and C{getHost()}.
    """

    @defer.inlineCallbacks
    def test_sameAsTwistedAddresses(self):
        from twisted.internet import reactor

        factory = _Keep()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", port.getHost().port)
        self.addCleanup(client.transport.loseConnection)
        while not factory.protocols or factory.protocols[0].transport is None:
            yield task.deferLater(reactor, 0.01, lambda: None)
        transport = factory.protocols[0].transport
        self.addCleanup(transport.loseConnection)
        peer, host = transport.getPeer(), transport.getHost()
        for kind in ("plain", "write-through"):
            if kind == "write-through":
                writeThrough(transport)
            info = ClientInfo.fromTransport(transport, "imap", _Listener(), ())
            self.assertEqual(
                (info.peerHost, info.peerPort, info.localHost, info.localPort),
                (peer.host, peer.port, host.host, host.port),
                kind,
            )
            self.assertEqual(info.peerPort, client.transport.getHost().port)
            self.assertEqual((info.protocol, info.listener, info.trusted), ("imap", "imap-1", False))
        # casd's TLS layers over it: the TCP connection's addresses, read the same way (its
        # getPeer and getHost, which would build Twisted's address objects, not asked).
        for cls in TLS_LAYERS:
            layer = cls.__new__(cls)
            layer.transport = transport
            layer.getPeer = layer.getHost = lambda: self.fail("address objects built")
            info = ClientInfo.fromTransport(layer, "imap", _Listener(), (), tls=True)
            self.assertEqual(
                (info.peerHost, info.peerPort, info.localHost, info.localPort, info.tls),
                (peer.host, peer.port, host.host, host.port, True),
                cls,
            )


class SessionIdTests(SynchronousTestCase):
    def test_shape(self):
        """
        Twelve characters of URL-safe base64 (9 random bytes), all different.
        """
        ids = [newSessionId() for _ in range(1000)]
        for sid in ids:
            self.assertRegex(sid, r"\A[A-Za-z0-9_-]{12}\Z")
        self.assertEqual(len(set(ids)), 1000)

    def test_randomReadInBatches(self):
        """
        The kernel's random pool is read once per 128 session ids, and every id uses fresh bytes.
        """
        reads = []

        def urandom(n):
            reads.append(n)
            return random.Random(len(reads)).randbytes(n)

        self.patch(clientinfo, "_random", [b"", 0])
        self.patch(os, "urandom", urandom)
        ids = [newSessionId() for _ in range(300)]
        self.assertEqual(reads, [9 * 128] * 3)
        self.assertEqual(len(set(ids)), 300)

        first = random.Random(1).randbytes(9 * 128)
        self.assertEqual(ids[1], base64.urlsafe_b64encode(first[9:18]).decode())


class TrustTests(SynchronousTestCase):
    def test_byValueAndIdentity(self):
        """
        C{isTrusted} answers for the networks given, whether the same tuple comes again or an
        equal one is built for each call; an entry left by another tuple that had the same id
        is not taken for it.
        """
        import ipaddress

        inside = (ipaddress.ip_network("10.0.0.0/8"),)
        outside = (ipaddress.ip_network("192.0.2.0/24"),)
        self.assertTrue(clientinfo.isTrusted("10.1.2.3", inside))
        self.assertTrue(clientinfo.isTrusted("10.1.2.3", inside))
        self.assertTrue(clientinfo.isTrusted("10.1.2.3", tuple(list(inside))))
        self.assertFalse(clientinfo.isTrusted("10.1.2.3", outside))
        # A stale entry under this tuple's id, left by a tuple that trusted the address.
        clientinfo._trustCache[("10.1.2.3", id(outside))] = (inside, True)
        self.assertFalse(clientinfo.isTrusted("10.1.2.3", outside))
        self.assertFalse(clientinfo.isTrusted("10.1.2.3", ()))
