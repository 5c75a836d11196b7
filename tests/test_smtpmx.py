# -*- test-case-name: tests.test_smtpmx -*-
"""
Port 25 (L{protocols.smtpmx}): recipient filtering (accepted domains, the directory, address
extensions, Postmaster), sender and parameter checks, the recipient look-up cache and its own
TTL, and the warning for C{preauth_timeout}.
"""

import attr

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.auth.cache import CachingChecker, CredentialCache
from casd.failures import DirectoryUnavailable
from casd.testing import connectFrontend, failBackend
from tests.test_smtp_helpers import CONFIG, SMTPTestMixin

UNKNOWN = b"550 5.1.1 <dave@example.com>: Recipient address rejected: User unknown\r\n"
FOUND = b"451 4.4.1 <dave@example.com>: Mailbox server unavailable, try again later\r\n"
LOOKUP_FAILED = b"451 4.3.0 <dave@example.com>: Temporary lookup failure, try again later\r\n"
DAVE = UserRecord(login="dave", address="dave@example.com", mailHost="mbx1")


class EnvelopeTests(SMTPTestMixin, SynchronousTestCase):
    def test_relayDenied(self):
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<someone@elsewhere.example>\r\n"),
            b"554 5.7.1 <someone@elsewhere.example>: Relay access denied\r\n",
        )
        self.assertEqual(self.reactor.tcpClients, [])

    def test_subdomainAccepted(self):
        self.context.directory.add(
            "dave",
            "pw",
            UserRecord(login="dave", address="dave@a.sub.example.com", mailHost="mbx1"),
        )
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.send(b"RCPT TO:<dave@a.sub.example.com>\r\n")
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_unknownRecipient(self):
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<nobody@example.com>\r\n"),
            b"550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown\r\n",
        )
        self.assertEqual(self.reactor.tcpClients, [])
        # A harvester's rejected recipients count towards the error limit.
        out = self.send(b"".join(b"RCPT TO:<%d@example.com>\r\n" % i for i in range(5)))
        self.assertTrue(out.endswith(b"421 4.7.0 cas.example.net Error: too many errors\r\n"), out)

    def test_directoryDown(self):
        self.ready()
        self.context.directory.error = DirectoryUnavailable("down")
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<alice@example.com>\r\n"),
            b"451 4.3.0 <alice@example.com>: Temporary lookup failure, try again later\r\n",
        )

    def test_recipientDelimiter(self):
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.send(b"RCPT TO:<alice+lists@example.com>\r\n")
        backend = self.openBackend()
        backend.step(
            b"MAIL FROM:<s@example.org>\r\nRCPT TO:<alice+lists@example.com>\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_postmasterWithoutDomain(self):
        self.context.directory.add(
            "postmaster",
            "pw",
            UserRecord(login="postmaster", address="postmaster@example.com", mailHost="mbx1"),
        )
        self.ready()
        self.send(b"MAIL FROM:<>\r\n")
        self.send(b"RCPT TO:<Postmaster>\r\n")
        backend = self.openBackend()
        backend.step(
            b"MAIL FROM:<>\r\nRCPT TO:<Postmaster>\r\n", b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n"
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")

    def test_blockedSenders(self):
        self.ready()
        self.assertEqual(
            self.send(b"MAIL FROM:<x@spam.example>\r\n"),
            b"550 5.7.1 <x@spam.example>: Sender address rejected: Access denied\r\n",
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<Bad@Example.org>\r\n"),
            b"550 5.7.1 <Bad@Example.org>: Sender address rejected: Access denied\r\n",
        )
        self.assertEqual(self.send(b"MAIL FROM:<good@example.org>\r\n"), b"250 2.1.0 Ok\r\n")

    def test_mailParameters(self):
        self.ready()
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org> SIZE=1001\r\n"),
            b"552 5.3.4 Message size exceeds fixed limit\r\n",
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org> SIZE=big\r\n"),
            b"501 5.5.4 Bad SIZE parameter\r\n",
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org> RET=FULL\r\n"),
            b"555 5.5.4 Unsupported option: RET\r\n",
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org> SMTPUTF8\r\n"),
            b"555 5.5.4 Unsupported option: SMTPUTF8\r\n",
        )
        self.assertEqual(
            self.send(b"MAIL FROM:<s@example.org SIZE=1\r\n"),
            b"501 5.1.7 Bad sender address syntax\r\n",
        )

    def test_bodyAndSizeReplayed(self):
        self.ready()
        backend = self.firstRecipient(params=b" SIZE=900 BODY=8BITMIME")
        self.assertEqual(backend.received(), b"")

    def test_recipientParameters(self):
        self.ready()
        self.send(b"MAIL FROM:<s@example.org>\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<alice@example.com> NOTIFY=NEVER\r\n"),
            b"555 5.5.4 Unsupported option: NOTIFY\r\n",
        )

    def test_recipientLimit(self):
        self.ready()
        backend = self.firstRecipient()
        for name in (b"carol", b"alice+a"):
            self.send(b"RCPT TO:<" + name + b"@example.com>\r\n")
            backend.step(b"RCPT TO:<" + name + b"@example.com>\r\n", b"250 2.1.5 Ok\r\n")
        self.assertEqual(
            self.send(b"RCPT TO:<alice+b@example.com>\r\n"),
            b"452 4.5.3 Error: too many recipients\r\n",
        )
        self.assertEqual(backend.received(), b"")


class RecipientCacheTests(SMTPTestMixin, SynchronousTestCase):
    """
    Recipient look-ups are remembered for C{recipient_cache_ttl} (30 s here), not for the
    credential cache's C{cache_ttl} (issue 15 defect 10).
    """

    config = CONFIG.replace('recipient_delimiter = "+"', "recipient_cache_ttl = 30.0")

    def rcpt(self) -> bytes:
        """
        A transaction for dave; a backend connection, when one is tried, is refused.
        """
        self.send(b"RSET\r\nMAIL FROM:<s@example.org>\r\n")
        tries = len(self.reactor.tcpClients)
        out = self.send(b"RCPT TO:<dave@example.com>\r\n")
        if len(self.reactor.tcpClients) > tries:
            failBackend(self.reactor)
            out += self.out()
        return out

    def test_deletedMailboxStopsReceivingWithinTTL(self):
        """
        Behind a credential cache that would remember dave for 300 s, a deleted mailbox is
        unknown once the recipient TTL is over.
        """
        memory = self.context.directory
        memory.add("dave", "pw", DAVE)
        self.context = attr.evolve(
            self.context,
            directory=CachingChecker(memory, CredentialCache(self.reactor, ttl=300)),
        )
        self.successResultOf(self.context.directory.lookup("dave@example.com"))  # cached 300 s
        self.ready()
        self.assertEqual(self.rcpt(), FOUND)
        del memory.users["dave"]
        self.reactor.advance(29)
        self.assertEqual(self.rcpt(), FOUND)
        self.reactor.advance(2)
        self.assertEqual(self.rcpt(), UNKNOWN)

    def test_directoryDownWithinTTL(self):
        self.ready()
        self.assertEqual(self.rcpt(), UNKNOWN)
        self.context.directory.error = DirectoryUnavailable("down")
        self.reactor.advance(29)
        self.assertEqual(self.rcpt(), UNKNOWN)
        self.reactor.advance(2)
        self.assertEqual(self.rcpt(), LOOKUP_FAILED)

    def test_failuresNotCached(self):
        self.ready()
        self.context.directory.error = DirectoryUnavailable("down")
        self.assertEqual(self.rcpt(), LOOKUP_FAILED)
        self.context.directory.error = None
        self.context.directory.add("dave", "pw", DAVE)
        self.assertEqual(self.rcpt(), FOUND)

    def test_noCache(self):
        self.reconfigure(self.config.replace("recipient_cache_ttl = 30.0", "recipient_cache_ttl = 0"))
        self.ready()
        self.assertEqual(self.rcpt(), UNKNOWN)
        self.context.directory.add("dave", "pw", DAVE)
        self.assertEqual(self.rcpt(), FOUND)


class PreauthTimeoutTests(SMTPTestMixin, SynchronousTestCase):
    """
    C{preauth_timeout} does nothing for SMTP: set, it is warned about; the client's silence is
    bounded by C{command_timeout}.
    """

    def warnings(self, config):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.reconfigure(config)
        connectFrontend(self.descriptor, self.context, 0, self.peer)
        return [e for e in events if "preauth_timeout" in e.get("log_format", "")]

    def test_warnedWhenSet(self):
        [event] = self.warnings(CONFIG.replace("[smtp]\n", "[smtp]\npreauth_timeout = 30.0\n"))
        self.assertEqual(event["name"], "smtp")

    def test_silentByDefault(self):
        self.assertEqual(self.warnings(CONFIG), [])

    def test_commandTimeoutBounds(self):
        self.reconfigure(CONFIG.replace("[smtp]\n", "[smtp]\npreauth_timeout = 1.0\n"))
        self.ready()
        self.reactor.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.reactor.advance(2)
        self.assertTrue(self.transport.disconnecting)
