"""
Faults at every step of a session, with real servers: the directory (slapd) and the mailbox
server (Dovecot) killed before the greeting, during the login (the directory query, the backend
login dialogue) and mid-relay, for IMAP and POP3.  Every time the client gets the protocol's
temporary error — never a wrong-password answer — or, mid-relay, a closed connection; never a
hang (every client call is bounded).  A Dovecot restart during a login is waited for and the login
succeeds (issue 15, defect 5); C{[auth] cache_during_outage} decides whether cached users keep
working while slapd is down (defect 10).
"""

from __future__ import annotations

import imaplib
import os
import poplib
import signal
import time

from twisted.internet import defer, reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from casd.auth.hashing import makeHash
from casd.session.dialogue import BackendDialogue
from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.dovecot import Dovecot
from tests.support.procs import freePort
from tests.support.slapd import SERVICE_PASSWORD, USERS, Slapd, fixtureLDIF, serviceDN

#: Seconds any client call may take: past it the session hung.
BOUND = 25

IMAP_TEMPORARY = "[UNAVAILABLE]"
POP3_TEMPORARY = "[SYS/TEMP]"


def imapLogin(port: int, user: str, password: str):
    """
    Connect, LOGIN, and when it worked SELECT INBOX and LOGOUT.

    @return: C{("OK", None)} or C{("NO", text)}.
    """
    c = imaplib.IMAP4("127.0.0.1", port, timeout=BOUND)
    try:
        try:
            c.login(user, password)
        except imaplib.IMAP4.error as e:
            return "NO", str(e)
        typ, _ = c.select("INBOX")
        c.logout()
        return typ, None
    finally:
        try:
            c.shutdown()
        except OSError:
            pass


def pop3Login(port: int, user: str, password: str):
    c = poplib.POP3("127.0.0.1", port, timeout=BOUND)
    try:
        c.user(user)
        try:
            c.pass_(password)
        except poplib.error_proto as e:
            return "NO", e.args[0].decode("utf-8", "replace")
        c.stat()
        c.quit()
        return "OK", None
    finally:
        try:
            c.close()
        except OSError:
            pass


#: The backend commands L{FaultTestMixin} records.
VERBS = {
    b"LOGIN", b"AUTHENTICATE", b"USER", b"PASS", b"AUTH", b"ID", b"XCLIENT", b"CAPA", b"EHLO",
    b"MAIL", b"RCPT", b"DATA",
}

LOGINS = {"imap": (imapLogin, IMAP_TEMPORARY), "pop3": (pop3Login, POP3_TEMPORARY)}


class BackendCommands:
    """
    Records the command verbs casd sends its backends (never a password), in this process's
    casd, and can act the moment one is sent.

    @ivar sent: the verbs sent, in order.
    @ivar onSent: C{(verbs, before, after)}: when casd sends one of C{verbs} (once), C{before}
        is called just before the bytes are written and C{after} just after (either may be
        C{None}).
    """

    onSent = None

    def __init__(self, testCase) -> None:
        self.sent: list[bytes] = []
        for name in ("send", "sendLine"):
            testCase.patch(BackendDialogue, name, self._recording(getattr(BackendDialogue, name)))

    def _recording(self, original):
        def recording(dialogue, data):
            verbs = set()
            for line in data.split(b"\n"):
                verbs.update(t.upper() for t in line.split()[:2] if t.upper() in VERBS)
            self.sent.extend(sorted(verbs))
            before = after = None
            if self.onSent is not None and self.onSent[0] & verbs:
                (_, before, after), self.onSent = self.onSent, None
            if before is not None:
                before()
            result = original(dialogue, data)
            if after is not None:
                after()
            return result

        return recording


class FaultTestMixin:
    timeout = 120

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        self.dovecot = Dovecot(
            os.path.join(self.tmp, "dovecot"),
            {"alice": USERS["alice"], "bob": USERS["bob"]},
            protocols=("imap", "pop3"),
        )
        self.dovecot.start()
        self.addCleanup(self.dovecot.stop)
        self.recorder = BackendCommands(self)

    @property
    def sent(self):
        return self.recorder.sent

    @property
    def onSent(self):
        return self.recorder.onSent

    @onSent.setter
    def onSent(self, value):
        self.recorder.onSent = value

    def casLog(self) -> str:
        return "\n".join(formatEvent(e) or "" for e in self.logged)

    def backendConfig(self, retry=2.0) -> str:
        return f"""
[backend]
connect_timeout = 2.0
banner_timeout = 4.0
reply_timeout = 4.0
failover_timeout = 15.0
connect_retry_time = {retry}

[health]
enabled = false

[backends.mbx]
host = "127.0.0.1"
protocols = ["imap", "pop3"]
[backends.mbx.imap]
port = {self.dovecot.imapPort}
tls = "none"
[backends.mbx.pop3]
port = {self.dovecot.pop3Port}
tls = "none"

[imap]
[[imap.listen]]
endpoint = "tcp:{self.ports['imap']}:interface=127.0.0.1"
trusted = true

[pop3]
enabled = true
[[pop3.listen]]
endpoint = "tcp:{self.ports['pop3']}:interface=127.0.0.1"
trusted = true
"""

    def startCAS(self, authConfig: str, retry=2.0):
        self.ports = {"imap": freePort(), "pop3": freePort()}
        text = authConfig + self.backendConfig(retry)
        self.cas = CASNode(os.path.join(self.tmp, "cas"), text).start(reactor)
        self.addCleanup(self.cas.stop)
        factory = next(self.cas.factories())
        self.context = factory.context

    def login(self, protocol: str, user: str, password: str) -> defer.Deferred:
        run, _ = LOGINS[protocol]
        return threads.deferToThread(run, self.ports[protocol], user, password)

    def assertTemporary(self, protocol: str, result) -> None:
        """
        The protocol's temporary failure, and not a refusal of the password.
        """
        _, marker = LOGINS[protocol]
        self.assertEqual(result[0], "NO", result)
        self.assertIn(marker, result[1])
        self.assertNotIn("AUTHENTICATIONFAILED", result[1])
        self.assertNotIn("[AUTH]", result[1])

    @defer.inlineCallbacks
    def waitFor(self, condition, what: str, timeout: float = 15.0):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"not in {timeout} s: {what}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    def killDovecot(self) -> None:
        killGroup(self.dovecot.pid)
        self.dovecot.stop()  # reaps it and waits for its ports to close


class BackendFaultTests(FaultTestMixin, TestCase):
    """
    Dovecot killed at each step; authentication from a users file (the directory is not in
    question here).
    """

    def setUp(self):
        super().setUp()
        self.usersPath = os.path.join(self.tmp, "users")
        with open(self.usersPath, "w") as f:
            for user in ("alice", "bob"):
                f.write(f"{user}:{makeHash('SHA512-CRYPT', USERS[user].encode())}:mailhost=mbx\n")
        self.auth = f"""
[auth]
users_file = "{self.usersPath}"
failure_delay = 0.1
"""

    @defer.inlineCallbacks
    def test_restartDuringLogin(self):
        """
        A login while Dovecot restarts waits for it (the pool retries a refused member) and
        succeeds, for each protocol.
        """
        self.startCAS(self.auth, retry=20.0)
        for protocol in ("imap", "pop3"):
            self.dovecot.stop()
            before = len(self.logged)
            d = self.login(protocol, "alice", USERS["alice"])
            # casd saw the refusal: its retries are under way.
            yield self.waitFor(
                lambda: any("refused" in (formatEvent(e) or "") for e in self.logged[before:]),
                "a refused connection",
            )
            yield threads.deferToThread(self.dovecot.start)
            result = yield d
            self.assertEqual(result, ("OK", None), protocol)
        self.assertIn("took the session after", self.casLog())

    @defer.inlineCallbacks
    def test_restartWithoutRetry(self):
        """
        The same restart with C{connect_retry_time = 0}: the login fails at once, temporarily
        (what every login did before defect 5 was fixed).
        """
        self.startCAS(self.auth, retry=0.0)
        self.dovecot.stop()
        for protocol in ("imap", "pop3"):
            self.assertTemporary(protocol, (yield self.login(protocol, "alice", USERS["alice"])))

    @defer.inlineCallbacks
    def test_downBeforeGreeting(self):
        """
        Dovecot down before the client even connects: casd greets, and the login gets the
        temporary failure once the retries are spent.
        """
        self.startCAS(self.auth, retry=1.0)
        self.killDovecot()
        for protocol in ("imap", "pop3"):
            self.assertTemporary(protocol, (yield self.login(protocol, "alice", USERS["alice"])))
            # A wrong password is still a wrong password: casd checks it before the backend.
            result = yield self.login(protocol, "alice", "wrong")
            self.assertEqual(result[0], "NO")
            self.assertNotIn(LOGINS[protocol][1], result[1])

    @defer.inlineCallbacks
    def test_killedDuringBackendLogin(self):
        """
        Dovecot killed the moment casd sent it the login: the client gets the temporary failure,
        and casd does not send the login again (a login is never retried).
        """
        self.startCAS(self.auth, retry=5.0)
        for protocol, verbs in (("imap", {b"AUTHENTICATE", b"LOGIN"}), ("pop3", {b"AUTH", b"PASS"})):
            self.sent.clear()
            # Stopped before the login is written (so it cannot answer it, whatever the thread
            # scheduling), killed right after.
            self.onSent = (
                verbs,
                lambda: os.killpg(self.dovecot.pid, signal.SIGSTOP),
                lambda: os.killpg(self.dovecot.pid, signal.SIGKILL),
            )
            result = yield self.login(protocol, "bob", USERS["bob"])
            self.assertIsNone(self.onSent, "the login reached Dovecot")
            self.assertTemporary(protocol, result)
            self.assertEqual(len([v for v in self.sent if v in verbs]), 1, self.sent)
            yield threads.deferToThread(self.killDovecot)
            yield threads.deferToThread(self.dovecot.start)

    @defer.inlineCallbacks
    def test_killedMidRelay(self):
        """
        Dovecot killed while sessions are relayed: casd closes them (the clients see the end of
        the connection at once, no hang); new logins get the temporary failure.
        """
        self.startCAS(self.auth, retry=1.0)

        def openSessions():
            imap = imaplib.IMAP4("127.0.0.1", self.ports["imap"], timeout=BOUND)
            imap.login("alice", USERS["alice"])
            imap.select("INBOX")
            pop = poplib.POP3("127.0.0.1", self.ports["pop3"], timeout=BOUND)
            pop.user("bob")
            pop.pass_(USERS["bob"])
            pop.stat()
            return imap, pop

        imap, pop = yield threads.deferToThread(openSessions)
        yield threads.deferToThread(self.killDovecot)

        def afterKill():
            ended = []
            try:
                imap.noop()
            except (imaplib.IMAP4.abort, OSError, EOFError) as e:
                ended.append(("imap", type(e).__name__))
            try:
                pop.stat()
            except (poplib.error_proto, OSError, EOFError) as e:
                ended.append(("pop3", type(e).__name__))
            return ended

        ended = yield threads.deferToThread(afterKill)
        self.assertEqual([p for p, _ in ended], ["imap", "pop3"], ended)
        for protocol in ("imap", "pop3"):
            self.assertTemporary(protocol, (yield self.login(protocol, "alice", USERS["alice"])))


class DirectoryFaultTests(FaultTestMixin, TestCase):
    """
    slapd killed at each step; users only in the directory.
    """

    def setUp(self):
        super().setUp()
        ca = CertificateAuthority.create(os.path.join(self.tmp, "ca"))
        self.slapd = Slapd(
            os.path.join(self.tmp, "slapd"), tls=ca.issue(["127.0.0.1"], "slapd"), caPath=ca.caPath
        )
        self.slapd.start()
        self.addCleanup(self.slapd.stop)
        self.slapd.load(fixtureLDIF(mailHosts={"alice": "mbx", "bob": "mbx", "carol": "mbx"}))
        with open(os.path.join(self.tmp, "service.secret"), "w") as f:
            f.write(SERVICE_PASSWORD + "\n")
        self.caPath = ca.caPath

    def authConfig(self, duringOutage=True) -> str:
        return f"""
[auth]
failure_delay = 0.1
cache_during_outage = {"true" if duringOutage else "false"}

[ldap]
urls = ["{self.slapd.url}"]
ca_file = "{self.caPath}"
bind_dn = "{serviceDN()}"
bind_password_file = "{self.tmp}/service.secret"
base_dn = "ou=people,dc=example,dc=com"
filter = "(&(objectClass=inetOrgPerson)(|(uid={{login}})(mail={{login}})))"
timeout = 3.0
connect_timeout = 2.0
"""

    def killSlapd(self) -> None:
        os.kill(self.slapd.pid, signal.SIGKILL)
        self.slapd.stop()

    @defer.inlineCallbacks
    def test_downBeforeGreeting(self):
        self.startCAS(self.authConfig())
        yield threads.deferToThread(self.killSlapd)
        for protocol in ("imap", "pop3"):
            for password in (USERS["bob"], "wrong"):
                # Right or wrong, the password cannot be checked: never "wrong password".
                self.assertTemporary(protocol, (yield self.login(protocol, "bob", password)))

    @defer.inlineCallbacks
    def test_killedDuringQuery(self):
        """
        slapd stopped (SIGSTOP) while casd's query is on its way, then killed: the login gets
        the temporary failure.
        """
        self.startCAS(self.authConfig())
        for protocol, user in (("imap", "alice"), ("pop3", "bob")):
            cache = self.context.directory.cache
            misses = cache.misses
            os.kill(self.slapd.pid, signal.SIGSTOP)
            d = self.login(protocol, user, USERS[user])
            yield self.waitFor(lambda: cache.misses > misses, "the query sent to the directory")
            yield threads.deferToThread(self.killSlapd)
            self.assertTemporary(protocol, (yield d))
            yield threads.deferToThread(self.slapd.start)

    @defer.inlineCallbacks
    def test_killedMidRelay(self):
        """
        The directory is not needed once a session is relayed: killing slapd changes nothing
        for it.
        """
        self.startCAS(self.authConfig())

        def login():
            c = imaplib.IMAP4("127.0.0.1", self.ports["imap"], timeout=BOUND)
            c.login("alice", USERS["alice"])
            return c

        c = yield threads.deferToThread(login)
        yield threads.deferToThread(self.killSlapd)

        def use():
            typ, _ = c.select("INBOX")
            c.noop()
            c.logout()
            return typ

        self.assertEqual((yield threads.deferToThread(use)), "OK")

    @defer.inlineCallbacks
    def outage(self, duringOutage: bool):
        self.startCAS(self.authConfig(duringOutage))
        self.assertEqual((yield self.login("imap", "alice", USERS["alice"])), ("OK", None))
        yield threads.deferToThread(self.killSlapd)
        # bob is not cached: his login shows the outage.
        self.assertTemporary("imap", (yield self.login("imap", "bob", USERS["bob"])))
        alice = yield self.login("imap", "alice", USERS["alice"])
        yield threads.deferToThread(self.slapd.start)
        self.assertEqual((yield self.login("imap", "bob", USERS["bob"])), ("OK", None))
        return alice

    @defer.inlineCallbacks
    def test_cacheServesDuringOutage(self):
        """
        C{cache_during_outage = true}: alice, cached, keeps working while slapd is down.
        """
        self.assertEqual((yield self.outage(True)), ("OK", None))
        self.assertIn("answered from the cache", self.casLog())

    @defer.inlineCallbacks
    def test_cacheSilentDuringOutage(self):
        """
        C{cache_during_outage = false}: alice gets the temporary failure too.
        """
        self.assertTemporary("imap", (yield self.outage(False)))
        self.assertIn("cache_during_outage = false", self.casLog())


def killGroup(pgid: int, timeout: float = 10.0) -> None:
    """
    SIGKILL process group C{pgid} until none of it is alive (a child forked while the first
    signal was on its way would escape it), bounded by C{timeout}; zombies are left for their
    parent to reap.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        if not _alive(pgid):
            return
        time.sleep(0.02)


def _alive(pgid: int) -> list[int]:
    """
    The processes of group C{pgid} that are not zombies.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found
