# -*- test-case-name: tests.integration.test_smtp_postfix -*-
"""
SMTP (port 25, L{protocols.smtpmx}) and submission (L{protocols.submission}) through casd to two
real Postfix instances standing for two mailbox servers' SMTP services, with real clients
(Python's smtplib and swaks) and a raw one.  What each Postfix really received is read from its
queue: every accepted message stays there on hold.
"""

import os
import shutil
import smtplib
import socket
import ssl
import time
from base64 import b64encode

from twisted.internet import reactor, threads
from twisted.internet.task import deferLater
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from casd.auth.hashing import makeHash
from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.postfix import Postfix
from tests.support.procs import freePort

#: The client's own address: casd talks to Postfix from 127.0.0.1, so XCLIENT shows.
CLIENT = "127.0.0.2"
HELO = "client.example.org"


def message(mid: str, body: str = "hello\r\n.a line with a leading dot\r\n") -> bytes:
    return (
        f"From: s@example.org\r\nTo: alice@example.com\r\nSubject: {mid}\r\nMessage-ID: <{mid}@example.org>\r\n"
        f"\r\n{body}"
    ).encode()


class Client:
    """
    A raw SMTP client, for what smtplib will not do (bare line endings, dying backends).
    """

    def __init__(self, port):
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=10, source_address=(CLIENT, 0)
        )
        self.file = self.sock.makefile("rb")

    def reply(self) -> bytes:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("connection closed")
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self):
        self.file.close()
        self.sock.close()


class PostfixCase(TestCase):
    """
    casd in front of mbx1 (STARTTLS, XCLIENT) and mbx2 (XFORWARD only).

    @cvar failoverTimeout: C{[backend] failover_timeout}, when not casd's default.
    @cvar healthInterval: C{[health] interval}, when not casd's default.
    """

    timeout = 60
    failoverTimeout = None
    healthInterval = None

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ca = CertificateAuthority.create(os.path.join(self.tmp, "ca"))
        # mbx1 offers STARTTLS and XCLIENT; mbx2 neither, only XFORWARD.
        self.mbx1 = Postfix(
            os.path.join(self.tmp, "mbx1"), "mbx1", tls=self.ca.issue(["127.0.0.1"], "mbx1")
        ).start()
        self.addCleanup(self.mbx1.cleanUp)
        self.mbx2 = Postfix(os.path.join(self.tmp, "mbx2"), "mbx2", xclient=False).start()
        self.addCleanup(self.mbx2.cleanUp)
        users = os.path.join(self.tmp, "users")
        with open(users, "w") as f:
            for name, host in (("alice", "mbx1"), ("carol", "mbx1"), ("bob", "mbx2")):
                f.write(
                    f"{name}:{makeHash('PLAIN', name.encode() + b'-pw')}:address={name}@example.com mailhost={host}\n"
                )
        cert, key = self.ca.issue(["localhost", "127.0.0.1"], "front")
        self.port = freePort()
        self.submissionPort = freePort()
        failover = (
            f"failover_timeout = {self.failoverTimeout}" if self.failoverTimeout else ""
        )
        health = f"[health]\ninterval = {self.healthInterval}\n" if self.healthInterval else ""
        config = f"""
[server]
hostname = "cas.example.net"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
users_file = "{users}"
failure_delay = 0

[backend]
ca_file = "{self.ca.caPath}"
connect_timeout = 2.0
reply_timeout = 5.0
{failover}

[backends.mbx1]
host = "127.0.0.1"
[backends.mbx1.smtp]
port = {self.mbx1.port}
tls = "starttls"
[backends.mbx1.submission]
port = {self.mbx1.port}
tls = "starttls"

[backends.mbx2]
host = "127.0.0.1"
[backends.mbx2.smtp]
port = {self.mbx2.port}
tls = "none"

{health}
[imap]
enabled = false

[smtp]
enabled = true
accepted_domains = ["example.com"]
message_size_limit = 5000000
data_timeout = 10.0
[[smtp.listen]]
endpoint = "tcp:{self.port}:interface=127.0.0.1"

[submission]
enabled = true
[[submission.listen]]
endpoint = "tcp:{self.submissionPort}:interface=127.0.0.1"
"""
        self.cas = CASNode(os.path.join(self.tmp, "cas"), config).start(reactor)
        self.addCleanup(self.cas.stop)

    def inThread(self, f, *args):
        return threads.deferToThread(f, *args)

    def smtp(self):
        client = smtplib.SMTP(
            "127.0.0.1", self.port, local_hostname=HELO, timeout=10, source_address=(CLIENT, 0)
        )
        return client

    def messageIds(self, postfix):
        return [m.header("Message-ID") for m in postfix.messages()]


class PostfixTests(PostfixCase):

    @inlineCallbacks
    def test_routingByRecipientWithSmtplib(self):
        """
        One transaction for alice, bob and carol: bob's mailbox server is another, so he gets
        452 and smtplib's retry brings him to mbx2; alice and carol arrive at mbx1, once; each
        Postfix sees the real client, through XCLIENT (mbx1) and XFORWARD (mbx2).
        """

        def session():
            c = self.smtp()
            refused = c.sendmail(
                "s@example.org",
                ["alice@example.com", "bob@example.com", "carol@example.com"],
                message("split"),
            )
            again = c.sendmail("s@example.org", list(refused), message("split"))
            c.quit()
            return refused, again

        refused, again = yield self.inThread(session)
        self.assertEqual(list(refused), ["bob@example.com"])
        code, text = refused["bob@example.com"]
        self.assertEqual(code, 452)
        self.assertTrue(text.startswith(b"4.5.3 "), text)
        self.assertEqual(again, {})

        [first] = self.mbx1.messages()
        self.assertEqual(first.recipients, ("alice@example.com", "carol@example.com"))
        self.assertEqual(first.sender, "s@example.org")
        self.assertEqual(first.header("Message-ID"), "<split@example.org>")
        self.assertEqual(first.body, ("hello", ".a line with a leading dot"))
        self.assertEqual(first.attributes["client_address"], CLIENT)
        self.assertEqual(first.attributes["helo_name"], HELO)
        self.assertEqual(first.attributes["protocol_name"], "ESMTP")
        self.assertIn("with ESMTPS", "\n".join(first.lines[:3]))  # casd to mbx1: STARTTLS

        [second] = self.mbx2.messages()
        self.assertEqual(second.recipients, ("bob@example.com",))
        self.assertEqual(second.header("Message-ID"), "<split@example.org>")
        # XFORWARD: Postfix logs the real client, while the connection came from casd.
        self.assertEqual(second.attributes["log_client_address"], CLIENT)
        self.assertEqual(second.attributes["log_helo_name"], HELO)

    @inlineCallbacks
    def test_swaks(self):
        """
        swaks with STARTTLS and pipelining delivers one message; the refused recipients (an
        unknown user, another domain) store nothing anywhere.
        """
        swaks = shutil.which("swaks")
        self.assertIsNotNone(swaks, "swaks is not installed: apt-get install swaks")
        base = [
            "--server",
            f"127.0.0.1:{self.port}",
            "--local-interface",
            CLIENT,
            "--helo",
            HELO,
            "--from",
            "s@example.org",
            "--timeout",
            "10",
            "--tls",
            "--pipeline",
        ]
        out, err, code = yield getProcessOutputAndValue(
            swaks,
            base
            + [
                "--to",
                "carol@example.com",
                "--header",
                "Message-Id: <swaks-1@example.org>",
                "--body",
                "first line\n.dot line\n",
            ],
            env=os.environ,
        )
        self.assertEqual(code, 0, out + err)
        self.assertIn(b"<~  250 2.0.0 Ok: queued as", out)
        for rcpt, expected in (
            ("nobody@example.com", b"550 5.1.1"),
            ("someone@elsewhere.example", b"554 5.7.1"),
        ):
            out, err, code = yield getProcessOutputAndValue(
                swaks, base + ["--to", rcpt], env=os.environ
            )
            self.assertNotEqual(code, 0)
            self.assertIn(expected, out)
        [stored] = self.mbx1.messages()
        self.assertEqual(stored.header("Message-ID"), "<swaks-1@example.org>")
        self.assertEqual(stored.recipients, ("carol@example.com",))
        self.assertIn(".dot line", stored.body)
        self.assertEqual(self.mbx2.messages(), [])

    def killedMidData(self, secondBody: bytes):
        """
        A session whose first message's backend smtpd is killed in the middle of its DATA,
        then a second message with C{secondBody}; every reply is kept.
        """
        c = Client(self.port)
        replies = [c.reply(), c.command(b"EHLO " + HELO.encode())]
        replies += [
            c.command(b"MAIL FROM:<s@example.org>"),
            c.command(b"RCPT TO:<alice@example.com>"),
            c.command(b"DATA"),
        ]
        c.send(message("killed", "part one\r\n"))
        killed = self.mbx1.killSMTPD()
        c.send(b"part two\r\n.\r\n")
        replies.append(c.reply())
        replies += [
            c.command(b"MAIL FROM:<s@example.org>"),
            c.command(b"RCPT TO:<alice@example.com>"),
            c.command(b"DATA"),
        ]
        if replies[-1].startswith(b"354"):
            c.send(secondBody + b".\r\n")
            replies.append(c.reply())
        replies.append(c.command(b"QUIT"))
        c.close()
        return killed, [r[:3] for r in replies], replies

    @inlineCallbacks
    def test_backendKilledAfter354(self):
        """
        The mailbox server's smtpd dies in the middle of DATA: the client gets 451, nothing is
        stored; the next message of the same session reaches a new smtpd, which itself answers
        354 before any of its body is sent, and is stored once.
        """
        killed, codes, replies = yield self.inThread(self.killedMidData, message("after"))
        self.assertGreaterEqual(killed, 1)
        self.assertEqual(
            codes,
            [b"220", b"250", b"250", b"250", b"354", b"451", b"250", b"250", b"354", b"250", b"221"],
            replies,
        )
        self.assertTrue(replies[5].startswith(b"451 4.4.2 "), replies[5])
        self.assertTrue(replies[9].startswith(b"250 2.0.0 Ok: queued as"), replies[9])
        self.assertEqual(self.messageIds(self.mbx1), ["<after@example.org>"])

    @inlineCallbacks
    def test_bodyNeverCommandsAfterBackendKilled(self):
        """
        The same race, with a second message whose body carries SMTP commands: they stay its
        body (stored as text, once), and none is executed, by casd or by Postfix: no message
        from the forged sender, none for carol.
        """
        body = message(
            "carrier",
            "MAIL FROM:<forged@example.org>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n"
            "forged body\r\n",
        )
        killed, codes, replies = yield self.inThread(self.killedMidData, body)
        self.assertGreaterEqual(killed, 1)
        self.assertEqual(
            codes,
            [b"220", b"250", b"250", b"250", b"354", b"451", b"250", b"250", b"354", b"250", b"221"],
            replies,
        )
        [stored] = self.mbx1.messages()
        self.assertEqual(stored.header("Message-ID"), "<carrier@example.org>")
        self.assertEqual(stored.sender, "s@example.org")
        self.assertEqual(stored.recipients, ("alice@example.com",))
        self.assertIn("RCPT TO:<carol@example.com>", stored.body)
        self.assertEqual(self.mbx2.messages(), [])

    @inlineCallbacks
    def test_smuggling(self):
        """
        A second message hidden behind a bare-LF "end of data" is content of the first: Postfix
        stores one message, and no message from the forged sender.
        """

        def session():
            c = Client(self.port)
            c.reply()
            c.command(b"EHLO " + HELO.encode())
            c.command(b"MAIL FROM:<s@example.org>")
            c.command(b"RCPT TO:<alice@example.com>")
            c.command(b"DATA")
            c.send(
                message("smuggler", "visible\r\n")
                + b"\n.\nMAIL FROM:<forged@example.org>\r\nRCPT TO:<carol@example.com>\r\nDATA\r\n"
                b"Subject: forged\r\n\r\nforged body\r\n\r.\r\nstill the first message\r\n.\r\n"
            )
            final = c.reply()
            quit = c.command(b"QUIT")
            c.close()
            return final, quit

        final, quit = yield self.inThread(session)
        self.assertTrue(final.startswith(b"250 "), final)
        self.assertTrue(quit.startswith(b"221"), quit)
        [stored] = self.mbx1.messages()
        self.assertEqual(stored.sender, "s@example.org")
        self.assertEqual(stored.recipients, ("alice@example.com",))
        self.assertIn("forged body", stored.body)
        self.assertIn("still the first message", stored.body)
        self.assertEqual(self.mbx2.messages(), [])

    @inlineCallbacks
    def test_bigMessageStreams(self):
        """
        A 4 MB message through STARTTLS on both sides arrives whole, byte for byte.
        """
        body = "".join("%07d %s\r\n" % (i, "y" * 70) for i in range(52000))

        def session():
            c = self.smtp()
            c.starttls(context=ssl.create_default_context(cafile=self.ca.caPath))
            c.ehlo(HELO)
            refused = c.sendmail("s@example.org", ["alice@example.com"], message("huge", body))
            c.quit()
            return refused

        self.assertEqual((yield self.inThread(session)), {})
        [stored] = self.mbx1.messages()
        self.assertEqual(stored.body, tuple(body.split("\r\n")[:-1]))

    @inlineCallbacks
    def test_sizeLimit(self):
        """
        Too big: refused at MAIL when the client announces its SIZE, else after its data, which
        the backend then never saw end: nothing stored either way.
        """
        big = message("big", ("x" * 998 + "\r\n") * 5100)

        def session():
            c = self.smtp()
            try:
                c.sendmail("s@example.org", ["alice@example.com"], big)
            except smtplib.SMTPSenderRefused as e:
                announced = e.smtp_code, e.smtp_error
            c.quit()
            raw = Client(self.port)
            raw.reply()
            raw.command(b"EHLO " + HELO.encode())
            raw.command(b"MAIL FROM:<s@example.org>")
            raw.command(b"RCPT TO:<alice@example.com>")
            raw.command(b"DATA")
            raw.send(big + b".\r\n")
            streamed = raw.reply()
            raw.command(b"QUIT")
            raw.close()
            return announced, streamed

        announced, streamed = yield self.inThread(session)
        self.assertEqual(announced, (552, b"5.3.4 Message size exceeds fixed limit"))
        self.assertEqual(streamed, b"552 5.3.4 Message size exceeds fixed limit\r\n")
        self.assertEqual(self.mbx1.messages(), [])

    @inlineCallbacks
    def test_submission(self):
        """
        Submission: no AUTH before STARTTLS; after it, a wrong password gets 535, the right one
        lets alice send anywhere, and mbx1 knows the message came from alice (XCLIENT LOGIN).
        """

        def session():
            c = smtplib.SMTP("127.0.0.1", self.submissionPort, local_hostname=HELO, timeout=10)
            c.ehlo()
            before = c.has_extn("auth")
            c.starttls(context=ssl.create_default_context(cafile=self.ca.caPath))
            c.ehlo()
            try:
                c.login("alice", "wrong")
                wrong = None
            except smtplib.SMTPAuthenticationError as e:
                wrong = e.smtp_code
            c.login("alice", "alice-pw")
            refused = c.sendmail(
                "alice@example.com", ["friend@elsewhere.example"], message("submitted")
            )
            c.quit()
            return before, wrong, refused

        before, wrong, refused = yield self.inThread(session)
        self.assertFalse(before)
        self.assertEqual(wrong, 535)
        self.assertEqual(refused, {})
        [stored] = self.mbx1.messages()
        self.assertEqual(stored.recipients, ("friend@elsewhere.example",))
        self.assertEqual(stored.attributes["sasl_username"], "alice")
        self.assertEqual(stored.attributes["sasl_method"], "XCLIENT")


class LongTransactionTests(PostfixCase):
    """
    After the backend login only the per-phase timeouts apply (issue 15 defect 2): the
    failover deadline, 2 s here, bounds the login and nothing after it.
    """

    failoverTimeout = 2.0

    @inlineCallbacks
    def test_slowSenderPastFailoverDeadline(self):
        """
        A message whose DATA takes longer than failover_timeout is accepted once and stored
        once; a second transaction after the deadline, on the same backend session, works.
        """

        def session():
            c = Client(self.port)
            replies = [c.reply(), c.command(b"EHLO " + HELO.encode())]
            replies += [
                c.command(b"MAIL FROM:<s@example.org>"),
                c.command(b"RCPT TO:<alice@example.com>"),
                c.command(b"DATA"),
            ]
            c.send(message("slow", "first half\r\n"))
            time.sleep(2.5)  # the slow sender: past the 2 s failover deadline
            c.send(b"second half\r\n.\r\n")
            replies.append(c.reply())
            time.sleep(1.0)
            replies += [
                c.command(b"MAIL FROM:<s@example.org>"),
                c.command(b"RCPT TO:<carol@example.com>"),
                c.command(b"DATA"),
            ]
            c.send(message("later") + b".\r\n")
            replies.append(c.reply())
            replies.append(c.command(b"QUIT"))
            c.close()
            return replies

        replies = yield self.inThread(session)
        self.assertEqual(
            [r[:3] for r in replies],
            [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250", b"221"],
            replies,
        )
        self.assertTrue(replies[5].startswith(b"250 2.0.0 Ok: queued as"), replies[5])
        stored = self.mbx1.messages()
        self.assertEqual(
            sorted(m.header("Message-ID") for m in stored),
            ["<later@example.org>", "<slow@example.org>"],
        )
        [slow] = [m for m in stored if m.header("Message-ID") == "<slow@example.org>"]
        self.assertEqual(slow.body, ("first half", "second half"))


class RouteDownTests(PostfixCase):
    """
    Submission when the health checks know that the user's mailbox server is down (issue 15
    defect 6): AUTH says 454, not 235 and then 451 at RCPT.
    """

    healthInterval = 0.2

    def auth(self) -> tuple:
        """
        @return: the reply to AUTH (after STARTTLS): C{(code, text)}.
        """
        c = smtplib.SMTP("127.0.0.1", self.submissionPort, local_hostname=HELO, timeout=10)
        c.starttls(context=ssl.create_default_context(cafile=self.ca.caPath))
        c.ehlo()
        reply = c.docmd("AUTH", "PLAIN " + b64encode(b"\x00alice\x00alice-pw").decode())
        c.quit()
        return reply

    @inlineCallbacks
    def test_authRefusedWhileDown(self):
        self.assertEqual((yield self.inThread(self.auth))[0], 235)
        self.mbx1.stop()
        # Bounded poll: the health checks take mbx1 DOWN within a few intervals.
        deadline = time.monotonic() + 15
        while True:
            reply = yield self.inThread(self.auth)
            if reply[0] != 235 or time.monotonic() > deadline:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(reply, (454, b"4.7.0 Mailbox server unavailable, try again later"))
