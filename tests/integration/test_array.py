"""
The array, for real: three casd nodes, each in its own network namespace with its own address,
behind a real HAProxy (TCP mode, PROXY protocol v2, health checks expecting the greeting),
sharing state through a private Redis, authenticating against a private slapd and proxying to a
private Dovecot.  docs/examples/array/ is the same set-up for people.

Where network namespaces cannot be made, the nodes fall back to distinct loopback addresses
(the test says so in its log); everything else is unchanged.
"""

import concurrent.futures
import imaplib
import os
import poplib
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from tests.support.certs import CertificateAuthority
from tests.support.dovecot import Dovecot
from tests.support.haproxy import HAProxy
from tests.support.netns import Namespaces
from tests.support.procs import freePort, pidAlive, stopPid, waitForPort
from tests.support.redis import RedisServer
from tests.support.slapd import SERVICE_PASSWORD, USERS, Slapd, fixtureLDIF, serviceDN

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODES = 3
REDIS_PASSWORD = "array-redis-pw-7Yt"


class _AllAddressesDovecot(Dovecot):
    """
    The Dovecot fixture, listening on every address, so that nodes in namespaces reach it.
    """

    def _config(self, usersPath, mastersPath):
        text = super()._config(usersPath, mastersPath)
        return text.replace("listen = 127.0.0.1", "listen = *").replace(
            "address = 127.0.0.1", "address = *"
        )


class _AllAddressesSlapd(Slapd):
    host = "0.0.0.0"


def until(predicate, timeout, what, interval=0.05):
    """
    A bounded poll: C{predicate()} true within C{timeout} seconds, else a failure naming C{what}.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError("not within %.1f s: %s" % (timeout, what))
        time.sleep(interval)


def _knowsProxyTrusted():
    from casd.config.settings import LISTENER_SETTINGS

    return any(s.key == "proxy_trusted" for s in LISTENER_SETTINGS)


class _SourceIMAP(imaplib.IMAP4):
    """
    imaplib's client, from a chosen source address (the penalty counts per address).
    """

    def __init__(self, host, port, source, timeout):
        self._source = source
        super().__init__(host, port, timeout=timeout)

    def _create_socket(self, timeout):
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


class ArrayFixture:
    """
    Everything of one array, started and stopped by the test case.
    """

    def __init__(self, case):
        self.case = case
        self.tmp = os.path.abspath(case.mktemp())
        os.makedirs(self.tmp)

    def start(self):
        case, tmp = self.case, self.tmp
        self.ns = Namespaces(NODES).create()
        case.addCleanup(self.ns.destroy)
        if not self.ns.isolated:
            sys.stderr.write("test_array: no network namespaces (%s); loopback addresses\n" % self.ns.why)
        servers = sorted({self.ns.serverAddress(i) for i in range(NODES)} | {"127.0.0.1"})
        self.ca = CertificateAuthority.create(os.path.join(tmp, "ca"))
        self.slapd = _AllAddressesSlapd(os.path.join(tmp, "slapd"))
        self.slapd.start()
        case.addCleanup(self.slapd.stop)
        self.slapd.load(fixtureLDIF(mailHosts={"alice": "mbx", "bob": "mbx", "carol": "mbx"}))
        self.dovecot = _AllAddressesDovecot(
            os.path.join(tmp, "dovecot"),
            {"alice": USERS["alice"], "bob": USERS["bob"]},
            tls=self.ca.issue(servers, "dovecot"),
            protocols=("imap", "pop3"),
        )
        self.dovecot.start()
        case.addCleanup(self.dovecot.stop)
        self.redis = RedisServer(os.path.join(tmp, "redis"), password=REDIS_PASSWORD, host="0.0.0.0")
        self.redis.start()
        case.addCleanup(self.redis.stop)
        for name, text in (
            ("service.secret", SERVICE_PASSWORD),
            ("redis.secret", REDIS_PASSWORD),
            ("array.key", "k" * 48),
        ):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(text + "\n")
        self.cert = self.ca.issue(["127.0.0.1"], "casd")
        self.imapPort, self.pop3Port, self.adminPort = freePort(), freePort(), freePort()
        self.nodes = [self.startNode(i) for i in range(NODES)]
        for i, node in enumerate(self.nodes):
            until(lambda: self._accepts(i, node), 30, "node %d listening" % i)
        self.startHAProxy()
        return self

    # -- nodes -------------------------------------------------------------------------------

    def nodeConfig(self, i):
        server, address = self.ns.serverAddress(i), self.ns.nodeAddress(i)
        cert, key = self.cert
        # HAProxy reaches node i from the test's side of its link.  Listeners that name their
        # load balancers (proxy_trusted, required on haproxy: endpoints once it exists) get it.
        trust = f'proxy_trusted = ["{server}/32"]' if _knowsProxyTrusted() else ""
        return f"""
[server]
hostname = "node{i}"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
failure_delay = 0.2
failure_delay_max = 3.2
user_lockout_threshold = 4
address_lockout_threshold = 0
lockout_duration = 60

[ldap]
urls = ["ldap://{server}:{self.slapd.port}/"]
starttls = false
bind_dn = "{serviceDN()}"
bind_password_file = "{self.tmp}/service.secret"
base_dn = "ou=people,dc=example,dc=com"
filter = "(&(objectClass=inetOrgPerson)(|(uid={{login}})(mail={{login}})))"
status_attribute = "accountStatus"

[state]
backend = "redis"
urls = ["redis://{server}:{self.redis.port}/0"]
password_file = "{self.tmp}/redis.secret"
secret_file = "{self.tmp}/array.key"
# Generous here: the test shares two busy cores; 50 ms (the default) is for a real node.
timeout = 0.5
retry_interval = 0.5

[backend]
ca_file = "{self.ca.caPath}"

[backends.mbx]
host = "{server}"
[backends.mbx.imap]
port = {self.dovecot.imapsPort}
tls = "implicit"
[backends.mbx.pop3]
port = {self.dovecot.pop3sPort}
tls = "implicit"

[imap]
[[imap.listen]]
endpoint = "haproxy:tcp:{self.imapPort}:interface={address}"
{trust}

[admin]
listen = "tcp:{self.adminPort}:interface={address}"

[pop3]
enabled = true
max_sessions_per_user = 1
[[pop3.listen]]
endpoint = "haproxy:tcp:{self.pop3Port}:interface={address}"
{trust}
"""

    def startNode(self, i):
        directory = os.path.join(self.tmp, "node%d" % i)
        os.makedirs(directory)
        path = os.path.join(directory, "casd.toml")
        with open(path, "w") as f:
            f.write(self.nodeConfig(i))
        log = open(os.path.join(directory, "twistd.out"), "wb")
        self.case.addCleanup(log.close)
        command = [
            sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--pidfile=", "cas", "--config", path,
        ]
        proc = subprocess.Popen(
            self.ns.command(i, command), cwd=directory, stdout=log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONPATH=ROOT),
        )
        self.case.addCleanup(stopPid, proc.pid)
        return proc

    def _accepts(self, i, proc):
        if proc.poll() is not None:
            raise AssertionError("node %d exited:\n%s" % (i, self.nodeLog(i)[-3000:]))
        # The listener is in the node's namespace: ask from there.
        probe = "import socket; socket.create_connection(('%s', %d), 1).close()" % (
            self.ns.nodeAddress(i), self.imapPort)
        return subprocess.run(
            self.ns.command(i, [sys.executable, "-c", probe]), capture_output=True
        ).returncode == 0

    def nodeLog(self, i):
        with open(os.path.join(self.tmp, "node%d" % i, "twistd.out"), "rb") as f:
            return f.read().decode("utf-8", "replace")

    def sessionsServed(self, i):
        return len(re.findall(r"result=proxy", self.nodeLog(i)))

    # -- HAProxy -----------------------------------------------------------------------------

    def startHAProxy(self):
        nodes = [("node%d" % i, self.ns.nodeAddress(i)) for i in range(NODES)]
        self.ports = {}
        frontends = []
        for protocol, port in (("imap", self.imapPort), ("pop3", self.pop3Port)):
            self.ports[protocol] = freePort()
            frontends.append((protocol, "127.0.0.1", self.ports[protocol], protocol,
                              [(name, address, port) for name, address in nodes]))
            # One frontend per node too, for "through node A, then B".
            for i, (name, address) in enumerate(nodes):
                key = "%s%d" % (protocol, i)
                self.ports[key] = freePort()
                frontends.append((key, "127.0.0.1", self.ports[key], protocol, [(name, address, port)]))
        self.haproxy = HAProxy(
            os.path.join(self.tmp, "haproxy"), frontends, inter=200, fall=2, rise=1, healthPort=self.adminPort
        )
        self.haproxy.start()
        self.case.addCleanup(self.haproxy.stop)
        until(lambda: set(self.haproxy.serverStates("imap_nodes").values()) == {"UP"}, 15,
              "every node UP in HAProxy")

    # -- clients -----------------------------------------------------------------------------

    def tlsContext(self):
        return ssl.create_default_context(cafile=self.ca.caPath)

    def imapLogin(self, user, password, frontend="imap", source="127.0.0.1", hold=0.0):
        """
        One IMAP session: STARTTLS, LOGIN, SELECT, LOGOUT.

        @return: C{("OK", seconds to the LOGIN answer)}, C{("NO", text, seconds)} for a refusal
            or C{("ERROR", text)} when the connection failed.
        """
        try:
            c = _SourceIMAP("127.0.0.1", self.ports[frontend], source, timeout=15)
            try:
                c.starttls(self.tlsContext())
                started = time.monotonic()
                try:
                    c.login(user, password)
                except imaplib.IMAP4.abort:
                    raise
                except imaplib.IMAP4.error as e:
                    return ("NO", str(e), time.monotonic() - started)
                took = time.monotonic() - started
                c.select("INBOX")
                if hold:
                    time.sleep(hold)
                    c.noop()
                c.logout()
                return ("OK", took)
            finally:
                try:
                    c.shutdown()
                except Exception:
                    pass
        except (OSError, imaplib.IMAP4.abort, imaplib.IMAP4.error, ssl.SSLError) as e:
            return ("ERROR", "%s: %s" % (type(e).__name__, e))

    def pop3Session(self, user, password, frontend):
        c = poplib.POP3("127.0.0.1", self.ports[frontend], timeout=15)
        c.stls(self.tlsContext())
        c.user(user)
        try:
            c.pass_(password)
        except poplib.error_proto as e:
            c.close()
            return None, e.args[0]
        return c, b"+OK"


class ArrayTests(SynchronousTestCase):
    timeout = 120

    def setUp(self):
        self.array = ArrayFixture(self).start()

    def storm(self, seconds, workers=6, during=None, frontend="imap"):
        """
        Logins from C{workers} threads for C{seconds}; C{during()} runs in the middle.

        @return: C{[(start, end, result)]} in monotonic seconds.
        """
        results = []
        lock = threading.Lock()
        stop = time.monotonic() + seconds
        users = [("alice", USERS["alice"]), ("bob", USERS["bob"])]

        def worker(n):
            k = 0
            while time.monotonic() < stop:
                user, password = users[(n + k) % 2]
                k += 1
                started = time.monotonic()
                result = self.array.imapLogin(user, password, frontend, hold=0.05)
                with lock:
                    results.append((started, time.monotonic(), result))

        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(worker, n) for n in range(workers)]
            if during is not None:
                time.sleep(seconds / 2)
                during()
            for f in futures:
                f.result()
        return results

    def test_stormSpreadsSurvivesKillAndDrains(self):
        array = self.array
        # A session held open on node 2 through the drain.
        held = _SourceIMAP("127.0.0.1", array.ports["imap2"], "127.0.0.1", timeout=15)
        held.starttls(array.tlsContext())
        held.login("alice", USERS["alice"])
        held.select("INBOX")

        before = [array.sessionsServed(i) for i in range(NODES)]
        killedAt = []

        def kill():
            killedAt.append(time.monotonic())
            array.nodes[1].send_signal(signal.SIGKILL)

        results = self.storm(6.0, during=kill)
        served = [array.sessionsServed(i) - before[i] for i in range(NODES)]
        # Spread: every node served sessions of the storm (node 1 until it was killed).
        self.assertTrue(all(n > 0 for n in served), served)
        # No session was ever refused (told its password was wrong, above all); a connection
        # cut by the kill is an "ERROR".
        self.assertFalse([r for r in results if r[2][0] == "NO"], "refusals during the storm")
        failed = [r for r in results if r[2][0] != "OK"]
        # Only sessions under way on node 1 when it died may fail; every session that began
        # after HAProxy's checks could see it (2 x 200 ms) and a margin succeeded.
        self.assertTrue(all(start <= killedAt[0] + 1.0 for start, _, _ in failed), failed)
        self.assertLessEqual(len(failed), 6)
        after = [r for r in results if r[0] > killedAt[0] + 1.0]
        self.assertTrue(after and all(r[2][0] == "OK" for r in after))
        until(lambda: array.haproxy.serverStates("imap_nodes")["node1"] == "DOWN", 5, "node1 DOWN")

        # Drain node 2: its check fails, HAProxy sends it nothing new, its session goes on.
        array.nodes[2].send_signal(signal.SIGUSR1)
        until(lambda: array.haproxy.serverStates("imap_nodes")["node2"] != "UP", 5, "node2 drained")
        drained = array.sessionsServed(2)
        results = self.storm(1.5, workers=3)
        self.assertTrue(results and all(r[2][0] == "OK" for r in results), results)
        self.assertEqual(array.sessionsServed(2), drained)
        self.assertEqual(held.noop()[0], "OK")
        self.assertEqual(held.select("INBOX")[0], "OK")
        self.assertEqual(held.logout()[0], "BYE")
        until(lambda: array.sessionsServed(2) == drained + 1, 5, "the held session logged")
        self.assertTrue(pidAlive(array.nodes[2].pid))

    def test_penaltyLockoutAndLimitsAcrossNodes(self):
        array = self.array
        # The delay escalates across nodes: failure 1 at node 0, 2 at node 1, 3 at node 2.
        source = "127.0.0.77"
        answers = [
            array.imapLogin("alice", "wrong-%d" % i, "imap%d" % i, source=source) for i in range(3)
        ]
        self.assertEqual([a[0] for a in answers], ["NO"] * 3, answers)
        self.assertIn("AUTHENTICATIONFAILED", answers[0][1])
        for answer, least in zip(answers, (0.2, 0.4, 0.8)):
            self.assertGreaterEqual(answer[2], least, answers)
        # The right password from that address clears it, array-wide.
        self.assertEqual(array.imapLogin("alice", USERS["alice"], "imap1", source=source)[0], "OK")

        # The POP3 per-user limit (1) holds across nodes.
        first, _ = array.pop3Session("alice", USERS["alice"], "pop30")
        self.assertIsNotNone(first)
        second, error = array.pop3Session("alice", USERS["alice"], "pop31")
        self.assertIsNone(second)
        self.assertIn(b"[IN-USE]", error)
        first.quit()
        third, _ = until(
            lambda: (lambda r: r if r[0] is not None else None)(
                array.pop3Session("alice", USERS["alice"], "pop32")
            ),
            5, "a POP3 session once the first ended",
        )
        third.quit()

        # Redis stopped: logins go on, locally.
        array.redis.stop()
        results = [array.imapLogin("alice", USERS["alice"], "imap%d" % (i % 3)) for i in range(6)]
        self.assertEqual([r[0] for r in results], ["OK"] * 6, results)
        for i in range(NODES):
            self.assertIn("shared state (Redis) unavailable", array.nodeLog(i))
        # Redis back: each node finds it again, and the penalty is shared again.
        array.redis.start()

        def allBack():
            for i in range(NODES):
                array.imapLogin("alice", USERS["alice"], "imap%d" % i)
            return all("available again" in array.nodeLog(i) for i in range(NODES))

        until(allBack, 20, "every node back on Redis", interval=0.3)
        source = "127.0.0.88"
        answers = [
            array.imapLogin("alice", "again-%d" % i, "imap%d" % (2 - i), source=source) for i in range(3)
        ]
        for answer, least in zip(answers, (0.2, 0.4, 0.8)):
            self.assertGreaterEqual(answer[2], least, answers)

        # Lockouts are array-wide: four distinct failures of bob through nodes 0 and 1, from
        # four addresses; then bob's right password is refused at node 2.
        for i in range(4):
            answer = array.imapLogin("bob", "guess-%d" % i, "imap%d" % (i % 2), source="127.0.1.%d" % (100 + i))
            self.assertEqual(answer[0], "NO")
        answer = array.imapLogin("bob", USERS["bob"], "imap2", source="127.0.0.99")
        self.assertEqual(answer[0], "NO", answer)
        self.assertIn("LIMIT", answer[1])
        for i in range(NODES):
            self.assertNotIn(USERS["bob"], array.nodeLog(i))
            self.assertNotIn(REDIS_PASSWORD, array.nodeLog(i))
        self.assertNotIn("bob", array.redis.dump())


class ExampleTests(SynchronousTestCase):
    """
    docs/examples/array/ is valid: HAProxy accepts its configuration, casd its node files.
    """

    here = os.path.join(ROOT, "docs", "examples", "array")

    def test_haproxyConfig(self):
        out = subprocess.run(
            ["haproxy", "-c", "-f", os.path.join(self.here, "haproxy.cfg")], capture_output=True, text=True
        )
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)

    def test_nodeConfigs(self):
        from casd.config import parseConfig
        from casd.service.discovery import discoverProtocols

        protocols = discoverProtocols().values()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "tls"))
        for name in ("array.key", "redis.secret", "ldap.secret", "tls/cas.pem", "tls/cas.key"):
            with open(os.path.join(directory, name), "w") as f:
                f.write("x" * 48 + "\n")
        addresses = set()
        for i in (1, 2, 3):
            with open(os.path.join(self.here, "node%d.toml" % i)) as f:
                config = parseConfig(f.read(), os.path.join(directory, "node%d.toml" % i), protocols)
            self.assertEqual(config.state.backend, "redis")
            self.assertEqual(config.protocols["pop3"].max_sessions_per_user, 1)
            addresses.add(config.protocols["imap"].listeners[0].endpoint)
        self.assertEqual(len(addresses), 3)
