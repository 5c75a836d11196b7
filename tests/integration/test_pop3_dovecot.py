"""
POP3 through casd to a real Dovecot (C{dovecot-pop3d}), with real clients: poplib and curl.
"""

import os
import poplib
import shutil
import socket

from twisted.internet import defer, reactor, task, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from tests.support.casdnode import DovecotFront

# Over 1 MiB, with lines that start with "." so that dot-stuffing is exercised end to end.
BIG = b"".join(
    (b"." if i % 1000 == 0 else b"") + b"%07d abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ!\r\n" % i
    for i in range(14400)
)
#: A second loopback address: the client connects from it, so casd (on 127.0.0.1) and the client
#: have different addresses in Dovecot's log.
CLIENT_ADDRESS = "127.0.0.2"


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return (
        b"From: sender@example.org\r\nTo: alice@example.com\r\nSubject: "
        + subject.encode()
        + b"\r\nMessage-ID: <"
        + subject.encode()
        + b"@example.org>\r\n\r\n"
        + body
    )


class _FromClientAddress:
    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(CLIENT_ADDRESS, 0)
        )


class POP3FromClientAddress(_FromClientAddress, poplib.POP3):
    pass


class DovecotPOP3Tests(DovecotFront, TestCase):
    timeout = 60
    protocol = dovecotProtocol = "pop3"

    def setUp(self):
        super().setUp()
        self.dovecot.deliver("alice", message("small"))
        self.dovecot.deliver("alice", message("big", BIG))

    def pop3Client(self, tls="starttls"):
        if tls == "implicit":
            return poplib.POP3_SSL("127.0.0.1", self.tlsPort, context=self.clientContext(), timeout=10)
        c = POP3FromClientAddress("127.0.0.1", self.port, timeout=10)
        c.stls(self.clientContext())
        return c

    def refusedLogin(self, user: str, password: str):
        """
        Log in as C{user} with C{password} in a thread, expecting a refusal.

        @return: a L{defer.Deferred} firing with the reply to C{PASS}.
        """

        def session():
            c = self.pop3Client()
            c.user(user)
            try:
                c.pass_(password)
            except poplib.error_proto as e:
                c.quit()
                return e.args[0]
            return b"logged in?!"

        return threads.deferToThread(session)

    def sessions(self):
        """
        Collect casd's end-of-session log events.
        """
        events = []

        def observe(event):
            if event.get("log_namespace") == "casd.session":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return events

    @defer.inlineCallbacks
    def test_poplibSession(self):
        """
        STLS on both sides: STAT, RETR of a 1 MiB message byte for byte, DELE, QUIT; the
        deletion holds in the next session.
        """
        self.startCAS()

        def session():
            c = self.pop3Client()
            caps = c.capa()
            c.user("alice")
            c.pass_("alice-pw")
            count, size = c.stat()
            sizes = [int(entry.split()[1]) for entry in c.list()[1]]
            big = sizes.index(max(sizes)) + 1
            _, lines, octets = c.retr(big)
            deleted = c.dele(1)
            c.quit()
            c = self.pop3Client()
            c.user("alice")
            c.pass_("alice-pw")
            after = c.stat()
            c.quit()
            return caps, count, b"\r\n".join(lines) + b"\r\n", deleted, after

        caps, count, big, deleted, after = yield threads.deferToThread(session)
        self.assertIn("USER", caps)
        self.assertEqual(count, 2)
        self.assertGreater(len(big), 1024 * 1024)
        self.assertEqual(big, message("big", BIG))
        self.assertTrue(deleted.startswith(b"+OK"))
        self.assertEqual(after[0], 1)

    @defer.inlineCallbacks
    def test_implicitTLSBothWays(self):
        """
        POP3S from the client, implicit TLS (Dovecot's pop3s port) towards the backend.
        """
        self.startCAS(backendTLS="implicit")

        def session():
            c = self.pop3Client("implicit")
            c.user("bob")
            c.pass_("bob-pw")
            stat = c.stat()
            c.quit()
            return stat

        self.assertEqual((yield threads.deferToThread(session)), (0, 0))

    @defer.inlineCallbacks
    def test_clientAddressForwarded(self):
        """
        Dovecot logs the client's own address (XCLIENT) and casd's session id.
        """
        self.startCAS()
        events = self.sessions()

        def session():
            c = self.pop3Client()
            c.user("alice")
            c.pass_("alice-pw")
            c.stat()
            c.quit()

        yield threads.deferToThread(session)
        for _ in range(50):
            if events and "Login: user=<alice>" in self.dovecot.logText():
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(events), 1, events)
        self.assertEqual(events[0]["client"].split(":")[0], CLIENT_ADDRESS)
        logins = [l for l in self.dovecot.logText().splitlines() if "Login: user=<alice>" in l]
        self.assertEqual(len(logins), 1, self.dovecot.logText())
        self.assertIn(f"rip={CLIENT_ADDRESS},", logins[0])
        self.assertIn("real_rip=127.0.0.1,", logins[0])
        self.assertIn(f"session=<{events[0]['session']}>", logins[0])

    @defer.inlineCallbacks
    def test_masterUser(self):
        self.startCAS(master=True)

        def session():
            c = self.pop3Client()
            c.user("alice")
            c.pass_("alice-pw")
            stat = c.stat()
            c.quit()
            return stat

        self.assertEqual((yield threads.deferToThread(session))[0], 2)
        log = self.dovecot.logText()
        self.assertRegex(log, r"Login: user=<alice>, method=PLAIN")
        self.assertIn("Master user logging in as alice", log)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        self.startCAS()
        reply = yield self.refusedLogin("alice", "nope")
        self.assertEqual(reply, b"-ERR [AUTH] Authentication failed.")

    @defer.inlineCallbacks
    def test_backendRefusesPipelinedLogin(self):
        """
        Dovecot offers XCLIENT, so casd sends XCLIENT, USER and PASS in one write: a user casd
        accepts but Dovecot does not know is refused with the authentication failure, the
        password in no log line of casd.
        """
        from casd.auth.hashing import makeHash

        with open(self.usersPath, "a") as f:
            f.write(f"dave:{makeHash('SHA512-CRYPT', b'dave-pw')}\n")
        self.startCAS()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        reply = yield self.refusedLogin("dave", "dave-pw")
        self.assertEqual(reply, b"-ERR [AUTH] Authentication failed.")
        # Dovecot took the pipelined XCLIENT before the login: the client's own address.
        expected = f"passwd-file(dave,{CLIENT_ADDRESS},"
        for _ in range(50):
            if expected in self.dovecot.logText():
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertIn(expected, self.dovecot.logText())
        for event in events:
            self.assertNotIn("dave-pw", formatEvent(event))

    @defer.inlineCallbacks
    def test_backendDown(self):
        self.startCAS()
        # carol is routed to a port where nothing listens.
        reply = yield self.refusedLogin("carol", "carol-pw")
        self.assertTrue(reply.startswith(b"-ERR [SYS/TEMP]"), reply)

    @defer.inlineCallbacks
    def test_curl(self):
        """
        curl over STLS (pop3:// with --ssl-reqd) and over implicit TLS (pop3s://).
        """
        self.startCAS()

        def findSmall():
            # Dovecot numbers messages in its own order: find the small one by its size.
            c = self.pop3Client()
            c.user("alice")
            c.pass_("alice-pw")
            sizes = [int(entry.split()[1]) for entry in c.list()[1]]
            c.quit()
            return sizes.index(min(sizes)) + 1

        small = yield threads.deferToThread(findSmall)
        curl = shutil.which("curl")
        self.assertIsNotNone(curl, "curl is not installed: apt-get install curl")
        for url in (f"pop3://127.0.0.1:{self.port}/{small}", f"pop3s://127.0.0.1:{self.tlsPort}/{small}"):
            out, err, code = yield getProcessOutputAndValue(
                curl,
                ["-s", "--ssl-reqd", "--cacert", self.ca.caPath, "--max-time", "20", url, "-u", "alice:alice-pw"],
                env=os.environ,
            )
            self.assertEqual(code, 0, (url, err))
            self.assertEqual(out, message("small"))
