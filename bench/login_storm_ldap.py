"""
Login storm against slapd: authenticated IMAP sessions per second through casd with its LDAP
checker, and through nginx's mail proxy with an C{auth_http} answerer that checks the same
directory, in the same run; each first with a cold credential cache (every login an LDAP search
and bind), then warm (the same users again: casd answers from its cache; nginx has none, so its
warm phase is the same work as its cold one).

    python -m bench.login_storm_ldap [--users 300] [--concurrency 20] [--warm-rounds 3]
        [--runs 3] [--targets casd,nginx] [--write] [--json PATH]

What runs, all on 127.0.0.1 high ports, each a child of this script stopped by its PID at the end:
  - slapd (tests/support/slapd.py) with the fixture directory plus C{--users} users, StartTLS
    with a private CA;
  - a stub IMAP backend (this script with C{--stub-backend}): it accepts any C{AUTHENTICATE} or
    C{LOGIN} (literals included, as nginx sends it), so the figures are the proxies' and the
    directory's, not a mail server's;
  - casd (C{twistd -n cas}) from this checkout with the LDAP checker (a service account searches,
    then a bind as the user), the client connections trusted (plaintext C{LOGIN}, no client TLS),
    the default cache settings; restarted before each run, so each run's cold phase is cold;
  - nginx's mail proxy (L{bench.servers.Nginx}, one worker) with C{auth_http} answered by
    C{bench/authhttp.py --ldap}: the same search and bind on the same kind of connections (one
    search connection bound as the service account, 4 bind connections, StartTLS).

A session is: connect, greeting, C{LOGIN}, tagged OK (the proxy has authenticated the user and
logged in to the backend), C{LOGOUT}, close.  The load generator is an asyncio loop in this
process, C{--concurrency} sessions at a time, a fixed number of sessions per phase (bounded).
Reported per phase and proxy (medians over C{--runs}, which alternate which proxy goes first):
sessions/s, latency p50/p99, errors, CPU per session of the proxy, of nginx's C{auth_http}
answerer, and of slapd, and the user binds and searches slapd logged.  C{--write} puts the table
into C{bench/RESULTS.md} between C{<!-- bench.ldap begin -->} and C{<!-- bench.ldap end -->}.  On
a shared machine the numbers move by 10-20 % between runs; compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
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


_LITERAL = re.compile(rb"\{(\d+)(\+?)\}\r\n$")


async def _stubCommand(reader, writer) -> bytes:
    """
    One command line, its literals included (nginx sends C{LOGIN} with synchronising literals).
    """
    line = await reader.readline()
    while True:
        match = _LITERAL.search(line)
        if match is None or int(match.group(1)) > 65536:
            return line
        if not match.group(2):
            writer.write(b"+ OK\r\n")
            await writer.drain()
        line += await reader.readexactly(int(match.group(1)))
        line += await reader.readline()


async def _stubSession(reader, writer) -> None:
    writer.write(b"* OK [CAPABILITY IMAP4rev1 SASL-IR ID AUTH=PLAIN] stub ready\r\n")
    try:
        while True:
            line = await _stubCommand(reader, writer)
            if not line:
                break
            parts = line.split(None, 2)
            if len(parts) < 2:
                continue
            tag, command = parts[0], parts[1].upper()
            if command == b"ID":
                writer.write(b"* ID NIL\r\n" + tag + b" OK ID completed\r\n")
            elif command in (b"AUTHENTICATE", b"LOGIN"):
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
        "latencyMs": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(0.999999)},
    }


# -- the servers ----------------------------------------------------------------------------


def _users(count: int) -> list[tuple[str, str]]:
    return [(f"storm{i:05d}", f"pw-{i:05d}-storm") for i in range(count)]


#: Logins before each proxy's cold phase, by users outside the measured ones, so that a cold phase
#: finds the proxy's directory connections open and its code loaded: only the credential cache is
#: cold.
PRIMERS = 8


def _primers() -> list[tuple[str, str]]:
    return [(f"prime{i:02d}", f"pw-{i:02d}-prime") for i in range(PRIMERS)]


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
    Counts what the proxies asked of slapd, from slapd's stats log.
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


#: What both proxies ask the directory: the users' entries under this base, found with this
#: filter ({login} is the login), bound as with the service account's password.
BASE_DN = "ou=people,dc=example,dc=com"
FILTER = "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))"


#: Signals that start and stop (writing the statistics to C{$STATS_ENV}) the profiler of a casd
#: run with C{--profiled-twistd}: real-time signals, which casd uses for nothing (C{SIGUSR1}
#: drains it, C{SIGUSR2} reopens its log).
PROFILE_START, PROFILE_STOP = signal.SIGRTMIN + 1, signal.SIGRTMIN + 2
STATS_ENV = "CASD_LDAP_STORM_STATS"


def _profiledTwistd(argv: list[str]) -> None:
    """
    Run C{twistd} with C{argv}, counting calls (cProfile, the reactor's thread) between
    L{PROFILE_START} and L{PROFILE_STOP}; each stop writes the statistics so far.
    """
    import cProfile

    profile = cProfile.Profile()
    signal.signal(PROFILE_START, lambda *_: profile.enable())

    def stop(*_):
        profile.disable()
        profile.dump_stats(os.environ[STATS_ENV])

    signal.signal(PROFILE_STOP, stop)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


def _servers():
    """
    The server classes, built on L{bench.servers.Process} (imported late: C{--stub-backend} runs
    without the project on the path).
    """
    from bench.servers import AuthHTTP, Process
    from tests.support.procs import freePort

    class CASD(Process):
        """
        casd (C{twistd -n cas}) from this checkout with the LDAP checker, default cache settings.
        """

        name = "casd"

        def __init__(self, work, slapd, caPath, secretPath, backendPort, profiled=False) -> None:
            super().__init__(work)
            self.slapd, self.caPath, self.secretPath = slapd, caPath, secretPath
            self.backendPort = backendPort
            self.profiled = profiled
            self.statsPath = os.path.join(work, "calls.prof")

        def choosePorts(self):
            self.ports = {"imap": freePort()}

        def prepare(self):
            from tests.support.slapd import serviceDN

            with open(os.path.join(self.work, "casd.toml"), "w") as f:
                f.write(
                    f"""
[server]
trusted_networks = ["127.0.0.0/8"]

[ldap]
urls = ["{self.slapd.url}"]
ca_file = "{self.caPath}"
bind_dn = "{serviceDN()}"
bind_password_file = "{self.secretPath}"
base_dn = "{BASE_DN}"
filter = "{FILTER}"
status_attribute = "accountStatus"

[backends.mbx]
host = "127.0.0.1"
[backends.mbx.imap]
port = {self.backendPort}
tls = "none"

[imap]
[[imap.listen]]
endpoint = "tcp:{self.ports['imap']}:interface=127.0.0.1:backlog=1024"
"""
                )

        def command(self):
            # Profiled: this script's --profiled-twistd mode counts calls between two signals.
            start = ["-m", "bench.login_storm_ldap", "--profiled-twistd"] if self.profiled else [
                "-c", "from twisted.scripts.twistd import run; run()"
            ]  # fmt: skip
            return [
                sys.executable, *start, "-n", "--pidfile=", "--logfile",
                os.path.join(self.work, "casd.log"), "cas", "--config", os.path.join(self.work, "casd.toml"),
            ]  # fmt: skip

        def environment(self):
            return dict(os.environ, PYTHONPATH=ROOT, **{STATS_ENV: self.statsPath})

        def calls(self, stop: bool):
            """
            Profiled: start counting, or stop and return the L{pstats.Stats} so far (cumulative).
            """
            import pstats

            if not stop:
                if os.path.exists(self.statsPath):
                    os.unlink(self.statsPath)
                os.kill(self.process.pid, PROFILE_START)
                return None
            time.sleep(0.5)  # the last sessions' close
            os.kill(self.process.pid, PROFILE_STOP)
            deadline = time.monotonic() + 30
            while not os.path.exists(self.statsPath) and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            return pstats.Stats(self.statsPath)

    class LDAPAuthHTTP(AuthHTTP):
        """
        L{bench.authhttp} checking each login against slapd as casd does (C{--ldap}).
        """

        def __init__(self, work, slapd, caPath, secretPath, backendPort) -> None:
            from tests.support.slapd import serviceDN

            super().__init__(work, "-", backendPort)
            self.ldapArguments = [
                "--ldap", slapd.url, "--base", BASE_DN, "--filter", FILTER,
                "--bind-dn", serviceDN(), "--bind-password-file", secretPath, "--ca-file", caPath,
            ]  # fmt: skip

        def command(self):
            return [sys.executable, "-m", "bench.authhttp", *self.ldapArguments, str(self.ports["http"]), "-"] + (
                self.backendPorts
            )

    return CASD, LDAPAuthHTTP


def _run(coroutine):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _measure(port, logins, concurrency, proxy, companion, slapd, counter) -> dict:
    """
    One phase against one proxy, with the CPU its processes, its C{auth_http} answerer (nginx's)
    and slapd used, and what slapd was asked.
    """
    from bench.measure import cpuDelta, cpuSeconds

    counter.take()
    before = (proxy.cpu(), companion.cpu() if companion else {}, cpuSeconds(slapd.rootPid))
    result = _run(_phase(port, logins, concurrency))
    after = (proxy.cpu(), companion.cpu() if companion else {}, cpuSeconds(slapd.rootPid))
    done = max(result["ok"], 1)
    result["cpuMs"] = round(1000 * cpuDelta(before[0], after[0]) / done, 3)
    result["companionCpuMs"] = round(1000 * cpuDelta(before[1], after[1]) / done, 3) if companion else None
    result["slapdCpuMs"] = round(1000 * (after[2] - before[2]) / done, 3)
    result["slapd"] = counter.take()
    result["loadAverage"] = round(os.getloadavg()[0], 1)
    return result


# -- the command ----------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--warm-rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=1, help="runs of every phase (medians reported)")
    parser.add_argument("--targets", default="casd,nginx", help="casd, nginx or both")
    parser.add_argument("--write", action="store_true", help="write the section of bench/RESULTS.md")
    parser.add_argument("--json", metavar="PATH", help="also write every per-run figure here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--callcount",
        action="store_true",
        help="count casd's Python calls per login in each phase (cProfile: CPU figures inflated; one run, casd only)",
    )
    parser.add_argument("--top", type=int, default=30, help="with --callcount: the functions called most")
    parser.add_argument("--stub-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--profiled-twistd"]:
        _profiledTwistd(argv[1:])
        return 0
    args = parser.parse_args(argv)
    if args.stub_backend:
        _run(_stubMain(args.stub_backend))
        return 0
    targets = [t for t in args.targets.split(",") if t]
    if args.callcount:
        targets, args.runs = ["casd"], 1
    if (
        not 1 <= args.users <= 100_000
        or not 1 <= args.concurrency <= 1000
        or not 1 <= args.warm_rounds <= 50
        or not 1 <= args.runs <= 20
        or not targets
        or set(targets) - {"casd", "nginx"}
    ):
        parser.error("--users 1..100000, --concurrency 1..1000, --warm-rounds 1..50, --runs 1..20, --targets casd,nginx")

    from bench import ldapreport
    from bench.measure import ProcessGroup
    from bench.servers import Nginx, writeCertificate
    from tests.support.certs import CertificateAuthority
    from tests.support.procs import freePort, stopPid, waitForPort
    from tests.support.slapd import SERVICE_PASSWORD, Slapd, fixtureLDIF

    CASD, LDAPAuthHTTP = _servers()
    work = tempfile.mkdtemp(prefix="casd-login-storm-")
    os.chmod(work, 0o755)  # nginx's workers run as www-data
    stub = slapd = None
    servers = []
    loadBefore = os.getloadavg()[0]
    try:
        ca = CertificateAuthority.create(os.path.join(work, "ca"))
        slapd = Slapd(os.path.join(work, "slapd"), tls=ca.issue(["127.0.0.1"], "slapd"), caPath=ca.caPath)
        slapd.start()
        users = _users(args.users)
        slapd.load(fixtureLDIF() + "\n" + _usersLDIF(users + _primers()))
        slapdGroup = ProcessGroup(slapd.pid, withChildren=False)
        secretPath = os.path.join(work, "service.secret")
        with open(secretPath, "w") as f:
            f.write(SERVICE_PASSWORD + "\n")
        os.chmod(secretPath, 0o600)

        backendPort = freePort()
        with open(os.path.join(work, "stub.out"), "wb") as stubLog:
            stub = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--stub-backend", str(backendPort)],
                stdout=stubLog, stderr=stubLog, cwd=work,
            )  # fmt: skip
        waitForPort("127.0.0.1", backendPort, 15.0, lambda: stub.poll() is None)

        proxies = {}
        if "casd" in targets:
            casd = CASD(os.path.join(work, "casd"), slapd, ca.caPath, secretPath, backendPort, args.callcount)
            servers.append(casd)
            proxies["casd"] = (casd, None)
        if "nginx" in targets:
            answerer = LDAPAuthHTTP(os.path.join(work, "authhttp"), slapd, ca.caPath, secretPath, backendPort)
            servers.append(answerer)
            answerer.start()
            cert, key, _ = writeCertificate(os.path.join(work, "nginx"))
            nginx = Nginx(os.path.join(work, "nginx"), answerer.ports["http"], cert, key, pop3=False)
            servers.append(nginx)
            nginx.start()
            proxies["nginx"] = (nginx, answerer)

        counter = _SlapdCounter(slapd)
        rng = random.Random(3)
        runs = []
        profiles = {}
        for run in range(1, args.runs + 1):
            # Alternate which proxy goes first, so that neither always meets a fresher machine.
            order = targets if run % 2 else list(reversed(targets))
            for target in order:
                server, companion = proxies[target]
                if target == "casd":
                    server.restart()  # each run starts with an empty credential cache
                primed = _run(_phase(server.ports["imap"], _primers(), PRIMERS))
                if primed["errors"]:
                    raise RuntimeError(f"{target} refused the priming logins: {primed['firstErrors']}")
                cold = list(users)
                rng.shuffle(cold)
                warm = [u for _ in range(args.warm_rounds) for u in rng.sample(users, len(users))]
                for phase, logins in (("cold", cold), ("warm", warm)):
                    if args.callcount:
                        server.calls(stop=False)
                    result = _measure(
                        server.ports["imap"], logins, args.concurrency, server.group,
                        companion.group if companion else None, slapdGroup, counter,
                    )  # fmt: skip
                    result.update(run=run, target=target, phase=phase)
                    if args.callcount:
                        profiles[phase] = (server.calls(stop=True), result["ok"])
                    runs.append(result)
                    print(
                        f"run {run} {target} {phase}: {result['sessionsPerSecond']}/s,"
                        f" CPU {result['cpuMs']} ms/session, {result['errors']} errors",
                        file=sys.stderr,
                    )
        report = {
            "benchmark": "login storm against slapd: casd (LDAP checker) beside nginx + auth_http (LDAP)",
            "stamp": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": os.cpu_count(),
            "parameters": {
                "users": args.users,
                "concurrency": args.concurrency,
                "warmRounds": args.warm_rounds,
                "runs": args.runs,
                "primers": PRIMERS,
                "loadBefore": loadBefore,
                "loadAfter": os.getloadavg()[0],
            },
            "versions": ldapreport.versions(),
            "runs": runs,
        }
        if args.callcount:
            ldapreport.printCalls(profiles, args.top)
            return 0
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=2)
        text = ldapreport.render(report)
        print(text)
        if args.write:
            from bench.report import writeBlock

            writeBlock(os.path.join(HERE, "RESULTS.md"), text, ldapreport.BEGIN, ldapreport.END)
        return 0 if all(r["errors"] == 0 for r in runs) else 1
    finally:
        for server in reversed(servers):
            server.stop()
        if stub is not None:
            stopPid(stub.pid, timeout=10.0)
            try:
                stub.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if slapd is not None:
            slapd.stop()
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
