"""
casd's HTTP front end beside nginx as a reverse proxy, in one run, to the same backend.

    python -m bench.http [--size-mb 1024] [--seconds 10] [--connections 16] [--runs 3] [--write]

The backend is a private nginx (static files, a small answer) and, behind it for C{/sink}, a
body sink that reads every byte of a request body before it answers (L{SINK}).  In front of it, on plain HTTP so that TLS is left out of the comparison:

  - casd (one twistd process) with a vdir C{/b} authenticated with Basic (users file, SSHA256, the
    credential cache) and the user named to the backend in C{X-Remote-User};
  - nginx (one worker) with C{auth_basic} ({SSHA} htpasswd), C{proxy_pass} to an C{upstream}
    with C{keepalive}, request buffering off, response buffering in memory only.

Figures: small authenticated GETs with keep-alive (C{wrk}: requests/s and the proxy's CPU per
request) and a large download and upload (C{curl}: MB/s and the proxy's CPU per GB).  CPU is the
proxy's user+system time from C{/proc}; MB = 10^6 bytes, GB = 10^9 bytes.  With C{--write} the
results replace the HTTP section of C{bench/RESULTS.md}.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import report
from bench.measure import ProcessGroup, cpuDelta
from tests.support.nginx import NginxServer
from tests.support.procs import freePort, pidAlive, stopPid, waitForPort

USER, PASSWORD = "bench", "bench-password"

PROXY_LOCATIONS = """
        location /b/ {{
            auth_basic "bench";
            auth_basic_user_file {htpasswd};
            proxy_pass http://backend/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Remote-User $remote_user;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_request_buffering off;
            proxy_max_temp_file_size 0;
            proxy_buffers 64 64k;
            proxy_buffer_size 64k;
            client_max_body_size 0;
        }}
"""

UPSTREAM = """
    upstream backend {{
        server 127.0.0.1:{port};
        keepalive 32;
    }}
"""

BACKEND_EXTRA = """
        location = /small {
            default_type text/plain;
            return 200 "a small answer from the backend, about one hundred bytes long, for the GET test\\n";
        }
        location = /sink {
            client_max_body_size 0;
            return 204;
        }
"""

CASD_CONFIG = """
[server]
hostname = "bench"
trusted_networks = ["127.0.0.0/8"]

[auth]
users_file = "{users}"

[health]
enabled = false

[routing]
default_backend = "web"

[backends.web]
host = "127.0.0.1"

[backends.web.http]
port = {backend}

[imap]
enabled = false

[http]
enabled = true
plain_http = "serve"
backend_connections = 64

[[http.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
tls = "none"

[[http.vdir]]
path = "/b"
backend_path = "/"
identity = "header"
max_body_size = 0
"""


#: With a body sink (L{startSink}): the backend hands C{/sink} on to it, body streamed, so that an
#: upload's every byte crosses the proxy under test.  (nginx's own C{return 204} answers at once
#: and discards the body: a proxy then stops forwarding it and only drains the client's, which is
#: not what the upload figure is for.)
SINK_LOCATION = """
        location = /sink {{
            client_max_body_size 0;
            proxy_pass http://127.0.0.1:{port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
        }}
"""

#: The body sink: an HTTP/1.1 server that reads each request's whole body (C{Content-Length} or
#: chunked) with C{recv_into} a 1 MiB buffer, then answers 204; one thread per connection.
SINK = r"""
import socket, sys, threading

def readHead(conn, data):
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest

def skip(conn, view, count, data):
    # Consume count bytes: first from data, then from the socket; returns what is left of data.
    if len(data) >= count:
        return data[count:]
    count -= len(data)
    while count > 0:
        n = conn.recv_into(view[: min(count, len(view))])
        if not n:
            raise EOFError
        count -= n
    return b""

def line(conn, data):
    while b"\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise EOFError
        data += chunk
    first, _, rest = data.partition(b"\r\n")
    return first, rest

def serve(conn):
    view = memoryview(bytearray(1 << 20))
    data = b""
    try:
        while True:
            head, data = readHead(conn, data)
            if head is None:
                return
            length, chunked = 0, False
            for field in head.split(b"\r\n")[1:]:
                name, _, value = field.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding" and b"chunked" in value.lower():
                    chunked = True
            if chunked:
                while True:
                    size, data = line(conn, data)
                    size = int(size.split(b";")[0], 16)
                    if size == 0:
                        while True:
                            trailer, data = line(conn, data)
                            if not trailer:
                                break
                        break
                    data = skip(conn, view, size + 2, data)
            else:
                data = skip(conn, view, length, data)
            conn.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    except (EOFError, OSError, ValueError):
        pass
    finally:
        conn.close()

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(64)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""


def startSink() -> tuple[subprocess.Popen, int]:
    """
    Start the body sink (L{SINK}) on a free loopback port.

    @return: its process and port.
    """
    port = freePort()
    process = subprocess.Popen([sys.executable, "-c", SINK, str(port)])
    waitForPort("127.0.0.1", port, 30, alive=lambda: pidAlive(process.pid))
    return process, port


def startBackend(sinkPort: int | None = None) -> NginxServer:
    """
    The backend nginx: its own locations plus the small answer and the sink (handed on to the
    body sink on C{sinkPort} when given, else nginx's own C{204}), started.
    """
    backend = NginxServer(locations=None)
    with open(backend.configPath) as f:
        conf = f.read()
    extra = BACKEND_EXTRA
    if sinkPort is not None:
        start = extra.index("        location = /sink {")
        end = extra.index("}", extra.index("return 204;", start)) + 2
        extra = extra[:start] + SINK_LOCATION.format(port=sinkPort) + extra[end:]
    with open(backend.configPath, "w") as f:
        f.write(conf.replace("        location /echo/ {", extra + "        location /echo/ {", 1))
    return backend.start()


def writeCasdConfig(work: str, backendPort: int, port: int, extra: str = "") -> str:
    """
    Write casd's users file and configuration (L{CASD_CONFIG}, then C{extra}) into C{work}.

    @return: the configuration's path.
    """
    users = os.path.join(work, "users")
    with open(users, "w") as f:
        f.write(f"{USER}:{ssha256(PASSWORD)}\n")
    config = os.path.join(work, "casd.toml")
    with open(config, "w") as f:
        f.write(CASD_CONFIG.format(users=users, backend=backendPort, port=port) + extra)
    return config


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


def ssha256(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha256(password.encode() + salt).digest()
    return "{SSHA256}" + base64.b64encode(digest + salt).decode()


class Proxy:
    def __init__(self, name, port, group):
        self.name = name
        self.port = port
        self.group = group

    def url(self, path):
        return f"http://127.0.0.1:{self.port}/b{path}"


def wrk(proxy, seconds, connections):
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    before = proxy.group.cpu()
    r = subprocess.run(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds}s",
         "-H", f"Authorization: Basic {auth}", proxy.url("/small")],
        capture_output=True, text=True, check=True,
    )
    cpu = cpuDelta(before, proxy.group.cpu())
    requests = int(re.search(r"(\d+) requests in", r.stdout).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", r.stdout)
    return {
        "rps": requests / seconds,
        "cpu_ms_per_request": cpu * 1000 / max(requests, 1),
        "errors": int(errors.group(1)) if errors else 0,
    }


def peakRSS(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def transfer(proxy, size, upload, source):
    for pid in proxy.group.pids():
        # Reset the peak (VmHWM) so that it measures this transfer alone.
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    rssBefore = proxy.group.rss()
    before = proxy.group.cpu()
    start = time.monotonic()
    if upload:
        args = ["-T", source, proxy.url("/sink")]
    else:
        args = ["-o", os.devnull, proxy.url("/files/big")]
    r = subprocess.run(
        ["curl", "-sS", "-u", f"{USER}:{PASSWORD}", "-w", "%{http_code} %{size_download} %{size_upload}", *args],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.monotonic() - start
    cpu = cpuDelta(before, proxy.group.cpu())
    code, down, up = r.stdout.split()
    moved = int(float(up if upload else down))
    if moved != size or code not in ("200", "204"):
        raise RuntimeError(f"{proxy.name}: {code}, {moved} of {size} bytes")
    growth = max(peakRSS(p) for p in proxy.group.pids()) - rssBefore
    return {
        "mb_per_s": size / 1e6 / elapsed,
        "cpu_s_per_gb": cpu / (size / 1e9),
        "rss_growth_mb": growth / 1e6,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="large transfer size, MiB")
    parser.add_argument("--seconds", type=int, default=10, help="wrk duration per run")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = parser.parse_args(argv)
    size = args.size_mb * 1024 * 1024

    work = tempfile.mkdtemp(prefix="casd-bench-http-")
    sink, sinkPort = startSink()
    backend = startBackend(sinkPort)
    source = backend.makeFile("big", size)
    htpasswd = os.path.join(work, "htpasswd")
    with open(htpasswd, "w") as f:
        f.write(f"{USER}:{ssha(PASSWORD)}\n")
    os.chmod(work, 0o755)
    os.chmod(htpasswd, 0o644)
    proxyNginx = NginxServer(
        locations=PROXY_LOCATIONS.format(htpasswd=htpasswd),
        upstreams=UPSTREAM.format(port=backend.port),
    ).start()
    casdPort = freePort()
    config = writeCasdConfig(work, backend.port, casdPort)
    log = open(os.path.join(work, "casd.log"), "wb")
    casd = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
         "--logfile", os.path.join(work, "twistd.log"), "cas", "--config", config],
        stdout=log, stderr=subprocess.STDOUT,
    )
    results = {}
    try:
        waitForPort("127.0.0.1", casdPort, 30, alive=lambda: pidAlive(casd.pid))
        proxies = [
            Proxy("nginx", proxyNginx.port, ProcessGroup(proxyNginx.process.pid)),
            Proxy("casd", casdPort, ProcessGroup(casd.pid, withChildren=False)),
        ]
        for proxy in proxies:
            wrk(proxy, 2, args.connections)  # warm-up: connections, credential cache
        for run in range(args.runs):
            for proxy in proxies:
                r = results.setdefault(proxy.name, {"get": [], "down": [], "up": []})
                r["get"].append(wrk(proxy, args.seconds, args.connections))
                r["down"].append(transfer(proxy, size, False, source))
                r["up"].append(transfer(proxy, size, True, source))
                print(f"run {run + 1} {proxy.name}: {r['get'][-1]} down {r['down'][-1]} up {r['up'][-1]}", file=sys.stderr)
    finally:
        stopPid(casd.pid)
        casd.wait()
        log.close()
        proxyNginx.remove()
        backend.remove()
        stopPid(sink.pid)
        sink.wait()
        shutil.rmtree(work, ignore_errors=True)
    text = render(results, args)
    print(text)
    if args.write:
        writeResults(text)
    return 0


def _median(runs, key):
    return statistics.median(r[key] for r in runs)


def render(results, args) -> str:
    n, c = results["nginx"], results["casd"]
    rows = [
        "## HTTP: casd beside nginx as a reverse proxy (plain HTTP, one process each)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `python -m bench.http"
        f" --size-mb {args.size_mb} --seconds {args.seconds} --connections {args.connections}"
        f" --runs {args.runs}`; medians of {args.runs} runs.  Backend: nginx (static file, a"
        " ~100-byte answer) and, for uploads, a sink behind it that reads every body byte before it answers.  casd: Basic against its users file (SSHA256, credential"
        " cache), identity in `X-Remote-User`; nginx: `auth_basic` ({SSHA}), `proxy_pass` to an"
        " upstream with `keepalive 32`, `proxy_request_buffering off`.  Load average at the"
        f" end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (others' work shares the"
        " machine: compare CPU figures, not rates, across runs).",
        "",
        "| figure | nginx | casd | casd/nginx | milestone |",
        "|---|---|---|---|---|",
    ]

    def row(label, key, part, fmt, milestone, higherBetter):
        a, b = _median(n[part], key), _median(c[part], key)
        ratio = b / a if a else float("nan")
        ok = (ratio >= milestone) if higherBetter else (ratio <= milestone)
        sign = "≥" if higherBetter else "≤"
        rows.append(
            f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {ratio:.2f}x |"
            f" {sign} {milestone}x: {'met' if ok else '**not met**'} |"
        )

    row(f"small GETs, keep-alive, {args.connections} connections: requests/s", "rps", "get", "{:.0f}", 0, True)
    rows[-1] = rows[-1].rsplit("|", 2)[0] + "| |"
    row("CPU per request, ms", "cpu_ms_per_request", "get", "{:.3f}", 3, False)
    row(f"download {args.size_mb} MiB: MB/s", "mb_per_s", "down", "{:.0f}", 0.9, True)
    row("download: CPU s per GB", "cpu_s_per_gb", "down", "{:.2f}", 1.5, False)
    row(f"upload {args.size_mb} MiB: MB/s", "mb_per_s", "up", "{:.0f}", 0.9, True)
    row("upload: CPU s per GB", "cpu_s_per_gb", "up", "{:.2f}", 1.5, False)
    rows.append(
        f"| casd's resident memory growth (peak) during the transfers, MB |  |"
        f" {max(r['rss_growth_mb'] for r in c['down'] + c['up']):.0f} |  | < 64 MB |"
    )
    return "\n".join(rows) + "\n"


def writeResults(text: str) -> None:
    report.writeBlock(
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"),
        text, "<!-- bench.http begin -->", "<!-- bench.http end -->",
    )


if __name__ == "__main__":
    sys.exit(main())
