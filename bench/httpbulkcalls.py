"""
Python function calls per MB of HTTP download and upload (and per request, as
C{bench.httpcalls} counts them but with built-ins counted apart), counted with
cProfile in casd's process (deterministic where CPU time on a shared machine is not).

    PYTHONPATH=$PWD .venv/bin/python -m bench.httpbulkcalls [--requests 2000] [--size-mb 64]

The set-up of L{bench.http} (a private nginx backend, casd with the Basic-authenticated vdir
C{/b}), casd run under L{bench.callcount}'s C{wrap} mode (cProfile on at one signal, off and
written at another).  Each phase is counted alone: C{--requests} small GETs one after the
other on one keep-alive connection, then one download and one upload of C{--size-mb} MiB.
Prints the calls per request, per MB down and up, and the functions called most per request.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
import time

from bench.callcount import START, STOP
from bench.http import PASSWORD, USER, startBackend, writeCasdConfig
from bench.httpcalls import startProfiledCASD
from bench.servers import ROOT
from tests.support.procs import freePort, pidAlive, stopPid, waitForPort

AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def _counted(pid: int, stats: str, run):
    """
    Run C{run()} with casd's profiler on; return the C{pstats.Stats} of it.
    """
    if os.path.exists(stats):
        os.unlink(stats)
    os.kill(pid, START)
    time.sleep(0.2)
    run()
    time.sleep(0.3)
    os.kill(pid, STOP)
    deadline = time.monotonic() + 30
    while not os.path.exists(stats) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    return pstats.Stats(stats)


def _gets(port: int, n: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    for _ in range(n):
        connection.request("GET", "/b/small", headers={"Authorization": AUTH})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"GET: {response.status}")
    connection.close()


def _download(port: int, size: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    connection.request("GET", "/b/files/big", headers={"Authorization": AUTH})
    response = connection.getresponse()
    got = 0
    while True:
        data = response.read(1 << 20)
        if not data:
            break
        got += len(data)
    connection.close()
    if response.status != 200 or got != size:
        raise RuntimeError(f"download: {response.status}, {got} of {size}")


def _upload(port: int, size: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port)
    block = b"u" * (1 << 20)

    def body():
        left = size
        while left:
            piece = block[: min(left, len(block))]
            left -= len(piece)
            yield piece

    connection.request(
        "PUT", "/b/sink", body=body(),
        headers={"Authorization": AUTH, "Content-Length": str(size)},
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    if response.status not in (200, 204):
        raise RuntimeError(f"upload: {response.status}")


def _syscalls(pid: int, run, per: float) -> dict:
    """
    The system calls of casd's process while C{run()} runs, per C{per} (C{strace -c}).
    """
    out = tempfile.mktemp(prefix="casd-strace-")
    tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(pid)],
                              stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        run()
    finally:
        tracer.send_signal(2)
        tracer.wait(30)
    counts = {}
    with open(out) as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 5 and fields[-1] not in ("syscall", "total") and fields[3].isdigit():
                counts[fields[-1]] = round(int(fields[3]) / per, 2)
    os.unlink(out)
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _top(result, per: float, top: int) -> None:
    rows = sorted(result.stats.items(), key=lambda kv: -kv[1][1])[:top]
    for (path, line, name), (cc, nc, tt, ct, _) in rows:
        where = os.path.relpath(path, ROOT) if path.startswith(ROOT) else path.rsplit("site-packages/", 1)[-1]
        print(f"{nc / per:8.2f}  {where}:{line}({name})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--size-mb", type=int, default=64, help="download and upload size, MiB")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--show", choices=("get", "down", "up"), default="get",
                        help="the phase whose functions are listed (per request, per MB)")
    parser.add_argument("--strace", action="store_true",
                        help="also count casd's system calls per request (strace -c)")
    parser.add_argument("--dump", help="write each phase's statistics to DUMP.PHASE.prof")
    args = parser.parse_args(argv)
    size = args.size_mb * 1024 * 1024

    work = tempfile.mkdtemp(prefix="casd-httpcalls-")
    backend = startBackend()
    backend.makeFile("big", size)
    port = freePort()
    config = writeCasdConfig(work, backend.port, port)
    casd, stats, log = startProfiledCASD(work, config)
    try:
        waitForPort("127.0.0.1", port, 30, alive=lambda: pidAlive(casd.pid))
        _gets(port, 50)  # the credential cache, a pooled backend connection
        gets = _counted(casd.pid, stats, lambda: _gets(port, args.requests))
        down = _counted(casd.pid, stats, lambda: _download(port, size))
        up = _counted(casd.pid, stats, lambda: _upload(port, size))
        mb = size / 1e6
        if args.strace:
            print(json.dumps({"syscallsPerRequest": _syscalls(casd.pid, lambda: _gets(port, args.requests), args.requests)}))
        print(json.dumps({
            "requests": args.requests,
            "callsPerRequest": round(gets.total_calls / args.requests, 1),
            "sizeMB": round(mb, 1),
            "callsPerMBDown": round(down.total_calls / mb, 1),
            "callsPerMBUp": round(up.total_calls / mb, 1),
        }))
        if args.dump:
            for name, result in (("get", gets), ("down", down), ("up", up)):
                result.dump_stats(f"{args.dump}.{name}.prof")
        shown = {"get": (gets, args.requests), "down": (down, mb), "up": (up, mb)}
        result, per = shown[args.show]
        _top(result, per, args.top)
        return 0
    except Exception:
        log.flush()
        for name in ("casd.log",):
            if os.path.exists(os.path.join(work, name)):
                with open(os.path.join(work, name), "rb") as f:
                    sys.stderr.write(f.read().decode("utf-8", "replace")[-3000:])
        raise
    finally:
        stopPid(casd.pid)
        casd.wait()
        log.close()
        backend.remove()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
