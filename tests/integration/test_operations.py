"""
The operator's handles on a running node, driven as an operator would: C{twistd -n cas} with the
admin listener and casd's own JSON log file; C{/metrics}, C{/health}, C{/status} and the dashboard
in headless Chromium; C{SIGUSR1} (drain), C{SIGUSR2} (log reopen), C{SIGHUP} (reload) and
C{SIGTERM} (graceful stop).
"""

import base64
import imaplib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from casd.service.tap import DEMO_CONFIG
from tests.support import chromium
from tests.support.procs import freePort, stopPid, waitForPort

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
USERS = os.path.join(os.path.dirname(DEMO_CONFIG), "users")


def fetch(url, credentials=None):
    """
    @return: C{(status, headers, body)}; never raises for an HTTP error status.
    """
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def poll(predicate, timeout=15.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Node:
    """
    A C{twistd -n cas} process with the in-process demo backend, an admin listener and a log file.
    """

    def __init__(self, directory, adminUsers=(), drain=False, grace=30, tls=None, http=False):
        self.directory = directory
        self.imap, self.admin = freePort(), freePort()
        self.backend, self.pop = freePort(), freePort()
        self.logfile = os.path.join(directory, "casd.json")
        self.config = os.path.join(directory, "casd.toml")
        self.adminUsers, self.grace = adminUsers, grace
        #: C{(certificate, key)} paths, or C{None}: IMAP on an implicit-TLS listener too.
        self.tls = tls
        self.imaps = freePort() if tls else None
        #: HTTP through casd to the demo web backend (plain HTTP: C{plain_http = "serve"}).
        self.http = freePort() if http else None
        self.web = freePort()
        self.write(drain)

    def write(self, drain):
        users = ", ".join(f'"{u}"' for u in self.adminUsers)
        with open(self.config, "w") as f:
            f.write(
                f"""
[server]
hostname = "node-a"
trusted_networks = ["127.0.0.0/8"]
drain = {"true" if drain else "false"}
shutdown_grace = {self.grace}
[auth]
users_file = "{USERS}"
failure_delay = 0.1
[routing]
default_backend = "demo"
[backends.demo]
host = "127.0.0.1"
[backends.demo.imap]
port = {self.backend}
tls = "none"
[health]
interval = 1.0
[demo]
enabled = true
imap_port = {self.backend}
pop3_port = {self.pop}
http_port = {self.web}
{self.httpText()}
[[imap.listen]]
endpoint = "tcp:{self.imap}:interface=127.0.0.1"
{self.tlsText()}
[admin]
listen = "tcp:{self.admin}:interface=127.0.0.1"
users = [{users}]
refresh = 1
[log]
file = "{self.logfile}"
format = "json"
"""
            )

    def httpText(self):
        if not self.http:
            return ""
        return (
            f'[backends.demo.http]\nport = {self.web}\ntls = "none"\n'
            f'[http]\nenabled = true\nplain_http = "serve"\n'
            f'[[http.listen]]\nendpoint = "tcp:{self.http}:interface=127.0.0.1"\ntls = "none"\n'
            f'[[http.vdir]]\npath = "/EWS"\nauth = ["basic"]\nidentity = "header"\n'
        )

    def tlsText(self):
        if not self.tls:
            return ""
        cert, key = self.tls
        return (
            f'[[imap.listen]]\nendpoint = "tcp:{self.imaps}:interface=127.0.0.1"\ntls = "implicit"\n'
            f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
        )

    def start(self):
        out = open(os.path.join(self.directory, "twistd.out"), "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "cas", "--config", self.config],
            cwd=self.directory, env=dict(os.environ, PYTHONPATH=ROOT), stdout=out, stderr=out,
        )
        out.close()
        waitForPort("127.0.0.1", self.admin, 30.0, lambda: self.proc.poll() is None)
        waitForPort("127.0.0.1", self.imap, 30.0, lambda: self.proc.poll() is None)
        return self

    def url(self, path):
        return f"http://127.0.0.1:{self.admin}{path}"

    def signal(self, number):
        self.proc.send_signal(number)

    def login(self):
        client = imaplib.IMAP4("127.0.0.1", self.imap, timeout=10)
        client.login("demo", "demo")
        return client

    def logRecords(self, path=None):
        with open(path or self.logfile, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def output(self):
        with open(os.path.join(self.directory, "twistd.out"), "rb") as f:
            return f.read()


class AdminListenerTests(TestCase):
    timeout = 120

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.node = Node(directory)
        self.node.start()
        self.addCleanup(stopPid, self.node.proc.pid)

    @defer.inlineCallbacks
    def test_metricsHealthStatus(self):
        """
        After an IMAP session through casd, C{/metrics} counts it (and its login) without any user
        name as a label; C{/status} lists listeners, backends and sessions; C{/health} is 200.
        """
        node = self.node

        def session():
            client = node.login()
            client.select("INBOX")
            client.logout()

        yield threads.deferToThread(session)
        ok = yield threads.deferToThread(
            poll, lambda: b'casd_sessions_total{protocol="imap",result="proxy"} 1.0' in fetch(node.url("/metrics"))[2]
        )
        status, headers, body = yield threads.deferToThread(fetch, node.url("/metrics"))
        self.assertTrue(ok, body.decode())
        self.assertEqual(status, 200)
        self.assertIn("text/plain", headers["content-type"])
        self.assertIn(b'casd_login_seconds_count{outcome="success"} 1.0', body)
        # The readiness probe's connection counts too (a "disconnected" session).
        self.assertIn(b'casd_connections_total{protocol="imap"} 2.0', body)
        self.assertIn(b'casd_sessions_total{protocol="imap",result="disconnected"} 1.0', body)
        self.assertIn(b'casd_backend_up{address="127.0.0.1:', body)
        self.assertNotIn(b"demo:demo", body)
        self.assertNotIn(b'user="', body)
        status, _, body = yield threads.deferToThread(fetch, node.url("/status"))
        self.assertEqual(status, 200)
        state = json.loads(body)
        self.assertEqual(state["node"], "node-a")
        self.assertTrue(state["healthy"])
        self.assertEqual(state["listeners"][0]["protocol"], "imap")
        self.assertEqual(state["backends"][0]["backend"], "demo")
        self.assertEqual(state["backends"][0]["state"], "UP")
        self.assertIn("imap", state["sessions"])
        status, _, body = yield threads.deferToThread(fetch, node.url("/health"))
        self.assertEqual((status, body), (200, b"OK node-a: OK\n"))
        status, _, _ = yield threads.deferToThread(fetch, node.url("/nothing"))
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_drainSignalsAndReload(self):
        """
        C{SIGUSR1} makes C{/health} answer 503 while a logged-in session goes on working; a
        C{SIGHUP} re-applies the file (C{drain = false}: healthy again; C{drain = true}: draining).
        """
        node = self.node
        client = yield threads.deferToThread(node.login)
        self.addCleanup(lambda: threads.deferToThread(client.logout))
        node.signal(signal.SIGUSR1)
        drained = yield threads.deferToThread(poll, lambda: fetch(node.url("/health"))[0] == 503)
        self.assertTrue(drained)
        status, _, body = yield threads.deferToThread(fetch, node.url("/health"))
        self.assertIn(b"draining (SIGUSR1)", body)
        typ, data = yield threads.deferToThread(client.select, "INBOX")
        self.assertEqual(typ, "OK")
        node.signal(signal.SIGHUP)
        healthy = yield threads.deferToThread(poll, lambda: fetch(node.url("/health"))[0] == 200)
        self.assertTrue(healthy)
        node.write(drain=True)
        node.signal(signal.SIGHUP)
        drained = yield threads.deferToThread(poll, lambda: b"(configuration)" in fetch(node.url("/health"))[2])
        self.assertTrue(drained)
        status, _, body = yield threads.deferToThread(fetch, node.url("/metrics"))
        self.assertIn(b"casd_draining 1.0", body)

    @defer.inlineCallbacks
    def test_logReopenedOnSIGUSR2(self):
        """
        logrotate's way: rename the file, send C{SIGUSR2}; the next session lines go to a new file
        at the same path, as one JSON object per line with the session fields.
        """
        node = self.node
        yield threads.deferToThread(lambda: node.login().logout())
        # The login's own line (the readiness probe's comes first, and the server may end the
        # session after the client's logout returned).
        found = yield threads.deferToThread(
            poll, lambda: any(r.get("namespace") == "casd.session" and r.get("user") == "demo"
                              for r in node.logRecords())
        )
        self.assertTrue(found)
        os.rename(node.logfile, node.logfile + ".1")
        node.signal(signal.SIGUSR2)
        reopened = yield threads.deferToThread(poll, lambda: os.path.exists(node.logfile))
        self.assertTrue(reopened)
        yield threads.deferToThread(lambda: node.login().logout())
        found = yield threads.deferToThread(
            poll, lambda: any(r.get("namespace") == "casd.session" for r in node.logRecords())
        )
        self.assertTrue(found)
        sessions = [r for r in node.logRecords() if r.get("namespace") == "casd.session"]
        self.assertEqual(len(sessions), 1, sessions)
        self.assertEqual(sessions[0]["user"], "demo")
        self.assertEqual(sessions[0]["protocol"], "imap")
        old = [r for r in node.logRecords(node.logfile + ".1") if r.get("namespace") == "casd.session"]
        # The readiness probe's connection, then the first login.
        self.assertEqual([r["user"] for r in old], ["-", "demo"])
        for path in (node.logfile, node.logfile + ".1"):
            with open(path, "rb") as f:
                self.assertNotIn(b"demo:demo", f.read())

    @defer.inlineCallbacks
    def test_dashboardInChromium(self):
        """
        The dashboard, loaded in headless Chromium, fills its tables from C{/status}: the node's
        listener and its backend UP; the screenshot is kept with the test output.
        """
        self.assertTrue(chromium.available(), "Debian's chromium is required")
        shot = os.path.abspath(os.path.join(self.node.directory, "dashboard.png"))
        result = yield threads.deferToThread(
            chromium.snapshot,
            self.node.url("/"),
            shot,
            waitFor="body[data-loaded=yes]",
            read=["#backends", "#listeners", "#health", "#node"],
        )
        self.assertEqual(result["title"], "casd dashboard")
        self.assertEqual(result["texts"]["#node"], "node-a")
        self.assertEqual(result["texts"]["#health"], "OK")
        self.assertIn("UP", result["texts"]["#backends"])
        self.assertIn("demo", result["texts"]["#backends"])
        self.assertIn(f"tcp:{self.node.imap}", result["texts"]["#listeners"])
        with open(shot, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


class AdminAuthTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_basicAuthThroughPortal(self):
        """
        With C{[admin] users}, pages need Basic credentials of a listed user, checked by the
        portal; a valid user who is not listed is refused like a bad password; C{/health} stays
        anonymous.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        node = Node(directory, adminUsers=["demo"]).start()
        self.addCleanup(stopPid, node.proc.pid)
        status, headers, _ = yield threads.deferToThread(fetch, node.url("/status"))
        self.assertEqual(status, 401)
        self.assertIn("Basic", headers["www-authenticate"])
        status, _, _ = yield threads.deferToThread(fetch, node.url("/metrics"), ("alice", "alice"))
        self.assertEqual(status, 401)
        status, _, _ = yield threads.deferToThread(fetch, node.url("/metrics"), ("demo", "Hunter2-nope"))
        self.assertEqual(status, 401)
        status, _, body = yield threads.deferToThread(fetch, node.url("/status"), ("demo", "demo"))
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["node"], "node-a")
        status, _, _ = yield threads.deferToThread(fetch, node.url("/health"))
        self.assertEqual(status, 200)
        self.assertNotIn(b"Hunter2-nope", node.output())


class GracefulStopTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_sigtermWaitsForSessions(self):
        """
        On C{SIGTERM} the node stops accepting at once but lets an open session finish; it exits
        when that session ends.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        node = Node(directory, grace=20).start()
        self.addCleanup(stopPid, node.proc.pid)
        client = yield threads.deferToThread(node.login)

        def onlyTheClient():
            # The readiness probe's connection (Node.start) counts as a session until casd has
            # read its close, which a busy machine may delay past the login.
            status, _, body = fetch(node.url("/status"))
            return status == 200 and json.loads(body)["sessions"].get("imap") == 1

        settled = yield threads.deferToThread(poll, onlyTheClient)
        self.assertTrue(settled, "the readiness probe's connection never closed")
        node.signal(signal.SIGTERM)
        # Probe the listener only once the node has counted its sessions: a probe accepted in
        # the same reactor turn as the signal would count as a session too.
        stopping = yield threads.deferToThread(poll, lambda: b"stopping:" in node.output())
        self.assertTrue(stopping, "no stop logged after SIGTERM")
        closed = yield threads.deferToThread(
            poll, lambda: subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{node.imap}"],
                                         capture_output=True).returncode != 0
        )
        self.assertTrue(closed, "the listener still accepts after SIGTERM")
        yield threads.deferToThread(time.sleep, 1.0)
        self.assertIsNone(node.proc.poll(), "exited with a session open")
        typ, _ = yield threads.deferToThread(client.select, "INBOX")
        self.assertEqual(typ, "OK")
        yield threads.deferToThread(client.logout)
        exited = yield threads.deferToThread(poll, lambda: node.proc.poll() is not None, 15.0)
        self.assertTrue(exited)
        # twistd ends by re-raising the signal it stopped for.
        self.assertIn(node.proc.returncode, (0, -signal.SIGTERM))
        self.assertIn(b"stopping: 1 session(s) open, waiting up to 20 s", node.output())
        self.assertNotIn(b"Traceback", node.output())


class ConnectivityTests(TestCase):
    timeout = 90

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.node = Node(directory, http=True).start()
        self.addCleanup(stopPid, self.node.proc.pid)
        self.passwordFile = os.path.join(directory, "password")

    def check(self, user, password, *extra):
        with open(self.passwordFile, "w") as f:
            f.write(password + "\n")
        return subprocess.run(
            [sys.executable, "-m", "casd", "test-connectivity", "-c", self.node.config, user,
             "--password-file", self.passwordFile, *extra],
            capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60,
        )

    @defer.inlineCallbacks
    def test_wholePath(self):
        """
        C{casd test-connectivity} walks the directory, the route, a probe of the backend, and a
        real login through the node with a harmless command, each step timed; exit status 0.
        """
        proc = yield threads.deferToThread(self.check, "demo", "demo")
        out = proc.stdout.decode()
        self.assertEqual(proc.returncode, 0, out + proc.stderr.decode())
        for step in ("config", "directory", "route", "backend", "connect", "login", "command", "logout"):
            self.assertRegex(out, rf"(?m)^{step} .* ok +[0-9.]+ ms$")
        self.assertIn("EXAMINE INBOX: 1 messages", out)

    @defer.inlineCallbacks
    def test_failures(self):
        """
        A wrong password fails the login step (exit 1, the password never printed); an unknown
        user fails at the directory; a POP3 test runs STAT.
        """
        proc = yield threads.deferToThread(self.check, "demo", "Hunter2-nope")
        out = proc.stdout.decode()
        self.assertEqual(proc.returncode, 1, out)
        self.assertRegex(out, r"(?m)^login .*AUTHENTICATIONFAILED.* FAILED ")
        self.assertNotIn("Hunter2-nope", out + proc.stderr.decode())
        proc = yield threads.deferToThread(self.check, "nobody-here", "x")
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stdout.decode(), r"(?m)^directory +nobody-here: not found .*FAILED")

    @defer.inlineCallbacks
    def test_http(self):
        """
        C{--protocol http}: a GET of the vdir taking Basic authentication, through casd to the
        web backend; a wrong password fails the login step.
        """
        proc = yield threads.deferToThread(self.check, "demo", "demo", "--protocol", "http")
        out = proc.stdout.decode()
        self.assertEqual(proc.returncode, 0, out + proc.stderr.decode())
        self.assertRegex(out, r"(?m)^login +GET /EWS/: 200 OK .* ok ")
        proc = yield threads.deferToThread(self.check, "demo", "Hunter2-nope", "--protocol", "http")
        self.assertEqual(proc.returncode, 1)
        self.assertRegex(proc.stdout.decode(), r"(?m)^login .*401.* FAILED ")
        # The access line of a request is in the log file before casd handles the next one
        # (the lines of a reactor turn are written at its end, never held for later:
        # casd.service.turns): no waiting for it after the second answer.
        records = yield threads.deferToThread(self.twoRequests)
        self.assertIn("/EWS/first", [r["path"] for r in records if r.get("namespace") == "casd.http.access"])

    def twoRequests(self):
        """
        Two GETs on one keep-alive connection through casd.

        @return: the log file's records when the second answer came.
        """
        import http.client

        token = base64.b64encode(b"demo:demo").decode()
        connection = http.client.HTTPConnection("127.0.0.1", self.node.http, timeout=10)
        try:
            connection.request("GET", "/EWS/first", headers={"Authorization": f"Basic {token}"})
            first = connection.getresponse()
            first.read()
            sock = connection.sock
            connection.request("GET", "/EWS/second", headers={"Authorization": f"Basic {token}"})
            connection.getresponse().read()
            self.assertIs(connection.sock, sock)  # the same connection
            return self.node.logRecords()
        finally:
            connection.close()


class TLSReloadTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_certificatesReloadedOnSIGHUP(self):
        """
        C{SIGHUP} re-reads the certificate and key: new connections get the new certificate, an
        established session goes on; a reload naming an unusable key is refused in one line and
        the old certificate stays in force.
        """
        import shutil
        import ssl

        from tests.support.certs import CertificateAuthority

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        first = CertificateAuthority.create(os.path.join(directory, "ca1"), name="first CA")
        second = CertificateAuthority.create(os.path.join(directory, "ca2"), name="second CA")
        live = (os.path.join(directory, "live-cert.pem"), os.path.join(directory, "live-key.pem"))

        def install(ca):
            cert, key = ca.issue(["127.0.0.1"], "front")
            shutil.copy(cert, live[0])
            shutil.copy(key, live[1])

        install(first)
        node = Node(directory, tls=live).start()
        self.addCleanup(stopPid, node.proc.pid)
        waitForPort("127.0.0.1", node.imaps, 30.0, lambda: node.proc.poll() is None)

        def connect(ca):
            context = ssl.create_default_context(cafile=ca.caPath)
            client = imaplib.IMAP4_SSL("127.0.0.1", node.imaps, ssl_context=context, timeout=10)
            client.login("demo", "demo")
            return client

        held = yield threads.deferToThread(connect, first)
        install(second)
        node.signal(signal.SIGHUP)

        def verifies(ca):
            try:
                connect(ca).logout()
                return True
            except ssl.SSLError:
                return False

        switched = yield threads.deferToThread(poll, lambda: verifies(second))
        self.assertTrue(switched)
        self.assertFalse((yield threads.deferToThread(verifies, first)))
        typ, _ = yield threads.deferToThread(held.select, "INBOX")
        self.assertEqual(typ, "OK")
        yield threads.deferToThread(held.logout)
        with open(live[1], "w") as f:
            f.write("not a key\n")
        node.signal(signal.SIGHUP)
        refused = yield threads.deferToThread(
            poll, lambda: b"configuration not reloaded, the running one stays" in node.output()
        )
        self.assertTrue(refused)
        self.assertTrue((yield threads.deferToThread(verifies, second)))
        self.assertNotIn(b"Traceback", node.output())
