"""
The LDAP checker against a real OpenLDAP slapd (tests/support/slapd.py): search-then-bind,
direct bind, disabled users, StartTLS and ldaps with verified certificates, failover, slapd stopped
and started again, timeouts, injection attempts (checked in slapd's own log), a login storm.
"""

from __future__ import annotations

import os
import re

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from casd.auth import UnknownUser
from casd.auth.authenticator import Authenticator, MailboxRealm
from casd.auth.cache import CachingChecker, CredentialCache
from casd.auth.ldap import checkerFromConfig
from casd.auth.penalty import LoginPenalty
from casd.session.clientinfo import ClientInfo
from casd.config import parseConfig
from casd.failures import AuthenticationFailed, DirectoryUnavailable
from casd.auth.sasl import Credentials
from protocols.imap import imap
from tests.support.certs import CertificateAuthority
from tests.support.procs import freePort
from tests.support.slapd import SERVICE_PASSWORD, USERS, Slapd, fixtureLDIF, serviceDN, userDN

CONFIG = """
[ldap]
urls = {urls}
starttls = {starttls}
ca_file = "{ca}"
base_dn = "ou=people,dc=example,dc=com"
filter = "(&(objectClass=inetOrgPerson)(|(uid={{login}})(mail={{login}})))"
bind_dn = "{bindDN}"
bind_password_file = "{secret}"
status_attribute = "accountStatus"
site_attribute = "mailRoutingSite"
policy_attributes = ["name=cn"]
timeout = {timeout}
connect_timeout = 2.0
pool_size = 2
{extra}
"""


class Refused:
    """
    What a failed login gave (returning the Failure itself would keep the Deferred failing).
    """

    def __init__(self, failure) -> None:
        self.value = failure.value


def client(trusted=True) -> ClientInfo:
    return ClientInfo("s1", "imap", "imap-test", "127.0.0.1", 40000, "127.0.0.1", 143, True, trusted)


class SlapdTests(TestCase):
    timeout = 60

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ca = CertificateAuthority.create(os.path.join(self.tmp, "ca"))
        cert = self.ca.issue(["127.0.0.1", "localhost"], "slapd")
        self.slapd = Slapd(os.path.join(self.tmp, "slapd"), tls=cert, caPath=self.ca.caPath)
        self.slapd.start()
        self.addCleanup(self.slapd.stop)
        self.slapd.load(fixtureLDIF())
        # What casd did starts here (the fixture's ldapadd came before).
        self.logStart = len(self.slapd.logText())
        self.secret = os.path.join(self.tmp, "service.secret")
        with open(self.secret, "w") as f:
            f.write(SERVICE_PASSWORD + "\n")
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def logText(self) -> str:
        return "\n".join(formatEvent(e) for e in self.logged)

    def checker(self, urls=None, starttls=True, ca=None, timeout=5.0, extra="", secret=None):
        urls = urls or [self.slapd.url]
        text = CONFIG.format(
            urls="[" + ", ".join(f'"{u}"' for u in urls) + "]",
            starttls="true" if starttls else "false",
            ca=ca or self.ca.caPath,
            bindDN=serviceDN(),
            secret=secret or self.secret,
            timeout=timeout,
            extra=extra,
        )
        config = parseConfig(text, os.path.join(self.tmp, "casd.toml"), [imap])
        checker = checkerFromConfig(config.ldap, reactor)
        self.addCleanup(checker.close)
        return checker

    def login(self, checker, user, password):
        if isinstance(password, str):
            password = password.encode()
        d = checker.requestAvatarId(Credentials(user, password))
        return d.addErrback(Refused)

    def slapdLog(self, pattern: str) -> list[str]:
        """
        Lines of slapd's stats log since the fixture was loaded that match C{pattern}.  A bind
        shows as two lines (request C{method=128}, result C{mech=SIMPLE}).
        """
        text = self.slapd.logText()[self.logStart :]
        return [line for line in text.splitlines() if re.search(pattern, line)]

    @defer.inlineCallbacks
    def test_searchThenBind(self):
        """
        Over StartTLS: the user is found by address, their password verified by a bind as their
        DN, the routing attributes read in the same search.
        """
        checker = self.checker()
        record = yield self.login(checker, "alice@example.com", USERS["alice"])
        self.assertEqual(
            (record.login, record.address, record.mailHost, record.site, record.disabled, dict(record.policy)),
            ("alice", "alice@example.com", "mail1.example.com", "site-a", False, {"name": "Alice Example"}),
        )
        wrong = yield self.login(checker, "alice", "not-her-password")
        self.assertIsInstance(wrong.value, UnauthorizedLogin)
        self.assertIn("invalid credentials", str(wrong.value))
        unknown = yield self.login(checker, "mallory", "x")
        self.assertIsInstance(unknown.value, UnknownUser)
        self.assertTrue(self.slapdLog(r"BIND dn=\"%s\" method=128" % re.escape(userDN("alice"))))
        self.assertTrue(self.slapdLog(r"STARTTLS"))
        # Every connection went through StartTLS before anything else.
        conns = {re.search(r"conn=(\d+)", line).group(1) for line in self.slapdLog(r"op=\d+ BIND")}
        tls = {re.search(r"conn=(\d+)", line).group(1) for line in self.slapdLog(r"STARTTLS")}
        self.assertTrue(conns)
        self.assertLessEqual(conns, tls)

    @defer.inlineCallbacks
    def test_disabled(self):
        checker = self.checker()
        authenticator = Authenticator(Portal(MailboxRealm(), [checker]), reactor, penalty=LoginPenalty(reactor))
        d = authenticator.login(Credentials("carol", USERS["carol"].encode()), client())
        failure = yield d.addErrback(Refused)
        self.assertIsInstance(failure.value, AuthenticationFailed)
        self.assertIn("authentication failed for 'carol' from 127.0.0.1: account disabled", self.logText())

    @defer.inlineCallbacks
    def test_startTLSUntrustedCertificate(self):
        """
        A CA that did not sign slapd's certificate: no bind ever happens (the service password
        is never sent) and the login fails temporarily.
        """
        other = CertificateAuthority.create(os.path.join(self.tmp, "other-ca"))
        checker = self.checker(ca=other.caPath)
        failure = yield self.login(checker, "alice", USERS["alice"])
        self.assertIsInstance(failure.value, DirectoryUnavailable)
        self.assertEqual(self.slapdLog(r"BIND dn="), [])

    @defer.inlineCallbacks
    def test_startTLSNameChecked(self):
        """
        The certificate must name the host of the URL: signed by the trusted CA but for another
        name, it is refused.
        """
        self.slapd.tls = self.ca.issue(["ldap.example.org"], "slapd-other")
        self.slapd.restart()
        checker = self.checker()
        failure = yield self.login(checker, "alice", USERS["alice"])
        self.assertIsInstance(failure.value, DirectoryUnavailable)
        self.assertEqual(self.slapdLog(r"BIND dn="), [])

    @defer.inlineCallbacks
    def test_ldaps(self):
        checker = self.checker(urls=[self.slapd.ldapsUrl])
        record = yield self.login(checker, "bob", USERS["bob"])
        self.assertEqual(record.mailHost, "mail2.example.com")
        self.assertEqual(self.slapdLog("STARTTLS"), [])
        accepted = r"ACCEPT from IP=127\.0\.0\.1:\d+ \(IP=127\.0\.0\.1:%d\)" % self.slapd.ldapsPort
        self.assertTrue(self.slapdLog(accepted))
        other = CertificateAuthority.create(os.path.join(self.tmp, "other-ca"))
        failure = yield self.login(self.checker(urls=[self.slapd.ldapsUrl], ca=other.caPath), "bob", USERS["bob"])
        self.assertIsInstance(failure.value, DirectoryUnavailable)

    @defer.inlineCallbacks
    def test_failover(self):
        """
        The first URL is down: the second answers.
        """
        dead = f"ldap://127.0.0.1:{freePort()}/"
        checker = self.checker(urls=[dead, self.slapd.url])
        record = yield self.login(checker, "alice", USERS["alice"])
        self.assertEqual(record.login, "alice")
        self.assertIn(f"LDAP server {dead} unusable", self.logText())

    @defer.inlineCallbacks
    def test_stoppedMidRun(self):
        """
        slapd goes away: logins fail temporarily (never as a bad password); it comes back: they
        succeed again, on new connections.
        """
        checker = self.checker()
        record = yield self.login(checker, "alice", USERS["alice"])
        self.assertEqual(record.login, "alice")
        self.slapd.stop()
        for user in ("alice", "bob"):
            failure = yield self.login(checker, user, USERS[user])
            self.assertIsInstance(failure.value, DirectoryUnavailable)
        self.slapd.start()
        record = yield self.login(checker, "bob", USERS["bob"])
        self.assertEqual(record.login, "bob")
        record = yield self.login(checker, "alice", USERS["alice"])
        self.assertEqual(record.login, "alice")

    @defer.inlineCallbacks
    def test_silentServerTimesOut(self):
        """
        A server that accepts connections and never answers: a temporary failure after the
        timeout, not a hang.
        """
        factory = protocol.Factory.forProtocol(protocol.Protocol)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        checker = self.checker(urls=[f"ldap://127.0.0.1:{port.getHost().port}/"], timeout=0.5)
        started = reactor.seconds()
        failure = yield self.login(checker, "alice", USERS["alice"])
        self.assertIsInstance(failure.value, DirectoryUnavailable)
        self.assertIn("timed out after 0.5 s", str(failure.value))
        self.assertLess(reactor.seconds() - started, 3)

    @defer.inlineCallbacks
    def test_wrongServicePassword(self):
        secret = os.path.join(self.tmp, "bad.secret")
        with open(secret, "w") as f:
            f.write("not-the-service-password\n")
        failure = yield self.login(self.checker(secret=secret), "alice", USERS["alice"])
        self.assertIsInstance(failure.value, DirectoryUnavailable)
        self.assertNotIn("not-the-service-password", self.logText() + str(failure.value))

    @defer.inlineCallbacks
    def test_injection(self):
        """
        Logins that try to widen the filter are plain failures, and slapd's own log shows the
        filter it received with them escaped as values.
        """
        checker = self.checker()
        for login in ["*", "alice)(uid=*", "*)(|(objectClass=*", "al*"]:
            failure = yield self.login(checker, login, "x")
            self.assertIsInstance(failure.value, UnknownUser, login)
        # slapd logs the filter it parsed from the request, values normalised (lower case).
        filters = [line.split("filter=", 1)[1].lower() for line in self.slapdLog(r"SRCH base=.*filter=")]
        self.assertEqual(
            filters,
            [
                r'"(&(objectclass=inetorgperson)(|(uid=\2a)(mail=\2a)))"',
                r'"(&(objectclass=inetorgperson)(|(uid=alice\29\28uid=\2a)(mail=alice\29\28uid=\2a)))"',
                r'"(&(objectclass=inetorgperson)(|(uid=\2a\29\28|\28objectclass=\2a)'
                r'(mail=\2a\29\28|\28objectclass=\2a)))"',
                r'"(&(objectclass=inetorgperson)(|(uid=al\2a)(mail=al\2a)))"',
            ],
        )
        # Logins no LDAP server should see are refused before any request.
        for login in ["ali\x00ce", "alice\r\nuid=bob", "a" * 300]:
            failure = yield self.login(checker, login, "x")
            self.assertIsInstance(failure.value, UnknownUser)
        self.assertEqual(len(self.slapdLog(r"SRCH base=")), 4)
        self.assertEqual(self.slapdLog(r'BIND dn="uid='), [])

    @defer.inlineCallbacks
    def test_emptyPasswordNeverBinds(self):
        checker = self.checker()
        failure = yield self.login(checker, "alice", b"")
        self.assertIsInstance(failure.value, UnauthorizedLogin)
        self.assertEqual(self.slapdLog(r'BIND dn="uid=alice'), [])

    @defer.inlineCallbacks
    def test_directBind(self):
        checker = self.checker(extra='dn_template = "uid={user},ou=people,dc=example,dc=com"')
        record = yield self.login(checker, "bob", USERS["bob"])
        self.assertEqual(
            (record.login, record.mailHost, record.address), ("bob", "mail2.example.com", "bob@example.com")
        )
        failure = yield self.login(checker, "bob", "wrong")
        self.assertIsInstance(failure.value, UnauthorizedLogin)
        # Only the user's own binds: the service account never bound.
        self.assertEqual(self.slapdLog(r'BIND dn="cn=casd'), [])
        self.assertEqual(len(self.slapdLog(r'BIND dn="uid=bob,ou=people,dc=example,dc=com" method=128')), 2)

    @defer.inlineCallbacks
    def test_lookup(self):
        checker = self.checker()
        record = yield checker.lookup("bob@example.com")
        self.assertEqual(record.login, "bob")
        self.assertIsNone((yield checker.lookup("nobody@example.com")))

    @defer.inlineCallbacks
    def test_loginStorm(self):
        """
        300 logins of three users, 30 at a time, through the cache: slapd sees one bind per user.
        """
        checker = self.checker()
        cache = CredentialCache(reactor, ttl=300, negativeTTL=20)
        cached = CachingChecker(checker, cache)
        for _ in range(10):
            results = yield defer.gatherResults(
                [cached.requestAvatarId(Credentials(u, USERS[u].encode())) for u in USERS for _ in range(10)]
            )
            self.assertEqual(sorted({r.login for r in results}), sorted(USERS))
        userBinds = self.slapdLog(r'BIND dn="uid=.* method=128')
        self.assertEqual(len(userBinds), 3)
        stats = cache.stats()
        self.assertEqual(stats["misses"], 3)
        self.assertEqual(stats["hits"] + stats["coalesced"], 297)
