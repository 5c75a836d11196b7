"""
The PROXY listener behind a real HAProxy: HAProxy (connecting from 127.0.0.2, the listener's only
C{proxy_trusted} sender) reports a client inside C{[server] trusted_networks} (with a version 2
header, and with a version 1 one), which casd then trusts; a client connecting directly from 127.0.0.1 with a forged header claiming the same
address is closed (C{proxy_untrusted = "close"}) or served as itself, untrusted (C{"ignore"}).
"""

import os
import socket
import subprocess

from twisted.internet import defer, reactor, threads
from twisted.trial.unittest import TestCase

from tests.support.casdnode import CASNode
from tests.support.procs import freePort, stopPid, waitForPort

CONFIG = """
[server]
trusted_networks = ["10.0.0.0/8"]

[auth]
users_file = "users"

[routing]
default_backend = "mbx"

[backends.mbx]
host = "127.0.0.1"

[health]
enabled = false

[imap]
[[imap.listen]]
name = "lb-close"
endpoint = "haproxy:tcp:{close}:interface=127.0.0.1"
proxy_trusted = ["127.0.0.2/32"]
[[imap.listen]]
name = "lb-ignore"
endpoint = "haproxy:tcp:{ignore}:interface=127.0.0.1"
proxy_trusted = ["127.0.0.2/32"]
proxy_untrusted = "ignore"
"""

HAPROXY = """
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend imap
    bind 127.0.0.1:{front}
    # The client HAProxy reports: inside casd's trusted_networks.
    tcp-request connection set-src ipv4(10.1.2.3)
    default_backend casd
backend casd
    server casd 127.0.0.1:{close} send-proxy-v2 source 127.0.0.2
frontend imap1
    bind 127.0.0.1:{front1}
    tcp-request connection set-src ipv4(10.1.2.3)
    default_backend casd1
backend casd1
    # The version 1 header (text).
    server casd 127.0.0.1:{close} send-proxy source 127.0.0.2
"""

#: What a client could forge: a header claiming the trusted 10.1.2.3.
FORGED = b"PROXY TCP4 10.1.2.3 127.0.0.1 5555 143\r\n"


def _exchange(port, first=b""):
    """
    Connect, send C{first}, read the greeting (or the close).
    """
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionResetError:
        # An untrusted sender is closed at once, with a reset, which can come before the
        # connect's own check of the socket: the same answer as a close after the header.
        return b""
    try:
        if first:
            try:
                s.sendall(first)
            except (ConnectionResetError, BrokenPipeError):
                return b""  # the same: closed before these bytes went out
        data = b""
        while not data.endswith(b"\r\n"):
            try:
                chunk = s.recv(4096)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        return data
    finally:
        s.close()


class HAProxyTrustTests(TestCase):
    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "node"))
        with open(os.path.join(directory, "node", "users"), "w") as f:
            f.write("alice:{PLAIN}pw\n")
        self.ports = {"close": freePort(), "ignore": freePort(), "front": freePort(), "front1": freePort()}
        self.node = CASNode(os.path.join(directory, "node"), CONFIG.format(**self.ports)).start(reactor)
        self.addCleanup(self.node.stop)
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY.format(**self.ports))
        log = open(os.path.join(directory, "haproxy.log"), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(["haproxy", "-db", "-f", config], stdout=log, stderr=log)
        self.addCleanup(process.wait, 10)
        self.addCleanup(stopPid, process.pid)
        waitForPort("127.0.0.1", self.ports["front"], 20.0, alive=lambda: process.poll() is None)
        waitForPort("127.0.0.1", self.ports["front1"], 20.0, alive=lambda: process.poll() is None)

    @defer.inlineCallbacks
    def test_throughHAProxyTrusted(self):
        greeting = yield threads.deferToThread(_exchange, self.ports["front"])
        self.assertTrue(greeting.startswith(b"* OK [CAPABILITY IMAP4rev1"), greeting)
        self.assertNotIn(b"LOGINDISABLED", greeting)
        self.assertIn(b"AUTH=PLAIN", greeting)

    @defer.inlineCallbacks
    def test_throughHAProxyVersion1Trusted(self):
        """
        HAProxy's text header (C{send-proxy}) is believed the same way.
        """
        greeting = yield threads.deferToThread(_exchange, self.ports["front1"])
        self.assertTrue(greeting.startswith(b"* OK [CAPABILITY IMAP4rev1"), greeting)
        self.assertNotIn(b"LOGINDISABLED", greeting)

    @defer.inlineCallbacks
    def test_forgedHeaderClosed(self):
        greeting = yield threads.deferToThread(_exchange, self.ports["close"], FORGED)
        self.assertEqual(greeting, b"")

    @defer.inlineCallbacks
    def test_forgedHeaderIgnored(self):
        greeting = yield threads.deferToThread(_exchange, self.ports["ignore"], FORGED)
        self.assertTrue(greeting.startswith(b"* OK [CAPABILITY IMAP4rev1"), greeting)
        # Served as itself (127.0.0.1, not in trusted_networks): plaintext login disabled.
        self.assertIn(b"LOGINDISABLED", greeting)
