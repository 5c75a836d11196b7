"""
The network helpers of L{casd.net}: one reading of peer addresses, one choice of client endpoint.
"""

import ipaddress

from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import SynchronousTestCase

from casd.net import clientEndpoint, parseAddress


class ParseAddressTests(SynchronousTestCase):
    def test_addresses(self):
        self.assertEqual(parseAddress("192.0.2.7"), ipaddress.ip_address("192.0.2.7"))
        self.assertEqual(parseAddress("2001:db8::1"), ipaddress.ip_address("2001:db8::1"))

    def test_mappedIsIPv4(self):
        self.assertEqual(parseAddress("::ffff:192.0.2.7"), ipaddress.ip_address("192.0.2.7"))

    def test_zoneDropped(self):
        self.assertEqual(parseAddress("fe80::1%eth0"), ipaddress.ip_address("fe80::1"))

    def test_notAnAddress(self):
        self.assertIsNone(parseAddress("/run/casd.sock"))
        self.assertIsNone(parseAddress(""))


class ClientEndpointTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()

    def test_kinds(self):
        self.assertIsInstance(clientEndpoint(self.reactor, "192.0.2.7", 143, 5), TCP4ClientEndpoint)
        self.assertIsInstance(clientEndpoint(self.reactor, "2001:db8::1", 143, 5), TCP6ClientEndpoint)
        self.assertIsInstance(clientEndpoint(self.reactor, "mbx.example.com", 143, 5), HostnameEndpoint)

    def test_connectsWithTimeout(self):
        clientEndpoint(self.reactor, "192.0.2.7", 993, 7).connect(Factory.forProtocol(Protocol))
        host, port, factory, timeout, bindAddress = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("192.0.2.7", 993, 7))

    def test_implicitTLS(self):
        options = optionsForClientTLS("mbx.example.com")
        endpoint = clientEndpoint(self.reactor, "192.0.2.7", 993, 7, options)
        self.assertNotIsInstance(endpoint, TCP4ClientEndpoint)
        endpoint.connect(Factory.forProtocol(Protocol))
        host, port, factory = self.reactor.tcpClients[0][:3]
        self.assertEqual((host, port), ("192.0.2.7", 993))
        # The connection's protocol is TLS from the first byte.
        self.assertIsInstance(factory.buildProtocol(None)._wrappedProtocol, TLSMemoryBIOProtocol)


class AddressFamilyTests(SynchronousTestCase):
    def test_families(self):
        from casd.net import addressFamily

        self.assertEqual(addressFamily("192.0.2.7"), 4)
        self.assertEqual(addressFamily("2001:db8::1"), 6)
        self.assertEqual(addressFamily("mail.example.com"), 0)
        self.assertEqual(addressFamily("localhost"), 0)
