"""
IMAP through casd to a real Dovecot, with users that exist only in a real OpenLDAP: casd has no
users file, it authenticates against slapd (StartTLS, verified), routes by the directory's
C{mailHost} and logs in to Dovecot with the user's own credentials or as a master user.
"""

from __future__ import annotations

import imaplib
import os
import ssl

from twisted.internet import defer, reactor, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from casd.testing import writeSecret
from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.dovecot import Dovecot
from tests.support.procs import freePort
from tests.support.slapd import SERVICE_PASSWORD, USERS, Slapd, fixtureLDIF, serviceDN

#: Dovecot's own idea of bob's password: not bob's LDAP password.  bob is routed to a backend
#: entered as a master user, so his LDAP password must never be needed by Dovecot.
DOVECOT_BOB = "dovecot-only-bob-pw"


class LDAPThroughIMAPTests(TestCase):
    timeout = 90

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ca = CertificateAuthority.create(os.path.join(self.tmp, "ca"))
        self.slapd = Slapd(
            os.path.join(self.tmp, "slapd"),
            tls=self.ca.issue(["127.0.0.1"], "slapd"),
            caPath=self.ca.caPath,
        )
        self.slapd.start()
        self.addCleanup(self.slapd.stop)
        self.slapd.load(fixtureLDIF(mailHosts={"alice": "mbx", "bob": "mbx-master", "carol": "mbx"}))
        self.dovecot = Dovecot(
            os.path.join(self.tmp, "dovecot"),
            {"alice": USERS["alice"], "bob": DOVECOT_BOB, "carol": USERS["carol"]},
            masterUsers={"casd-master": "master-pw"},
            tls=self.ca.issue(["127.0.0.1"], "dovecot"),
            protocols=("imap",),
        )
        self.dovecot.start()
        self.addCleanup(self.dovecot.stop)
        writeSecret(self.tmp, "service.secret", SERVICE_PASSWORD)
        writeSecret(self.tmp, "master.secret", "master-pw")
        self.port = freePort()
        cert, key = self.ca.issue(["127.0.0.1"], "casd")
        config = f"""
[tls]
certificate = "{cert}"
key = "{key}"

[auth]
failure_delay = 0.1
failure_delay_max = 0.2

[ldap]
urls = ["{self.slapd.url}"]
ca_file = "{self.ca.caPath}"
bind_dn = "{serviceDN()}"
bind_password_file = "{self.tmp}/service.secret"
base_dn = "ou=people,dc=example,dc=com"
filter = "(&(objectClass=inetOrgPerson)(|(uid={{login}})(mail={{login}})))"
status_attribute = "accountStatus"
timeout = 3.0

[backend]
ca_file = "{self.ca.caPath}"

[backends.mbx]
host = "127.0.0.1"
[backends.mbx.imap]
port = {self.dovecot.imapsPort}
tls = "implicit"

[backends.mbx-master]
host = "127.0.0.1"
[backends.mbx-master.imap]
port = {self.dovecot.imapsPort}
tls = "implicit"
master_user = "casd-master"
master_password_file = "{self.tmp}/master.secret"

[imap]
[[imap.listen]]
endpoint = "tcp:{self.port}:interface=127.0.0.1"
tls = "implicit"
"""
        self.cas = CASNode(os.path.join(self.tmp, "cas"), config).start(reactor)
        self.addCleanup(self.cas.stop)
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def casLog(self) -> str:
        return "\n".join(formatEvent(e) for e in self.logged)

    def session(self, user, password):
        """
        TLS to casd, LOGIN, SELECT INBOX, LOGOUT (in a thread).

        @return: a L{Deferred} firing with C{("OK", exists)} or C{("NO", text)}.
        """

        def run():
            c = imaplib.IMAP4_SSL(
                "127.0.0.1", self.port, ssl_context=ssl.create_default_context(cafile=self.ca.caPath), timeout=15
            )
            try:
                try:
                    c.login(user, password)
                except imaplib.IMAP4.error as e:
                    return "NO", str(e)
                typ, data = c.select("INBOX")
                return typ, int(data[0])
            finally:
                try:
                    c.logout()
                except Exception:
                    pass

        return threads.deferToThread(run)

    @defer.inlineCallbacks
    def test_ownCredentials(self):
        """
        alice exists only in LDAP (and in Dovecot's own passdb with the same password, as in a
        real deployment where both ask the directory): casd passes her credentials on.
        """
        self.assertEqual((yield self.session("alice@example.com", USERS["alice"])), ("OK", 0))
        log = self.dovecot.logText()
        self.assertRegex(log, r"imap-login: Info: Login: user=<alice>, method=PLAIN")

    @defer.inlineCallbacks
    def test_masterUser(self):
        """
        bob's mailbox server is entered as the master user with bob as authorisation identity:
        his LDAP password never reaches Dovecot, which does not know it.
        """
        self.assertEqual((yield self.session("bob", USERS["bob"])), ("OK", 0))
        self.assertNotEqual(USERS["bob"], DOVECOT_BOB)
        log = self.dovecot.logText()
        self.assertRegex(log, r"imap-login: Info: Login: user=<bob>, method=PLAIN")
        self.assertIn("Master user logging in as bob", log)
        # Dovecot's own password for bob does not work through casd: casd asked LDAP.
        result = yield self.session("bob", DOVECOT_BOB)
        self.assertEqual(result[0], "NO")
        self.assertIn("[AUTHENTICATIONFAILED]", result[1])

    @defer.inlineCallbacks
    def test_refusals(self):
        # imaplib sends the user name as given: quote the ones that are no IMAP atom.
        for user, password in [
            ("alice", "wrong"),
            ("carol", USERS["carol"]),
            ('"*"', "x"),
            ('"alice)(uid=*"', "x"),
            ('"*)(|(objectClass=*"', USERS["alice"]),
        ]:
            result = yield self.session(user, password)
            self.assertEqual(result[0], "NO", user)
            self.assertIn("[AUTHENTICATIONFAILED] Authentication failed.", result[1], user)
        self.assertIn("authentication failed for 'carol' from 127.0.0.1: account disabled", self.casLog())
        self.assertNotIn("Login: user=<carol>", self.dovecot.logText())

    @defer.inlineCallbacks
    def test_directoryDownThenBack(self):
        self.assertEqual((yield self.session("alice", USERS["alice"]))[0], "OK")
        self.slapd.stop()
        # bob is not cached: his login needs the directory.
        result = yield self.session("bob", USERS["bob"])
        self.assertEqual(result[0], "NO")
        self.assertIn("[UNAVAILABLE] Temporary authentication failure", result[1])
        # alice is: the cache carries her through the outage.
        self.assertEqual((yield self.session("alice", USERS["alice"]))[0], "OK")
        self.slapd.start()
        self.assertEqual((yield self.session("bob", USERS["bob"]))[0], "OK")
