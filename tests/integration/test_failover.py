"""
The backend pool over real sockets: two real Dovecot instances as one group, a member stopped
and started again, a blackholed backend, a drain by reload.
"""

import imaplib
import os
import signal
import socket
import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial.unittest import TestCase

from casd.auth.hashing import makeHash
from casd.routing.router import rendezvousOrder
from tests.support.casdnode import CASNode
from tests.support.dovecot import Dovecot
from tests.support.procs import freePort

PASSWORD = "pw-1"
HASHED = [f"user{i}" for i in range(8)]


def marker(name: str) -> bytes:
    return (
        b"From: a@example.org\r\nTo: b@example.com\r\nSubject: on-"
        + name.encode()
        + b"\r\n\r\nhello\r\n"
    )


def close(c) -> None:
    try:
        c.shutdown()
    except OSError:
        pass  # logout closed it already


def backendOf(port: int, user: str) -> str:
    """
    Log in through casd and say which Dovecot holds the session (each holds one marker).
    """
    c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:
        c.login(user, PASSWORD)
        c.select("INBOX", readonly=True)
        typ, data = c.fetch(b"1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        c.logout()
    finally:
        close(c)
    return data[0][1].decode().strip().split("on-")[1]


def loginError(port: int, user: str):
    """
    @return: the error of a login that fails, and how long it took.
    """
    c = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    started = time.monotonic()
    try:
        c.login(user, PASSWORD)
    except imaplib.IMAP4.error as e:
        return str(e), time.monotonic() - started
    finally:
        close(c)
    return "logged in?!", time.monotonic() - started


class GroupTests(TestCase):
    timeout = 60

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        users = {u: PASSWORD for u in ["alice"] + HASHED}
        self.dovecots = {}
        for name in ("d1", "d2"):
            d = Dovecot(os.path.join(self.tmp, name), users, protocols=("imap",))
            d.start()
            self.addCleanup(d.stop)
            for user in users:
                d.deliver(user, marker(name))
            self.dovecots[name] = d
        self.usersPath = os.path.join(self.tmp, "users")
        with open(self.usersPath, "w") as f:
            f.write(f"alice:{makeHash('SHA512-CRYPT', PASSWORD.encode())}:mailhost=dag\n")
            for user in HASHED:
                f.write(f"{user}:{makeHash('SHA512-CRYPT', PASSWORD.encode())}\n")

    def configText(self, extra="", d1Extra="", backend=""):
        return f"""
[server]
hostname = "cas.test"
trusted_networks = ["127.0.0.0/8"]

[auth]
users_file = "{self.usersPath}"
failure_delay = 0.1

[routing]
hash_group = "pool"

[backend]
connect_timeout = 1.0
banner_timeout = 1.0
reply_timeout = 5.0
failover_timeout = 5.0
{backend}

[health]
interval = 0.1
timeout = 0.5
rise = 1
fall = 1
passive_fall = 1

[backends.d1]
host = "127.0.0.1"
{d1Extra}
[backends.d1.imap]
port = {self.dovecots['d1'].imapPort}
tls = "none"

[backends.d2]
host = "127.0.0.1"
[backends.d2.imap]
port = {self.dovecots['d2'].imapPort}
tls = "none"

[groups.dag]
members = ["d1", "d2"]

[groups.pool]
members = ["d1", "d2"]
balance = "hash"

[imap]
[[imap.listen]]
endpoint = "tcp:{self.port}:interface=127.0.0.1"
{extra}
"""

    def startCAS(self, **kw):
        self.port = freePort()
        self.cas = CASNode(os.path.join(self.tmp, "cas"), self.configText(**kw)).start(reactor)
        self.addCleanup(self.cas.stop)
        self.connector = next(self.cas.factories()).context.connector

    def member(self, name):
        port = self.dovecots[name].imapPort
        return self.connector.members.get(("127.0.0.1", port))

    @defer.inlineCallbacks
    def waitFor(self, condition, timeout=5.0):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail("condition not met in time")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def test_sessionsKeepWorkingWhenMemberStops(self):
        """
        A session on the stopped member is closed promptly; new sessions go to the other member.
        """
        self.startCAS()
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, "alice")), "d1")

        c = yield threads.deferToThread(imaplib.IMAP4, "127.0.0.1", self.port, timeout=10)
        self.addCleanup(close, c)
        yield threads.deferToThread(c.login, "alice", PASSWORD)
        yield threads.deferToThread(c.select, "INBOX")
        yield threads.deferToThread(self.dovecots["d1"].stop)

        def deadSession():
            started = time.monotonic()
            try:
                while time.monotonic() - started < 5:
                    c.noop()
                    time.sleep(0.05)
            except (imaplib.IMAP4.abort, OSError) as e:
                return str(e), time.monotonic() - started
            return "still open", 5.0

        why, elapsed = yield threads.deferToThread(deadSession)
        self.assertLess(elapsed, 2.0, why)
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, "alice")), "d2")
        yield self.waitFor(lambda: not self.member("d1").up)

    @defer.inlineCallbacks
    def test_hashedUserFailsOverAndComesBack(self):
        self.startCAS()
        user = next(u for u in HASHED if rendezvousOrder(u, [("d1", 1), ("d2", 1)])[0] == "d1")
        other = next(u for u in HASHED if rendezvousOrder(u, [("d1", 1), ("d2", 1)])[0] == "d2")
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, user)), "d1")
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, other)), "d2")

        yield threads.deferToThread(self.dovecots["d1"].stop)
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, user)), "d2")
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, other)), "d2")
        self.assertFalse(self.member("d1").up)

        yield threads.deferToThread(self.dovecots["d1"].start)
        yield self.waitFor(lambda: self.member("d1").up)
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, user)), "d1")
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, other)), "d2")

    @defer.inlineCallbacks
    def test_drainByReload(self):
        """
        C{drain = true} and a reload: new sessions avoid the member, its open sessions are
        closed over C{drain_close_period}; undrained, it takes sessions again.
        """
        self.startCAS()
        c = yield threads.deferToThread(imaplib.IMAP4, "127.0.0.1", self.port, timeout=10)
        self.addCleanup(close, c)
        yield threads.deferToThread(c.login, "alice", PASSWORD)
        with open(self.cas.path, "w") as f:
            f.write(self.configText(d1Extra="drain = true", backend="drain_close_period = 0.5"))
        reload = self.cas.service.getServiceNamed("reload")
        # A real SIGHUP, once it is certain the node handles it (else it would end the tests).
        self.assertEqual(signal.getsignal(signal.SIGHUP), reload._onSignal)
        os.kill(os.getpid(), signal.SIGHUP)
        yield self.waitFor(lambda: self.connector.draining == {"d1"})
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, "alice")), "d2")

        def closed():
            started = time.monotonic()
            try:
                while time.monotonic() - started < 5:
                    c.noop()
                    time.sleep(0.05)
            except (imaplib.IMAP4.abort, OSError):
                return time.monotonic() - started
            return 5.0

        self.assertLess((yield threads.deferToThread(closed)), 2.0)
        with open(self.cas.path, "w") as f:
            f.write(self.configText())
        self.assertTrue(reload.reload())
        self.assertEqual((yield threads.deferToThread(backendOf, self.port, "alice")), "d1")


class BlackholeTests(TestCase):
    timeout = 30

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        # Listening sockets that never accept: the kernel completes the handshake, nobody speaks.
        self.holes = []
        for _ in range(2):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            self.addCleanup(s.close)
            self.holes.append(s.getsockname()[1])
        users = os.path.join(self.tmp, "users")
        with open(users, "w") as f:
            f.write(f"carol:{makeHash('SHA512-CRYPT', PASSWORD.encode())}:mailhost=holes\n")
        self.port = freePort()
        config = f"""
[server]
trusted_networks = ["127.0.0.0/8"]
[auth]
users_file = "{users}"
[backend]
connect_timeout = 1.0
banner_timeout = 1.0
failover_timeout = 1.5
[health]
passive_fall = 1
[backends.h1]
host = "127.0.0.1"
health_check = false
[backends.h1.imap]
port = {self.holes[0]}
tls = "none"
[backends.h2]
host = "127.0.0.1"
health_check = false
[backends.h2.imap]
port = {self.holes[1]}
tls = "none"
[groups.holes]
members = ["h1", "h2"]
[imap]
[[imap.listen]]
endpoint = "tcp:{self.port}:interface=127.0.0.1"
"""
        self.cas = CASNode(os.path.join(self.tmp, "cas"), config).start(reactor)
        self.addCleanup(self.cas.stop)

    @defer.inlineCallbacks
    def test_unavailableWithinTheConfiguredTime(self):
        """
        The first member's greeting never comes (1 s), the second gets what is left of the
        session's 1.5 s: the client hears NO [UNAVAILABLE] then, never a hang.  Both members
        are now DOWN: the next client hears it at once.
        """
        text, elapsed = yield threads.deferToThread(loginError, self.port, "carol")
        self.assertIn("[UNAVAILABLE]", text)
        self.assertGreater(elapsed, 1.3)
        self.assertLess(elapsed, 2.5)
        text, elapsed = yield threads.deferToThread(loginError, self.port, "carol")
        self.assertIn("[UNAVAILABLE]", text)
        self.assertLess(elapsed, 0.5)
