# -*- test-case-name: tests.test_smtpfilters -*-
"""
The SMTP connection and sender filters (L{protocols.smtpfilters}) through both services: allow
and deny networks, per-address limits, the pregreet test, DNS block lists, blocked senders.
"""

from twisted.internet import defer
from twisted.names import dns
from twisted.names.error import DomainError
from twisted.trial.unittest import SynchronousTestCase

from protocols.smtpfilters import dnsblName, hostPort, senderBlocked
from protocols.smtpmx import smtp
from protocols.submission import submission
from tests.test_smtp_helpers import CONFIG, SMTPTestMixin


class FakeResolver:
    """
    Answers DNSBL queries from a table; C{None} means "never answers".
    """

    def __init__(self, listed=(), silent=()):
        self.listed = set(listed)
        self.silent = set(silent)
        self.queries = []

    def lookupAddress(self, name, timeout=None):
        self.queries.append(name)
        if name in self.silent:
            return defer.Deferred()
        if name in self.listed:
            rr = dns.RRHeader(name, dns.A, payload=dns.Record_A("127.0.0.2"))
            return defer.succeed(([rr], [], []))
        return defer.fail(DomainError(name))


class FilterTests(SMTPTestMixin, SynchronousTestCase):
    def withFilters(self, settings: str):
        self.reconfigure(CONFIG.replace("max_recipients = 3", "max_recipients = 3\n" + settings))

    def test_denyNetworks(self):
        self.withFilters('deny_networks = ["198.51.100.0/24"]')
        self.assertEqual(self.connect(), b"554 5.7.1 Access denied\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(
            self.connect(peer=("203.0.113.1", 1)), b"220 cas.example.net ESMTP ready\r\n"
        )

    def test_connectionsPerAddress(self):
        self.withFilters("max_connections_per_address = 2")
        first = self.connect()
        second = self.connect()
        self.assertEqual(first, second)
        keep = self.server
        self.assertEqual(
            self.connect(),
            b"421 4.7.0 cas.example.net Too many connections from your address, try again later\r\n",
        )
        self.assertEqual(
            self.connect(peer=("203.0.113.1", 1)), b"220 cas.example.net ESMTP ready\r\n"
        )
        keep.connectionLost(None)
        self.assertEqual(self.connect(), b"220 cas.example.net ESMTP ready\r\n")

    def test_allowNetworksSkipLimits(self):
        self.withFilters('max_connections_per_address = 1\nallow_networks = ["198.51.100.7/32"]')
        self.connect()
        self.assertEqual(self.connect(), b"220 cas.example.net ESMTP ready\r\n")

    def test_connectionRate(self):
        self.withFilters("connection_rate_limit = 2\nmax_connections_per_address = 0")
        self.connect()
        self.connect()
        self.assertTrue(self.connect().startswith(b"421 4.7.0"))
        self.reactor.advance(61)
        self.assertEqual(self.connect(), b"220 cas.example.net ESMTP ready\r\n")

    def test_pregreetTalker(self):
        self.withFilters("pregreet_delay = 3.0")
        self.assertEqual(self.connect(), b"220-cas.example.net ESMTP\r\n")
        self.assertEqual(self.send(b"EHLO bot.example\r\nMAIL FROM:<x@y.example>\r\n"), b"")
        self.reactor.advance(3)
        self.assertEqual(self.out(), b"554 5.5.1 Error: SMTP protocol synchronization\r\n")
        self.assertTrue(self.transport.disconnecting)

    def test_pregreetPatientClient(self):
        self.withFilters("pregreet_delay = 3.0")
        self.connect()
        self.reactor.advance(3)
        self.assertEqual(self.out(), b"220 cas.example.net ESMTP ready\r\n")
        self.assertTrue(self.send(b"EHLO ok.example\r\n").startswith(b"250-"))

    def dnsbl(self, resolver):
        self.withFilters('dnsbl_zones = ["bl.example", "other.example"]\ndnsbl_timeout = 2.0')
        section = self.context.config.protocols["smtp"]
        smtp.sharedState(section, self.context).filter.resolver = resolver

    def test_dnsblListed(self):
        resolver = FakeResolver(listed={"7.100.51.198.other.example"})
        self.dnsbl(resolver)
        self.assertEqual(
            self.connect(),
            b"554 5.7.1 Service unavailable; client [198.51.100.7] blocked using other.example\r\n",
        )
        self.assertEqual(
            set(resolver.queries), {"7.100.51.198.bl.example", "7.100.51.198.other.example"}
        )
        # Cached: no second look-up.
        self.connect()
        self.assertEqual(len(resolver.queries), 2)

    def test_dnsblNotListed(self):
        resolver = FakeResolver()
        self.dnsbl(resolver)
        self.assertEqual(self.connect(), b"220 cas.example.net ESMTP ready\r\n")

    def test_dnsblBoundedTime(self):
        resolver = FakeResolver(silent={"7.100.51.198.bl.example", "7.100.51.198.other.example"})
        self.dnsbl(resolver)
        self.assertEqual(self.connect(), b"")
        self.reactor.advance(1.9)
        self.assertEqual(self.out(), b"")
        self.reactor.advance(0.2)
        self.assertEqual(self.out(), b"220 cas.example.net ESMTP ready\r\n")
        # A timeout is not remembered as an answer.
        self.connect()
        self.assertEqual(len(resolver.queries), 4)

    def test_dnsblNames(self):
        self.assertEqual(dnsblName("192.0.2.1", "zen.example."), "1.2.0.192.zen.example")
        self.assertEqual(
            dnsblName("2001:db8::1", "bl.example"),
            "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example",
        )
        self.assertIsNone(dnsblName("not-an-ip", "bl.example"))

    def test_senderBlocked(self):
        blocked = ("bad@example.org", "@spam.example", "junk.example", ".bulk.example")
        self.assertTrue(senderBlocked("Bad@Example.org", blocked))
        self.assertTrue(senderBlocked("x@spam.example", blocked))
        self.assertTrue(senderBlocked("x@junk.example", blocked))
        self.assertTrue(senderBlocked("x@a.bulk.example", blocked))
        self.assertFalse(senderBlocked("x@bulk.example", blocked))
        self.assertFalse(senderBlocked("good@example.org", blocked))
        self.assertFalse(senderBlocked("", blocked))

    def test_submissionConnectionLimit(self):
        self.reconfigure(
            CONFIG.replace(
                "user_messages_per_hour = 2",
                "user_messages_per_hour = 2\nmax_connections_per_address = 1",
            )
        )
        self.descriptor = submission
        self.connect()
        self.assertEqual(
            self.connect(),
            b"421 4.7.0 cas.example.net Too many connections from your address, try again later\r\n",
        )


class HelperTests(SynchronousTestCase):
    def test_hostPort(self):
        self.assertEqual(hostPort("192.0.2.1:5353"), ("192.0.2.1", 5353))
        self.assertEqual(hostPort("[2001:db8::1]:53"), ("2001:db8::1", 53))
        self.assertEqual(hostPort("192.0.2.1"), ("192.0.2.1", 53))
