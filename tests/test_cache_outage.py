"""
C{[auth] cache_during_outage}: whether the credential cache answers while the directory fails
(issue 15, defect 10), both settings against a directory that fails.
"""

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from casd.auth.assembly import wrapCheckers
from casd.auth.cache import CachingChecker, CredentialCache
from casd.auth.sasl import Credentials
from casd.config import parseConfig
from casd.failures import DirectoryUnavailable
from casd.testing import MemoryDirectory


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


class OutageTestMixin:
    serve = True

    def setUp(self):
        self.clock = Clock()
        self.directory = MemoryDirectory({"alice": "a-pw", "bob": "b-pw"})
        self.cache = CredentialCache(self.clock, ttl=300, negativeTTL=20)
        self.checker = CachingChecker(self.directory, self.cache, serveDuringOutage=self.serve)
        self.events = []
        self.patch(CachingChecker, "log", Logger(observer=self.events.append))

    def login(self, user, password):
        return result(self.checker.requestAvatarId(Credentials(user, password.encode())))

    def fail(self):
        self.directory.error = DirectoryUnavailable("ldap: no server answered")

    def heal(self):
        self.directory.error = None

    def startOutage(self):
        """
        alice logged in; the directory goes down; bob's login (not cached) shows it.
        """
        self.assertEqual(self.login("alice", "a-pw").login, "alice")
        self.assertEqual(self.result(self.checker.lookup("alice")).login, "alice")
        self.fail()
        self.assertIsInstance(self.login("bob", "b-pw").value, DirectoryUnavailable)
        self.assertTrue(self.checker.directoryFailing)

    def result(self, d):
        return result(d)

    def warnings(self):
        return [e for e in self.events if "directory failing" in e["log_format"]]


class ServeDuringOutageTests(OutageTestMixin, SynchronousTestCase):
    serve = True

    def test_cachedUserKeepsWorking(self):
        self.startOutage()
        checks = self.directory.checks
        self.assertEqual(self.login("alice", "a-pw").login, "alice")
        self.assertEqual(self.result(self.checker.lookup("alice")).login, "alice")
        self.assertEqual(self.checker.cachedSuccess(Credentials("alice", b"a-pw")).login, "alice")
        self.assertEqual(self.directory.checks, checks)
        # Never a wrong password: a password the cache does not know gets the outage.
        self.assertIsInstance(self.login("alice", "other").value, DirectoryUnavailable)
        self.assertEqual(len(self.warnings()), 1)
        self.assertIn("answered from the cache", self.warnings()[0]["what"])

    def test_onlyWithinTTL(self):
        """
        The cache answers for at most C{cache_ttl} after a user's last check, outage or not
        (a deleted account keeps working that long, no longer).
        """
        self.startOutage()
        self.clock.advance(301)
        self.assertIsInstance(self.login("alice", "a-pw").value, DirectoryUnavailable)


class NoServeDuringOutageTests(OutageTestMixin, SynchronousTestCase):
    serve = False

    def test_cacheSilentDuringOutage(self):
        self.startOutage()
        checks = self.directory.checks
        self.assertIsInstance(self.login("alice", "a-pw").value, DirectoryUnavailable)
        self.assertIsInstance(self.result(self.checker.lookup("alice")).value, DirectoryUnavailable)
        self.assertGreater(self.directory.checks, checks)
        self.assertIn("cache_during_outage = false", self.warnings()[0]["what"])
        # The authenticator's synchronous lane is closed too.
        self.assertIsNone(self.checker.cachedSuccess(Credentials("alice", b"a-pw")))

    def test_cacheBackWithDirectory(self):
        self.startOutage()
        self.heal()
        self.assertEqual(self.login("alice", "a-pw").login, "alice")
        self.assertFalse(self.checker.directoryFailing)
        checks = self.directory.checks
        self.assertEqual(self.login("alice", "a-pw").login, "alice")
        self.assertEqual(self.directory.checks, checks)  # from the cache again
        self.assertEqual(len([e for e in self.events if "answering again" in e["log_format"]]), 1)

    def test_refusalIsNoOutage(self):
        """
        A wrong password is the directory answering: it never counts as an outage.
        """
        self.assertEqual(self.login("alice", "a-pw").login, "alice")
        self.assertIsInstance(self.login("bob", "wrong").value, UnauthorizedLogin)
        self.assertFalse(self.checker.directoryFailing)
        checks = self.directory.checks
        self.assertEqual(self.login("alice", "a-pw").login, "alice")
        self.assertEqual(self.directory.checks, checks)


class SettingTests(SynchronousTestCase):
    def checker(self, text):
        config = parseConfig(text, "t.toml", ())
        return wrapCheckers([MemoryDirectory({})], config, Clock())

    def test_defaultServes(self):
        self.assertTrue(self.checker("").serveDuringOutage)

    def test_off(self):
        self.assertFalse(self.checker("[auth]\ncache_during_outage = false\n").serveDuringOutage)
