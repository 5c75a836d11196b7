"""
The shared state in a real, private redis-server: two "nodes" (two penalties, two session
limiters) over one Redis; one round trip per successful login; nothing readable stored; Redis
stopped mid-test and blackholed: decisions fall back in bounded time, and sharing resumes.
"""

import os

from twisted.cred.portal import Portal
from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from casd.auth.authenticator import Authenticator, MailboxRealm
from casd.auth.penalty import LoginPenalty
from casd.auth.sasl import makeCredentials
from casd.failures import AuthenticationFailed, Throttled
from casd.state import StateStats
from casd.state.fallback import FallbackState
from casd.state.keys import KeyMaker
from casd.state.local import LocalState
from casd.state.penalty import SharedLoginPenalty
from casd.state.redis import RedisState, connect
from casd.state.revocation import RevocationSet
from casd.state.sessions import SessionLimiter
from casd.testing import MemoryDirectory
from tests.support.redis import Blackhole, RedisServer
from tests.test_state import SECRET, client

PASSWORD = "redis-pw-Kq3"


class Node:
    """
    What one casd node holds of the shared state: a penalty and an authenticator over Redis.
    """

    def __init__(self, url, directory, timeout, password=PASSWORD, userLockout=3):
        # txredisapi's own bounds generous: on a loaded machine AUTH may take a second, and a
        # connection it drops mid-AUTH logs an error (the decisions' bound is C{timeout}).
        self.connection = connect(url, password=password, connectTimeout=5.0, replyTimeout=5.0)
        make = lambda: connect(url, password=password, connectTimeout=5.0, replyTimeout=5.0)
        settings = dict(initialDelay=0.01, maxDelay=0.08, userLockout=userLockout, lockoutDuration=60)
        self.remote = RedisState([self.connection], [make], expiry=900, userLockout=userLockout,
                                 lockoutDuration=60)
        self.local = LocalState(reactor, LoginPenalty(reactor, **settings))
        self.stats = StateStats(backend="redis")
        self.state = FallbackState(self.remote, self.local, reactor, timeout, 0.2, self.stats)
        keys = KeyMaker(SECRET, "t:")
        self.penalty = SharedLoginPenalty(reactor, self.state, keys, **settings)
        self.authenticator = Authenticator(
            Portal(MailboxRealm(), [directory]), reactor, penalty=self.penalty
        )
        self.sessions = SessionLimiter(self.state, keys)
        self.revocations = RevocationSet(self.state, keys)

    def login(self, password, host="198.51.100.7", user=b"alice"):
        return self.authenticator.login(makeCredentials(user, password), client(host))

    def close(self):
        return self.remote.close()


class RedisStateTests(TestCase):
    timeout = 60

    def setUp(self):
        self.redis = RedisServer(os.path.abspath(self.mktemp()), password=PASSWORD).start()
        self.addCleanup(self.redis.stop)
        self.directory = MemoryDirectory({"alice": "right", "bob": "other"})
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    @defer.inlineCallbacks
    def nodes(self, count=2, timeout=2.0, url=None):
        nodes = [Node(url or self.redis.url, self.directory, timeout) for _ in range(count)]
        for node in nodes:
            self.addCleanup(node.close)
            if url is None:
                yield node.remote.ping()
        return nodes

    @defer.inlineCallbacks
    def test_penaltySharedAndLockoutArrayWide(self):
        a, b, c = yield self.nodes(3)
        counts = []
        for i, node in enumerate((a, b, c)):
            yield self.assertFailure(node.login(b"wrong%d" % i, host="198.51.100.%d" % (i + 1)),
                                     AuthenticationFailed)
        # The third distinct failure, made at C, locked alice out: A refuses the right password.
        yield self.assertFailure(a.login(b"right", host="203.0.113.5"), Throttled)
        # ... and so does B, which now refuses before asking the directory.
        checks = self.directory.checks
        yield self.assertFailure(b.login(b"right", host="203.0.113.5"), Throttled)
        counts.append(self.directory.checks - checks)
        self.assertIn(counts, ([0], [1]))
        self.assertEqual(a.stats.fallbacks + b.stats.fallbacks + c.stats.fallbacks, 0)

    @defer.inlineCallbacks
    def test_addressCountEscalatesAcrossNodes(self):
        a, b = yield self.nodes(2)
        replies = []
        for i, node in enumerate((a, b, a, b)):
            reply = yield node.state.loginFailed(
                node.penalty._userKey("u%d" % i), node.penalty._addressKey(client()), "tag%d" % i
            )
            replies.append(reply.addressCount)
        self.assertEqual(replies, [1, 2, 3, 4])

    @defer.inlineCallbacks
    def test_oneRoundTripPerSuccessfulLogin(self):
        (a,) = yield self.nodes(1)
        yield a.login(b"right")
        # What a client sends itself (the scripts' own calls count in INFO too).
        sent = ("eval", "evalsha", "ping", "exists", "zrem", "script")
        before = self.redis.commandCount(sent)
        for _ in range(10):
            user = yield a.login(b"right")
            self.assertEqual(user.login, "alice")
        self.assertEqual(self.redis.commandCount(sent) - before, 10)

    @defer.inlineCallbacks
    def test_nothingReadableStored(self):
        a, b = yield self.nodes(2)
        yield self.assertFailure(a.login(b"Hunter2-secret"), AuthenticationFailed)
        token = yield b.sessions.acquire("pop3", "alice", 1)
        yield b.revocations.add("cookie-id-XYZ", 4102444800)
        dump = self.redis.dump()
        self.assertTrue(dump)
        for secret in ("alice", "Hunter2", "198.51.100", "cookie-id-XYZ", PASSWORD):
            self.assertNotIn(secret, dump)
        self.assertIsNotNone(token)

    @defer.inlineCallbacks
    def test_sessionLimitAcrossNodes(self):
        a, b = yield self.nodes(2)
        first = yield a.sessions.acquire("pop3", "alice", 1)
        self.assertIsNotNone(first)
        second = yield b.sessions.acquire("pop3", "Alice", 1)
        self.assertIsNone(second)
        other = yield b.sessions.acquire("imap", "alice", 1)
        self.assertIsNotNone(other)
        a.sessions.release(first)
        yield a.remote.ping()
        third = yield b.sessions.acquire("pop3", "alice", 1)
        self.assertIsNotNone(third)

    @defer.inlineCallbacks
    def test_revocationShared(self):
        a, b = yield self.nodes(2)
        yield a.revocations.add("tok-1", reactor.seconds() + 60)
        self.assertTrue((yield b.revocations.contains("tok-1")))
        self.assertFalse((yield b.revocations.contains("tok-2")))

    @defer.inlineCallbacks
    def test_redisStoppedThenBack(self):
        a, b = yield self.nodes(2, timeout=0.05)
        yield self.assertFailure(a.login(b"wrong1"), AuthenticationFailed)
        self.redis.stop()
        # Logins go on: the right password succeeds, the wrong one is refused, both locally.
        for _ in range(3):
            user = yield a.login(b"right")
            self.assertEqual(user.login, "alice")
        yield self.assertFailure(b.login(b"wrong2"), AuthenticationFailed)
        self.assertFalse(a.stats.available)
        self.assertGreater(a.stats.fallbacks, 0)
        warnings = [e for e in self.events if "unavailable" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 2)  # once per node
        self.redis.start()
        # Within a bounded time each node's next probe finds Redis again.
        for node in (a, b):
            for _ in range(100):
                yield node.state.hit("probe", 10)
                if node.stats.available:
                    break
                yield task.deferLater(reactor, 0.05, lambda: None)
            self.assertTrue(node.stats.available)
        # Shared again: failures at A and B add up.
        replies = []
        for i, node in enumerate((a, b, a)):
            reply = yield node.state.loginFailed(
                node.penalty._userKey("bob"), node.penalty._addressKey(client("192.0.2.77")), "t%d" % i
            )
            replies.append(reply.addressCount)
        self.assertEqual(replies, [1, 2, 3])


    @defer.inlineCallbacks
    def test_givenUpConnectionRevived(self):
        """
        txredisapi stops reconnecting for good when AUTH fails on a reconnection (a Redis
        restarting with its password not yet set, say); the node connects afresh on its next
        probe and shares again.
        """
        from casd.state.redis import _givenUp

        (a,) = yield self.nodes(1, timeout=0.05)
        self.redis.cli("CONFIG", "SET", "requirepass", "not-yet")
        self.redis.password = "not-yet"
        self.redis.cli("CLIENT", "KILL", "TYPE", "normal")
        for _ in range(200):
            if _givenUp(a.remote.connection):
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(_givenUp(a.remote.connection))
        user = yield a.login(b"right")
        self.assertEqual(user.login, "alice")
        self.assertFalse(a.stats.available)
        self.redis.cli("CONFIG", "SET", "requirepass", PASSWORD)
        self.redis.password = PASSWORD
        for _ in range(200):
            yield a.state.hit("probe", 10)
            if a.stats.available:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(a.stats.available)
        self.assertFalse(_givenUp(a.remote.connection))


class BlackholeTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_blackholedRedisFallsBackInBoundedTime(self):
        hole = Blackhole()
        self.addCleanup(hole.close)
        directory = MemoryDirectory({"alice": "right"})
        node = Node(hole.url, directory, timeout=0.05, password=None)
        self.addCleanup(node.close)
        started = reactor.seconds()
        for _ in range(5):
            user = yield node.login(b"right")
            self.assertEqual(user.login, "alice")
        yield self.assertFailure(node.login(b"wrong"), AuthenticationFailed)
        # Only the first decision waited for Redis; the rest were local at once (no timing
        # assertion beyond "well within the test's own bound").
        self.assertLess(reactor.seconds() - started, 5.0)
        self.assertEqual(node.stats.outages, 1)
        self.assertFalse(node.stats.available)
        self.assertGreaterEqual(node.stats.fallbacks, 6)


class RedisTLSTests(TestCase):
    """
    C{rediss://} with C{[state] ca_file} and C{password_file}, through L{StateService} as casd
    builds it: the server's certificate is verified.
    """

    timeout = 30

    def setUp(self):
        from tests.support.certs import CertificateAuthority

        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ca = CertificateAuthority.create(os.path.join(self.tmp, "ca"))
        self.redis = RedisServer(
            os.path.join(self.tmp, "redis"), password=PASSWORD,
            tls=self.ca.issue(["127.0.0.1"], "redis"), caPath=self.ca.caPath,
        ).start()
        self.addCleanup(self.redis.stop)
        for name, text in (("redis.secret", PASSWORD), ("array.key", "a" * 40)):
            with open(os.path.join(self.tmp, name), "w") as f:
                f.write(text + "\n")

    def service(self, caPath):
        from casd.config import parseConfig
        from casd.state.service import StateService

        config = parseConfig(
            f"""
[state]
backend = "redis"
urls = ["{self.redis.url}"]
password_file = "redis.secret"
secret_file = "array.key"
ca_file = "{caPath}"
timeout = 2.0
connect_timeout = 10.0
""",
            os.path.join(self.tmp, "casd.toml"),
            [],
        )
        service = StateService(config, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        return config, service

    @defer.inlineCallbacks
    def test_verifiedTLSWithPassword(self):
        config, service = self.service(self.ca.caPath)
        yield service.remote.ping()
        penalty = service.penalty(config.auth)
        delay = yield penalty.failed("alice", b"wrong", client())
        self.assertEqual(delay, config.auth.failure_delay)
        self.assertEqual(service.stats.fallbacks, 0)
        self.assertIn("casd:u:", self.redis.dump())

    @defer.inlineCallbacks
    def test_unknownCAFallsBack(self):
        from tests.support.certs import CertificateAuthority

        other = CertificateAuthority.create(os.path.join(self.tmp, "other-ca"))
        config, service = self.service(other.caPath)
        penalty = service.penalty(config.auth)
        delay = yield penalty.failed("alice", b"wrong", client())
        self.assertEqual(delay, config.auth.failure_delay)
        self.assertFalse(service.stats.available)
        self.assertEqual(self.redis.dump(), "")
