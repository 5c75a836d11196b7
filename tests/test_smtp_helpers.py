"""
Shared fixtures of the SMTP unit transcripts (no tests here): a configuration with two mailbox
servers, users on each, and a scripted SMTP backend.
"""

from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from casd.auth import UserRecord
from casd.testing import ScriptedBackend, connectFrontend, makeContext
from protocols.smtpmx import smtp

CONFIG = """
[server]
hostname = "cas.example.net"

[auth]
failure_delay = 0

[routing]
default_backend = "mbx1"

[backend]
reply_timeout = 5.0
# A refused connection fails at once here; its retries: tests/test_retry.py.
connect_retry_time = 0.0

[backends.mbx1]
host = "192.0.2.10"
[backends.mbx1.smtp]
tls = "none"
[backends.mbx1.submission]
tls = "none"

[backends.mbx2]
host = "192.0.2.20"
[backends.mbx2.smtp]
tls = "none"

[smtp]
enabled = true
accepted_domains = ["example.com", ".sub.example.com"]
recipient_delimiter = "+"
max_line_length = 512
max_bad_commands = 6
message_size_limit = 1000
max_recipients = 3
command_timeout = 60.0
data_timeout = 30.0
blocked_senders = ["@spam.example", "bad@example.org"]
[[smtp.listen]]
endpoint = "tcp:2525"

[submission]
enabled = true
user_messages_per_hour = 2
[[submission.listen]]
endpoint = "tcp:2587"
[[submission.listen]]
endpoint = "tcp:2588"
trusted = true
"""

USERS = {
    "alice": ("alice-pw", UserRecord(login="alice", address="alice@example.com", mailHost="mbx1")),
    "bob": ("bob-pw", UserRecord(login="bob", address="bob@example.com", mailHost="mbx2")),
    "carol": ("carol-pw", UserRecord(login="carol", address="carol@example.com", mailHost="mbx1")),
}

HELO = b"client.example.org"

#: A backend's EHLO replies: before XCLIENT (offering it) and after.
EHLO_XCLIENT = (
    b"250-mbx.example.com\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
    b"250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN\r\n250 ENHANCEDSTATUSCODES\r\n"
)
EHLO_PLAIN = b"250-mbx.example.com\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n"

XCLIENT = (
    b"XCLIENT ADDR=198.51.100.7 PORT=40000 NAME=[UNAVAILABLE] HELO=client.example.org"
    b" PROTO=ESMTP\r\n"
)


class SMTPTestMixin:
    config = CONFIG
    descriptor = smtp
    peer = ("198.51.100.7", 40000)

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, users=USERS, config=self.config)

    def reconfigure(self, config: str) -> None:
        self.context = makeContext(self.reactor, users=USERS, config=config)

    def connect(self, listener=0, peer=None):
        """
        @return: the greeting.
        """
        self.server, self.transport = connectFrontend(
            self.descriptor, self.context, listener, peer or self.peer
        )
        greeting = self.transport.value()
        self.transport.clear()
        return greeting

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.server.dataReceived(data)
        return self.out()

    def out(self) -> bytes:
        said = self.transport.value()
        self.transport.clear()
        return said

    def ready(self, listener=0):
        self.connect(listener)
        self.send(b"EHLO " + HELO + b"\r\n")

    def openBackend(self, index=-1, helo=HELO, xclient=XCLIENT):
        """
        Play a backend's side of the login dialogue, XCLIENT included.
        """
        return ScriptedBackend(
            self.reactor,
            [
                (b"", b"220 mbx.example.com ESMTP\r\n"),
                (b"EHLO cas.example.net\r\n", EHLO_XCLIENT),
                (xclient, b"220 mbx.example.com ESMTP\r\n"),
                (b"EHLO " + helo + b"\r\n", EHLO_PLAIN),
            ],
            index,
        ).run()

    def firstRecipient(self, sender=b"<s@example.org>", rcpt=b"<alice@example.com>", params=b""):
        """
        MAIL and a first recipient accepted, through a new backend session.

        @return: the L{ScriptedBackend}.
        """
        self.assertEqual(self.send(b"MAIL FROM:" + sender + params + b"\r\n"), b"250 2.1.0 Ok\r\n")
        self.assertEqual(self.send(b"RCPT TO:" + rcpt + b"\r\n"), b"")
        backend = self.openBackend()
        backend.step(
            b"MAIL FROM:" + sender + params + b"\r\nRCPT TO:" + rcpt + b"\r\n",
            b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n",
        )
        self.assertEqual(self.out(), b"250 2.1.5 Ok\r\n")
        return backend

    def startData(self, backend):
        self.assertEqual(self.send(b"DATA\r\n"), b"")
        backend.step(b"DATA\r\n", b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self.assertEqual(self.out(), b"354 End data with <CR><LF>.<CR><LF>\r\n")

    def clientGone(self):
        self.server.connectionLost(Failure(ConnectionDone()))
