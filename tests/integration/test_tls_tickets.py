"""
TLS session tickets across separately started casd processes: the same C{[tls] ticket_keys}
file resumes a session made by another process (as another worker or another node would see
it); rotation (a new first key, the old one kept) keeps resuming; a process without the key
does not resume.  TLS 1.2 and 1.3, with Python's C{ssl}.
"""

import os
import socket
import ssl
import subprocess
import sys

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.support.certs import CertificateAuthority
from tests.support.procs import freePort, stopPid, waitForPort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = """
[auth]
users_file = "users"

[tls]
certificate = "{cert}"
key = "{key}"
ticket_keys = "{keys}"

[routing]
default_backend = "mbx"

[backends.mbx]
host = "127.0.0.1"

[health]
enabled = false

[[imap.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "implicit"
"""



class SharedTicketKeysTests(TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.ca = CertificateAuthority.create(self.directory)
        self.cert, self.key = self.ca.issue(["mail.example.com"], "server")
        self.old, self.new = os.urandom(80).hex(), os.urandom(80).hex()

    def startNode(self, name: str, keys: list[str]) -> int:
        """
        Start a casd process whose key file holds C{keys}, first encrypting.

        @return: its implicit-TLS IMAP port.
        """
        directory = os.path.join(self.directory, name)
        os.makedirs(directory)
        with open(os.path.join(directory, "users"), "w") as f:
            f.write("alice:{PLAIN}pw\n")
        keyFile = os.path.join(directory, "ticket.keys")
        fd = os.open(keyFile, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# test keys\n" + "\n".join(keys) + "\n")
        port = freePort()
        config = os.path.join(directory, "casd.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(cert=self.cert, key=self.key, keys=keyFile, port=port))
        log = open(os.path.join(directory, "casd.log"), "wb")
        self.addCleanup(log.close)
        process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "cas", "--config", config],
            cwd=directory, env=dict(os.environ, PYTHONPATH=ROOT), stdout=log, stderr=log,
        )
        self.addCleanup(process.wait, 10)
        self.addCleanup(stopPid, process.pid)
        waitForPort("127.0.0.1", port, 30.0, alive=lambda: process.poll() is None)
        self.logs = getattr(self, "logs", []) + [os.path.join(directory, "casd.log")]
        return port

    def clientContext(self, version):
        context = ssl.create_default_context(cafile=self.ca.caPath)
        context.check_hostname = False
        context.minimum_version = context.maximum_version = version
        return context

    def handshake(self, port, context, session=None):
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname="mail.example.com", session=session) as tls:
            self.assertTrue(tls.recv(4096).startswith(b"* OK"))
            return tls.session, tls.session_reused

    def scenario(self):
        """
        @return: for each TLS version, whether a session made on node A resumed on B (same
            key), on C (A's key kept as an older key behind a new one), on D (only the new
            key).
        """
        a = self.startNode("a", [self.old])
        b = self.startNode("b", [self.old])
        c = self.startNode("c", [self.new, self.old])
        d = self.startNode("d", [self.new])
        results = {}
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            # A session a client would keep (Python resumes only within one SSLContext).
            context = self.clientContext(version)
            session, reused = self.handshake(a, context)
            assert not reused
            again = self.handshake(a, context, session)[1]
            onB = self.handshake(b, context, session)[1]
            onC = self.handshake(c, context, session)[1]
            onD = self.handshake(d, context, session)[1]
            results[version.name] = (again, onB, onC, onD)
        return results

    @defer.inlineCallbacks
    def test_sharedKeysResumeAcrossProcesses(self):
        results = yield threads.deferToThread(self.scenario)
        self.assertEqual(
            results,
            {"TLSv1_2": (True, True, True, False), "TLSv1_3": (True, True, True, False)},
        )
        for path in self.logs:
            with open(path) as f:
                text = f.read()
            self.assertIn("TLS session tickets: ", text)
            self.assertNotIn(self.old, text)
            self.assertNotIn(self.new, text)
            self.assertNotIn("Traceback", text)
