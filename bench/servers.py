"""
The servers under test, each a private instance on loopback high ports, started as a child in
its own session and stopped by PID (its process group): Dovecot (the backend), nginx's mail
proxy with its C{auth_http} server, HAProxy in TCP mode, and casd.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
import subprocess
import sys
import time

from casd.auth.hashing import makeHash
from tests.support.dovecot import Dovecot
from tests.support.procs import freePort, requireBinary, stopPid, waitForPort

from bench.measure import ProcessGroup

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: One MiB, the size of the bulk messages.
MIB = 1 << 20

#: Seconds an unused Dovecot mail process lives (see L{BenchDovecot}).
DOVECOT_IDLE_KILL = 3


def userName(i: int) -> str:
    return f"u{i:04d}"


def password(i: int) -> str:
    return f"pw{i:04d}x"


class Process:
    """
    A server run as our child, in a new session so that its whole group can be stopped.

    @ivar group: the L{ProcessGroup} measured: the server's processes.
    """

    name = "server"
    withChildren = True
    #: The CPUs the server runs on (its children and threads inherit them); empty: any.
    cpus: set = frozenset()

    def __init__(self, work: str) -> None:
        self.work = work
        self.process = None
        self.group = None
        self.ports: dict[str, int] = {}

    def command(self) -> list[str]:
        raise NotImplementedError()

    def environment(self):
        return None

    def prepare(self) -> None:
        """
        Write the configuration (ports are chosen once, on the first start).
        """

    def start(self) -> None:
        os.makedirs(self.work, exist_ok=True)
        if not self.ports:
            self.choosePorts()
        self.prepare()
        log = open(os.path.join(self.work, f"{self.name}.out"), "ab")
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.work,
            env=self.environment(),
            preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
        )
        log.close()
        alive = lambda: self.process.poll() is None  # noqa: E731
        try:
            for port in self.ports.values():
                waitForPort("127.0.0.1", port, timeout=30.0, alive=alive)
        except RuntimeError as e:
            self.stop()
            with open(os.path.join(self.work, f"{self.name}.out"), errors="replace") as f:
                raise RuntimeError(f"{self.name} did not start: {e}\n{f.read()[-3000:]}") from None
        self.group = ProcessGroup(self.process.pid, self.withChildren)
        self.settle()

    def settle(self) -> None:
        """
        Wait until the server's worker processes are up (they count in its CPU and memory).
        """

    def choosePorts(self) -> None:
        raise NotImplementedError()

    def stop(self) -> None:
        if self.process is not None:
            stopPid(self.process.pid, timeout=10.0, processGroup=True)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            self.process = None
            self.group = None

    def restart(self) -> None:
        self.stop()
        self.start()


class BenchDovecot(Dovecot):
    """
    The backend: the test fixture's Dovecot tuned for many sessions (login processes in
    high-performance mode, IMAP/POP3 processes reused, no per-user connection cap).

    @ivar imapClients: clients one IMAP process serves at once (1, Dovecot's default; the soak's
        10,000 held sessions need more, or 10,000 processes).
    """

    imapClients = 1

    def _config(self, usersPath, mastersPath):
        text = super()._config(usersPath, mastersPath)
        for login in ("imap-login", "pop3-login"):
            text = text.replace(
                "service %s {\n" % login,
                "service %s {\n  service_count = 0\n  process_min_avail = 2\n"
                "  client_limit = 6000\n  vsz_limit = 1G\n" % login,
            )
        text += "\n".join(
            [
                "default_process_limit = 6000",
                "default_client_limit = 20000",
                "mail_fsync = never",
                "auth_cache_size = 1M",
                "auth_cache_ttl = 1 hour",
                # Reused mail processes: the backend's fork cost is not what is measured.  They
                # all wait on one socket, so the thousands the idle phase needs must go soon
                # after it (idle_kill), or every later login wakes them all.
                "service imap {\n  service_count = 1000\n  process_limit = 6000\n  idle_kill = %d secs\n"
                "  client_limit = %d\n}" % (DOVECOT_IDLE_KILL, self.imapClients),
                "service pop3 {\n  service_count = 1000\n  process_limit = 6000\n  idle_kill = %d secs\n}"
                % DOVECOT_IDLE_KILL,
                # The test fixture looks for new mail every second when inotify is unavailable;
                # Dovecot's default here (nothing is delivered during the idle phase).
                "mailbox_idle_check_interval = 30 secs",
                "service auth {\n  client_limit = 20000\n}",
                "service anvil {\n  client_limit = 20000\n}",
                "",
            ]
        )
        return text

    @property
    def group(self):
        return ProcessGroup(self.pid, True) if self.pid else None


def startDovecot(
    work: str, users: int, bulkUsers: int, bulkMessages: int, pop3: bool, imapClients: int = 1
) -> BenchDovecot:
    """
    Start Dovecot with C{users} users, each with a few small messages, the first C{bulkUsers} with
    C{bulkMessages} more of 1 MiB each.
    """
    accounts = {userName(i): password(i) for i in range(users)}
    dovecot = BenchDovecot(
        os.path.join(work, "dovecot"), accounts, protocols=("imap", "pop3") if pop3 else ("imap",)
    )
    dovecot.imapClients = imapClients
    if os.path.isdir(dovecot.mailRoot):
        shutil.rmtree(dovecot.mailRoot)
    dovecot.start()
    rng = random.Random(7)
    small = [_message(f"small {k}", rng, 2000) for k in range(3)]
    big = _message("big", rng, MIB)
    for i in range(users):
        user = userName(i)
        maildir = dovecot.maildir(user)
        messages = list(small) + ([big] * bulkMessages if i < bulkUsers else [])
        for k, body in enumerate(messages):
            path = os.path.join(maildir, "cur", f"{1700000000 + k}.M{k}P{i}.bench:2,S")
            with open(path, "wb") as f:
                f.write(body)
            os.chown(path, dovecot.mailUid, dovecot.mailGid)
    return dovecot


def _message(subject: str, rng: random.Random, size: int) -> bytes:
    head = (
        f"From: load@bench.test\nTo: user@bench.test\nSubject: {subject}\n"
        f"Message-ID: <{rng.getrandbits(64):x}@bench.test>\n\n"
    ).encode()
    raw = base64.b64encode(rng.randbytes(size))
    lines = [raw[k : k + 76] for k in range(0, size - len(head), 77)]
    body = b"\n".join(lines)[: size - len(head) - 1] + b"\n"
    return head + body


def writeCertificate(work: str) -> tuple[str, str, str]:
    """
    @return: C{(cert, key, combined)} PEM paths (EC P-256, self-signed).
    """
    from tests.support.certs import selfSigned

    directory = os.path.join(work, "tls")
    cert, key = selfSigned(directory, ["127.0.0.1", "localhost"], "server")
    combined = os.path.join(directory, "combined.pem")
    with open(combined, "wb") as out:
        for path in (cert, key):
            with open(path, "rb") as f:
                out.write(f.read())
    os.chmod(combined, 0o600)
    return cert, key, combined


class AuthHTTP(Process):
    """
    nginx's C{auth_http} answerer (L{bench.authhttp}).
    """

    name = "authhttp"
    withChildren = False

    def __init__(self, work, usersPath, imapPort, pop3Port=None) -> None:
        super().__init__(work)
        self.usersPath = usersPath
        self.backendPorts = [str(imapPort)] + ([str(pop3Port)] if pop3Port else [])

    def choosePorts(self):
        self.ports = {"http": freePort()}

    def command(self):
        return [sys.executable, "-m", "bench.authhttp", str(self.ports["http"]), self.usersPath] + self.backendPorts

    def environment(self):
        return dict(os.environ, PYTHONPATH=ROOT)


class Nginx(Process):
    """
    nginx's mail proxy: C{proxy_buffer 64k}, one worker unless told otherwise.
    """

    name = "nginx"

    def __init__(self, work, authPort, cert, key, pop3: bool, workers: int = 1) -> None:
        super().__init__(work)
        self.authPort = authPort
        self.cert, self.key = cert, key
        self.pop3 = pop3
        self.workers = workers

    def choosePorts(self):
        self.ports = {"imap": freePort(), "imaps": freePort()}
        if self.pop3:
            self.ports.update(pop3=freePort(), pop3s=freePort())

    def prepare(self):
        module = "/usr/lib/nginx/modules/ngx_mail_module.so"
        servers = []
        for proto in ("imap", "pop3") if self.pop3 else ("imap",):
            servers.append(f"    server {{ listen 127.0.0.1:{self.ports[proto]}; protocol {proto}; }}")
            servers.append(
                f"    server {{ listen 127.0.0.1:{self.ports[proto + 's']} ssl; protocol {proto};"
                f" ssl_certificate {self.cert}; ssl_certificate_key {self.key}; }}"
            )
        conf = f"""
load_module {module};
daemon off;
master_process on;
user www-data;
worker_processes {self.workers};
worker_rlimit_nofile 19000;
pid {self.work}/nginx.pid;
error_log {self.work}/nginx-error.log error;
events {{ worker_connections 9000; }}
mail {{
    server_name bench.test;
    auth_http 127.0.0.1:{self.authPort}/auth;
    proxy on;
    proxy_buffer 64k;
    proxy_pass_error_message on;
    imap_auth plain login;
    imap_capabilities "IMAP4rev1" "LITERAL+" "SASL-IR" "ID" "IDLE";
    pop3_auth plain;
    # Session tickets on, as casd issues them (its default and nginx's): both send the same
    # TLS 1.3 tickets after each full handshake; the load generator never resumes.
    ssl_session_cache off;
    ssl_session_tickets on;
{chr(10).join(servers)}
}}
"""
        with open(os.path.join(self.work, "nginx.conf"), "w") as f:
            f.write(conf)

    def command(self):
        binary = requireBinary("nginx", [("/usr/sbin/nginx", "nginx")])
        return [binary, "-p", self.work, "-c", os.path.join(self.work, "nginx.conf"), "-e", "stderr"]

    def settle(self):
        _waitForChildren(self.group, self.workers)


class HAProxy(Process):
    """
    HAProxy in TCP mode, one thread: the no-protocol baseline.
    """

    name = "haproxy"
    withChildren = False

    def __init__(self, work, combinedPem, imapPort, pop3Port=None) -> None:
        super().__init__(work)
        self.pem = combinedPem
        self.imapPort = imapPort
        self.pop3Port = pop3Port

    def choosePorts(self):
        self.ports = {"imap": freePort(), "imaps": freePort()}
        if self.pop3Port:
            self.ports.update(pop3=freePort(), pop3s=freePort())

    def prepare(self):
        parts = [
            "global\n    maxconn 9000\n    nbthread 1\n    tune.bufsize 65536\n",
            "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n",
        ]
        for proto, port in (("imap", self.imapPort), ("pop3", self.pop3Port)):
            if not port:
                continue
            parts.append(
                f"frontend {proto}\n    bind 127.0.0.1:{self.ports[proto]}\n"
                f"    default_backend {proto}_back\n"
            )
            parts.append(
                f"frontend {proto}s\n    bind 127.0.0.1:{self.ports[proto + 's']} ssl crt {self.pem}\n"
                f"    default_backend {proto}_back\n"
            )
            parts.append(f"backend {proto}_back\n    server d 127.0.0.1:{port}\n")
        with open(os.path.join(self.work, "haproxy.cfg"), "w") as f:
            f.write("\n".join(parts))

    def command(self):
        binary = requireBinary("haproxy", [("/usr/sbin/haproxy", "haproxy")])
        return [binary, "-db", "-f", os.path.join(self.work, "haproxy.cfg")]


class CASD(Process):
    """
    casd under C{twistd -n cas}, from this checkout, users in a users file.
    """

    name = "casd"

    def __init__(self, work, cert, key, usersPath, imapPort, pop3Port=None, workers: int = 1) -> None:
        super().__init__(work)
        self.cert, self.key = cert, key
        self.usersPath = usersPath
        self.imapPort = imapPort
        self.pop3Port = pop3Port
        self.workers = workers

    def choosePorts(self):
        self.ports = {"imap": freePort(), "imaps": freePort()}
        if self.pop3Port:
            self.ports.update(pop3=freePort(), pop3s=freePort())

    def prepare(self):
        sections = []
        backend = [f'[backends.dovecot.imap]\nport = {self.imapPort}\ntls = "none"\n']
        for proto, port in (("imap", self.imapPort), ("pop3", self.pop3Port)):
            if not port:
                continue
            if proto == "pop3":
                backend.append(f'[backends.dovecot.pop3]\nport = {port}\ntls = "none"\n')
            sections.append(
                f"""[{proto}]
enabled = true
[[{proto}.listen]]
name = "{proto}"
endpoint = "tcp:{self.ports[proto]}:interface=127.0.0.1:backlog=1024"
tls = "none"
[[{proto}.listen]]
name = "{proto}s"
endpoint = "tcp:{self.ports[proto + 's']}:interface=127.0.0.1:backlog=1024"
tls = "implicit"
"""
            )
        config = f"""
[server]
hostname = "bench.test"
trusted_networks = ["127.0.0.0/8"]

[tls]
certificate = "{self.cert}"
key = "{self.key}"

[auth]
users_file = "{self.usersPath}"
failure_delay = 0.0
# Warm for the whole run (the benchmark logs every user in once before measuring).
cache_ttl = 7200.0

[routing]
default_backend = "dovecot"

[backends.dovecot]
host = "127.0.0.1"

{chr(10).join(backend)}
{chr(10).join(sections)}
"""
        with open(os.path.join(self.work, "casd.toml"), "w") as f:
            f.write(config)

    def command(self):
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        args = [
            sys.executable,
            twistd,
            "-n",
            "--pidfile",
            os.path.join(self.work, "twistd.pid"),
            "--logfile",
            os.path.join(self.work, "casd.log"),
            "cas",
            "--config",
            os.path.join(self.work, "casd.toml"),
        ]
        if self.workers > 1:
            args += ["--workers", str(self.workers)]
        return args

    def environment(self):
        return dict(os.environ, PYTHONPATH=ROOT)

    def settle(self):
        if self.workers > 1:
            _waitForChildren(self.group, self.workers)
            # The workers adopt the parent's sockets: wait until each answers.
            time.sleep(1.0)


def _waitForChildren(group, count, timeout=20.0):
    deadline = time.monotonic() + timeout
    while len(group.pids()) < count + 1:
        if time.monotonic() > deadline:
            raise RuntimeError(f"expected {count} worker processes, found {len(group.pids()) - 1}")
        time.sleep(0.05)


def writeUsers(work: str, users: int, scheme: str, rounds: int | None = None) -> tuple[str, str]:
    """
    Write casd's users file (hashed) and the auth_http table (clear).

    @return: C{(casdUsersPath, clearUsersPath)}.
    """
    os.makedirs(work, exist_ok=True)
    casdPath = os.path.join(work, f"users.{scheme.lower()}")
    clearPath = os.path.join(work, "users.clear")
    with open(casdPath, "w") as f:
        for i in range(users):
            f.write(f"{userName(i)}:{makeHash(scheme, password(i).encode(), rounds=rounds)}\n")
    with open(clearPath, "w") as f:
        for i in range(users):
            f.write(f"{userName(i)}:{password(i)}\n")
    return casdPath, clearPath
