"""
Submission with the mailbox server's Postfix failing: stopped before the client's greeting, and
its smtpd killed the moment casd logs in to it.  The client only ever hears temporary errors
(4xx, never 535 nor another 5xx), no message is accepted that Postfix did not store, and the
message the client sends again is stored exactly once.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from casd.auth.hashing import makeHash
from casd.auth.sasl import encodePlain
from tests.integration.test_faults import BackendCommands
from tests.support.casdnode import CASNode
from tests.support.postfix import Postfix
from tests.support.procs import freePort
from tests.integration.test_smtp_postfix import Client, message


class SubmissionFaultTests(TestCase):
    timeout = 90

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.mbx = Postfix(os.path.join(self.tmp, "mbx"), "mbx").start()
        self.addCleanup(self.mbx.cleanUp)
        users = os.path.join(self.tmp, "users")
        with open(users, "w") as f:
            f.write(f"alice:{makeHash('PLAIN', b'alice-pw')}:address=alice@example.com mailhost=mbx\n")
        self.port = freePort()
        config = f"""
[server]
hostname = "cas.example.net"

[auth]
users_file = "{users}"
failure_delay = 0

[backend]
connect_timeout = 2.0
reply_timeout = 5.0
failover_timeout = 10.0
connect_retry_time = 1.0

[health]
enabled = false

[backends.mbx]
host = "127.0.0.1"
protocols = ["submission"]
[backends.mbx.submission]
port = {self.mbx.port}
tls = "none"

[imap]
enabled = false

[submission]
enabled = true
[[submission.listen]]
endpoint = "tcp:{self.port}:interface=127.0.0.1"
trusted = true
"""
        self.recorder = BackendCommands(self)
        self.cas = CASNode(os.path.join(self.tmp, "cas"), config).start(reactor)
        self.addCleanup(self.cas.stop)

    def transaction(self, mid: str, retries: int = 0):
        """
        One session: EHLO, AUTH, then the transaction, tried again after RSET up to C{retries}
        times while it gets a temporary failure.

        @return: every reply code, in order, and whether the message was accepted.
        """
        c = Client(self.port)
        codes = [c.reply()[:3]]
        accepted = False
        try:
            codes.append(c.command(b"EHLO client.example.org")[:3])
            codes.append(c.command(b"AUTH PLAIN " + encodePlain("alice", b"alice-pw"))[:3])
            for attempt in range(retries + 1):
                for line in (b"MAIL FROM:<alice@example.com>", b"RCPT TO:<friend@example.com>", b"DATA"):
                    code = c.command(line)[:3]
                    codes.append(code)
                    if not code.startswith((b"2", b"3")):
                        break
                if code == b"354":
                    c.send(message(mid) + b".\r\n")
                    code = c.reply()[:3]
                    codes.append(code)
                    accepted = code.startswith(b"2")
                if accepted or attempt == retries:
                    break
                codes.append(c.command(b"RSET")[:3])
            c.command(b"QUIT")
        except EOFError:
            codes.append(b"EOF")
        finally:
            c.close()
        return codes, accepted

    def storedIds(self):
        return [m.header("Message-ID") for m in self.mbx.messages()]

    def assertOnlyTemporary(self, codes):
        self.assertFalse([c for c in codes if c.startswith(b"5")], codes)
        self.assertTrue([c for c in codes if c.startswith(b"4")], codes)

    @defer.inlineCallbacks
    def test_downBeforeGreeting(self):
        """
        Postfix stopped: casd still greets, the session ends in a temporary failure, nothing is
        accepted; once Postfix is back the client's new try is stored, once.
        """
        yield threads.deferToThread(self.mbx.stop)
        codes, accepted = yield threads.deferToThread(self.transaction, "down")
        self.assertEqual(codes[0], b"220")
        self.assertNotEqual(codes[2], b"535", codes)  # AUTH: never "wrong password"
        self.assertOnlyTemporary(codes)
        self.assertFalse(accepted)
        self.assertNotIn(b"354", codes)
        yield threads.deferToThread(self.mbx.start)
        codes, accepted = yield threads.deferToThread(self.transaction, "down")
        self.assertTrue(accepted, codes)
        self.assertEqual(self.storedIds(), ["<down@example.org>"])

    @defer.inlineCallbacks
    def test_killedDuringBackendLogin(self):
        """
        The smtpd serving casd killed the moment casd sends it the login (XCLIENT or AUTH): the client
        gets a temporary failure, tries again in the same session (RSET), and the message is
        stored exactly once.
        """
        self.recorder.onSent = ({b"XCLIENT", b"AUTH"}, None, self.mbx.killSMTPD)
        codes, accepted = yield threads.deferToThread(self.transaction, "retried", 3)
        self.assertIsNone(self.recorder.onSent, "casd logged in to Postfix")
        self.assertOnlyTemporary(codes)
        self.assertTrue(accepted, codes)
        self.assertEqual(self.storedIds(), ["<retried@example.org>"])
