"""
The shared state of an array (casd/state/) at the unit level: the local store, the fallback from
a remote store that does not answer, the array's login penalty, per-user session limits through
POP3, opaque keys and the C{[state]} section.  The Redis store itself: tests/test_state_redis.py.
"""

import os
import tempfile

from zope.interface.verify import verifyObject

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.auth.authenticator import Authenticator
from casd.auth.penalty import LoginPenalty
from casd.auth.sasl import makeCredentials
from casd.config import ConfigError, parseConfig
from casd.failures import AuthenticationFailed, Throttled
from casd.interfaces import ISharedState
from casd.session.clientinfo import ClientInfo
from casd.state import PenaltyReply
from casd.state.fallback import FallbackState
from casd.state.keys import KeyMaker, SecretError, readSecret
from casd.state.local import LocalState
from casd.state.penalty import SharedLoginPenalty
from casd.state.sessions import SessionLimiter
from casd.testing import MemoryDirectory, ScriptedBackend, TranscriptMixin
from protocols.pop3 import pop3
from tests.test_pop3 import CONFIG as POP3_CONFIG, LOGIN as POP3_LOGIN

SECRET = b"s" * 32


def client(host="198.51.100.7", trusted=False):
    return ClientInfo("s1", "imap", "imap-test", host, 40000, "192.0.2.1", 143, True, trusted)


class KeyTests(SynchronousTestCase):
    def test_keysHideNames(self):
        keys = KeyMaker(SECRET, "p:")
        key = keys.key("u", "alice")
        self.assertTrue(key.startswith("p:u:{"))
        self.assertNotIn("alice", key)
        self.assertEqual(key, keys.key("u", "alice"))
        self.assertNotEqual(key, KeyMaker(b"t" * 32, "p:").key("u", "alice"))

    def test_tagHidesPassword(self):
        keys = KeyMaker(SECRET)
        tag = keys.tag("Alice", b"hunter2")
        self.assertEqual(len(tag), 16)
        self.assertNotIn("hunter2", tag)
        self.assertEqual(tag, keys.tag("alice", b"hunter2"))
        self.assertNotEqual(tag, keys.tag("alice", b"hunter3"))

    def test_shortSecretRefused(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"short\n")
        self.assertRaises(SecretError, readSecret, path)
        with open(path, "wb") as f:
            f.write(SECRET + b"\n")
        self.assertEqual(readSecret(path), SECRET)


class LocalStateTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        penalty = LoginPenalty(self.clock, userLockout=3, addressLockout=5, lockoutDuration=100)
        self.state = LocalState(self.clock, penalty, lease=30)

    def result(self, d):
        return self.successResultOf(d)

    def test_provides(self):
        self.assertTrue(verifyObject(ISharedState, self.state))

    def test_failuresCountDistinct(self):
        self.assertEqual(self.result(self.state.loginFailed("u", "a", "t1")).addressCount, 1)
        self.assertEqual(self.result(self.state.loginFailed("u", "a", "t1")).addressCount, 1)
        reply = self.result(self.state.loginFailed("u", "a", "t2"))
        self.assertEqual((reply.userCount, reply.addressCount), (2, 2))

    def test_lockoutSurvivesSuccess(self):
        for tag in ("t1", "t2", "t3"):
            reply = self.result(self.state.loginFailed("u", None, tag))
        self.assertEqual(reply.userLockedFor, 100)
        self.assertEqual(self.result(self.state.loginSucceeded("u", None)).userLockedFor, 100)
        self.clock.advance(101)
        self.assertEqual(self.result(self.state.loginSucceeded("u", None)), PenaltyReply())

    def test_successClears(self):
        self.result(self.state.loginFailed("u", "a", "t1"))
        self.result(self.state.loginSucceeded("u", "a"))
        self.assertEqual(self.result(self.state.loginFailed("u", "a", "t2")).addressCount, 1)

    def test_slots(self):
        self.assertTrue(self.result(self.state.acquire("k", 2, "a")))
        self.assertTrue(self.result(self.state.acquire("k", 2, "b")))
        self.assertFalse(self.result(self.state.acquire("k", 2, "c")))
        # Renewing a held slot is never refused.
        self.assertTrue(self.result(self.state.acquire("k", 2, "a")))
        self.result(self.state.release("k", "a"))
        self.assertTrue(self.result(self.state.acquire("k", 2, "c")))

    def test_slotLeaseEnds(self):
        self.assertTrue(self.result(self.state.acquire("k", 1, "a")))
        self.clock.advance(31)
        self.assertTrue(self.result(self.state.acquire("k", 1, "b")))

    def test_hitWindow(self):
        self.assertEqual([self.result(self.state.hit("k", 10)) for _ in range(3)], [1, 2, 3])
        self.clock.advance(10)
        self.assertEqual(self.result(self.state.hit("k", 10)), 1)

    def test_revocations(self):
        self.result(self.state.revoke("r", 50))
        self.assertTrue(self.result(self.state.isRevoked("r")))
        self.assertFalse(self.result(self.state.isRevoked("other")))
        self.clock.advance(50)
        self.assertFalse(self.result(self.state.isRevoked("r")))


class RedisStateShapeTests(SynchronousTestCase):
    def test_provides(self):
        from casd.state.redis import RedisState

        self.assertTrue(verifyObject(ISharedState, RedisState([])))

    def test_noConnectionIsAnError(self):
        from casd.state.redis import RedisState

        state = RedisState([])
        state.failover()
        self.assertRaises(IndexError, state.hit, "k", 1)

    def test_parseURL(self):
        from casd.state.redis import parseURL

        self.assertEqual(
            parseURL("rediss://:p%40ss@r1.example.com:6380/3"),
            {"host": "r1.example.com", "port": 6380, "db": 3, "tls": True, "password": "p@ss"},
        )
        self.assertEqual(parseURL("redis://r1")["port"], 6379)


class RevocationSetTests(SynchronousTestCase):
    def test_sharedAndHashed(self):
        from casd import interfaces
        from casd.state.revocation import RevocationSet

        clock = Clock()
        store = LocalState(clock)
        revocations = RevocationSet(store, KeyMaker(SECRET))
        if hasattr(interfaces, "IRevocationSet"):
            self.assertTrue(verifyObject(interfaces.IRevocationSet, revocations))
        self.successResultOf(revocations.add("token-1", 30))
        self.assertTrue(self.successResultOf(RevocationSet(store, KeyMaker(SECRET)).contains("token-1")))
        self.assertFalse(self.successResultOf(revocations.contains("token-2")))
        self.assertNotIn("token-1", " ".join(store._revoked))
        clock.advance(30)
        self.assertFalse(self.successResultOf(revocations.contains("token-1")))


class _Remote:
    """
    A remote store whose calls wait until the test answers them.
    """

    def __init__(self):
        self.pending = []
        self.failovers = 0

    def _call(self, *args):
        d = defer.Deferred()
        self.pending.append((args, d))
        return d

    loginFailed = loginSucceeded = acquire = release = hit = revoke = isRevoked = _call

    def failover(self):
        self.failovers += 1


class FallbackTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.remote = _Remote()
        self.local = LocalState(self.clock)
        self.state = FallbackState(self.remote, self.local, self.clock, timeout=0.05, retryInterval=1.0)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def warnings(self):
        return [e for e in self.events if "unavailable" in e.get("log_format", "")]

    def test_provides(self):
        self.assertTrue(verifyObject(ISharedState, self.state))

    def test_remoteAnswers(self):
        d = self.state.hit("k", 10)
        self.remote.pending[0][1].callback(7)
        self.assertEqual(self.successResultOf(d), 7)
        self.assertEqual(self.state.stats.calls, 1)
        self.assertEqual(self.state.stats.fallbacks, 0)

    def test_noTimerLeftWhenAllAnswered(self):
        first, second = self.state.hit("k", 10), self.state.hit("k", 10)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.remote.pending[0][1].callback(1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.remote.pending[1][1].callback(2)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (1, 2))

    def test_slowRemoteFallsBackInBoundedTime(self):
        d = self.state.hit("k", 10)
        self.clock.advance(0.049)
        self.assertNoResult(d)
        self.clock.advance(0.002)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertFalse(self.state.stats.available)
        self.assertEqual(self.state.stats.outages, 1)
        self.assertEqual(self.remote.failovers, 1)
        # The late reply is dropped, not delivered twice.
        self.remote.pending[0][1].callback(99)
        self.assertEqual(self.state.stats.lateReplies, 1)

    def test_outageIsLocalAtOnceAndWarnsOnce(self):
        self.state.hit("k", 10)
        self.clock.advance(0.05)
        for _ in range(5):
            self.assertEqual(self.successResultOf(self.state.hit("k", 10)) > 1, True)
        self.assertEqual(len(self.remote.pending), 1)
        self.assertEqual(len(self.warnings()), 1)
        self.assertEqual(self.state.stats.fallbacks, 6)

    def test_remoteErrorFallsBack(self):
        d = self.state.acquire("k", 1, "t")
        self.remote.pending[0][1].errback(Failure(ConnectionRefusedError("down")))
        self.assertTrue(self.successResultOf(d))
        self.assertFalse(self.state.available)

    def test_recovery(self):
        self.state.hit("k", 10)
        self.clock.advance(0.05)
        self.clock.advance(1.0)
        # One probe goes to the remote store; it answers: the outage is over.
        d = self.state.hit("k", 10)
        self.assertEqual(len(self.remote.pending), 2)
        self.remote.pending[1][1].callback(1)
        self.assertEqual(self.successResultOf(d), 1)
        self.assertTrue(self.state.available)
        self.assertTrue(self.state.stats.available)
        d = self.state.hit("k", 10)
        self.assertEqual(len(self.remote.pending), 3)

    def test_revocationKeptLocallyToo(self):
        self.state.revoke("r", 100)
        self.clock.advance(0.05)
        self.assertTrue(self.successResultOf(self.local.isRevoked("r")))


class SharedPenaltyTests(SynchronousTestCase):
    """
    Two nodes, one store: L{SharedLoginPenalty} in front of the authenticator.
    """

    def setUp(self):
        self.clock = Clock()
        store = LocalState(self.clock, LoginPenalty(self.clock, userLockout=4, lockoutDuration=300))
        keys = KeyMaker(SECRET)
        self.directory = MemoryDirectory({"alice": "right"})
        self.nodes = []
        for _ in range(2):
            penalty = SharedLoginPenalty(
                self.clock, store, keys, initialDelay=2.0, maxDelay=15.0, userLockout=4,
                lockoutDuration=300,
            )
            from twisted.cred.portal import Portal
            from casd.auth.authenticator import MailboxRealm

            portal = Portal(MailboxRealm(), [self.directory])
            self.nodes.append(Authenticator(portal, self.clock, penalty=penalty))

    def login(self, node, password, host="198.51.100.7"):
        d = self.nodes[node].login(makeCredentials(b"alice", password), client(host))
        results = []
        d.addBoth(results.append)
        return results

    def delayOf(self, node, password, host="198.51.100.7"):
        results = self.login(node, password, host)
        waited = 0.0
        while not results:
            self.clock.advance(0.5)
            waited += 0.5
        self.assertIsInstance(results[0], Failure)
        return waited, results[0]

    def test_delayEscalatesAcrossNodes(self):
        waits = [self.delayOf(node, b"wrong%d" % i)[0] for i, node in enumerate((0, 1, 0))]
        self.assertEqual(waits, [2.0, 4.0, 8.0])

    def test_lockoutIsArrayWide(self):
        for i in range(4):
            waited, failure = self.delayOf(i % 2, b"wrong%d" % i, host="198.51.100.%d" % (i + 1))
            failure.trap(AuthenticationFailed)
        checks = self.directory.checks
        # The node that counted the last failure knows at once: no directory check.
        waited, failure = self.delayOf(1, b"right", host="203.0.113.9")
        failure.trap(Throttled)
        self.assertEqual(self.directory.checks, checks)
        # The other learns it from the store, although the password is right.
        waited, failure = self.delayOf(0, b"right", host="203.0.113.9")
        failure.trap(Throttled)
        self.clock.advance(300)
        results = self.login(0, b"right")
        self.assertEqual(results[0].login, "alice")

    def test_successClearsArrayWide(self):
        self.delayOf(0, b"wrong1")
        self.delayOf(0, b"wrong2")
        results = self.login(1, b"right")
        self.assertEqual(results[0].login, "alice")
        self.assertEqual(self.delayOf(0, b"wrong3")[0], 2.0)

    def test_trustedAnsweredAtOnce(self):
        d = self.nodes[0].login(makeCredentials(b"alice", b"bad"), client(trusted=True))
        self.failureResultOf(d, AuthenticationFailed)


class SessionLimiterTests(SynchronousTestCase):
    def test_renewKeepsSlots(self):
        clock = Clock()
        limiter = SessionLimiter(LocalState(clock, lease=30), KeyMaker(SECRET))
        token = self.successResultOf(limiter.acquire("pop3", "Alice", 1))
        self.assertIsNotNone(token)
        for _ in range(4):
            clock.advance(10)
            limiter.renew()
        self.assertIsNone(self.successResultOf(limiter.acquire("pop3", "alice", 1)))
        limiter.release(token)
        self.assertEqual(limiter.held(), 0)
        self.assertIsNotNone(self.successResultOf(limiter.acquire("pop3", "alice", 1)))


class POP3SessionLimitTests(TranscriptMixin, SynchronousTestCase):
    """
    C{max_sessions_per_user}: a user's second POP3 session is refused with C{[IN-USE]}.
    """

    descriptor = pop3
    config = POP3_CONFIG.replace("idle_timeout = 100.0", "idle_timeout = 100.0\nmax_sessions_per_user = 1")
    listener = 1
    users = {"alice": ("secret", UserRecord(login="alice", backendLogin="alice@example.com"))}

    def login(self):
        self.connect()
        self.send(b"USER alice\r\n")
        return self.send(b"PASS secret\r\n")

    def test_secondSessionRefused(self):
        self.login()
        ScriptedBackend(self.reactor, POP3_LOGIN).run()
        first = self.server
        self.assertEqual(self.login(), b"-ERR [IN-USE] Too many sessions or logins, try again later.\r\n")
        first.transport.loseConnection()
        first.connectionLost(Failure(ConnectionDone()))
        self.login()
        self.assertEqual(len(self.reactor.tcpClients), 2)


class _SlowStore(LocalState):
    """
    A local store whose slot requests wait until the test answers them.
    """

    def __init__(self, clock):
        super().__init__(clock)
        self.waiting = []
        self.released = []

    def acquire(self, key, limit, token):
        d = defer.Deferred()
        self.waiting.append(d)
        return d

    def release(self, key, token):
        self.released.append(token)
        return defer.succeed(None)


class POP3SlotRaceTests(TranscriptMixin, SynchronousTestCase):
    """
    A client that leaves while its slot is being taken does not keep the slot.
    """

    descriptor = pop3
    config = POP3SessionLimitTests.config
    listener = 1
    users = POP3SessionLimitTests.users

    def test_clientGoneBeforeSlotAnswered(self):
        store = _SlowStore(self.reactor)
        limiter = self.context.state.sessions = SessionLimiter(store, KeyMaker(SECRET))
        self.connect()
        self.send(b"USER alice\r\n")
        self.send(b"PASS secret\r\n")
        self.assertEqual(len(store.waiting), 1)
        self.server.connectionLost(Failure(ConnectionDone()))
        store.waiting[0].callback(True)
        self.assertEqual(limiter.held(), 0)
        self.assertEqual(len(store.released), 1)
        self.assertEqual(self.reactor.tcpClients, [])


class StateConfigTests(SynchronousTestCase):
    def parse(self, text):
        return parseConfig(text, "test.toml", [])

    def test_defaultLocal(self):
        config = self.parse("")
        self.assertEqual(config.state.backend, "local")
        self.assertEqual(config.state.timeout, 0.05)

    def test_redisNeedsURLAndSecret(self):
        e = self.assertRaises(ConfigError, self.parse, '[state]\nbackend = "redis"\n')
        self.assertEqual(e.key, "state.urls")
        e = self.assertRaises(
            ConfigError, self.parse, '[state]\nbackend = "redis"\nurls = ["redis://127.0.0.1"]\n'
        )
        self.assertEqual(e.key, "state.secret_file")

    def test_badURL(self):
        e = self.assertRaises(ConfigError, self.parse, '[state]\nurls = ["http://x"]\n')
        self.assertEqual(e.key, "state.urls")

    def test_badURLHidesPassword(self):
        e = self.assertRaises(
            ConfigError, self.parse, '[state]\nurls = ["redis://:s3cret-pw@host:port/0"]\n'
        )
        self.assertEqual(e.key, "state.urls")
        self.assertNotIn("s3cret-pw", str(e))

    def test_shortSecretIsAConfigError(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("too-short\n")
        e = self.assertRaises(
            ConfigError,
            self.parse,
            f'[state]\nbackend = "redis"\nurls = ["redis://r1"]\nsecret_file = "{os.path.abspath(path)}"\n',
        )
        self.assertEqual(e.key, "state.secret_file")
        self.assertNotIn("too-short", str(e))

    def test_redis(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, directory)
        path = os.path.join(directory, "secret")
        with open(path, "wb") as f:
            f.write(SECRET)
        self.addCleanup(os.remove, path)
        config = self.parse(
            f'[state]\nbackend = "redis"\nurls = ["rediss://:pw@r1:6380/2"]\nsecret_file = "{path}"\n'
        )
        self.assertEqual(config.state.urls, ("rediss://:pw@r1:6380/2",))



class SMTPRateTests(SynchronousTestCase):
    """
    C{connection_rate_limit} counted array-wide through the shared state (protocols/smtpfilters).
    """

    def filters(self, shared=True, connections=0, rate=3):
        from types import SimpleNamespace

        from protocols.smtpfilters import ConnectionFilter

        clock = Clock()
        from casd.state.sessions import SessionLimiter

        store = LocalState(clock)
        keys = KeyMaker(SECRET)
        state = SimpleNamespace(shared=store, keys=keys, isShared=shared, sessions=SessionLimiter(store, keys))
        section = SimpleNamespace(
            allow_networks=(), deny_networks=(), max_connections_per_address=connections,
            connection_rate_limit=rate,
        )
        return clock, [ConnectionFilter(section, clock, shared=state) for _ in range(2)]

    def test_rateAcrossNodes(self):
        from protocols.smtpfilters import Verdict

        clock, (a, b) = self.filters()
        host = "203.0.113.4"
        self.assertEqual([a.admit(host), a.admit(host)], [Verdict.ACCEPT] * 2)
        # B's own count is at 2 of 3, but the array's is at 4 after B's second: B learnt it.
        self.assertEqual([b.admit(host), b.admit(host)], [Verdict.ACCEPT] * 2)
        self.assertEqual(b.admit(host), Verdict.THROTTLE)
        self.assertEqual(b.admit("203.0.113.5"), Verdict.ACCEPT)
        clock.advance(61)
        self.assertEqual(b.admit(host), Verdict.ACCEPT)

    def test_connectionsAcrossNodes(self):
        """
        C{max_connections_per_address} counted array-wide: with 2 allowed, the third open
        connection (on another node) is let in once, then that node refuses the address until
        one of its own connections from it ends.
        """
        from protocols.smtpfilters import Verdict

        clock, (a, b) = self.filters(connections=2, rate=0)
        host = "203.0.113.4"
        self.assertEqual([a.admit(host), a.admit(host)], [Verdict.ACCEPT] * 2)
        self.assertEqual(b.admit(host), Verdict.ACCEPT)  # B learns: the array is full
        self.assertEqual(b.admit(host), Verdict.THROTTLE)
        self.assertEqual(b.admit("203.0.113.5"), Verdict.ACCEPT)
        b.closed(host)
        a.closed(host)  # A's slot is given back to the array: A holds 1 of 2
        self.assertEqual(b.admit(host), Verdict.ACCEPT)  # 2 of 2
        self.assertEqual(b.admit(host), Verdict.ACCEPT)  # refused by the array: B learns
        self.assertEqual(b.admit(host), Verdict.THROTTLE)

    def test_localBackendCountsPerNode(self):
        from protocols.smtpfilters import Verdict

        clock, (a, b) = self.filters(shared=False)
        host = "203.0.113.4"
        for _ in range(3):
            self.assertEqual((a.admit(host), b.admit(host)), (Verdict.ACCEPT, Verdict.ACCEPT))
        self.assertEqual(a.admit(host), Verdict.THROTTLE)
