"""
The PROXY listener's light set-up (casd.service.proxyproto): the common version 1 header read
by one regular expression into what Twisted's parser gives, and the wrapper's interface
declaration from a table.
"""

import random
from ipaddress import ip_network

from zope.interface import directlyProvides, providedBy

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import BaseProtocol, Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.trial.unittest import SynchronousTestCase

from casd.service import proxyproto
from casd.service.proxyproto import ProxyProtocolFactory, _StartAfterHeader, _v1Info, _v2Info


def v2(familyProtocol, addresses, command=0x21, extra=b"", length=None):
    """
    A version 2 header: C{addresses} (packed) and C{extra} (TLVs) as its address block.
    """
    body = addresses + extra
    size = len(body) if length is None else length
    return V2Parser.PREFIX + bytes([command, familyProtocol]) + size.to_bytes(2, "big") + body


def v4Block(src, dst, sport, dport):
    return bytes(src) + bytes(dst) + sport.to_bytes(2, "big") + dport.to_bytes(2, "big")

#: Headers the fast path reads, each with what follows it.
COMMON = [
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 143\r\n",
    b"PROXY TCP4 10.1.2.3 203.0.113.9 65535 993\r\na LOGIN x y\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 0 00143\r\n",
    b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 143\r\n",
    b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\nrest",
]

#: Headers left to Twisted's parser (odd, partial, or other versions).
OTHER = [
    b"PROXY UNKNOWN\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 143 extra\r\n",
    b"PROXY TCP4 192.0.2.1  192.0.2.2 1234 143\r\n",
    b"PROXY TCP4 host.example 192.0.2.2 1234 143\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 143\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1234\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 x 143\r\n",
    b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
    b"PROXY TCP4 192.0.2.1 192.0.2.2 1234 143",
    b"proxy TCP4 192.0.2.1 192.0.2.2 1234 143\r\n",
]


class Recorder(Protocol):
    def __init__(self):
        self.received = []
        self.peers = []

    def connectionMade(self):
        self.peers.append((self.transport.getPeer(), self.transport.getHost()))

    def dataReceived(self, data):
        self.received.append(data)


class V1Tests(SynchronousTestCase):
    def test_sameAsTwistedParser(self):
        """
        Each common header gives the L{ProxyInfo} Twisted's C{V1Parser} gives (equal addresses
        of the same classes, the same raw header) and the same bytes after it.
        """
        for data in COMMON:
            info, rest = _v1Info(data)
            expected, expectedRest = V1Parser().feed(data)
            self.assertEqual(info, expected, data)
            self.assertEqual(rest, expectedRest, data)
            self.assertIs(type(info.source), type(expected.source))
            self.assertIs(type(info.destination), type(expected.destination))
            self.assertEqual(hash(info.source), hash(expected.source))

    def test_othersLeftToTwisted(self):
        """
        Anything but a whole common header is not read by the fast path.
        """
        for data in OTHER:
            self.assertIsNone(_v1Info(data), data)

    def test_addressKinds(self):
        info, _ = _v1Info(COMMON[0])
        self.assertEqual(info.source, IPv4Address("TCP", "192.0.2.1", 1234))
        info, _ = _v1Info(COMMON[3])
        self.assertEqual(info.destination, IPv6Address("TCP", "2001:db8::2", 143))


class V2Tests(SynchronousTestCase):
    def common(self):
        rng = random.Random(1405)
        headers = [
            v2(0x11, v4Block([192, 0, 2, 1], [192, 0, 2, 2], 1234, 143)),
            v2(0x11, v4Block([0, 0, 0, 0], [255, 255, 255, 255], 0, 65535)) + b"a LOGIN x y\r\n",
            # TLVs after the addresses (send-proxy-v2-ssl and the like) belong to the header.
            v2(0x11, v4Block([10, 1, 2, 3], [10, 9, 8, 7], 5, 6), extra=b"\x01\x00\x02h2") + b"rest",
            v2(0x21, bytes(16) + bytes(15) + b"\x01" + (7).to_bytes(2, "big") + (8).to_bytes(2, "big")),
        ]
        for _ in range(200):
            if rng.random() < 0.5:
                block = v4Block(
                    [rng.randrange(256) for _ in range(4)],
                    [rng.randrange(256) for _ in range(4)],
                    rng.randrange(65536),
                    rng.randrange(65536),
                )
                headers.append(v2(0x11, block, extra=bytes(rng.randrange(3))) + bytes(rng.randrange(3)))
            else:
                block = bytes(rng.randrange(256) for _ in range(32)) + bytes(rng.randrange(256) for _ in range(4))
                headers.append(v2(0x21, block, extra=bytes(rng.randrange(3))) + b"x" * rng.randrange(3))
        return headers

    def test_sameAsTwistedParser(self):
        """
        Each version 2 PROXY header over TCP gives what Twisted's C{V2Parser} gives: equal
        addresses of the same classes and texts, the same raw header, the same bytes after it.
        """
        for data in self.common():
            info, rest = _v2Info(data)
            expected, expectedRest = V2Parser().feed(data)
            self.assertEqual(info, expected, data)
            self.assertEqual((info.source.host, info.destination.host), (expected.source.host, expected.destination.host))
            self.assertIs(type(info.source), type(expected.source))
            self.assertEqual(rest, expectedRest, data)

    def test_othersLeftToTwisted(self):
        """
        C{LOCAL}, UDP, UNIX, unspecified, a short address block or a header in pieces are not
        read by the fast path.
        """
        block = v4Block([192, 0, 2, 1], [192, 0, 2, 2], 1234, 143)
        for data in [
            v2(0x11, block, command=0x20),  # LOCAL (health checks)
            v2(0x12, block),  # UDP
            v2(0x31, bytes(216)),  # UNIX
            v2(0x00, b""),  # UNSPEC
            v2(0x11, block[:8]),  # addresses missing
            v2(0x21, bytes(20)),
            v2(0x11, block)[:20],  # in pieces
            v2(0x11, block)[:15],
            v2(0x11, block, command=0x11),  # version 1 in a version 2 signature
        ]:
            self.assertIsNone(_v2Info(data), data)


class WrapperTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.factory = ProxyProtocolFactory(
            Factory.forProtocol(Recorder), self.clock, [ip_network("127.0.0.0/8")]
        )

    def connect(self):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5000))
        transport = StringTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 2143), peerAddress=IPv4Address("TCP", "127.0.0.1", 5000)
        )
        proto.makeConnection(transport)
        return proto, transport

    def test_headerThenData(self):
        """
        A common header in the first read starts the wrapped protocol with the header's
        addresses, hands it what followed, and cancels the header timer.
        """
        proto, transport = self.connect()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        proto.dataReceived(COMMON[1])
        inner = proto.wrappedProtocol
        self.assertEqual(
            inner.peers,
            [(IPv4Address("TCP", "10.1.2.3", 65535), IPv4Address("TCP", "203.0.113.9", 993))],
        )
        self.assertEqual(inner.received, [b"a LOGIN x y\r\n"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIsNone(proto._parser)  # Twisted's parser was not needed
        proto.dataReceived(b"more")
        self.assertEqual(inner.received, [b"a LOGIN x y\r\n", b"more"])

    def test_splitHeaderByTwisted(self):
        """
        A header in two reads goes to Twisted's parser, with the same outcome.
        """
        proto, transport = self.connect()
        proto.dataReceived(COMMON[0][:15])
        self.assertEqual(proto.wrappedProtocol.peers, [])
        proto.dataReceived(COMMON[0][15:] + b"x")
        self.assertIsInstance(proto._parser, V1Parser)
        self.assertEqual(proto.wrappedProtocol.peers[0][0], IPv4Address("TCP", "192.0.2.1", 1234))
        self.assertEqual(proto.wrappedProtocol.received, [b"x"])

    def test_version2(self):
        """
        A version 2 header in the first read starts the wrapped protocol without Twisted's
        parser; one in pieces, or a C{LOCAL} one, through it.
        """
        header = v2(0x11, v4Block([192, 0, 2, 1], [192, 0, 2, 2], 1234, 143))
        proto, transport = self.connect()
        proto.dataReceived(header + b"tail")
        self.assertIsNone(proto._parser)
        self.assertEqual(proto.wrappedProtocol.peers[0][0], IPv4Address("TCP", "192.0.2.1", 1234))
        self.assertEqual(proto.wrappedProtocol.received, [b"tail"])
        proto, transport = self.connect()
        proto.dataReceived(header[:17])
        proto.dataReceived(header[17:])
        self.assertIsInstance(proto._parser, V2Parser)
        self.assertEqual(proto.wrappedProtocol.peers[0][1], IPv4Address("TCP", "192.0.2.2", 143))
        proto, transport = self.connect()
        proto.dataReceived(v2(0x11, v4Block([192, 0, 2, 1], [192, 0, 2, 2], 1, 2), command=0x20))
        self.assertIsInstance(proto._parser, V2Parser)
        self.assertEqual(proto.wrappedProtocol.peers[0][0], transport.getPeer())

    def test_invalidHeaderCloses(self):
        proto, transport = self.connect()
        proto.dataReceived(b"PROXY TCP4 192.0.2.1 192.0.2.2 x 143\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(proto.wrappedProtocol.peers, [])

    def test_declarationAsDirectlyProvides(self):
        """
        The wrapper provides what its transport provides, with the declaration
        C{directlyProvides} would make; one per transport declaration, shared.
        """
        proto, transport = self.connect()
        other = _StartAfterHeader(self.factory, Recorder())
        directlyProvides(other, providedBy(transport))
        self.assertIs(proto.__provides__, other.__provides__)
        self.assertEqual(list(providedBy(proto)), list(providedBy(other)))
        for interface in providedBy(transport):
            self.assertTrue(interface.providedBy(proto), interface)
        again, _ = self.connect()
        self.assertIs(again.__provides__, proto.__provides__)
        self.assertEqual(proto.connected, 1)
        self.assertIs(proto.transport, transport)

    def test_declarationTableBounded(self):
        self.patch(proxyproto, "_DECLARATIONS", {})
        for i in range(300):
            proxyproto._DECLARATIONS[("k", i)] = i
            if len(proxyproto._DECLARATIONS) >= 256:
                break
        self.connect()
        self.assertEqual(len(proxyproto._DECLARATIONS), 1)

    def test_noConnectionMadeOfItsOwn(self):
        """
        C{makeConnection} skips the wrapper's own C{connectionMade}, which must stay the
        no-op it inherits.
        """
        self.assertIs(_StartAfterHeader.connectionMade, BaseProtocol.connectionMade)
