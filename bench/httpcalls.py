"""
Python function calls per proxied HTTP request, counted with cProfile: deterministic where
wall-clock and CPU figures are not (a machine shared with other work).

    PYTHONPATH=$PWD .venv/bin/python -m bench.httpcalls [--requests 2000] [--connections 4]

The set-up of C{bench.http}: a private nginx backend and casd (one C{twistd} process, plain HTTP)
with the vdir C{/b}, Basic authentication against its users file (SSHA256, the credential
cache), the user named to the backend in C{X-Remote-User}.  casd runs inside
C{bench.callcount}'s C{wrap} mode, which turns cProfile on at one real-time signal and off,
writing the statistics, at another.  After a warm-up (credential cache, backend connections),
C{--requests} small authenticated GETs go over C{--connections} keep-alive connections, one
request at a time, from a raw socket client; prints the calls per request and the functions
called most per request (C{--by-module}: per module, built-ins counted with their caller).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pstats
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from bench.callcount import START, STATS_ENV, STOP
from bench.garbage import GARBAGE_ENV
from bench.http import PASSWORD, USER, startBackend, writeCasdConfig
from bench.servers import ROOT
from tests.support.procs import freePort, pidAlive, stopPid, waitForPort

def _request(sock, host: bytes, auth: bytes, path: bytes) -> int:
    sock.sendall(
        b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\nUser-Agent: httpcalls\r\n"
        b"Accept: */*\r\nAuthorization: Basic " + auth + b"\r\n\r\n"
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("connection closed in the body")
        body += chunk
    return status


def _load(port: int, requests: int, connections: int) -> int:
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode())
    host = b"127.0.0.1:%d" % port
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    done = 0
    try:
        for i in range(requests):
            status = _request(socks[i % connections], host, auth, b"/b/small")
            if status != 200:
                raise RuntimeError(f"status {status}")
            done += 1
    finally:
        for s in socks:
            s.close()
    return done


def _syscalls(pid: int, port: int, args, work: str) -> int:
    """
    Count casd's system calls (C{strace -c -f}) over C{--requests} GETs and print them per
    request (no profiler running).
    """
    out = os.path.join(work, "strace.txt")
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)], stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached
    done = _load(port, args.requests, args.connections)
    time.sleep(0.5)
    tracer.terminate()
    tracer.wait()
    with open(out) as f:
        rows = f.read().splitlines()
    print(json.dumps({"requests": done}))
    for row in rows:
        fields = row.split()
        # % time, seconds, usecs/call, calls, [errors,] syscall
        if len(fields) >= 5 and fields[3].isdigit() and fields[-1] != "total":
            print(f"{int(fields[3]) / done:8.2f}  {fields[-1]}")
        elif fields[-1:] == ["total"]:
            print(f"{int(fields[3]) / done:8.2f}  total")
    return 0


def _where(path: str) -> str:
    return os.path.relpath(path, ROOT) if path.startswith(ROOT) else path.rsplit("site-packages/", 1)[-1]


def startProfiledCASD(work: str, config: str, garbage: str | None = None):
    """
    Start casd (C{twistd -n cas}) under L{bench.callcount}'s C{wrap}: its profiler switched by
    L{bench.callcount.START} and L{bench.callcount.STOP}, the statistics written to C{stats}.

    @param garbage: where casd writes its cyclic-garbage report (L{bench.garbage}), if wanted.
    @return: C{(process, stats, log)}: the process, the statistics' path, casd's open output file.
    """
    stats = os.path.join(work, "calls.prof")
    log = open(os.path.join(work, "casd.log"), "wb")
    casd = subprocess.Popen(
        [sys.executable, "-m", "bench.callcount", "wrap", "-n", "--pidfile=",
         "--logfile", os.path.join(work, "twistd.log"), "cas", "--config", config],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
        env=dict(os.environ, **{STATS_ENV: stats, "PYTHONPATH": ROOT}, **({GARBAGE_ENV: garbage} if garbage else {})),
    )
    return casd, stats, log


def measure(args) -> int:
    work = tempfile.mkdtemp(prefix="casd-httpcalls-")
    backend = startBackend()
    port = freePort()
    # HTTP only: IMAP would take its default port (busy on a shared machine).
    config = writeCasdConfig(work, backend.port, port)
    garbage = os.path.join(work, "garbage.json") if args.garbage else None
    casd, stats, log = startProfiledCASD(work, config, garbage)
    try:
        try:
            waitForPort("127.0.0.1", port, 30, alive=lambda: pidAlive(casd.pid))
        except RuntimeError:
            for name in ("casd.log", "twistd.log"):
                if os.path.exists(os.path.join(work, name)):
                    with open(os.path.join(work, name)) as f:
                        print(f.read()[-3000:], file=sys.stderr)
            raise
        _load(port, 50, args.connections)  # the credential cache, the backend's connections
        if args.strace:
            return _syscalls(casd.pid, port, args, work)
        os.kill(casd.pid, START)
        time.sleep(0.2)
        done = _load(port, args.requests, args.connections)
        time.sleep(0.5)  # the connections' close
        os.kill(casd.pid, STOP)
        deadline = time.monotonic() + 30
        while not os.path.exists(stats) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        if args.save:
            shutil.copy(stats, args.save)
        result = pstats.Stats(stats)
        total = result.total_calls
        print(json.dumps({"requests": done, "calls": total, "callsPerRequest": round(total / done, 1)}))
        rows = sorted(result.stats.items(), key=lambda kv: -kv[1][1])[: args.top]
        for (path, line, name), (cc, nc, tt, ct, _) in rows:
            print(f"{nc / done:8.2f}  {_where(path)}:{line}({name})")
        if garbage:
            from bench.garbage import render

            with open(garbage) as f:
                print(render(json.load(f), done, "request"))
        if args.by_module:
            # Built-ins counted with the module that called them.
            modules: dict = {}
            for (path, line, name), (cc, nc, tt, ct, callers) in result.stats.items():
                if path == "~":
                    for (cpath, _, _), counts in callers.items():
                        where = _where(cpath)
                        modules[where] = modules.get(where, 0) + counts[0]
                else:
                    where = _where(path)
                    modules[where] = modules.get(where, 0) + nc
            print("-- by module (built-ins with their caller)")
            for where, n in sorted(modules.items(), key=lambda kv: -kv[1])[: args.top]:
                print(f"{n / done:8.2f}  {where}")
        return 0
    finally:
        stopPid(casd.pid)
        casd.wait()
        log.close()
        backend.remove()
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--by-module", action="store_true")
    parser.add_argument("--garbage", action="store_true", help="also report the cyclic garbage casd leaves (bench.garbage)")
    parser.add_argument("--save", help="keep the cProfile statistics in this file")
    parser.add_argument("--strace", action="store_true", help="count system calls instead")
    return measure(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
