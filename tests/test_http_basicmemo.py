"""
The per-connection memo of a Basic login (L{protocols.http.auth.BasicCredentials}): the same
C{Authorization} on the same connection gets the same user without parsing or digesting the
credentials again, only while the credential cache itself would answer them.
"""

from __future__ import annotations

from base64 import b64encode

import attr

from twisted.cred.portal import Portal
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.auth.authenticator import Authenticator, MailboxRealm
from casd.auth.cache import CachingChecker, CredentialCache
from casd.auth.penalty import LoginPenalty
from casd.auth.sasl import makeCredentials
from casd.testing import acceptBackend, connectFrontend, makeContext
from protocols.http import http
from tests.test_http_site import BASIC, CONFIG

BOB = b"Basic " + b64encode(b"bob:hunter2")


class BasicMemoTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        context = makeContext(self.reactor, users={"alice": "secret", "bob": "hunter2"}, config=CONFIG)
        self.directory = context.directory
        # A TTL below the connection's keep-alive timeout (120 s).
        self.cache = CredentialCache(self.reactor, ttl=60.0)
        self.checker = CachingChecker(self.directory, self.cache)
        self.authenticator = Authenticator(
            Portal(MailboxRealm(), [self.checker]),
            self.reactor,
            penalty=LoginPenalty.fromConfig(self.reactor, context.config.auth),
        )
        self.context = attr.evolve(context, authenticator=self.authenticator)
        self.digests = 0
        digest = self.cache.digest

        def counting(username, password):
            self.digests += 1
            return digest(username, password)

        self.cache.digest = counting
        self.client, self.transport = connectFrontend(http, self.context)
        self.server = None

    def get(self, authorization=BASIC, client=None, transport=None):
        """
        One proxied GET; the backend answers it.

        @return: what the backend received.
        """
        client = client or self.client
        transport = transport or self.transport
        before = len(self.reactor.tcpClients)
        client.dataReceived(
            b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + authorization + b"\r\n\r\n"
        )
        self.reactor.advance(0)
        if len(self.reactor.tcpClients) > before:
            self.server, self.backend = acceptBackend(self.reactor, -1)
        if self.server is None:
            return b""
        sent = self.backend.value()
        self.backend.clear()
        self.server.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.reactor.advance(0)
        return sent

    def test_sameHeaderNotDigestedAgain(self):
        """
        The first request logs in through the portal, the second from the cache (one digest),
        the following ones from the connection's memo: no digest, no directory, a cache hit
        each, the same user.
        """
        self.assertIn(b"X-Remote-User: alice\r\n", self.get())
        self.assertEqual(self.directory.checks, 1)
        self.assertIn(b"X-Remote-User: alice\r\n", self.get())
        digests, hits = self.digests, self.cache.hits
        for _ in range(3):
            self.assertIn(b"X-Remote-User: alice\r\n", self.get())
        self.assertEqual(self.digests, digests)
        self.assertEqual(self.cache.hits, hits + 3)
        self.assertEqual(self.directory.checks, 1)
        self.assertEqual(self.transport.value().count(b"HTTP/1.1 200 OK"), 5)

    def test_secondAuthorizationNotRemembered(self):
        """
        With the memo set, the same credentials sent twice in one request are refused (401),
        not answered from the memo.
        """
        self.get()
        self.get()
        self.assertIsNotNone(self.client.basicMemo)
        self.transport.clear()
        self.client.dataReceived(
            b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC
            + b"\r\nAuthorization: " + BASIC + b"\r\n\r\n"
        )
        self.reactor.advance(0)
        self.assertTrue(self.transport.value().startswith(b"HTTP/1.1 401 "), self.transport.value())

    def test_otherHeaderLoggedInAfresh(self):
        """
        Other credentials on the same connection are their own login.
        """
        self.get()
        self.get()
        self.assertIn(b"X-Remote-User: bob\r\n", self.get(BOB))
        self.assertEqual(self.directory.checks, 2)
        self.assertIn(b"X-Remote-User: alice\r\n", self.get())

    def test_expiredEntry(self):
        """
        Past the cache's TTL the memo does not answer: the directory is asked again.
        """
        self.get()
        self.get()
        self.reactor.advance(61)
        self.assertIn(b"X-Remote-User: alice\r\n", self.get())
        self.assertEqual(self.directory.checks, 2)

    def test_cacheCleared(self):
        """
        An entry dropped from the cache (cleared, evicted, replaced) ends the memo.
        """
        self.get()
        self.get()
        self.cache.clear()
        self.get()
        self.assertEqual(self.directory.checks, 2)

    def test_passwordChanged(self):
        """
        The cache's success replaced by another password's: the memo of the old one is void
        (the old password goes to the directory and is refused).
        """
        self.get()
        self.get()
        self.directory.add("alice", "new-secret")
        newBasic = b"Basic " + b64encode(b"alice:new-secret")
        self.get(newBasic)
        checks = self.directory.checks
        self.client.dataReceived(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n\r\n")
        self.reactor.advance(10)
        self.assertEqual(self.directory.checks, checks + 1)
        self.assertIn(b"HTTP/1.1 401 ", self.transport.value())

    def test_lockedOutMeanwhile(self):
        """
        A lockout of the user since the memo was taken refuses the request.
        """
        self.get()
        self.get()
        penalty = self.authenticator.penalty
        penalty.userLockout = 3
        for i in range(3):
            penalty.failed("alice", b"guess%d" % i, self.client.client)
        self.client.dataReceived(b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: " + BASIC + b"\r\n\r\n")
        self.reactor.advance(60)
        out = self.transport.value().rsplit(b"HTTP/1.1 ", 1)[1]
        self.assertFalse(out.startswith(b"200 "), out)
        self.assertEqual(self.backend.value(), b"")

    def test_directoryDown(self):
        """
        While the directory fails and the cache must not answer (C{cache_during_outage =
        false}), the memo does not answer either.
        """
        self.get()
        self.get()
        self.checker.serveDuringOutage = False
        self.checker.directoryFailing = True
        digests = self.digests
        self.get()
        self.assertGreater(self.digests, digests)
        self.assertEqual(self.directory.checks, 2)

    def test_perConnection(self):
        """
        Another connection has its own memo.
        """
        self.get()
        self.get()
        other, otherTransport = connectFrontend(http, self.context)
        digests = self.digests
        self.get(client=other, transport=otherTransport)
        self.assertGreater(self.digests, digests)

    def test_noCacheNoMemo(self):
        """
        Without a credential cache every request goes to the directory.
        """
        context = makeContext(self.reactor, users={"alice": "secret"}, config=CONFIG)
        client, transport = connectFrontend(http, context)
        directory = context.directory
        for _ in range(3):
            self.get(client=client, transport=transport)
        self.assertEqual(directory.checks, 3)


class LoginAgainTests(SynchronousTestCase):
    """
    L{Authenticator.loginAgain} keeps L{Authenticator.loginNow}'s conditions.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        context = makeContext(self.reactor, users={"alice": "secret"})
        self.cache = CredentialCache(self.reactor)
        checker = CachingChecker(context.directory, self.cache)
        self.authenticator = Authenticator(Portal(MailboxRealm(), [checker]), self.reactor)
        self.client = _Client()
        credentials = makeCredentials(b"alice", b"secret")
        self.authenticator.login(credentials, self.client)
        self.reactor.advance(0)
        avatar, self.memo = self.authenticator.loginNowMemo(credentials, self.client)
        self.assertEqual(avatar.login, "alice")

    def test_answers(self):
        self.assertEqual(self.authenticator.loginAgain(self.memo, self.client).login, "alice")

    def test_sharedPenalty(self):
        """
        The array's shared penalty asks Redis about a success: no memo.
        """
        self.authenticator.penalty.asynchronous = True
        self.assertIsNone(self.authenticator.loginAgain(self.memo, self.client))

    def test_otherChecker(self):
        """
        A memo of another checker (a reloaded configuration) does not answer.
        """
        self.authenticator._cached = CachingChecker(None, CredentialCache(self.reactor))
        self.assertIsNone(self.authenticator.loginAgain(self.memo, self.client))


@attr.s
class _Client:
    peerHost = attr.ib(default="192.0.2.1")
    trusted = attr.ib(default=False)


class IdlePenaltyTests(SynchronousTestCase):
    """
    With no failure remembered, the fast lane does not ask the penalty (no address parsing);
    with one, it does, and a success resets it as the ordinary login does.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        context = makeContext(self.reactor, users={"alice": "secret"})
        checker = CachingChecker(context.directory, CredentialCache(self.reactor))
        self.authenticator = Authenticator(Portal(MailboxRealm(), [checker]), self.reactor)
        self.penalty = self.authenticator.penalty
        self.credentials = makeCredentials(b"alice", b"secret")
        self.client = _Client(peerHost="198.51.100.7")
        self.authenticator.login(self.credentials, self.client)
        self.reactor.advance(0)
        self.parsed = []
        addressKey = self.penalty.addressKey
        self.penalty.addressKey = lambda host: (self.parsed.append(host), addressKey(host))[1]

    def test_idleNotAsked(self):
        self.assertTrue(self.penalty.idle)
        avatar, memo = self.authenticator.loginNowMemo(self.credentials, self.client)
        self.assertEqual(self.authenticator.loginAgain(memo, self.client).login, "alice")
        self.assertEqual(self.parsed, [])

    def test_failureRemembered(self):
        """
        A failure from the address since: the penalty is asked, and the success resets it.
        """
        avatar, memo = self.authenticator.loginNowMemo(self.credentials, self.client)
        self.penalty.failed("bob", b"guess", self.client)
        self.assertFalse(self.penalty.idle)
        self.assertEqual(self.authenticator.loginAgain(memo, self.client).login, "alice")
        self.assertIn("198.51.100.7", self.parsed)
        self.assertEqual(self.penalty.currentDelay(self.client), 0.0)  # the address afresh

    def test_lockedOut(self):
        avatar, memo = self.authenticator.loginNowMemo(self.credentials, self.client)
        self.penalty.userLockout = 3
        for i in range(3):
            self.penalty.failed("alice", b"guess%d" % i, self.client)
        self.assertIsNotNone(self.penalty.locked("alice", self.client))
        self.assertIsNone(self.authenticator.loginAgain(memo, self.client))
        self.assertIsNone(self.authenticator.loginNow(self.credentials, self.client))
