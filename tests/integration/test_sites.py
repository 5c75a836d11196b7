"""
Two casd nodes configured as two sites, over real sockets: a user of the other site is proxied to
that site's casd (CAS-to-CAS), loops between misconfigured nodes end on the proxy TTL, and a
route back at the node itself is refused at once.
"""

import imaplib
import os
import time

from twisted.internet import defer, reactor, task, threads
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

from casd.auth.hashing import makeHash
from tests.support.casdnode import CASNode
from tests.support.dovecot import Dovecot
from tests.support.procs import freePort

PASSWORD = "pw-2"


def message(subject: str) -> bytes:
    return b"From: a@example.org\r\nTo: b@example.com\r\nSubject: " + subject.encode() + b"\r\n\r\nhi\r\n"


def close(c) -> None:
    try:
        c.shutdown()
    except OSError:
        pass


def firstSubject(port: int, user: str) -> str:
    c = imaplib.IMAP4("127.0.0.1", port, timeout=10)
    try:
        c.login(user, PASSWORD)
        c.select("INBOX", readonly=True)
        typ, data = c.fetch(b"1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        c.logout()
    finally:
        close(c)
    return data[0][1].decode().strip().split(": ", 1)[1]


def loginError(port: int, user: str):
    c = imaplib.IMAP4("127.0.0.1", port, timeout=20)
    started = time.monotonic()
    try:
        c.login(user, PASSWORD)
    except imaplib.IMAP4.error as e:
        return str(e), time.monotonic() - started
    finally:
        close(c)
    return "logged in?!", time.monotonic() - started


def nodeConfig(site, usersPath, port, mailboxPort, otherSite, otherPort):
    return f"""
[server]
hostname = "cas-{site}.test"
site = "{site}"
# The other site's casd is a trusted client: its x-proxy-ttl and client address count.
trusted_networks = ["127.0.0.0/8"]

[auth]
users_file = "{usersPath}"
failure_delay = 0.1

[routing]
default_backend = "mbx-{site}"

[backend]
connect_timeout = 2.0
reply_timeout = 5.0

[backends.mbx-{site}]
host = "127.0.0.1"
site = "{site}"
[backends.mbx-{site}.imap]
port = {mailboxPort}
tls = "none"

[backends.cas-{otherSite}]
host = "127.0.0.1"
site = "{otherSite}"
[backends.cas-{otherSite}.imap]
port = {otherPort}
tls = "none"

[sites.{otherSite}]
cas = "cas-{otherSite}"

[imap]
[[imap.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
"""


class TwoSiteTests(TestCase):
    timeout = 60

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.eastPort, self.westPort = freePort(), freePort()
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def users(self, name, lines):
        path = os.path.join(self.tmp, name)
        hashed = makeHash("SHA512-CRYPT", PASSWORD.encode())
        with open(path, "w") as f:
            for login, attributes in lines:
                f.write(f"{login}:{hashed}:{attributes}\n")
        return path

    def startNode(self, site, usersPath, mailboxPort):
        port, otherPort = (self.eastPort, self.westPort) if site == "east" else (self.westPort, self.eastPort)
        other = "west" if site == "east" else "east"
        config = nodeConfig(site, usersPath, port, mailboxPort, other, otherPort)
        node = CASNode(os.path.join(self.tmp, site), config).start(reactor)
        self.addCleanup(node.stop)
        return node

    def startMailboxes(self):
        self.mailboxes = {}
        for site, users in (("east", ("eve",)), ("west", ("wendy",))):
            d = Dovecot(os.path.join(self.tmp, f"dovecot-{site}"), {u: PASSWORD for u in users})
            d.start()
            self.addCleanup(d.stop)
            for user in users:
                d.deliver(user, message(f"{user} in {site}"))
            self.mailboxes[site] = d

    @defer.inlineCallbacks
    def sessionsOf(self, user, count):
        """
        The session log lines of C{user}, once there are C{count} (the inner hop ends a moment
        after the outer one).
        """
        for _ in range(100):
            found = [e for e in self.events if e.get("log_namespace") == "casd.session" and e.get("user") == user]
            if len(found) >= count:
                return found
            yield task.deferLater(reactor, 0.02, lambda: None)
        return found

    def warnings(self, text):
        return [
            e for e in self.events
            if e.get("log_level") == LogLevel.warn and text in str(e.get("reason", ""))
        ]

    @defer.inlineCallbacks
    def test_casToCas(self):
        """
        Wendy's mailbox is in the west: logging in at the east node works, through the west
        casd (the east node knows no west mailbox server), which saw the session.
        """
        self.startMailboxes()
        shared = self.users("users", [("eve", "site=east"), ("wendy", "site=west")])
        self.startNode("east", shared, self.mailboxes["east"].imapPort)
        west = self.startNode("west", shared, self.mailboxes["west"].imapPort)
        self.assertEqual((yield threads.deferToThread(firstSubject, self.eastPort, "wendy")), "wendy in west")
        self.assertEqual((yield threads.deferToThread(firstSubject, self.eastPort, "eve")), "eve in east")
        self.assertEqual((yield threads.deferToThread(firstSubject, self.westPort, "eve")), "eve in east")

        wendy = yield self.sessionsOf("wendy", 2)
        east = next(e for e in wendy if str(self.eastPort) in e["listener"])
        west = next(e for e in wendy if str(self.westPort) in e["listener"])
        self.assertEqual(east["backend"], f"cas-west(127.0.0.1:{self.westPort})")
        self.assertEqual(west["backend"], f"mbx-west(127.0.0.1:{self.mailboxes['west'].imapPort})")
        self.assertTrue(east["result"].startswith("proxy"))

    @defer.inlineCallbacks
    def test_loopEndsOnTTL(self):
        """
        Each node believes the user lives at the other: the session goes back and forth, the
        proxy TTL (x-proxy-ttl in IMAP ID) counts the hops, and the node where it is spent
        refuses: the client hears NO [UNAVAILABLE] promptly.
        """
        eastUsers = self.users("east-users", [("loopy", "site=west")])
        westUsers = self.users("west-users", [("loopy", "site=east")])
        self.startNode("east", eastUsers, freePort())
        self.startNode("west", westUsers, freePort())
        text, elapsed = yield threads.deferToThread(loginError, self.eastPort, "loopy")
        self.assertIn("[UNAVAILABLE]", text)
        self.assertLess(elapsed, 5.0)
        self.assertEqual(len(self.warnings("proxy TTL 1 reached")), 1)
        # east (5) -> west (4) -> east (3) -> west (2) -> east (1): refused there.
        hops = yield self.sessionsOf("loopy", 5)
        self.assertEqual(len(hops), 5)
        self.assertEqual({e["result"] for e in hops}, {"BackendUnavailable"})

    @defer.inlineCallbacks
    def test_routeToItself(self):
        """
        The west site's casd configured at this node's own address: refused at once, with no
        connection to itself.
        """
        users = self.users("users", [("wendy", "site=west")])
        self.westPort = self.eastPort  # the east node's [sites.west] points at the east node
        self.startNode("east", users, freePort())
        text, elapsed = yield threads.deferToThread(loginError, self.eastPort, "wendy")
        self.assertIn("[UNAVAILABLE]", text)
        self.assertLess(elapsed, 1.0)
        self.assertEqual(len(self.warnings("points back at this node")), 1)
