"""
The size of casd's reads from an HTTP backend (L{protocols.http.proxy.growReads}): they grow while
a response body streams and every read fills the buffer, and come back to
L{protocols.http.proxy.BUFFER_SIZE} when the client falls behind and when the response ends.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase

from casd.testing import TLSStringTransport
from protocols.http.proxy import BUFFER_SIZE, MAX_READ_SIZE
from tests.test_http_upstream import TARGET, Connector, Sink, UpstreamPool


class SocketTransport(StringTransport):
    """
    A L{StringTransport} that looks like plain TCP to the backend connection (a C{socket} and a
    C{bufferSize}), as Twisted's C{tcp.Client} does.
    """

    socket = None
    bufferSize = 65536


class ReadSizeTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.pool = UpstreamPool(self.reactor, Connector(self.reactor), maxConnections=4, maxIdle=2,
                                 idleTimeout=60)

    def start(self, head, transport=None):
        """
        Send a GET, connect it over C{transport}, answer with C{head}.

        @return: C{(sink, exchange, connection, transport)}.
        """
        sink = Sink()
        exchange = self.pool.request(TARGET, b"GET", b"/big", [], None, sink)
        host, port, factory = self.reactor.tcpClients[-1][:3]
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        transport = SocketTransport() if transport is None else transport
        protocol.makeConnection(transport)
        connection = getattr(protocol, "_wrappedProtocol", protocol)
        connection.dataReceived(head)
        return sink, exchange, connection, transport

    def fill(self, connection, transport, times=1):
        """
        Hand C{connection} C{times} reads that each fill its transport's buffer.

        @return: the buffer sizes seen before each read, and after the last.
        """
        sizes = []
        for _ in range(times):
            sizes.append(transport.bufferSize)
            connection.dataReceived(b"x" * transport.bufferSize)
        sizes.append(transport.bufferSize)
        return sizes

    def test_growsToTheLimit(self):
        """
        Each read of a C{Content-Length} body that fills the buffer doubles the next, up to
        L{MAX_READ_SIZE}; the pieces reach the sink whole.
        """
        sink, _, connection, transport = self.start(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"
        )
        self.assertEqual(transport.bufferSize, BUFFER_SIZE)
        sizes = self.fill(connection, transport, 5)
        self.assertEqual(sizes, [BUFFER_SIZE, 2 * BUFFER_SIZE, 4 * BUFFER_SIZE, MAX_READ_SIZE,
                                 MAX_READ_SIZE, MAX_READ_SIZE])
        self.assertEqual([len(d) for d in sink.data], sizes[:-1])

    def test_shortReadKeepsSize(self):
        """
        A read that does not fill the buffer leaves the size as it is.
        """
        _, _, connection, transport = self.start(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        self.fill(connection, transport, 1)
        connection.dataReceived(b"x" * 1000)
        self.assertEqual(transport.bufferSize, 2 * BUFFER_SIZE)

    def test_slowClientShrinks(self):
        """
        When the client falls behind (its connection pauses the response), reads go back to
        L{BUFFER_SIZE}, and grow again once it keeps up.
        """
        _, exchange, connection, transport = self.start(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n"
        )
        self.fill(connection, transport, 3)
        self.assertEqual(transport.bufferSize, MAX_READ_SIZE)
        exchange.pauseResponse()
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(transport.bufferSize, BUFFER_SIZE)
        exchange.resumeResponse()
        self.assertEqual(self.fill(connection, transport, 1), [BUFFER_SIZE, 2 * BUFFER_SIZE])

    def test_endShrinks(self):
        """
        At the end of a response the size goes back to L{BUFFER_SIZE} for the next request on
        the connection, which is kept.
        """
        length = BUFFER_SIZE + 2 * BUFFER_SIZE + 10
        sink, _, connection, transport = self.start(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (length,)
        )
        self.fill(connection, transport, 2)
        self.assertEqual(transport.bufferSize, 4 * BUFFER_SIZE)
        connection.dataReceived(b"y" * 10)
        self.assertEqual(sink.events, [("started", 200), ("ended", True)])
        self.assertEqual(transport.bufferSize, BUFFER_SIZE)
        self.assertFalse(transport.disconnecting)

    def test_chunkedAndUntilClose(self):
        """
        A chunked body and one that runs to the close grow their reads the same way.
        """
        _, _, connection, transport = self.start(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b"%x\r\n%s\r\n" % (BUFFER_SIZE - 9, b"c" * (BUFFER_SIZE - 9))
        self.assertEqual(len(chunk), BUFFER_SIZE)
        connection.dataReceived(chunk)
        self.assertEqual(transport.bufferSize, 2 * BUFFER_SIZE)
        _, _, connection, transport = self.start(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        self.assertEqual(self.fill(connection, transport, 2),
                         [BUFFER_SIZE, 2 * BUFFER_SIZE, 4 * BUFFER_SIZE])

    def test_neverThroughTLS(self):
        """
        Over TLS (a transport without a socket of its own: the TLS layer's chunks) reads never
        grow and the size is not touched.
        """
        _, _, connection, transport = self.start(
            b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n", TLSStringTransport()
        )
        connection.dataReceived(b"x" * BUFFER_SIZE)
        connection.dataReceived(b"x" * MAX_READ_SIZE)
        self.assertFalse(hasattr(transport, "bufferSize"))
