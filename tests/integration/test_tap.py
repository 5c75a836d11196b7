"""
Launching casd as operators do: twistd in the foreground and daemonised, the demo, PROXY protocol
listeners and SNI, over real sockets.
"""

import os
import signal
import socket
import ssl
import subprocess
import sys
import time

from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from casd.auth.usersfile import UsersFileChecker
from casd.config import loadConfig
from casd.service.discovery import discoverProtocols
from casd.auth.sasl import Credentials
from casd.service.tap import DEMO_CONFIG
from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.procs import freePort, stopPid, waitForPort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def twistdCommand(*args):
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", *args]


def imapExchange(port, lines, timeout=10.0, proxyHeader=b""):
    """
    Speak raw IMAP: send each line after reading the previous reply's tagged line.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    f = s.makefile("rb")
    if proxyHeader:
        s.sendall(proxyHeader)
    out = [f.readline()]
    for tag, line in lines:
        s.sendall(line)
        while True:
            reply = f.readline()
            out.append(reply)
            if not reply or reply.startswith(tag + b" "):
                break
    s.close()
    return out


class DemoTests(TestCase):
    timeout = 60

    def test_shippedDemoConfig(self):
        """
        The embedded demo configuration parses and its users file holds demo/demo.
        """
        config = loadConfig(DEMO_CONFIG, discoverProtocols().values())
        self.assertTrue(config.demo.enabled)
        self.assertTrue(config.protocols["imap"].listeners)
        checker = UsersFileChecker(config.auth.users_file, lambda f, *a: defer.maybeDeferred(f, *a), reactor)
        d = checker.requestAvatarId(Credentials("demo", b"demo"))
        d.addCallback(lambda record: self.assertEqual(record.login, "demo"))
        return d

    @defer.inlineCallbacks
    def test_twistdForegroundDemoPath(self):
        """
        C{twistd -n cas} with the demo backend enabled: curl lists the demo mailbox through casd.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port, imapBackend, popBackend = freePort(), freePort(), freePort()
        users = os.path.join(os.path.dirname(DEMO_CONFIG), "users")
        config = os.path.join(directory, "casd.toml")
        with open(config, "w") as f:
            f.write(
                f"""
[server]
trusted_networks = ["127.0.0.0/8"]
[auth]
users_file = "{users}"
[routing]
default_backend = "demo"
[backends.demo]
host = "127.0.0.1"
[backends.demo.imap]
port = {imapBackend}
tls = "none"
[demo]
enabled = true
imap_port = {imapBackend}
pop3_port = {popBackend}
[[imap.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
"""
            )
        env = dict(os.environ, PYTHONPATH=ROOT)
        log = open(os.path.join(directory, "twistd.out"), "wb")
        proc = subprocess.Popen(
            twistdCommand("-n", "cas", "--config", config), cwd=directory, env=env, stdout=log, stderr=log
        )
        self.addCleanup(log.close)
        self.addCleanup(stopPid, proc.pid)
        yield threads.deferToThread(waitForPort, "127.0.0.1", port, 30.0, lambda: proc.poll() is None)
        out = yield threads.deferToThread(
            subprocess.run,
            ["curl", "-s", "--max-time", "15", f"imap://127.0.0.1:{port}/INBOX;UID=1", "-u", "demo:demo"],
            capture_output=True,
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn(b"Subject: Welcome to casd", out.stdout)
        proc.send_signal(signal.SIGTERM)
        yield threads.deferToThread(proc.wait, 20)
        with open(os.path.join(directory, "twistd.out"), "rb") as f:
            text = f.read()
        self.assertIn(b"user=demo backend=demo(127.0.0.1:", text)
        self.assertIn(b"result=proxy(", text)
        self.assertNotIn(b"demo:demo", text)

    @defer.inlineCallbacks
    def test_twistdDaemonises(self):
        """
        Without C{-n}, twistd daemonises with its usual pid and log files.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        port = freePort()
        users = os.path.join(directory, "users")
        with open(users, "w") as f:
            f.write("u:{PLAIN}p\n")
        config = os.path.join(directory, "casd.toml")
        with open(config, "w") as f:
            f.write(f'[auth]\nusers_file = "users"\n[[imap.listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n')
        pidfile = os.path.join(directory, "casd.pid")
        logfile = os.path.join(directory, "casd.log")
        env = dict(os.environ, PYTHONPATH=ROOT)
        result = yield threads.deferToThread(
            subprocess.run,
            twistdCommand("--pidfile", pidfile, "--logfile", logfile, "cas", "--config", config),
            cwd=directory,
            env=env,
            capture_output=True,
            timeout=60,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        yield threads.deferToThread(waitForPort, "127.0.0.1", port, 30.0)
        with open(pidfile) as f:
            pid = int(f.read())
        self.addCleanup(stopPid, pid)
        replies = yield threads.deferToThread(imapExchange, port, [(b"a", b"a LOGOUT\r\n")])
        self.assertTrue(replies[0].startswith(b"* OK [CAPABILITY IMAP4rev1"))
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):
            if not os.path.exists(pidfile):
                break
            yield threads.deferToThread(time.sleep, 0.05)
        self.assertFalse(os.path.exists(pidfile))
        with open(logfile) as f:
            self.assertIn("Server Shut Down", f.read())


class RecordingBackend(Protocol):
    """
    A scripted IMAP backend that records what casd sends it.
    """

    def connectionMade(self):
        self.factory.seen.append(self)
        self.received = b""
        self.transport.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] scripted\r\n")

    def dataReceived(self, data):
        self.received += data
        if b"A AUTHENTICATE" in self.received and not getattr(self, "done", False):
            self.done = True
            self.transport.write(b"I OK\r\nA OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
        elif self.received.endswith(b"z LOGOUT\r\n"):
            self.transport.write(b"* BYE\r\nz OK bye\r\n")
            self.transport.loseConnection()


class ListenerTests(TestCase):
    timeout = 60

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.backendFactory = Factory.forProtocol(RecordingBackend)
        self.backendFactory.seen = []
        self.backendPort = reactor.listenTCP(0, self.backendFactory, interface="127.0.0.1")
        self.addCleanup(self.backendPort.stopListening)
        with open(os.path.join(self.directory, "users"), "w") as f:
            f.write("alice:{PLAIN}pw\n")

    def node(self, listeners, tls=""):
        config = f"""
[auth]
users_file = "users"
failure_delay = 0.0
[routing]
default_backend = "b"
[backends.b]
host = "127.0.0.1"
[backends.b.imap]
port = {self.backendPort.getHost().port}
tls = "none"
{tls}
[imap]
{listeners}
"""
        node = CASNode(self.directory, config).start(reactor)
        self.addCleanup(node.stop)
        return node

    @defer.inlineCallbacks
    def test_proxyProtocol(self):
        """
        Behind a C{haproxy:} listener the real client address comes from the PROXY header and is
        what the backend is told.
        """
        port = freePort()
        self.node(f'[[imap.listen]]\nendpoint = "haproxy:tcp:{port}:interface=127.0.0.1"\ntrusted = true\n')
        header = b"PROXY TCP4 203.0.113.9 127.0.0.1 40123 143\r\n"
        replies = yield threads.deferToThread(
            imapExchange, port, [(b"a", b"a LOGIN alice pw\r\n"), (b"z", b"z LOGOUT\r\n")], 10.0, header
        )
        self.assertIn(b"a OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n", replies)
        sent = self.backendFactory.seen[0].received
        self.assertIn(b'"x-originating-ip" "203.0.113.9" "x-originating-port" "40123"', sent)

    @defer.inlineCallbacks
    def test_sni(self):
        """
        Implicit TLS picks the certificate by SNI; other names get the default certificate.
        """
        ca = CertificateAuthority.create(os.path.join(self.directory, "ca"))
        defaultCert, defaultKey = ca.issue(["mail.example.com"], "default")
        otherCert, otherKey = ca.issue(["imap.example.org"], "other")
        port = freePort()
        self.node(
            f'[[imap.listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "implicit"\n',
            tls=f"""
[tls]
certificate = "{defaultCert}"
key = "{defaultKey}"
[[tls.sni]]
names = ["imap.example.org"]
certificate = "{otherCert}"
key = "{otherKey}"
""",
        )

        def handshake(name):
            context = ssl.create_default_context(cafile=ca.caPath)
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                with context.wrap_socket(raw, server_hostname=name) as s:
                    greeting = s.recv(1000)
                    subject = dict(x[0] for x in s.getpeercert()["subject"])
                    return subject.get("commonName"), s.getpeercert()["subjectAltName"], greeting

        _, sans, greeting = yield threads.deferToThread(handshake, "imap.example.org")
        self.assertEqual(sans, (("DNS", "imap.example.org"),))
        self.assertTrue(greeting.startswith(b"* OK"))
        _, sans, _ = yield threads.deferToThread(handshake, "mail.example.com")
        self.assertEqual(sans, (("DNS", "mail.example.com"),))

    @defer.inlineCallbacks
    def test_junkTLS(self):
        """
        Garbage instead of a TLS handshake closes that connection and nothing else.
        """
        ca = CertificateAuthority.create(os.path.join(self.directory, "ca"))
        cert, key = ca.issue(["mail.example.com"], "default")
        port = freePort()
        node = self.node(
            f'[[imap.listen]]\nendpoint = "tcp:{port}:interface=127.0.0.1"\ntls = "implicit"\n',
            tls=f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n',
        )

        def junk():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"a LOGIN alice pw\r\n" * 10)
                data = s.recv(1000)
                rest = s.recv(1000)
                return data, rest

        data, rest = yield threads.deferToThread(junk)
        self.assertFalse(b"OK" in data)
        self.assertEqual(rest, b"")
        self.assertEqual(self.backendFactory.seen, [])
        for _ in range(100):
            if not node.sessions():
                break
            yield threads.deferToThread(time.sleep, 0.02)
        self.assertEqual(node.sessions(), [])


class ProxyHeaderTests(TestCase):
    """
    The PROXY wrapper starts the protocol only after the header, and bounds the wait.
    """

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock, StringTransport
        from casd.service.proxyproto import ProxyProtocolFactory

        self.clock = MemoryReactorClock()
        self.started = []
        started = self.started

        class Greeter(Protocol):
            def connectionMade(self):
                started.append(self.transport.getPeer())
                self.transport.write(b"hello\r\n")

            def dataReceived(self, data):
                started.append(data)

        factory = ProxyProtocolFactory(Factory.forProtocol(Greeter), self.clock)
        self.proto = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_startsAfterHeader(self):
        self.assertEqual(self.transport.value(), b"")
        self.proto.dataReceived(b"PROXY TCP6 2001:db8::7 ::1 4000 143\r\nfirst")
        self.assertEqual(self.started[0].host, "2001:db8::7")
        self.assertEqual(self.started[1], b"first")
        self.assertEqual(self.transport.value(), b"hello\r\n")

    def test_noHeaderTimesOut(self):
        from casd.service.proxyproto import HEADER_TIMEOUT

        self.clock.advance(HEADER_TIMEOUT + 0.1)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.started, [])

    def test_junkHeaderCloses(self):
        self.proto.dataReceived(b"GET / HTTP/1.0\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.started, [])
