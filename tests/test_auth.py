"""
The shared authentication layer: the credential cache, the login penalty and lockout, the checker
chain, the authenticator and its assembly from the configuration; the login storm against the LDAP
checker (ldaptor's in-memory server over iosim).  Time is a Clock: nothing sleeps.
"""

from __future__ import annotations

import os

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ldaptor.protocols import pureldap

from casd.auth import UnknownUser, UserRecord
from casd.auth.assembly import buildAuthentication, buildCheckers
from casd.auth.authenticator import Authenticator, MailboxRealm
from casd.auth.cache import CachingChecker, CredentialCache
from casd.auth.chain import CheckerChain
from casd.auth.hashing import makeHash
from casd.auth.ldap import LDAPChecker
from casd.auth.penalty import LoginPenalty
from casd.auth.usersfile import UsersFileChecker
from casd.session.clientinfo import ClientInfo
from casd.config import ConfigError, parseConfig
from casd.failures import AuthenticationFailed, DirectoryUnavailable, Throttled
from casd.interfaces import IUserDirectory
from casd.auth.sasl import Credentials
from casd.testing import MemoryDirectory, connectFrontend, makeContext
from protocols.imap import imap
from tests.support.slapd import USERS as LDAP_USERS
from tests.test_ldap import _Harness, loadTree, resultOf


def client(host="198.51.100.7", trusted=False) -> ClientInfo:
    return ClientInfo("s1", "imap", "imap-test", host, 40000, "192.0.2.1", 143, True, trusted)


def creds(user, password) -> Credentials:
    return Credentials(user, password.encode() if isinstance(password, str) else password)


class _Logged:
    def setUp(self):
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def logText(self) -> str:
        return "\n".join(formatEvent(e) for e in self.logged)


class SlowDirectory(MemoryDirectory):
    """
    A L{MemoryDirectory} whose answers wait until the test fires them.
    """

    def __init__(self, users=None):
        super().__init__(users)
        self.pending: list = []

    def requestAvatarId(self, credentials):
        d = defer.Deferred()
        self.pending.append((d, super().requestAvatarId(credentials)))
        return d

    def answer(self):
        pending, self.pending = self.pending, []
        for d, result in pending:
            result.chainDeferred(d)


class LocalDirectory(MemoryDirectory):
    """
    A L{MemoryDirectory} that says L{UnknownUser} for names it does not hold.
    """

    def requestAvatarId(self, credentials):
        if self.error is None and credentials.username.lower() not in self.users:
            self.checks += 1
            return defer.fail(UnknownUser("unknown user"))
        return super().requestAvatarId(credentials)


class CacheTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.directory = MemoryDirectory({"alice": "old-pw", "bob": "bob-pw"})
        self.cache = CredentialCache(self.clock, ttl=300, negativeTTL=20, maxSize=100)
        self.checker = CachingChecker(self.directory, self.cache)

    def check(self, user, password):
        return resultOf(self.checker.requestAvatarId(creds(user, password)))

    def test_interfaces(self):
        verifyObject(IUserDirectory, self.checker)

    def test_positive(self):
        self.assertEqual(self.check("alice", "old-pw").login, "alice")
        self.assertEqual(self.check("ALICE", "old-pw").login, "alice")
        self.assertEqual(self.directory.checks, 1)
        self.assertEqual((self.cache.hits, self.cache.misses), (1, 1))

    def test_positiveExpires(self):
        self.check("alice", "old-pw")
        self.clock.advance(299)
        self.check("alice", "old-pw")
        self.assertEqual(self.directory.checks, 1)
        self.clock.advance(2)
        self.check("alice", "old-pw")
        self.assertEqual(self.directory.checks, 2)

    def test_changedPasswordNeverRidesOnAStaleSuccess(self):
        """
        The cached success is tied to the password it was for: another password always goes to
        the directory, which decides.
        """
        self.check("alice", "old-pw")
        self.directory.add("alice", "new-pw")
        self.assertEqual(self.check("alice", "new-pw").login, "alice")
        self.assertEqual(self.directory.checks, 2)
        # A wrong password is not answered from alice's cached success either.
        self.assertIsInstance(self.check("alice", "guess").value, UnauthorizedLogin)
        self.assertEqual(self.directory.checks, 3)
        # The new success replaced the old one: the old password goes to the directory again.
        self.assertIsInstance(self.check("alice", "old-pw").value, UnauthorizedLogin)
        self.assertEqual(self.directory.checks, 4)

    def test_negative(self):
        self.assertIsInstance(self.check("alice", "wrong").value, UnauthorizedLogin)
        failure = self.check("alice", "wrong")
        self.assertIsInstance(failure.value, UnauthorizedLogin)
        self.assertIn("(cached)", str(failure.value))
        self.assertEqual(self.directory.checks, 1)
        self.assertEqual(self.cache.negativeHits, 1)
        # The right password is not hurt by the cached refusal.
        self.assertEqual(self.check("alice", "old-pw").login, "alice")
        self.clock.advance(21)
        self.check("alice", "wrong")
        self.assertEqual(self.directory.checks, 3)

    def test_directoryTroubleNotCached(self):
        self.directory.error = DirectoryUnavailable("down")
        self.assertIsInstance(self.check("alice", "old-pw").value, DirectoryUnavailable)
        self.directory.error = None
        self.assertEqual(self.check("alice", "old-pw").login, "alice")
        self.assertEqual(self.directory.checks, 2)

    def test_bounded(self):
        cache = CredentialCache(self.clock, maxSize=3)
        checker = CachingChecker(MemoryDirectory({f"u{i}": "pw" for i in range(5)}), cache)
        for i in range(5):
            resultOf(checker.requestAvatarId(creds(f"u{i}", "pw")))
        resultOf(checker.requestAvatarId(creds("u4", "pw")))
        self.assertEqual(cache.stats()["size"], 3)
        self.assertEqual(cache.evictions, 2)
        self.assertEqual(cache.hits, 1)
        resultOf(checker.requestAvatarId(creds("u0", "pw")))
        self.assertEqual(cache.misses, 6)

    def test_disabledOff(self):
        cache = CredentialCache(self.clock, ttl=0, negativeTTL=0)
        checker = CachingChecker(self.directory, cache)
        for _ in range(3):
            resultOf(checker.requestAvatarId(creds("alice", "old-pw")))
            resultOf(checker.requestAvatarId(creds("alice", "x")))
        self.assertEqual(self.directory.checks, 6)

    def test_coalesced(self):
        """
        Identical logins at the same moment (a client opening several connections) share one
        directory check.
        """
        slow = SlowDirectory({"alice": "old-pw"})
        checker = CachingChecker(slow, self.cache)
        ds = [checker.requestAvatarId(creds("alice", "old-pw")) for _ in range(5)]
        wrong = checker.requestAvatarId(creds("alice", "nope"))
        self.assertEqual(slow.checks, 2)
        slow.answer()
        self.assertEqual([resultOf(d).login for d in ds], ["alice"] * 5)
        self.assertIsInstance(resultOf(wrong).value, UnauthorizedLogin)
        self.assertEqual(self.cache.coalesced, 4)

    def test_noSecretsKept(self):
        """
        The cache holds keyed digests, never a password.
        """
        self.check("alice", "old-pw")
        self.check("alice", "wrong-one")
        dump = repr(self.cache._entries) + repr(self.cache)
        self.assertNotIn("old-pw", dump)
        self.assertNotIn("wrong-one", dump)
        other = CredentialCache(self.clock)
        self.assertNotEqual(other.digest("alice", b"old-pw"), self.cache.digest("alice", b"old-pw"))

    def test_lookup(self):
        self.assertEqual(resultOf(self.checker.lookup("alice")).login, "alice")
        self.directory.users.clear()
        self.assertEqual(resultOf(self.checker.lookup("alice")).login, "alice")
        self.assertIsNone(resultOf(self.checker.lookup("nobody")))
        self.directory.add("nobody", "x")
        self.assertIsNone(resultOf(self.checker.lookup("nobody")))
        self.clock.advance(21)
        self.assertEqual(resultOf(self.checker.lookup("nobody")).login, "nobody")
        self.assertEqual((self.cache.lookupHits, self.cache.lookupMisses), (2, 3))


class PenaltyTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.penalty = LoginPenalty(self.clock, initialDelay=2.0, maxDelay=15.0, expiry=900)

    def test_growingDelay(self):
        delays = [self.penalty.failed("alice", f"pw{i}".encode(), client()) for i in range(6)]
        self.assertEqual(delays, [2, 4, 8, 15, 15, 15])

    def test_repeatedPasswordDoesNotEscalate(self):
        delays = [self.penalty.failed("alice", b"stale", client()) for _ in range(5)]
        self.assertEqual(delays, [2, 2, 2, 2, 2])
        self.assertEqual(self.penalty.failed("alice", b"other", client()), 4)

    def test_sprayingEscalates(self):
        """
        The same password tried against many users is one failure each.
        """
        delays = [self.penalty.failed(u, b"Summer2024!", client()) for u in ("a", "b", "c")]
        self.assertEqual(delays, [2, 4, 8])

    def test_perAddress(self):
        self.penalty.failed("alice", b"x", client("198.51.100.7"))
        self.assertEqual(self.penalty.failed("alice", b"y", client("198.51.100.8")), 2)
        self.assertEqual(self.penalty.currentDelay(client("198.51.100.7")), 2)

    def test_ipv6Prefix(self):
        self.penalty.failed("a", b"1", client("2001:db8:0:1::1"))
        self.assertEqual(self.penalty.failed("a", b"2", client("2001:db8:0:1:ffff::2")), 4)
        self.assertEqual(self.penalty.failed("a", b"3", client("2001:db8:0:2::1")), 2)
        wide = LoginPenalty(self.clock, ipv6Prefix=48)
        wide.failed("a", b"1", client("2001:db8:0:1::1"))
        self.assertEqual(wide.failed("a", b"2", client("2001:db8:0:2::1")), 4)
        self.assertEqual(self.penalty.addressKey("::ffff:198.51.100.7"), "198.51.100.7/32")
        self.assertEqual(LoginPenalty(self.clock, ipv4Prefix=24).addressKey("198.51.100.7"), "198.51.100.0/24")

    def test_trustedExempt(self):
        for i in range(5):
            self.assertEqual(self.penalty.failed("alice", f"{i}".encode(), client(trusted=True)), 0)
        self.assertEqual(self.penalty.currentDelay(client(trusted=True)), 0)

    def test_expiry(self):
        self.penalty.failed("alice", b"1", client())
        self.penalty.failed("alice", b"2", client())
        self.clock.advance(899)
        self.assertEqual(self.penalty.failed("alice", b"3", client()), 8)
        self.clock.advance(901)
        self.assertEqual(self.penalty.currentDelay(client()), 0)
        self.assertEqual(self.penalty.failed("alice", b"4", client()), 2)

    def test_successResets(self):
        self.penalty.failed("alice", b"1", client())
        self.penalty.failed("alice", b"2", client())
        self.penalty.succeeded("alice", client())
        self.assertEqual(self.penalty.failed("alice", b"3", client()), 2)

    def test_userLockout(self):
        """
        Past the threshold the user name is locked out, from every address (trusted ones too),
        until the lockout expires.
        """
        penalty = LoginPenalty(self.clock, userLockout=3, lockoutDuration=600)
        for i, host in enumerate(["198.51.100.1", "198.51.100.2", "203.0.113.9"]):
            self.assertIsNone(penalty.locked("alice", client(host)))
            penalty.failed("alice", f"{i}".encode(), client(host))
        self.assertIn("user locked out", penalty.locked("ALICE", client("192.0.2.99")))
        self.assertIn("user locked out", penalty.locked("alice", client(trusted=True)))
        self.assertIsNone(penalty.locked("bob", client("198.51.100.1")))
        self.clock.advance(599)
        self.assertIsNotNone(penalty.locked("alice", client()))
        self.clock.advance(2)
        self.assertIsNone(penalty.locked("alice", client()))
        self.assertEqual(penalty.stats()["lockedUsers"], 0)

    def test_repeatsDoNotLockOut(self):
        penalty = LoginPenalty(self.clock, userLockout=3, addressLockout=3)
        for _ in range(10):
            penalty.failed("alice", b"stale-saved-password", client())
        self.assertIsNone(penalty.locked("alice", client()))

    def test_addressLockout(self):
        penalty = LoginPenalty(self.clock, addressLockout=3, lockoutDuration=60)
        for user in ("a", "b", "c"):
            penalty.failed(user, b"pw", client("2001:db8::1"))
        self.assertIn("address 2001:db8::/64 locked out", penalty.locked("d", client("2001:db8::2")))
        self.assertIsNone(penalty.locked("d", client("2001:db8:1::2")))
        self.assertIsNone(penalty.locked("d", client("2001:db8::2", trusted=True)))
        self.clock.advance(61)
        self.assertIsNone(penalty.locked("d", client("2001:db8::2")))
        self.assertEqual(penalty.failed("d", b"pw", client("2001:db8::2")), 2)

    def test_bounded(self):
        penalty = LoginPenalty(self.clock, maxEntries=10)
        for i in range(50):
            penalty.failed(f"user{i}", b"x", client(f"198.51.100.{i}"))
        self.assertEqual(penalty.stats()["addresses"], 10)
        self.assertEqual(penalty.stats()["users"], 10)

    def test_fromConfig(self):
        config = parseConfig(
            "[auth]\nfailure_delay = 1.0\nfailure_delay_max = 5.0\npenalty_ipv6_prefix = 56\n"
            "user_lockout_threshold = 7\naddress_lockout_threshold = 0\nlockout_duration = 60.0\n",
            "t.toml",
            [imap],
        )
        penalty = LoginPenalty.fromConfig(self.clock, config.auth)
        self.assertEqual(
            (penalty.initialDelay, penalty.maxDelay, penalty.ipv6Prefix, penalty.userLockout,
             penalty.addressLockout, penalty.lockoutDuration),
            (1.0, 5.0, 56, 7, 0, 60.0),
        )


class ChainTests(SynchronousTestCase):
    def setUp(self):
        self.local = LocalDirectory({"admin": "admin-pw"})
        self.remote = MemoryDirectory({"alice": "alice-pw", "admin": "other"})
        self.chain = CheckerChain([self.local, self.remote])

    def test_fallsThroughOnUnknown(self):
        self.assertEqual(resultOf(self.chain.requestAvatarId(creds("alice", "alice-pw"))).login, "alice")
        self.assertEqual((self.local.checks, self.remote.checks), (1, 1))

    def test_wrongPasswordEnds(self):
        failure = resultOf(self.chain.requestAvatarId(creds("admin", "other")))
        self.assertIsInstance(failure.value, UnauthorizedLogin)
        self.assertEqual(self.remote.checks, 0)

    def test_troubleEnds(self):
        self.local.error = DirectoryUnavailable("down")
        failure = resultOf(self.chain.requestAvatarId(creds("alice", "alice-pw")))
        self.assertIsInstance(failure.value, DirectoryUnavailable)
        self.assertEqual(self.remote.checks, 0)

    def test_lookup(self):
        self.assertEqual(resultOf(self.chain.lookup("alice")).login, "alice")
        self.assertIsNone(resultOf(self.chain.lookup("nobody")))


class AuthenticatorTests(_Logged, SynchronousTestCase):
    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.directory = MemoryDirectory(
            {
                "alice": "alice-pw",
                "dave": ("dave-pw", UserRecord(login="dave", disabled=True)),
            }
        )
        self.penalty = LoginPenalty(self.clock, initialDelay=2.0, maxDelay=15.0, userLockout=3)
        self.authenticator = Authenticator(
            Portal(MailboxRealm(), [self.directory]), self.clock, penalty=self.penalty
        )

    def login(self, user, password, who=None):
        return self.authenticator.login(creds(user, password), who or client())

    def test_successNoDelay(self):
        self.assertEqual(resultOf(self.login("alice", "alice-pw")).login, "alice")

    def test_failureAnsweredAfterGrowingDelay(self):
        for i, delay in enumerate([2, 4, 8]):
            d = self.login("alice", f"wrong{i}")
            self.clock.advance(delay - 0.01)
            self.assertNoResult(d)
            self.clock.advance(0.02)
            self.assertIsInstance(resultOf(d).value, AuthenticationFailed)
        self.assertIn("(answered after 4 s)", self.logText())

    def test_lockoutRefusesBeforeTheDirectory(self):
        for i in range(3):
            d = self.login("alice", f"wrong{i}")
            self.clock.advance(15)
            self.assertIsInstance(resultOf(d).value, AuthenticationFailed)
        checks = self.directory.checks
        d = self.login("alice", "alice-pw", client("192.0.2.50"))
        failure = resultOf(d)
        self.assertIsInstance(failure.value, Throttled)
        self.assertEqual(self.directory.checks, checks)
        self.assertIn("user locked out", self.logText())

    def test_disabledLoggedWhy(self):
        d = self.login("dave", "dave-pw", client(trusted=True))
        self.assertIsInstance(resultOf(d).value, AuthenticationFailed)
        self.assertIn("authentication failed for 'dave' from 198.51.100.7: account disabled", self.logText())

    def test_directoryTroubleIsTemporaryAndNotPenalised(self):
        self.directory.error = RuntimeError("ldap exploded")
        d = self.login("alice", "alice-pw")
        self.assertIsInstance(resultOf(d).value, DirectoryUnavailable)
        self.flushLoggedErrors(RuntimeError)
        self.directory.error = DirectoryUnavailable("no LDAP server usable")
        d = self.login("alice", "alice-pw")
        self.assertIsInstance(resultOf(d).value, DirectoryUnavailable)
        self.assertIn("failed temporarily: no LDAP server usable", self.logText())
        self.assertEqual(self.penalty.currentDelay(client()), 0)

    def test_successClearsPenalty(self):
        first = self.login("alice", "nope")
        self.clock.advance(2)
        self.assertIsInstance(resultOf(first).value, AuthenticationFailed)
        resultOf(self.login("alice", "alice-pw"))
        d = self.login("alice", "nope2")
        self.clock.advance(2)
        self.assertIsInstance(resultOf(d).value, AuthenticationFailed)

    def test_passwordsNeverLogged(self):
        results = []
        for password in ["alice-pw", "S3cret-guess", ""]:
            results.append(self.login("alice", password))
            self.clock.advance(20)
        self.directory.error = DirectoryUnavailable("down")
        results.append(self.login("alice", "S3cret-second"))
        self.assertEqual(
            [type(getattr(resultOf(d), "value", resultOf(d))) for d in results],
            [UserRecord, AuthenticationFailed, AuthenticationFailed, DirectoryUnavailable],
        )
        text = self.logText() + "".join(repr(e) for e in self.logged)
        for secret in ["alice-pw", "S3cret-guess", "S3cret-second"]:
            self.assertNotIn(secret, text)

    def test_defaultPenalty(self):
        authenticator = Authenticator(Portal(MailboxRealm(), [self.directory]), self.clock, 1.5)
        self.assertEqual((authenticator.failureDelay, authenticator.penalty.maxDelay), (1.5, 15.0))


class IMAPPenaltyTests(SynchronousTestCase):
    """
    The penalty as an IMAP client sees it.
    """

    config = """
[auth]
failure_delay = 2.0
user_lockout_threshold = 3

[routing]
default_backend = "mbx"

[backends.mbx]
host = "192.0.2.10"

[imap]
[[imap.listen]]
endpoint = "tcp:1143"
"""

    def test_penaltyAndLockout(self):
        reactor = MemoryReactorClock()
        context = makeContext(reactor, users={"alice": "secret"}, config=self.config, protocols=[imap])
        server, transport = connectFrontend(imap, context, peer=("198.51.100.7", 40000))
        server.client = server.client.withTLS()
        transport.clear()
        for tag, delay in [(b"a", 2.0), (b"b", 4.0), (b"c", 8.0)]:
            server.dataReceived(tag + b" LOGIN alice wrong-" + tag + b"\r\n")
            reactor.advance(delay - 0.1)
            self.assertEqual(transport.value(), b"")
            reactor.advance(0.2)
            self.assertEqual(transport.value(), tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
            transport.clear()
        server.dataReceived(b"d LOGIN alice secret\r\n")
        reactor.advance(15)
        self.assertEqual(transport.value(), b"d NO [LIMIT] Too many connections or logins, try again later.\r\n")
        self.assertEqual(reactor.tcpClients, [])


CONFIG_BOTH = """
[auth]
users_file = "{users}"
cache_ttl = {ttl}
cache_negative_ttl = {ttl}

[ldap]
urls = ["ldap://127.0.0.1:389/"]
starttls = false
base_dn = "ou=people,dc=example,dc=com"
filter = "(&(objectClass=inetOrgPerson)(|(uid={{login}})(mail={{login}})))"
bind_dn = "cn=casd,ou=services,dc=example,dc=com"
bind_password_file = "{secret}"
status_attribute = "accountStatus"
site_attribute = "mailRoutingSite"
policy_attributes = ["name=cn"]
"""


class AssemblyTests(_Harness, SynchronousTestCase):
    """
    From the configuration to the login path: users file first, then LDAP, behind the cache.
    """

    def setUp(self):
        super().setUp()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.users = os.path.join(directory, "users")
        with open(self.users, "w") as f:
            f.write(f"admin:{makeHash('PLAIN', b'admin-pw')}\n")
            f.write(f"alice:{makeHash('PLAIN', b'local-alice')}\n")
        self.secret = os.path.join(directory, "secret")
        with open(self.secret, "w") as f:
            from tests.support.slapd import SERVICE_PASSWORD

            f.write(SERVICE_PASSWORD + "\n")
        self.net.serve(389)

    def config(self, ttl=300):
        return parseConfig(CONFIG_BOTH.format(users=self.users, secret=self.secret, ttl=ttl), "t.toml", [imap])

    def build(self, ttl=300):
        return buildAuthentication(
            self.config(ttl), self.reactor, lambda f, *a: defer.maybeDeferred(f, *a)
        )

    def test_chainBehindCache(self):
        authenticator, directory, checkers = self.build()
        self.assertIsInstance(directory, CachingChecker)
        self.assertIsInstance(directory.checker, CheckerChain)
        self.assertEqual([type(c) for c in checkers], [UsersFileChecker, LDAPChecker])
        who = client(trusted=True)
        d = authenticator.login(creds("admin", "admin-pw"), who)
        self.assertEqual(resultOf(d).login, "admin")
        d = authenticator.login(creds("bob", LDAP_USERS["bob"]), who)
        self.net.flush()
        record = resultOf(d)
        self.assertEqual(
            (record.login, record.site, dict(record.policy)), ("bob", "site-a", {"name": "Bob Example"})
        )
        # alice is in the users file: her LDAP password is not asked of LDAP.
        d = authenticator.login(creds("alice", LDAP_USERS["alice"]), who)
        self.net.flush()
        self.assertIsInstance(resultOf(d).value, AuthenticationFailed)
        d = authenticator.login(creds("carol", LDAP_USERS["carol"]), who)
        self.net.flush()
        self.assertIsInstance(resultOf(d).value, AuthenticationFailed)
        self.assertIn("'carol' from 198.51.100.7: account disabled", self.logText())
        d = directory.lookup("bob@example.com")
        self.net.flush()
        self.assertEqual(resultOf(d).login, "bob")

    def test_cacheOff(self):
        authenticator, directory, checkers = self.build(ttl=0)
        self.assertIsInstance(directory, CheckerChain)

    def test_needsAChecker(self):
        config = parseConfig("", "t.toml", [imap])
        e = self.assertRaises(ConfigError, buildCheckers, config, self.reactor, None)
        self.assertEqual(e.key, "auth")

    def test_unreadableSecret(self):
        config = self.config()
        os.remove(self.secret)
        e = self.assertRaises(ConfigError, buildCheckers, config, self.reactor, None)
        self.assertEqual(e.key, "ldap.bind_password_file")

    def test_configErrors(self):
        base = CONFIG_BOTH.format(users=self.users, secret=self.secret, ttl=1)
        for old, new, key in [
            ('urls = ["ldap://127.0.0.1:389/"]', 'urls = ["ldapx://h/"]', "ldap.urls"),
            ("(uid={login})", "(uid={logon})", "ldap.filter"),
            (
                f'bind_password_file = "{self.secret}"',
                'bind_password_file = "/nonexistent/x"',
                "ldap.bind_password_file",
            ),
            ('starttls = false', 'starttls = "no"', "ldap.starttls"),
        ]:
            text = base.replace(old, new)
            self.assertNotEqual(text, base)
            e = self.assertRaises(ConfigError, parseConfig, text, "t.toml", [imap])
            self.assertEqual(e.key, key)

    def test_tapContext(self):
        from casd.service.tap import buildContext

        context, checkers = buildContext(
            self.config(), {"imap": imap}, self.reactor, lambda f, *a: defer.maybeDeferred(f, *a)
        )
        self.assertIsInstance(context.directory, CachingChecker)
        self.assertEqual(context.authenticator.penalty.maxDelay, 15.0)


class LoginStormTests(_Harness, SynchronousTestCase):
    """
    Monday, 9:00: every user's clients log in again and again.  The directory sees one bind per
    user; the rest is answered from the cache.
    """

    users = 20

    def test_storm(self):
        extra = "".join(
            f"dn: uid=u{i},ou=people,dc=example,dc=com\nobjectClass: inetOrgPerson\nuid: u{i}\n"
            f"cn: U {i}\nsn: U\nmail: u{i}@example.com\nuserPassword: pw-u{i}\n\n"
            for i in range(self.users)
        )
        factory = self.net.serve(389, loadTree(extra))
        cache = CredentialCache(self.reactor, ttl=300, negativeTTL=20)
        authenticator = Authenticator(
            Portal(MailboxRealm(), [CachingChecker(self.makeChecker(self.makePool(poolSize=4)), cache)]),
            self.reactor,
            penalty=LoginPenalty(self.reactor),
        )
        logins = 0
        # 1,200 logins in one minute, 20 a second, many of them at the same moment.
        for second in range(60):
            batch = []
            for i in range(20):
                user = f"u{(second * 7 + i) % self.users}"
                d = authenticator.login(creds(user, f"pw-{user}"), client(f"198.51.100.{i}"))
                batch.append((user, d))
            self.net.flush()
            for user, d in batch:
                self.assertEqual(resultOf(d).login, user)
            logins += len(batch)
            self.reactor.advance(1)
        userBinds = [
            r for c, r in factory.requests
            if isinstance(r, pureldap.LDAPBindRequest) and b"ou=people" in r.dn
        ]
        self.assertEqual(logins, 1200)
        self.assertEqual(len(userBinds), self.users)
        stats = cache.stats()
        self.assertEqual(stats["misses"], self.users)
        self.assertEqual(stats["hits"] + stats["coalesced"], logins - self.users)
        self.assertGreater(stats["hits"], 1100)


class LoginNowTests(_Logged, SynchronousTestCase):
    """
    L{Authenticator.loginNow}: a login the credential cache answers, synchronously, without the
    portal; everything else is left to L{Authenticator.login}.
    """

    def setUp(self):
        super().setUp()
        self.clock = Clock()
        self.directory = MemoryDirectory(
            {
                "alice": "alice-pw",
                "dave": ("dave-pw", UserRecord(login="dave", disabled=True)),
            }
        )
        self.cache = CredentialCache(self.clock, ttl=300, negativeTTL=20)
        self.penalty = LoginPenalty(self.clock, initialDelay=2.0, maxDelay=15.0, userLockout=3)
        self.portal = Portal(MailboxRealm(), [CachingChecker(self.directory, self.cache)])
        self.authenticator = Authenticator(self.portal, self.clock, penalty=self.penalty)

    def now(self, user, password, who=None):
        return self.authenticator.loginNow(creds(user, password), who or client())

    def login(self, user, password, who=None):
        return resultOf(self.authenticator.login(creds(user, password), who or client()))

    def test_cachedSuccessWithoutThePortal(self):
        self.assertIsNone(self.now("alice", "alice-pw"))  # a miss: login() asks the directory
        self.assertEqual(self.login("alice", "alice-pw").login, "alice")

        def noPortal(*args):
            raise AssertionError("the portal was asked")

        self.portal.login = noPortal
        avatar = self.now("alice", "alice-pw")
        self.assertEqual((avatar.login, self.directory.checks), ("alice", 1))
        self.assertEqual(self.cache.stats()["hits"], 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_otherPasswordsGoTheLongWay(self):
        self.login("alice", "alice-pw")
        for password in ["wrong", ""]:
            self.assertIsNone(self.now("alice", password))
        d = self.authenticator.login(creds("alice", "wrong"), client())
        self.clock.advance(2)
        self.assertIsInstance(resultOf(d).value, AuthenticationFailed)
        self.assertIsNone(self.now("alice", "wrong"))  # a cached refusal: login() says it
        self.assertEqual(self.cache.stats()["hits"], 0)

    def test_notWithTheArraysPenalty(self):
        """
        With the array's shared penalty a success is asked of the shared state (a lockout on
        another node still refuses it): no synchronous lane.
        """
        self.login("alice", "alice-pw")
        self.penalty.asynchronous = True
        self.assertIsNone(self.now("alice", "alice-pw"))

    def test_foreignAuthorisationIdentity(self):
        self.login("alice", "alice-pw")
        credentials = Credentials("alice", b"alice-pw", authzid="bob")
        self.assertIsNone(self.authenticator.loginNow(credentials, client()))

    def test_lockedOutUserRefusedEvenWithTheRightPassword(self):
        self.login("alice", "alice-pw")
        for i in range(3):
            d = self.authenticator.login(creds("alice", f"wrong{i}"), client())
            self.clock.advance(15)
            self.assertIsInstance(resultOf(d).value, AuthenticationFailed)
        self.assertIsNone(self.now("alice", "alice-pw", client("192.0.2.50")))

    def test_successClearsPenalty(self):
        self.login("alice", "alice-pw")
        d = self.authenticator.login(creds("alice", "nope"), client())
        self.clock.advance(2)
        self.assertIsInstance(resultOf(d).value, AuthenticationFailed)
        self.assertGreater(self.penalty.currentDelay(client()), 0)
        self.assertIsNotNone(self.now("alice", "alice-pw"))
        self.assertEqual(self.penalty.currentDelay(client()), 0)

    def test_disabledAccountLeftToLogin(self):
        trusted = client(trusted=True)
        self.assertIsInstance(self.login("dave", "dave-pw", trusted).value, AuthenticationFailed)
        self.assertIsNone(self.now("dave", "dave-pw", trusted))  # login() refuses, logs why

    def test_withoutCacheAlwaysTheLongWay(self):
        authenticator = Authenticator(Portal(MailboxRealm(), [self.directory]), self.clock)
        resultOf(authenticator.login(creds("alice", "alice-pw"), client()))
        self.assertIsNone(authenticator.loginNow(creds("alice", "alice-pw"), client()))


class CredentialDigestTests(SynchronousTestCase):
    def test_hmacSHA256OfLowercasedLoginAndPassword(self):
        """
        The cache's key is HMAC-SHA256 (RFC 2104) of the lower-cased login, a NUL and the
        password: a fixed vector, whatever the call that computes it.
        """
        from casd.auth.cache import credentialDigest

        digest = credentialDigest(b"k" * 32, "Alice@Example.ORG", b"s3cret")
        self.assertEqual(
            digest.hex(), "eaee73f64ba26a74748474bcbd35787a3c385dbd47259608ba72f619f7b25602"
        )
        self.assertNotEqual(credentialDigest(b"k" * 32, "alice@example.org", b"s3cret!"), digest)
