"""
Shared set-up of the web-backend integration tests (Radicale, SOGo, Roundcube, two casd nodes):
a test CA, a users file, and a casd node with one HTTPS listener and the given backends and vdirs.
"""

import os
import subprocess
import sys

from twisted.internet import defer, reactor, task, threads

from casd.auth.hashing import makeHash
from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.procs import freePort, stopPid, waitForPort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class CASWeb:
    """
    One casd node serving HTTPS on C{127.0.0.1}.

    @ivar port: the HTTPS port.
    @ivar caPath: the CA file clients trust.
    """

    def __init__(self, directory, users, backends, vdirs, http="", extra="", ca=None, port=None, server=""):
        """
        @param users: login -> (password, extra users-file fields such as C{address=...}).
        @param backends: name -> HTTP port on 127.0.0.1.
        @param vdirs: TOML text of the C{[[http.vdir]]} tables.
        @param http: further C{[http]} keys.
        @param server: further C{[server]} keys.
        @param extra: further sections.
        """
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.ca = ca or CertificateAuthority.create(os.path.join(self.directory, "ca"))
        self.caPath = self.ca.caPath
        cert, key = self.ca.issue(["localhost", "127.0.0.1"], "casd-web-" + str(id(self)))
        usersPath = os.path.join(self.directory, "users")
        with open(usersPath, "w") as f:
            for login, (password, fields) in users.items():
                f.write(f"{login}:{makeHash('SHA512-CRYPT', password.encode())}{':' + fields if fields else ''}\n")
        self.port = port or freePort()
        backendText = "".join(
            f'\n[backends.{name}]\nhost = "127.0.0.1"\n[backends.{name}.http]\nport = {p}\n'
            for name, p in backends.items()
        )
        self.config = f"""
[server]
hostname = "cas.test"
{server}

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
users_file = "{usersPath}"
failure_delay = 0.1

[routing]
default_backend = "{next(iter(backends))}"

[backend]
connect_timeout = 2.0
{backendText}
{extra}

[imap]
enabled = false

[http]
enabled = true
{http}

[[http.listen]]
endpoint = "tcp:{self.port}:interface=127.0.0.1"
tls = "implicit"

{vdirs}
"""
        self.node = None

    @property
    def url(self):
        return "https://127.0.0.1:%d" % (self.port,)

    def start(self):
        self.node = CASNode(os.path.join(self.directory, "node"), self.config).start(reactor)
        self.channels = []
        for factory in self.sites():
            original = factory.buildProtocol

            def buildProtocol(addr, original=original):
                protocol = original(addr)
                if protocol is not None:
                    self.channels.append(protocol)
                return protocol

            factory.buildProtocol = buildProtocol
        return self

    def startProcess(self, timeout=30.0, workers=None):
        """
        Run the node as operators do, C{twistd -n cas --config ...}, in its own process.

        @param workers: C{--workers N}, or L{None} for a single process.
        """
        os.makedirs(os.path.join(self.directory, "node"), exist_ok=True)
        self.configPath = os.path.join(self.directory, "node", "casd.toml")
        with open(self.configPath, "w") as f:
            f.write(self.config)
        self.logPath = os.path.join(self.directory, "node", "twistd.out")
        self._log = open(self.logPath, "wb")
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "cas",
             "--config", self.configPath, *(("--workers", str(workers)) if workers else ())],
            cwd=os.path.join(self.directory, "node"), env=env, stdout=self._log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        return threads.deferToThread(
            waitForPort, "127.0.0.1", self.port, timeout, lambda: self.process.poll() is None
        )

    def stopProcess(self):
        if getattr(self, "process", None) is not None:
            stopPid(self.process.pid, timeout=10.0)
            self.process.wait()
            self.process = None
            self._log.close()

    def logText(self):
        with open(self.logPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    def sites(self):
        return [f for f in self.node.factories() if hasattr(f, "upstream")]

    @defer.inlineCallbacks
    def stop(self):
        """
        Close client connections still open, the backend pools, then the node.
        """
        if self.node is None:
            return
        node, self.node = self.node, None
        for channel in self.channels:
            transport = getattr(channel, "transport", None)
            if transport is not None and getattr(transport, "connected", False):
                transport.abortConnection()
        for site in {id(s): s for s in (f for f in node.factories() if hasattr(f, "upstream"))}.values():
            site.upstream.closeIdle()
        yield node.stop()
        yield task.deferLater(reactor, 0.05, lambda: None)
