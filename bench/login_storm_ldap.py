"""
Login storm against the LDAP checker: authenticated IMAP sessions per second through casd, with
casd checking every password against a real OpenLDAP slapd, first with a cold credential cache
(every login is an LDAP search and bind), then warm (the same users again: answered from the
cache).

    python -m bench.login_storm_ldap [--users 300] [--concurrency 20] [--warm-rounds 3]

What runs, all on 127.0.0.1 high ports, each a child of this script stopped by its PID at the end:
  - slapd (tests/support/slapd.py) with the fixture directory plus C{--users} users, StartTLS
    with a private CA; casd binds a service account to search, then binds as each user;
  - a stub IMAP backend (this script with C{--stub-backend}): it accepts any AUTHENTICATE, so the
    figures are casd's and the directory's, not a mail server's;
  - casd (C{twistd -n cas}) from this checkout, the client connections trusted (plaintext LOGIN,
    no client TLS), the default cache settings.

A session is: connect, greeting, C{LOGIN}, tagged OK (casd has authenticated the user and logged
in to the backend), C{LOGOUT}, close.  The load generator is an asyncio loop in this process,
C{--concurrency} sessions at a time, a fixed number of sessions per phase (bounded).  Reported per
phase: sessions/s, latency percentiles, errors, the user binds and searches slapd logged, and CPU
seconds used by casd and slapd.  On a shared machine the numbers move by 10-20 % between runs;
compare phases within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

#: Seconds one session may take before it counts as an error.
SESSION_TIMEOUT = 15.0


# -- the stub backend (run as a child process) ----------------------------------------------


async def _stubSession(reader, writer) -> None:
    writer.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN] stub ready\r\n")
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            parts = line.split(None, 2)
            if len(parts) < 2:
                continue
            tag, command = parts[0], parts[1].upper()
            if command == b"ID":
                writer.write(b"* ID NIL\r\n" + tag + b" OK ID completed\r\n")
            elif command == b"AUTHENTICATE":
                writer.write(tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n")
            elif command == b"LOGOUT":
                writer.write(b"* BYE Logging out\r\n" + tag + b" OK Logout completed\r\n")
                await writer.drain()
                break
            else:
                writer.write(tag + b" OK done\r\n")
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _stubMain(port: int) -> None:
    server = await asyncio.start_server(_stubSession, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# -- the load -------------------------------------------------------------------------------


async def _session(port: int, user: str, password: str) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        greeting = await reader.readline()
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(f"greeting {greeting[:60]!r}")
        writer.write(b'a LOGIN "%s" "%s"\r\n' % (user.encode(), password.encode()))
        while True:
            line = await reader.readline()
            if not line:
                raise RuntimeError("closed during LOGIN")
            if line.startswith(b"a "):
                break
        if not line.startswith(b"a OK"):
            raise RuntimeError(f"LOGIN answered {line[:80]!r}")
        elapsed = time.perf_counter() - started
        writer.write(b"b LOGOUT\r\n")
        while True:
            line = await reader.readline()
            if not line or line.startswith(b"b "):
                break
        return elapsed
    finally:
        writer.close()


async def _phase(port: int, logins: list[tuple[str, str]], concurrency: int) -> dict:
    queue = list(reversed(logins))
    latencies: list[float] = []
    errors: list[str] = []

    async def worker():
        while queue:
            user, password = queue.pop()
            try:
                latencies.append(await asyncio.wait_for(_session(port, user, password), SESSION_TIMEOUT))
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}"[:120])

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p):
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1) if latencies else None

    return {
        "sessions": len(logins),
        "ok": len(latencies),
        "errors": len(errors),
        "firstErrors": errors[:3],
        "seconds": round(elapsed, 3),
        "sessionsPerSecond": round(len(latencies) / elapsed, 1),
        "latencyMs": {"p50": pct(0.50), "p95": pct(0.95), "max": pct(0.999999)},
    }


# -- orchestration --------------------------------------------------------------------------


def _users(count: int) -> list[tuple[str, str]]:
    return [(f"storm{i:05d}", f"pw-{i:05d}-storm") for i in range(count)]


def _usersLDIF(users) -> str:
    from tests.support.slapd import sshaPassword

    return "\n".join(
        f"dn: uid={u},ou=people,dc=example,dc=com\nobjectClass: inetOrgPerson\n"
        f"objectClass: casdMailUser\nuid: {u}\ncn: {u}\nsn: Storm\nmail: {u}@example.com\n"
        f"userPassword: {sshaPassword(p)}\nmailHost: mbx\naccountStatus: active\n"
        for u, p in users
    )


class _SlapdCounter:
    """
    Counts what casd asked of slapd, from slapd's stats log.
    """

    def __init__(self, slapd) -> None:
        self.slapd = slapd
        self.offset = len(slapd.logText())

    def take(self) -> dict:
        text = self.slapd.logText()
        new, self.offset = text[self.offset :], len(text)
        return {
            "userBinds": len(re.findall(r'BIND dn="uid=[^"]*" method=128', new)),
            "searches": len(re.findall(r" SRCH base=", new)),
            "connections": len(re.findall(r" ACCEPT from ", new)),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warm-rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--stub-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stub_backend:
        asyncio.run(_stubMain(args.stub_backend))
        return 0

    from bench.measure import cpuSeconds
    from tests.support.certs import CertificateAuthority
    from tests.support.procs import freePort, stopPid, waitForPort
    from tests.support.slapd import SERVICE_PASSWORD, Slapd, fixtureLDIF, serviceDN

    if not 1 <= args.users <= 100_000 or not 1 <= args.concurrency <= 1000 or not 1 <= args.warm_rounds <= 50:
        parser.error("--users 1..100000, --concurrency 1..1000, --warm-rounds 1..50")
    work = tempfile.mkdtemp(prefix="casd-login-storm-")
    children: list[subprocess.Popen] = []
    slapd = None
    logs = []
    try:
        ca = CertificateAuthority.create(os.path.join(work, "ca"))
        slapd = Slapd(os.path.join(work, "slapd"), tls=ca.issue(["127.0.0.1"], "slapd"), caPath=ca.caPath)
        slapd.start()
        users = _users(args.users)
        slapd.load(fixtureLDIF() + "\n" + _usersLDIF(users))

        backendPort, casPort = freePort(), freePort()
        stubLog = open(os.path.join(work, "stub.out"), "wb")
        logs.append(stubLog)
        stub = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--stub-backend", str(backendPort)],
            stdout=stubLog, stderr=stubLog, cwd=work,
        )
        children.append(stub)
        waitForPort("127.0.0.1", backendPort, 15.0, lambda: stub.poll() is None)

        with open(os.path.join(work, "service.secret"), "w") as f:
            f.write(SERVICE_PASSWORD + "\n")
        config = os.path.join(work, "casd.toml")
        with open(config, "w") as f:
            f.write(
                f"""
[server]
trusted_networks = ["127.0.0.0/8"]

[ldap]
urls = ["{slapd.url}"]
ca_file = "{ca.caPath}"
bind_dn = "{serviceDN()}"
bind_password_file = "service.secret"
base_dn = "ou=people,dc=example,dc=com"
filter = "(&(objectClass=inetOrgPerson)(|(uid={{login}})(mail={{login}})))"
status_attribute = "accountStatus"

[backends.mbx]
host = "127.0.0.1"
[backends.mbx.imap]
port = {backendPort}
tls = "none"

[imap]
[[imap.listen]]
endpoint = "tcp:{casPort}:interface=127.0.0.1:backlog=1024"
"""
            )
        casLog = open(os.path.join(work, "casd.out"), "wb")
        logs.append(casLog)
        cas = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=",
             "cas", "--config", config],
            stdout=casLog, stderr=casLog, cwd=work, env=dict(os.environ, PYTHONPATH=ROOT),
        )
        children.append(cas)
        waitForPort("127.0.0.1", casPort, 30.0, lambda: cas.poll() is None)

        counter = _SlapdCounter(slapd)
        rng = random.Random(3)
        results = {}
        cold = list(users)
        rng.shuffle(cold)
        warm = [u for _ in range(args.warm_rounds) for u in rng.sample(users, len(users))]
        for name, logins in (("cold", cold), ("warm", warm)):
            cpu = (cpuSeconds(cas.pid), cpuSeconds(slapd.pid))
            result = asyncio.run(_phase(casPort, logins, args.concurrency))
            result["slapd"] = counter.take()
            result["cpuSeconds"] = {
                "casd": round(cpuSeconds(cas.pid) - cpu[0], 2),
                "slapd": round(cpuSeconds(slapd.pid) - cpu[1], 2),
            }
            results[name] = result
        report = {
            "benchmark": "login storm, LDAP checker (casd -> slapd StartTLS), stub IMAP backend",
            "users": args.users,
            "concurrency": args.concurrency,
            "cpus": os.cpu_count(),
            "phases": results,
        }
        print(json.dumps(report, indent=2))
        return 0 if all(r["errors"] == 0 for r in results.values()) else 1
    finally:
        for child in reversed(children):
            stopPid(child.pid, timeout=10.0)
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if slapd is not None:
            slapd.stop()
        for log in logs:
            log.close()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
