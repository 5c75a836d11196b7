"""
A casd node running in the test process on the real reactor, from a TOML text; and
L{DovecotFront}, a casd in front of a private Dovecot.
"""

import os

from twisted.internet import defer, task

from casd.service.tap import Options, makeService


def startDemoNode(testCase, directory):
    """
    Start casd's demo configuration (IMAP, POP3, HTTPS with its demo web backend, the admin
    listener) in this process, every port a free one, stopped at C{testCase}'s clean-up.

    @return: C{(node, ca, ports)}: the L{CASNode}, the demo CA file, the ports by name
        (C{https}, C{web}, C{imap}, C{pop3}, C{bimap}, C{bpop3}, C{admin}).
    """
    from casd.demo.web import demoConfigText
    from casd.service.tap import DEMO_CONFIG
    from tests.support.procs import freePort

    os.makedirs(directory, exist_ok=True)
    os.environ["CASD_DEMO_DIR"] = directory
    testCase.addCleanup(os.environ.pop, "CASD_DEMO_DIR")
    with open(DEMO_CONFIG) as f:
        base = f.read()
    ports = {name: freePort() for name in ("https", "web", "imap", "pop3", "bimap", "bpop3", "admin")}
    base = (
        base.replace('users_file = "users"', f'users_file = "{os.path.join(os.path.dirname(DEMO_CONFIG), "users")}"')
        .replace("tcp:1143:", f"tcp:{ports['imap']}:")
        .replace("tcp:1110:", f"tcp:{ports['pop3']}:")
        .replace("11143", str(ports["bimap"]))
        .replace("11110", str(ports["bpop3"]))
        .replace("tcp:9100:", f"tcp:{ports['admin']}:")
    )
    text, ca = demoConfigText(base, ports["web"])
    text = text.replace("tcp:8443:", f"tcp:{ports['https']}:")
    text = text.replace("[demo]\n", f"[demo]\nhttp_port = {ports['web']}\n")
    node = CASNode(directory, text).start()
    testCase.addCleanup(node.stop)
    return node, ca, ports


class CASNode:
    """
    @ivar service: the running service tree.
    @ivar path: the configuration file.
    """

    def __init__(self, directory: str, configText: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "casd.toml")
        with open(self.path, "w") as f:
            f.write(configText)

    def start(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        options = Options()
        options.parseOptions(["--config", self.path])
        self.options = options
        self.service = makeService(options, reactor)
        try:
            self.service.startService()
        except BaseException:
            # A listener that could not bind (a port taken meanwhile): stop what did start, or
            # its auth thread pool (not daemon threads) keeps the test process from exiting and
            # its listeners and timers dirty the next test's reactor.
            self._stopStarted()
            raise
        return self

    def _stopStarted(self) -> None:
        for child in reversed(list(self.service)):
            if child.running:
                try:
                    child.stopService()
                except Exception:
                    pass

    def factories(self):
        for svc in self.service:
            factory = getattr(svc, "factory", None)
            if factory is not None:
                yield getattr(factory, "wrappedFactory", factory)

    def sessions(self):
        return [s for f in self.factories() for s in getattr(f, "sessions", ())]

    @defer.inlineCallbacks
    def stop(self, timeout: float = 10.0):
        """
        Stop listening, wait (bounded) for the sessions to end, then stop everything.
        """
        for _ in range(int(timeout / 0.02)):
            if not self.sessions():
                break
            yield task.deferLater(self.reactor, 0.02, lambda: None)
        for s in self.sessions():
            s.transport.abortConnection()
        yield self.service.stopService()
        # Let aborted connections and backend sockets finish closing.
        yield task.deferLater(self.reactor, 0.05, lambda: None)


#: The users of L{DovecotFront}: in Dovecot's passwd-file and in casd's users file.
USERS = {"alice": "alice-pw", "bob": "bob-pw"}
#: Dovecot's master user, which casd logs in as when a route says so.
MASTER = ("casd-master", "master-pw")


class DovecotFront:
    """
    A mixin for C{TestCase}s: a casd in front of a private Dovecot, the set-up every
    real-Dovecot test of a protocol shares.  A test CA issues Dovecot's certificate
    (C{127.0.0.1}, C{mbx.test}) and casd's (C{localhost}, C{127.0.0.1}); casd's users file holds
    L{USERS} (alice's hash bcrypt, bob's SHA512-CRYPT) and C{carol}, whose mailbox server
    C{nowhere} refuses connections; Dovecot knows the master user L{MASTER}.

    Set C{protocol} (casd's name for it) and C{dovecotProtocol} (Dovecot's); then
    L{startCAS}.

    @ivar tmp: the test's directory.
    @ivar ca: the L{tests.support.certs.CertificateAuthority}.
    @ivar dovecot: the running L{tests.support.dovecot.Dovecot}.
    @ivar port: casd's listener (STARTTLS offered); C{tlsPort}: its implicit-TLS one.
    """

    protocol = "imap"
    dovecotProtocol = "imap"

    def setUp(self):
        super().setUp()
        from casd.auth.hashing import makeHash
        from casd.testing import writeSecret
        from tests.support.certs import CertificateAuthority
        from tests.support.dovecot import Dovecot

        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ca = CertificateAuthority.create(os.path.join(self.tmp, "ca"))
        self.dovecot = Dovecot(
            os.path.join(self.tmp, "dovecot"),
            USERS,
            masterUsers=dict([MASTER]),
            tls=self.ca.issue(["127.0.0.1", "mbx.test"], "backend"),
            protocols=(self.dovecotProtocol,),
        )
        self.dovecot.start()
        self.addCleanup(self.dovecot.stop)
        self.frontCert = self.ca.issue(["localhost", "127.0.0.1"], "front")
        self.usersPath = os.path.join(self.tmp, "users")
        with open(self.usersPath, "w") as f:
            f.write(f"alice:{makeHash('BLF-CRYPT', b'alice-pw', rounds=4)}:address=alice@example.com\n")
            f.write(f"bob:{makeHash('SHA512-CRYPT', b'bob-pw')}\n")
            f.write(f"carol:{makeHash('SHA512-CRYPT', b'carol-pw')}:mailhost=nowhere\n")
        self.masterSecret = writeSecret(self.tmp, "master", MASTER[1])

    def startCAS(self, backendTLS="starttls", master=False, backendPort=None, ca=None, extra="", tlsName=None):
        """
        Start casd for C{protocol} in this process, routing everyone to Dovecot (C{mbx}).

        @param backendTLS: how casd reaches Dovecot: C{starttls}, C{implicit} or C{none}.
        @param master: log in to Dovecot as L{MASTER}.
        @param backendPort: Dovecot's port to use instead of the one for C{backendTLS}.
        @param ca: the CA file casd verifies Dovecot with (default: the test CA).
        @param extra: more TOML, appended.
        @param tlsName: the name casd verifies in Dovecot's certificate (default: its address).
        """
        from twisted.internet import reactor

        from tests.support.procs import freePort

        self.port = freePort()
        self.tlsPort = freePort()
        cert, key = self.frontCert
        name = self.protocol
        if backendPort is None:
            d = self.dovecot
            backendPort = {
                ("imap", False): d.imapPort,
                ("imap", True): d.imapsPort,
                ("pop3", False): d.pop3Port,
                ("pop3", True): d.pop3sPort,
                ("sieve", False): d.sievePort,
            }[self.dovecotProtocol, backendTLS == "implicit"]
        masterLines = (
            f'master_user = "{MASTER[0]}"\nmaster_password_file = "{self.masterSecret}"\n'
            if master
            else ""
        )
        config = f"""
[server]
hostname = "cas.test"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
users_file = "{self.usersPath}"
failure_delay = 0.2

[routing]
default_backend = "mbx"

[backend]
ca_file = "{ca or self.ca.caPath}"
connect_timeout = 2.0
reply_timeout = 5.0
# A refused member is retried this long ("nowhere", where nothing listens, in test_backendDown).
connect_retry_time = 1.0

[backends.mbx]
host = "127.0.0.1"
{f'tls_name = "{tlsName}"' if tlsName else ""}
[backends.mbx.{name}]
port = {backendPort}
tls = "{backendTLS}"
{masterLines}
[backends.nowhere]
host = "127.0.0.1"
[backends.nowhere.{name}]
port = {freePort()}
tls = "none"
{"" if name == "imap" else chr(10) + "[imap]" + chr(10) + "enabled = false" + chr(10)}
[{name}]
enabled = true
[[{name}.listen]]
endpoint = "tcp:{self.port}:interface=127.0.0.1"
[[{name}.listen]]
endpoint = "tcp:{self.tlsPort}:interface=127.0.0.1"
tls = "implicit"
{extra}
"""
        self.cas = CASNode(os.path.join(self.tmp, "cas"), config).start(reactor)
        self.addCleanup(self.cas.stop)
        return self.cas

    def clientContext(self):
        """
        A client's TLS context that trusts the test CA.
        """
        from casd.testing import clientTLSContext

        return clientTLSContext(self.ca.caPath)
