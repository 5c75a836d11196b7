"""
sslyze against every kind of TLS listener casd has: each must comply with Mozilla's
"intermediate" profile (sslyze's own checker), accept neither TLS 1.0 nor 1.1, refuse
client-initiated renegotiation, and resume TLS 1.2 sessions by id and by ticket.

One casd with all the listeners of L{ROWS}; one sslyze run scans them all concurrently.  sslyze
has no ManageSieve STARTTLS: its row goes through L{SieveStartTLSRelay}, which speaks the
plaintext part (greeting, C{STARTTLS}, C{OK}) with casd and then relays bytes, so sslyze sees
casd's TLS after a real ManageSieve STARTTLS as if it were implicit TLS.

sslyze runs in its own venv (C{.venv-sslyze}, made by C{./run tests}), as the script
C{tests/support/tlsscan.py}.  A new kind of TLS listener (HTTPS) is one more row.
"""

import json
import os
import subprocess

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.procs import freePort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCANNER = os.path.join(ROOT, ".venv-sslyze", "bin", "python")

#: name, protocol section, listener TLS mode, how sslyze starts TLS (None: implicit; "SIEVE":
#: through the relay).
ROWS = [
    ("imap-993", "imap", "implicit", None),
    ("imap-143", "imap", "starttls", "IMAP"),
    ("pop3-995", "pop3", "implicit", None),
    ("pop3-110", "pop3", "starttls", "POP3"),
    ("smtp-25", "smtp", "starttls", "SMTP"),
    ("submission-587", "submission", "starttls", "SMTP"),
    ("submission-465", "submission", "implicit", None),
    ("managesieve-4190", "managesieve", "starttls", "SIEVE"),
    ("https-443", "http", "implicit", None),
]

CONFIG = """
[auth]
users_file = "users"

[tls]
certificate = "{cert}"
key = "{key}"

[routing]
default_backend = "mbx"

[backends.mbx]
host = "127.0.0.1"

[health]
enabled = false
"""


class _SieveBackSide(Protocol):
    """
    The relay's connection to casd: greeting, STARTTLS, then bytes both ways.
    """

    def __init__(self, front):
        self.front = front
        self.buffer = b""
        self.state = "greeting"

    def dataReceived(self, data):
        if self.state == "relay":
            self.front.transport.write(data)
            return
        self.buffer += data
        while self.state != "relay" and b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            if self.state == "greeting" and line.startswith(b"OK"):
                self.transport.write(b"STARTTLS\r\n")
                self.state = "starttls"
            elif self.state == "starttls":
                if not line.startswith(b"OK"):
                    self.transport.loseConnection()
                    return
                self.state = "relay"
                self.front.ready(self, self.buffer)

    def connectionLost(self, reason):
        self.front.transport.loseConnection()


class _SieveFrontSide(Protocol):
    back = None

    def connectionMade(self):
        self.pending = []
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.factory.casdPort)
        endpoint.connect(Factory.forProtocol(lambda: _SieveBackSide(self))).addErrback(
            lambda f: self.transport.loseConnection()
        )

    def ready(self, back, leftover):
        self.back = back
        if leftover:
            self.transport.write(leftover)
        for data in self.pending:
            back.transport.write(data)
        self.pending = []

    def dataReceived(self, data):
        if self.back is None:
            self.pending.append(data)
        else:
            self.back.transport.write(data)

    def connectionLost(self, reason):
        if self.back is not None:
            self.back.transport.loseConnection()


class SieveStartTLSRelay(Factory):
    protocol = _SieveFrontSide

    def __init__(self, casdPort):
        self.casdPort = casdPort


class TLSScanTests(TestCase):
    timeout = 240

    def setUp(self):
        if not os.path.exists(SCANNER):
            self.fail(f"{SCANNER} is missing: ./run tests makes it")
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.directory, "node"))
        self.ca = CertificateAuthority.create(self.directory)
        cert, key = self.ca.issue(["mail.example.com"], "server")
        with open(os.path.join(self.directory, "node", "users"), "w") as f:
            f.write("alice:{PLAIN}pw\n")
        self.ports = {name: freePort() for name, _, _, _ in ROWS}
        sections = {}
        for name, section, tls, _ in ROWS:
            sections.setdefault(section, []).append(
                f'[[{section}.listen]]\nendpoint = "tcp:{self.ports[name]}:interface=127.0.0.1"\n'
                f'tls = "{tls}"\n'
            )
        config = CONFIG.format(cert=cert, key=key) + "".join(
            f"\n[{section}]\nenabled = true\n" + "".join(listeners)
            for section, listeners in sections.items()
        )
        self.node = CASNode(os.path.join(self.directory, "node"), config).start(reactor)
        self.addCleanup(self.node.stop)
        self.targets = []
        for name, _, _, dialect in ROWS:
            port = self.ports[name]
            if dialect == "SIEVE":
                relay = reactor.listenTCP(0, SieveStartTLSRelay(port), interface="127.0.0.1")
                self.addCleanup(relay.stopListening)
                port, dialect = relay.getHost().port, None
            self.targets.append(
                {"name": name, "host": "127.0.0.1", "port": port, "serverName": "mail.example.com",
                 "starttls": dialect}
            )

    def scan(self):
        request = os.path.join(self.directory, "scan.json")
        with open(request, "w") as f:
            json.dump({"caFile": self.ca.caPath, "targets": self.targets}, f)
        done = subprocess.run(
            [SCANNER, os.path.join(ROOT, "tests", "support", "tlsscan.py"), request],
            capture_output=True,
            timeout=200,
        )
        if done.returncode != 0:
            raise AssertionError(done.stderr.decode("utf-8", "replace")[-3000:])
        return json.loads(done.stdout)

    @defer.inlineCallbacks
    def test_everyListener(self):
        results = yield threads.deferToThread(self.scan)
        self.assertEqual(sorted(results), sorted(name for name, _, _, _ in ROWS))
        expected = {
            "error": None,
            "intermediate": {},
            "versions": ["TLSv1.2", "TLSv1.3"],
            "renegotiation": {"secure": True, "clientInitiatedDoS": False},
            "resumption": {"sessionId": "FULLY_SUPPORTED", "ticket": "FULLY_SUPPORTED"},
        }
        for name, result in results.items():
            self.assertEqual(result, expected, name)
