"""
IMAP through casd to a real Dovecot, with real clients: imaplib, curl, Twisted's IMAP4Client.
"""

import imaplib
import os
import shutil
import time

from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.mail import imap4
from twisted.trial.unittest import TestCase

from tests.support.casdnode import DovecotFront
from tests.support.certs import CertificateAuthority

BIG = b"".join(b"%07d abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ!\r\n" % i for i in range(14400))


def message(subject: str, body: bytes = b"hello\r\n") -> bytes:
    return (
        b"From: sender@example.org\r\nTo: alice@example.com\r\nSubject: "
        + subject.encode()
        + b"\r\nMessage-ID: <"
        + subject.encode()
        + b"@example.org>\r\n\r\n"
        + body
    )


class DovecotProxyTests(DovecotFront, TestCase):
    timeout = 60

    def setUp(self):
        super().setUp()
        self.dovecot.deliver("alice", message("small"))
        self.dovecot.deliver("alice", message("big", BIG))

    def imapClient(self, tls="starttls"):
        if tls == "implicit":
            c = imaplib.IMAP4_SSL("127.0.0.1", self.tlsPort, ssl_context=self.clientContext(), timeout=10)
        else:
            c = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
            if tls == "starttls":
                c.starttls(self.clientContext())
        return c

    @defer.inlineCallbacks
    def test_imaplibSession(self):
        """
        STARTTLS on the client side, STARTTLS verified towards Dovecot: LOGIN, SELECT, FETCH of a
        1 MiB message byte for byte, APPEND, LOGOUT.
        """
        self.startCAS()

        def session():
            c = self.imapClient()
            typ, data = c.login("alice", "alice-pw")
            assert typ == "OK", data
            caps = c.capability()[1][0].decode().split()
            typ, data = c.select("INBOX")
            exists = int(data[0])
            typ, found = c.search(None, "SUBJECT", "big")
            typ, data = c.fetch(found[0].split()[0], "(BODY.PEEK[])")
            big = data[0][1]
            typ, _ = c.append("INBOX", None, None, message("appended"))
            typ2, data2 = c.select("INBOX")
            c.logout()
            return caps, exists, big, typ, int(data2[0])

        caps, exists, big, appendStatus, after = yield threads.deferToThread(session)
        self.assertIn("IDLE", caps)  # post-login capabilities came from Dovecot
        self.assertGreaterEqual(exists, 2)
        self.assertEqual(big, message("big", BIG))
        self.assertGreater(len(big), 1024 * 1024)
        self.assertEqual(appendStatus, "OK")
        self.assertEqual(after, exists + 1)

    @defer.inlineCallbacks
    def test_idleSeesDelivery(self):
        """
        IDLE through the relay receives a message delivered while idling (implicit TLS client).
        """
        self.startCAS(backendTLS="implicit")

        def session():
            c = self.imapClient("implicit")
            c.login("bob", "bob-pw")
            c.select("INBOX")
            tag = c._new_tag()
            c.send(tag + b" IDLE\r\n")
            first = c.readline()
            assert first.startswith(b"+"), first
            self.dovecot.deliver("bob", message("while-idling"))
            c.sock.settimeout(10)
            seen = c.readline()
            c.send(b"DONE\r\n")
            while True:
                line = c.readline()
                if line.startswith(tag):
                    break
            c.logout()
            return seen, line

        seen, done = yield threads.deferToThread(session)
        self.assertRegex(seen, rb"^\* \d+ EXISTS")
        self.assertIn(b"OK", done)

    @defer.inlineCallbacks
    def test_clientAddressAndSessionReachDovecot(self):
        self.startCAS()

        def session():
            c = self.imapClient()
            c.login("alice", "alice-pw")
            port = c.sock.getsockname()[1]
            c.logout()
            return port

        port = yield threads.deferToThread(session)
        yield task.deferLater(reactor, 0.3, lambda: None)
        log = self.dovecot.logText()
        # Dovecot saw the client's own port, and took casd's session id as its own.
        sent = [l for l in log.splitlines() if "ID sent:" in l and f"x-originating-port={port}," in l]
        self.assertEqual(len(sent), 1, log)
        session = sent[0].split("x-session-id=")[1].split(":")[0]
        self.assertIn(f"Login: user=<alice>, method=PLAIN", log)
        self.assertRegex(log, rf"Login: user=<alice>.*session=<{session}>")

    @defer.inlineCallbacks
    def test_masterUserLogin(self):
        self.startCAS(master=True)

        def session():
            c = self.imapClient()
            typ, _ = c.login("alice", "alice-pw")
            typ2, data = c.select("INBOX")
            c.logout()
            return typ, typ2

        self.assertEqual((yield threads.deferToThread(session)), ("OK", "OK"))
        self.assertIn("master", self.dovecot.logText().lower())

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        self.startCAS()

        def session():
            c = self.imapClient()
            try:
                c.login("alice", "nope")
            except imaplib.IMAP4.error as e:
                c.logout()
                return str(e)
            return "logged in?!"

        self.assertIn("[AUTHENTICATIONFAILED]", (yield threads.deferToThread(session)))

    @defer.inlineCallbacks
    def test_backendDown(self):
        self.startCAS()

        def session():
            c = self.imapClient()
            started = time.monotonic()
            try:
                c.login("carol", "carol-pw")  # routed to a port where nothing listens
            except imaplib.IMAP4.error as e:
                c.logout()
                return str(e), time.monotonic() - started
            return "logged in?!", 0

        text, elapsed = yield threads.deferToThread(session)
        self.assertIn("[UNAVAILABLE]", text)
        self.assertLess(elapsed, 3)

    @defer.inlineCallbacks
    def test_backendCertificateNotTrusted(self):
        other = CertificateAuthority.create(os.path.join(self.tmp, "other-ca"))
        self.startCAS(ca=other.caPath)

        def session():
            c = self.imapClient()
            try:
                c.login("alice", "alice-pw")
            except imaplib.IMAP4.error as e:
                c.logout()
                return str(e)
            return "logged in?!"

        self.assertIn("[UNAVAILABLE]", (yield threads.deferToThread(session)))

    @defer.inlineCallbacks
    def test_curl(self):
        self.startCAS()

        def findUID():
            c = self.imapClient()
            c.login("alice", "alice-pw")
            c.select("INBOX")
            typ, data = c.uid("SEARCH", None, "SUBJECT", "small")
            c.logout()
            return int(data[0].split()[0])

        uid = yield threads.deferToThread(findUID)
        curl = shutil.which("curl")
        self.assertIsNotNone(curl, "curl is not installed: apt-get install curl")
        out, err, code = yield getProcessOutputAndValue(
            curl,
            [
                "-s",
                "--ssl-reqd",
                "--cacert",
                self.ca.caPath,
                "--max-time",
                "20",
                f"imap://127.0.0.1:{self.port}/INBOX;UID={uid}",
                "-u",
                "alice:alice-pw",
            ],
            env=os.environ,
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out.replace(b"\r\n", b"\n"), message("small").replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_twistedIMAP4Client(self):
        self.startCAS(extra="")
        from twisted.internet.ssl import Certificate, optionsForClientTLS
        from twisted.internet.endpoints import SSL4ClientEndpoint

        with open(self.ca.caPath, "rb") as f:
            trust = Certificate.loadPEM(f.read())
        endpoint = SSL4ClientEndpoint(
            reactor, "127.0.0.1", self.tlsPort, optionsForClientTLS("localhost", trustRoot=trust)
        )
        greeted = defer.Deferred()

        class Client(imap4.IMAP4Client):
            def serverGreeting(self, caps):
                greeted.callback(self)

        client = yield endpoint.connect(protocol.Factory.forProtocol(Client))
        yield greeted
        yield client.login(b"alice", b"alice-pw")
        info = yield client.select("INBOX")
        self.assertGreaterEqual(info["EXISTS"], 2)
        yield client.logout()

    @defer.inlineCallbacks
    def test_backendStopped(self):
        """
        Dovecot dies mid-session: the client is closed promptly; new logins get [UNAVAILABLE].
        """
        self.startCAS()

        def session():
            c = self.imapClient()
            c.login("alice", "alice-pw")
            c.select("INBOX")
            self.dovecot.stop()
            started = time.monotonic()
            c.sock.settimeout(10)
            try:
                c.noop()
                outcome = "answered?!"
            except (imaplib.IMAP4.abort, OSError) as e:
                outcome = type(e).__name__
            closedAfter = time.monotonic() - started
            c2 = self.imapClient()
            try:
                c2.login("alice", "alice-pw")
                text = "logged in?!"
            except imaplib.IMAP4.error as e:
                text = str(e)
            c2.logout()
            return outcome, closedAfter, text

        outcome, closedAfter, text = yield threads.deferToThread(session)
        self.assertIn(outcome, ("abort", "ConnectionResetError", "BrokenPipeError"))
        self.assertLess(closedAfter, 5)
        self.assertIn("[UNAVAILABLE]", text)
