"""
Login storm with the array's shared state: the same storm against two casd nodes in one run,
one with C{[state] backend = "local"} (today's single-node state), one with C{"redis"} (a private
redis-server on loopback), phases alternating so that both see the same machine.  Reported per
backend: sessions/s, latency percentiles, errors and casd CPU per session; for Redis also its own
CPU per session and the commands casd sent it per login (from C{INFO commandstats}; the
commands its Lua scripts run inside count as one round trip with their script).

    python -m bench.login_storm_redis [--users 200] [--concurrency 20] [--rounds 3]

The credential cache is warm (every user logs in once before the measured phases); the clients
log in with plaintext LOGIN from a trusted network, as in L{bench.login_storm_ldap}, so a session
costs casd little and the share of Redis in it shows plainly.  (A trusted client's penalty keys
only the user; an untrusted one's keys the address in the same script: still one round trip.)
The backend is the stub IMAP server of L{bench.login_storm_ldap}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from bench.login_storm_ldap import _phase  # noqa: E402

CONFIG = """
[server]
trusted_networks = {trusted}

[auth]
users_file = "users"

[state]
backend = "{backend}"
{redis}

[backends.mbx]
host = "127.0.0.1"
[backends.mbx.imap]
port = {backendPort}
tls = "none"

[routing]
default_backend = "mbx"

[imap]
[[imap.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1:backlog=1024"
"""


def _users(count):
    return [(f"storm{i:05d}", f"pw-{i:05d}-storm") for i in range(count)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    if not 1 <= args.users <= 100_000 or not 1 <= args.concurrency <= 1000 or not 1 <= args.rounds <= 20:
        parser.error("--users 1..100000, --concurrency 1..1000, --rounds 1..20")

    from bench.measure import cpuSeconds
    from tests.support.procs import freePort, stopPid, waitForPort
    from tests.support.redis import RedisServer

    work = tempfile.mkdtemp(prefix="casd-redis-storm-")
    children: list[subprocess.Popen] = []
    logs = []
    redis = None
    try:
        redis = RedisServer(os.path.join(work, "redis-server")).start()
        users = _users(args.users)
        with open(os.path.join(work, "users"), "w") as f:
            f.writelines(f"{u}:{{PLAIN}}{p}\n" for u, p in users)
        with open(os.path.join(work, "array.key"), "w") as f:
            f.write("b" * 48 + "\n")
        backendPort = freePort()
        stubLog = open(os.path.join(work, "stub.out"), "wb")
        logs.append(stubLog)
        stub = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "login_storm_ldap.py"), "--stub-backend", str(backendPort)],
            stdout=stubLog, stderr=stubLog, cwd=work,
        )
        children.append(stub)
        waitForPort("127.0.0.1", backendPort, 15.0, lambda: stub.poll() is None)

        nodes = {}
        for backend in ("local", "redis"):
            port = freePort()
            directory = os.path.join(work, backend)
            os.makedirs(directory)
            shutil.copy(os.path.join(work, "users"), directory)
            extra = (
                f'urls = ["{redis.url}"]\nsecret_file = "{work}/array.key"' if backend == "redis" else ""
            )
            text = CONFIG.format(
                trusted='["127.0.0.0/8"]', backend=backend, redis=extra, backendPort=backendPort,
                port=port,
            )
            path = os.path.join(directory, "casd.toml")
            with open(path, "w") as f:
                f.write(text)
            log = open(os.path.join(directory, "casd.out"), "wb")
            logs.append(log)
            proc = subprocess.Popen(
                [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
                 "--pidfile=", "cas", "--config", path],
                stdout=log, stderr=log, cwd=directory, env=dict(os.environ, PYTHONPATH=ROOT),
            )
            children.append(proc)
            waitForPort("127.0.0.1", port, 30.0, lambda: proc.poll() is None)
            nodes[backend] = (proc, port)

        # Warm the credential caches (and the Redis script cache).
        for backend, (proc, port) in nodes.items():
            asyncio.run(_phase(port, users, args.concurrency))

        rng = random.Random(5)
        totals = {b: {"sessions": 0, "ok": 0, "errors": 0, "seconds": 0.0, "casdCpu": 0.0} for b in nodes}
        totals["redis"].update({"redisCpu": 0.0, "commands": 0})
        phases = []
        sent = ("eval", "evalsha", "ping", "exists", "zrem", "script", "set")
        for _ in range(args.rounds):
            for backend in ("local", "redis"):
                proc, port = nodes[backend]
                logins = rng.sample(users, len(users))
                cpu, redisCpu = cpuSeconds(proc.pid), cpuSeconds(redis.process.pid)
                commands = redis.commandCount(sent)
                result = asyncio.run(_phase(port, logins, args.concurrency))
                result["casdCpuSeconds"] = round(cpuSeconds(proc.pid) - cpu, 3)
                t = totals[backend]
                t["sessions"] += result["sessions"]
                t["ok"] += result["ok"]
                t["errors"] += result["errors"]
                t["seconds"] += result["seconds"]
                t["casdCpu"] += result["casdCpuSeconds"]
                if backend == "redis":
                    result["redisCpuSeconds"] = round(cpuSeconds(redis.process.pid) - redisCpu, 3)
                    result["redisCommands"] = redis.commandCount(sent) - commands
                    t["redisCpu"] += result["redisCpuSeconds"]
                    t["commands"] += result["redisCommands"]
                result["backend"] = backend
                phases.append(result)

        summary = {}
        for backend, t in totals.items():
            ok = max(t["ok"], 1)
            summary[backend] = {
                "sessions": t["sessions"],
                "errors": t["errors"],
                "sessionsPerSecond": round(t["ok"] / t["seconds"], 1),
                "casdCpuMsPerSession": round(1000 * t["casdCpu"] / ok, 3),
            }
            if backend == "redis":
                summary[backend]["redisCpuMsPerSession"] = round(1000 * t["redisCpu"] / ok, 3)
                summary[backend]["redisCommandsPerLogin"] = round(t["commands"] / ok, 3)
        local, shared = summary["local"], summary["redis"]
        summary["casdCpuIncrease"] = (
            f"{100 * (shared['casdCpuMsPerSession'] / local['casdCpuMsPerSession'] - 1):+.1f} %"
        )
        print(json.dumps({
            "benchmark": "login storm, [state] local vs redis, warm credential cache, stub IMAP backend",
            "users": args.users, "concurrency": args.concurrency, "rounds": args.rounds,
            "cpus": os.cpu_count(), "summary": summary, "phases": phases,
        }, indent=2))
        return 0 if all(t["errors"] == 0 for t in totals.values()) else 1
    finally:
        for child in reversed(children):
            stopPid(child.pid, timeout=10.0)
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if redis is not None:
            redis.stop()
        for log in logs:
            log.close()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
