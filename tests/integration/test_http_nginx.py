"""
The HTTP front end in a real casd process, over TLS, in front of a private nginx: forwarded
headers as nginx sees them, large bodies both ways with casd's memory bounded, smuggling probes
over a real socket, and the answers when nginx is stopped.
"""

import os
import socket
import ssl
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from casd.service.tap import DEMO_CONFIG
from tests.support.certs import CertificateAuthority
from tests.support.nginx import NginxServer
from tests.support.procs import freePort, pidAlive, requireBinary, stopPid, waitForPort

#: The body size of the large-transfer test (1 GB was measured by hand: docs/protocols/http.md).
LARGE = 256 * 1024 * 1024

#: What casd's resident memory may grow by while it moves LARGE bytes each way.
MEMORY_BOUND = 64 * 1024 * 1024

CASD_CONFIG = """
[server]
hostname = "cas-test"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
users_file = "{users}"
failure_delay = 0.1

[health]
interval = 0.5
fall = 1

[backend]
connect_timeout = 2.0

[routing]
default_backend = "web"

[backends.web]
host = "127.0.0.1"

[backends.web.http]
port = {nginx}

[imap]
enabled = false

[http]
enabled = true
plain_http = "serve"

[[http.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "implicit"

[[http.listen]]
endpoint = "tcp:{plain}:interface=127.0.0.1"
tls = "none"

[[http.vdir]]
path = "/open"
backend = "web"
backend_path = "/"
auth = ["none"]
max_body_size = 0

[[http.vdir]]
path = "/app"
backend_path = "/"
identity = "header"
max_body_size = 0

[[http.vdir]]
path = "/EWS"
backend_path = "/echo"
"""


def vmKB(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class NginxBackendTests(SynchronousTestCase):
    """
    casd (a twistd process) -> nginx.
    """

    def setUp(self):
        cls = self
        cls.curl = requireBinary("curl")
        cls.directory = os.path.abspath(self.mktemp())
        ca = CertificateAuthority.create(os.path.join(cls.directory, "ca"))
        cls.caPath = ca.caPath
        cert, key = ca.issue(["localhost", "127.0.0.1"], "server")
        cls.nginx = NginxServer().start()
        self.addCleanup(self.nginx.remove)
        cls.port = freePort()
        cls.plain = freePort()
        cls.config = os.path.join(cls.directory, "casd.toml")
        users = os.path.join(os.path.dirname(DEMO_CONFIG), "users")
        with open(cls.config, "w") as f:
            f.write(
                CASD_CONFIG.format(
                    cert=cert, key=key, users=users, nginx=cls.nginx.port, port=cls.port,
                    plain=cls.plain,
                )
            )
        cls.log = open(os.path.join(cls.directory, "casd.log"), "wb")
        cls.casd = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "cas", "--config", cls.config],
            stdout=cls.log, stderr=subprocess.STDOUT, cwd=cls.directory,
        )
        self.addCleanup(self.stopCASD)
        waitForPort("127.0.0.1", cls.port, 30, alive=lambda: pidAlive(cls.casd.pid))

    def stopCASD(self):
        stopPid(self.casd.pid)
        self.casd.wait()
        self.log.close()

    def url(self, path):
        return f"https://127.0.0.1:{self.port}{path}"

    def curlRun(self, *args, timeout=120):
        """
        @return: C{(status, body)}.
        """
        r = subprocess.run(
            [self.curl, "-sS", "--cacert", self.caPath, "-o", "-", "-w", "\n%{http_code}", *args],
            capture_output=True, timeout=timeout,
        )
        body, _, status = r.stdout.rpartition(b"\n")
        return int(status or 0), body

    def test_forwardedHeaders(self):
        """
        nginx sees the real client in X-Forwarded-*, casd's identity header (the client's own
        dropped), and no Authorization for a header-identity vdir.
        """
        status, body = self.curlRun(
            "-u", "alice:alice", "-H", "X-Remote-User: mallory", "-H", "X-Forwarded-For: 10.6.6.6",
            self.url("/app/echo/x?y=1"),
        )
        self.assertEqual(status, 200, body)
        xff, proto, host, user, authorization, length, method, uri, forwarded, conn = (
            body.decode().rstrip("\n").split("|")
        )
        self.assertEqual((xff, proto, user, authorization, method, uri), (
            "127.0.0.1", "https", "alice", "", "GET", "/echo/x?y=1"))
        self.assertEqual(host, f"127.0.0.1:{self.port}")
        self.assertEqual(forwarded, f"for=127.0.0.1;proto=https;host=127.0.0.1:{self.port}")

    def test_passthrough(self):
        """
        A pass-through vdir hands the client's Authorization to the backend; a bad password is
        401 with the challenge and never reaches nginx.
        """
        status, body = self.curlRun("-u", "alice:alice", self.url("/EWS/z"))
        self.assertEqual(status, 200, body)
        self.assertIn(b"|Basic YWxpY2U6YWxpY2U=|", body)
        status, body = self.curlRun("-u", "alice:wrong", "-D", "-", self.url("/EWS/z"))
        self.assertEqual(status, 401)
        self.assertIn(b"WWW-Authenticate: Basic", body)

    def test_largeBodies(self):
        """
        LARGE bytes up and LARGE bytes down go through whole, while casd's resident memory
        grows by less than MEMORY_BOUND.
        """
        pid = self.casd.pid
        self.curlRun("-u", "alice:alice", self.url("/app/echo/warm"))
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) now measures from here
        before = vmKB(pid, "VmRSS") * 1024
        source = self.nginx.makeFile("big", LARGE)
        status, body = self.curlRun(
            "-u", "alice:alice", "-T", source, self.url("/app/upload/big-up"), timeout=300
        )
        self.assertIn(status, (201, 204), body)
        self.assertEqual(os.path.getsize(self.nginx.uploaded("big-up")), LARGE)
        r = subprocess.run(
            [self.curl, "-sS", "--cacert", self.caPath, "-u", "alice:alice", "-o", os.devnull,
             "-w", "%{http_code} %{size_download}", self.url("/app/files/big")],
            capture_output=True, timeout=300,
        )
        self.assertEqual(r.stdout.split(), [b"200", str(LARGE).encode()])
        peak = vmKB(pid, "VmHWM") * 1024
        self.assertLess(peak - before, MEMORY_BOUND, f"RSS grew from {before} to a peak of {peak}")

    def test_plainClient(self):
        """
        Over plain HTTP (where body pieces go straight to the client's socket when it has room):
        a download arrives whole and in order, and a client that reads slowly still pauses the
        backend (memory stays bounded).
        """
        import filecmp

        pid = self.casd.pid
        size = 64 * 1024 * 1024
        source = self.nginx.makeFile("plain", size)
        target = os.path.join(self.directory, "downloaded")
        url = f"http://127.0.0.1:{self.plain}/open/files/plain"
        r = subprocess.run(
            [self.curl, "-sS", "-o", target, "-w", "%{http_code}", url], capture_output=True,
            timeout=120,
        )
        self.assertEqual(r.stdout, b"200", r.stderr)
        self.assertTrue(filecmp.cmp(source, target, shallow=False))
        before = vmKB(pid, "VmRSS") * 1024
        r = subprocess.run(
            [self.curl, "-sS", "-o", os.devnull, "--limit-rate", "8M", "-w", "%{size_download}", url],
            capture_output=True, timeout=120,
        )
        self.assertEqual(r.stdout, str(size).encode())
        self.assertLess(vmKB(pid, "VmRSS") * 1024 - before, 32 * 1024 * 1024)

    def test_slowReaderBounded(self):
        """
        A client that reads slowly: casd does not buffer the backend's body (memory stays
        bounded while the download is throttled).
        """
        pid = self.casd.pid
        self.nginx.makeFile("slow", 64 * 1024 * 1024)
        before = vmKB(pid, "VmRSS") * 1024
        r = subprocess.run(
            [self.curl, "-sS", "--cacert", self.caPath, "-u", "alice:alice", "-o", os.devnull,
             "--limit-rate", "8M", "-w", "%{size_download}", self.url("/app/files/slow")],
            capture_output=True, timeout=120,
        )
        self.assertEqual(r.stdout, str(64 * 1024 * 1024).encode())
        now = vmKB(pid, "VmRSS") * 1024
        self.assertLess(now - before, 32 * 1024 * 1024)

    def rawExchange(self, data: bytes) -> bytes:
        context = ssl.create_default_context(cafile=self.caPath)
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(data)
                out = b""
                while True:
                    try:
                        chunk = s.recv(65536)
                    except (ConnectionResetError, ssl.SSLError):
                        break
                    if not chunk:
                        break
                    out += chunk
                return out

    def test_smugglingOverSocket(self):
        """
        CL+TE and obs-fold over a real TLS socket: 400, and nginx never logs the request.
        """
        auth = b"Authorization: Basic YWxpY2U6YWxpY2U=\r\n"
        for probe in (
            b"POST /app/echo/smuggle1 HTTP/1.1\r\nHost: h\r\n" + auth
            + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
            b"GET /app/echo/smuggle2 HTTP/1.1\r\nHost: h\r\n" + auth + b"X-A: 1\r\n\tB: 2\r\n\r\n",
            b"GET /app/echo/smuggle3 HTTP/1.1\nHost: h\n" + auth.replace(b"\r\n", b"\n") + b"\n",
        ):
            out = self.rawExchange(probe)
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out)
        with open(os.path.join(self.nginx.directory, "access.log"), "rb") as f:
            self.assertNotIn(b"smuggle", f.read())

    def test_backendStopped(self):
        """
        nginx stopped: 502 or 503 (never 401); once the pool knows it is down, 503 with
        Retry-After, and the vdir's health page is 503.
        """
        self.nginx.stop()
        try:
            status, body = self.curlRun("-u", "alice:alice", self.url("/app/echo/x"))
            self.assertIn(status, (502, 503), body)
            import time

            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                status, body = self.curlRun("-u", "alice:alice", "-D", "-", self.url("/app/echo/x"))
                if status == 503:
                    break
                time.sleep(0.2)
            self.assertEqual(status, 503, body)
            self.assertIn(b"Retry-After: 30", body)
            status, body = self.curlRun(self.url("/app/healthcheck.htm"))
            self.assertEqual(status, 503, body)
        finally:
            self.nginx.start()


TLS_BACKEND_CONFIG = """
[auth]
users_file = "{users}"

[health]
enabled = false

[backend]
ca_file = "{ca}"

[routing]
default_backend = "good"

[backends.good]
host = "127.0.0.1"
tls_name = "localhost"
[backends.good.http]
port = {nginx}
tls = "implicit"

[backends.impostor]
host = "127.0.0.1"
tls_name = "mbx.example.com"
[backends.impostor.http]
port = {nginx}
tls = "implicit"

[imap]
enabled = false

[http]
enabled = true
plain_http = "serve"

[[http.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "none"
trusted = true

[[http.vdir]]
path = "/good"
backend = "good"
backend_path = "/"

[[http.vdir]]
path = "/impostor"
backend = "impostor"
backend_path = "/"
"""


class TLSBackendTests(SynchronousTestCase):
    """
    HTTPS to the backend, its certificate verified for the server's C{tls_name}.
    """

    def setUp(self):
        self.curl = requireBinary("curl")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca = CertificateAuthority.create(os.path.join(directory, "ca"))
        cert, key = ca.issue(["localhost", "127.0.0.1"], "backend")
        self.nginx = NginxServer(tls=(cert, key)).start()
        self.addCleanup(self.nginx.remove)
        self.port = freePort()
        config = os.path.join(directory, "casd.toml")
        with open(config, "w") as f:
            f.write(TLS_BACKEND_CONFIG.format(
                users=os.path.join(os.path.dirname(DEMO_CONFIG), "users"), ca=ca.caPath,
                nginx=self.nginx.port, port=self.port))
        self.log = open(os.path.join(directory, "casd.log"), "wb")
        self.casd = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "cas", "--config", config],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=directory,
        )
        self.addCleanup(self.stop)
        waitForPort("127.0.0.1", self.port, 30, alive=lambda: pidAlive(self.casd.pid))

    def stop(self):
        stopPid(self.casd.pid)
        self.casd.wait()
        self.log.close()

    def get(self, path):
        r = subprocess.run(
            [self.curl, "-sS", "-u", "alice:alice", "-o", "-", "-w", "\n%{http_code}",
             f"http://127.0.0.1:{self.port}{path}"],
            capture_output=True, timeout=60,
        )
        body, _, status = r.stdout.rpartition(b"\n")
        return int(status), body

    def test_verified(self):
        """
        A backend whose certificate names its C{tls_name} is reached over TLS; one whose
        certificate does not is refused (502), never used.
        """
        status, body = self.get("/good/echo/x")
        self.assertEqual(status, 200, body)
        # 200 at all proves TLS: nginx answers plain HTTP on its TLS port with 400.
        self.assertTrue(body.startswith(b"127.0.0.1|http|"), body)
        status, body = self.get("/impostor/echo/x")
        self.assertEqual(status, 502, body)


CERT_CONFIG = """
[server]
hostname = "cas-test"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
users_file = "{users}"
failure_delay = 0.1

[routing]
default_backend = "web"

[backends.web]
host = "127.0.0.1"

[backends.web.http]
port = {nginx}

[imap]
enabled = false

[http]
enabled = true
client_ca_file = "{clientCA}"

[[http.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "implicit"

[[http.vdir]]
path = "/cert"
backend_path = "/echo"
auth = ["cert"]
identity = "header"

[[http.vdir]]
path = "/EWS"
backend_path = "/echo"
"""


class ClientCertificateTests(SynchronousTestCase):
    """
    A vdir with C{auth = ["cert"]} in a real casd: its TLS listener asks curl for a certificate,
    and the certificate's e-mail address names the user to the backend (nginx's echo).
    """

    def setUp(self):
        self.curl = requireBinary("curl")
        directory = os.path.abspath(self.mktemp())
        ca = CertificateAuthority.create(os.path.join(directory, "ca"))
        self.caPath = ca.caPath
        cert, key = ca.issue(["localhost", "127.0.0.1"], "server")
        clients = CertificateAuthority.create(os.path.join(directory, "clients"), name="client CA")
        self.client = clients.issue(["demo@example.com"], "demo")
        self.unknown = clients.issue(["nobody@example.com"], "nobody")
        strangers = CertificateAuthority.create(os.path.join(directory, "strangers"), name="other CA")
        self.stranger = strangers.issue(["demo@example.com"], "forged")
        self.nginx = NginxServer().start()
        self.addCleanup(self.nginx.remove)
        self.port = freePort()
        config = os.path.join(directory, "casd.toml")
        users = os.path.join(os.path.dirname(DEMO_CONFIG), "users")
        with open(config, "w") as f:
            f.write(CERT_CONFIG.format(
                cert=cert, key=key, users=users, nginx=self.nginx.port, port=self.port,
                clientCA=clients.caPath,
            ))
        log = open(os.path.join(directory, "casd.log"), "wb")
        self.addCleanup(log.close)
        casd = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
             "-n", "--pidfile=", "cas", "--config", config],
            stdout=log, stderr=subprocess.STDOUT, cwd=directory,
        )

        def stop():
            stopPid(casd.pid)
            casd.wait()

        self.addCleanup(stop)
        waitForPort("127.0.0.1", self.port, 30, alive=lambda: pidAlive(casd.pid))

    def get(self, path, pair=None, *extra):
        args = [self.curl, "-sS", "--cacert", self.caPath, "-w", "\n%{http_code}", *extra]
        if pair is not None:
            args += ["--cert", pair[0], "--key", pair[1]]
        r = subprocess.run(
            args + [f"https://127.0.0.1:{self.port}{path}"],
            capture_output=True, text=True, timeout=30,
        )
        body, _, code = r.stdout.rpartition("\n")
        return int(code or 0), body

    def test_certificateNamesTheUser(self):
        """
        curl's certificate (rfc822Name demo@example.com, from the configured client CA) logs on
        the directory's C{demo}, named to the backend in C{X-Remote-User}.
        """
        code, body = self.get("/cert/x", self.client)
        self.assertEqual(code, 200, body)
        self.assertEqual(body.split("|")[3], "demo")

    def test_noOrForeignCertificate(self):
        """
        Without a certificate, with one from another CA (the same name), or with one naming no
        user, the vdir answers 403; the handshake itself succeeds, so a vdir without C{cert}
        still answers on the same listener.
        """
        self.assertEqual(self.get("/cert/x")[0], 403)
        self.assertEqual(self.get("/cert/x", self.stranger)[0], 403)
        self.assertEqual(self.get("/cert/x", self.unknown)[0], 403)
        code, body = self.get("/EWS/x", None, "-u", "demo:demo")
        self.assertEqual(code, 200, body)
        self.assertEqual(self.get("/EWS/x", self.stranger, "-u", "demo:demo")[0], 200)
