"""
The benchmark's driver: start the servers, run each phase against each target in turn, write
C{bench/RESULTS.md}.  See C{docs/performance.md}; C{bench/run} is the entry point.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

from bench import report
from bench.measure import cpuDelta
from bench.servers import (
    CASD,
    DOVECOT_IDLE_KILL,
    HAProxy,
    HERE,
    MIB,
    ROOT,
    AuthHTTP,
    Nginx,
    password,
    startDovecot,
    userName,
    writeCertificate,
    writeUsers,
)


class Parameters:
    """
    The knobs of one benchmark run; C{--quick} shrinks them for a smoke run.
    """

    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.runs = 1 if quick else 3
        self.users = 200 if quick else 1000
        self.bulkUsers = 4 if quick else 8
        self.bulkMessages = 8
        self.loadProcesses = 2
        self.loginConcurrency = 50
        self.loginSeconds = 2.0 if quick else 5.0
        self.loginMaxSessions = 20000
        self.bulkConnections = 4
        self.bulkBytes = (64 if quick else 1024) * MIB
        self.bulkSeconds = 30.0
        self.idleSessions = 200 if quick else 2000
        self.idleConcurrency = 50
        self.idleSeconds = 120.0
        self.hashScheme = "SSHA256"
        #: With C{--pin}: the CPU of the proxies under test, and those of the rest of the run.
        self.proxyCPUs: set[int] = set()
        self.otherCPUs: set[int] = set()

    def describe(self) -> list[tuple[str, str]]:
        return [
            ("runs per figure (median reported)", str(self.runs)),
            ("users (Dovecot passwd-file, casd users file, auth_http table)", str(self.users)),
            ("casd users-file scheme", self.hashScheme),
            ("bulk mailboxes", f"{self.bulkUsers} x {self.bulkMessages} messages of 1 MiB"),
            ("load generator", f"{self.loadProcesses} processes, asyncio" + (" + uvloop" if _hasUvloop() else "")),
            ("login storm", f"concurrency {self.loginConcurrency}, {self.loginSeconds:g} s per run"),
            ("bulk", f"{self.bulkConnections} connections, {self.bulkBytes // MIB} MiB per run"),
            ("idle", f"{self.idleSessions} sessions in IDLE, fresh proxy processes"),
            ("TLS", "full handshakes only (the load generator never resumes); casd and nginx both"
             " issue TLS 1.3 session tickets after each, as they do by default"),
            ("CPU pinning", (
                f"the proxy under test (all its processes) on CPU {_cpuList(self.proxyCPUs)}; the load"
                f" generators, Dovecot and nginx's auth_http on CPU {_cpuList(self.otherCPUs)}"
            ) if self.proxyCPUs else "none (the kernel schedules every process on both CPUs)"),
        ]


def _cpuList(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _hasUvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


class Target:
    """
    One server under test and the ports of each protocol.
    """

    def __init__(self, name, server, phases, companion=None) -> None:
        self.name = name
        self.server = server
        self.phases = phases
        #: A helper whose CPU is reported beside the target's (nginx's auth_http server).
        self.companion = companion

    def port(self, proto, tls):
        return self.server.ports[proto + ("s" if tls else "")]


def _spawnLoad(spec: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.load", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=ROOT),
        text=True,
    )


def _collect(procs, timeout) -> list[dict]:
    results = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise RuntimeError("load generator did not finish in time") from None
        lines = [l for l in out.splitlines() if l.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"load generator failed ({p.returncode}): {err[-2000:]}")
        results.append(json.loads(lines[-1]))
    return results


def _userList(params, bulk=False):
    count = params.bulkUsers if bulk else params.users
    return [[userName(i), password(i)] for i in range(count)]


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _mergeErrors(results) -> dict:
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return errors


def _percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, int(round(q * (len(values) - 1)))))
    return values[k]


def _cpu(target):
    sample = target.server.group.cpu()
    extra = target.companion.group.cpu() if target.companion else {}
    return sample, extra


def loginStorm(params, target, proto, tls, seed) -> dict:
    before, extraBefore = _cpu(target)
    specs = [
        dict(
            mode="login", proto=proto, host="127.0.0.1", port=target.port(proto, tls), tls=tls,
            concurrency=c, duration=params.loginSeconds, maxSessions=params.loginMaxSessions // params.loadProcesses,
            users=_userList(params), seed=seed * 100 + i,
        )
        for i, c in enumerate(_split(params.loginConcurrency, params.loadProcesses))
    ]
    results = _collect([_spawnLoad(s) for s in specs], params.loginSeconds + 60)
    time.sleep(0.3)  # let the proxy finish closing the last sessions
    after, extraAfter = _cpu(target)
    sessions = sum(r["sessions"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    latencies = [x for r in results for x in r["latencies"]]
    cpu = cpuDelta(before, after)
    errors = _mergeErrors(results)
    return {
        "sessions": sessions,
        "rate": sessions / wall if wall > 0 else 0.0,
        "p50": _percentile(latencies, 0.5),
        "p99": _percentile(latencies, 0.99),
        "errors": sum(errors.values()),
        "errorKinds": errors,
        "cpuMs": cpu / sessions * 1000.0 if sessions else float("nan"),
        "companionCpuMs": (cpuDelta(extraBefore, extraAfter) / sessions * 1000.0) if target.companion and sessions else None,
    }


def bulk(params, target, proto, tls, seed) -> dict:
    before, _ = _cpu(target)
    users = _userList(params, bulk=True)
    perProcess = _split(params.bulkConnections, params.loadProcesses)
    specs, offset = [], 0
    for c in perProcess:
        specs.append(
            dict(
                mode="bulk", proto=proto, host="127.0.0.1", port=target.port(proto, tls), tls=tls,
                concurrency=c, bytes=params.bulkBytes * c // params.bulkConnections,
                duration=params.bulkSeconds, users=users, offset=offset + seed,
            )
        )
        offset += c
    results = _collect([_spawnLoad(s) for s in specs], params.bulkSeconds + 60)
    time.sleep(0.3)
    after, _ = _cpu(target)
    total = sum(r["bytes"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)
    cpu = cpuDelta(before, after)
    errors = _mergeErrors(results)
    return {
        "bytes": total,
        "mbps": total / 1e6 / wall if wall > 0 else 0.0,
        "cpuPerGB": cpu / (total / 1e9) if total else float("nan"),
        "errors": sum(errors.values()),
        "errorKinds": errors,
    }


def idle(params, target, proto, tls, seed) -> dict:
    # Fresh processes: memory a previous phase freed but kept would hide the cost.
    target.server.restart()
    warm = dict(
        mode="login", proto=proto, host="127.0.0.1", port=target.port(proto, tls), tls=tls,
        concurrency=5, duration=5.0, maxSessions=20, users=_userList(params), seed=seed,
    )
    _collect([_spawnLoad(warm)], 60)
    time.sleep(0.5)
    rssBefore = target.server.group.rss()
    procs = []
    for i, n in enumerate(_split(params.idleSessions, params.loadProcesses)):
        procs.append(
            _spawnLoad(
                dict(
                    mode="idle", proto=proto, host="127.0.0.1", port=target.port(proto, tls), tls=tls,
                    count=n, concurrency=params.idleConcurrency, duration=params.idleSeconds,
                    users=_userList(params), offset=i * n, hold=params.idleSeconds + 60,
                )
            )
        )
    ready, readyErrors = 0, {}
    deadline = time.monotonic() + params.idleSeconds + 30
    for p in procs:
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("idle sessions were not established in time")
            r, _, _ = select.select([p.stdout], [], [], 1.0)
            if r:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"idle load generator exited: {p.stderr.read()[-2000:]}")
                if line.startswith("{"):
                    info = json.loads(line)
                    ready += info["ready"]
                    for k, v in info["errors"].items():
                        readyErrors[k] = readyErrors.get(k, 0) + v
                    break
    time.sleep(1.0)  # settle: the last sessions' buffers are allocated
    rssAfter = target.server.group.rss()
    for p in procs:
        p.stdin.write("\n")
        p.stdin.flush()
    results = _collect(procs, 60)
    # Let Dovecot retire the mail processes these sessions needed (DOVECOT_IDLE_KILL): while they
    # wait, each new backend login would wake all of them.
    time.sleep(DOVECOT_IDLE_KILL + 3)
    return {
        "sessions": ready,
        "alive": sum(r["alive"] for r in results),
        "rssPerConn": (rssAfter - rssBefore) / ready / 1024.0 if ready else float("nan"),
        "rssBefore": rssBefore,
        "rssAfter": rssAfter,
        "errors": sum(readyErrors.values()),
        "errorKinds": readyErrors,
    }


PHASES = {"login": loginStorm, "bulk": bulk, "idle": idle}


def warmUp(params, dovecot, port=None, what="Dovecot"):
    """
    Log every user in once: directly at Dovecot, so its indexes and process pool are warm for
    every target alike; and through each casd target, so that its credential cache is warm as
    the targets ask (the hash's cost is the hash's, not the proxy's).
    """
    users = _userList(params)
    specs = [
        dict(
            mode="login", proto="imap", host="127.0.0.1", port=port or dovecot.imapPort, tls=False,
            concurrency=25, duration=120.0, maxSessions=len(part), users=part, sequential=True,
        )
        for part in (users[0::2], users[1::2])
    ]
    results = _collect([_spawnLoad(s) for s in specs], 180)
    errors = _mergeErrors(results)
    if errors:
        raise RuntimeError(f"warm-up logins at {what} failed: {errors}")


def casdProtocols() -> set[str]:
    from casd.service.discovery import discoverProtocols

    return set(discoverProtocols())


def casdHasWorkers() -> bool:
    from casd.service.tap import Options

    return any(p[0] == "workers" for p in getattr(Options, "optParameters", []))


def rerender(args) -> int:
    """
    Write the results table again from a saved C{results.json} (e.g. after a change of the
    report's layout), without running anything.
    """
    with open(args.render) as f:
        saved = json.load(f)
    results = {}
    for key, runs in saved.items():
        phase, proto, tls, name = key.split("|")
        results[(phase, proto, tls == "True", name)] = runs
    params = Parameters(args.quick)
    params.runs = max(len(r) for r in results.values())
    names = []
    for _, _, _, name in results:
        if name not in names:
            names.append(name)
    order = ["haproxy", "nginx", "casd", "nginx-2w", "casd-2w"]
    targets = [Target(n, None, ()) for n in sorted(names, key=lambda n: order.index(n) if n in order else 99)]
    protocols = sorted({k[1] for k in results}, key=lambda p: (p != "imap", p))
    stamp = datetime.datetime.fromtimestamp(os.path.getmtime(args.render), datetime.timezone.utc)
    text = report.render(results, params, stamp, targets, protocols, casdProtocols())
    output = args.output or os.path.join(HERE, "RESULTS.md")
    report.writeResults(output, text)
    print(text)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 run, small counts")
    parser.add_argument("--runs", type=int, help="runs per figure (default 3, quick 1)")
    parser.add_argument("--bulk-mib", type=int, help="MiB per bulk run (default 1024, quick 64)")
    parser.add_argument("--phases", default="login,bulk,idle", help="comma-separated: login,bulk,idle")
    parser.add_argument("--targets", default="", help="comma-separated subset of target names")
    parser.add_argument("--protocols", default="", help="imap,pop3 (default: imap, and pop3 when casd has it)")
    parser.add_argument("--no-tls", action="store_true", help="skip the TLS variants")
    parser.add_argument("--output", help="results file (default bench/RESULTS.md; quick: bench/scratch/RESULTS-quick.md)")
    parser.add_argument(
        "--pin", action="store_true",
        help="pin the proxy under test to the last CPU and everything else to the others (taskset-like):"
        " its sessions/s is then what one core sustains",
    )
    parser.add_argument("--hold", action="store_true", help="after setup, keep the servers up until Enter")
    parser.add_argument("--render", metavar="JSON", help="only re-render a saved bench/scratch/results.json")
    args = parser.parse_args(argv)
    if args.render:
        return rerender(args)
    # A SIGTERM (or Ctrl-C) still runs the clean-up below: every server started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    params = Parameters(args.quick)
    if args.runs:
        params.runs = args.runs
    if args.bulk_mib:
        params.bulkBytes = args.bulk_mib * MIB
    work = os.path.join(HERE, "scratch")
    os.makedirs(work, exist_ok=True)
    # Thousands of sessions, two sockets each, in every server: raise the limit the children inherit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (65536, max(hard, 65536)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            parser.error("--pin needs at least 2 CPUs")
        params.proxyCPUs, params.otherCPUs = {cpus[-1]}, set(cpus[:-1])
        # Dovecot, auth_http and the load generators inherit this process's CPUs.
        os.sched_setaffinity(0, params.otherCPUs)

    casdProtos = casdProtocols()
    protocols = args.protocols.split(",") if args.protocols else (["imap"] + (["pop3"] if "pop3" in casdProtos else []))
    pop3 = "pop3" in protocols
    phases = [p for p in args.phases.split(",") if p]
    started = []
    stamp = datetime.datetime.now(datetime.timezone.utc)
    try:
        print(f"bench: starting Dovecot with {params.users} users", flush=True)
        dovecot = startDovecot(work, params.users, params.bulkUsers, params.bulkMessages, pop3)
        started.append(dovecot)
        cert, key, combined = writeCertificate(work)
        casdUsers, clearUsers = writeUsers(work, params.users, params.hashScheme)
        auth = AuthHTTP(os.path.join(work, "authhttp"), clearUsers, dovecot.imapPort, dovecot.pop3Port)
        auth.start()
        started.append(auth)
        targets = [
            Target("haproxy", HAProxy(os.path.join(work, "haproxy"), combined, dovecot.imapPort, dovecot.pop3Port), ("login", "bulk", "idle")),
            Target("nginx", Nginx(os.path.join(work, "nginx"), auth.ports["http"], cert, key, pop3), ("login", "bulk", "idle"), companion=auth),
            Target(
                "casd",
                CASD(os.path.join(work, "casd"), cert, key, casdUsers, dovecot.imapPort, dovecot.pop3Port if "pop3" in casdProtos and pop3 else None),
                ("login", "bulk", "idle"),
            ),
        ]
        if casdHasWorkers():
            targets.append(Target("nginx-2w", Nginx(os.path.join(work, "nginx2"), auth.ports["http"], cert, key, pop3, workers=2), ("login",), companion=auth))
            targets.append(
                Target(
                    "casd-2w",
                    CASD(os.path.join(work, "casd2"), cert, key, casdUsers, dovecot.imapPort, dovecot.pop3Port if "pop3" in casdProtos and pop3 else None, workers=2),
                    ("login",),
                )
            )
        if args.targets:
            wanted = set(args.targets.split(","))
            targets = [t for t in targets if t.name in wanted]
        for t in targets:
            print(f"bench: starting {t.name}", flush=True)
            t.server.cpus = params.proxyCPUs
            t.server.start()
            started.append(t.server)
        print("bench: warming Dovecot up (every user logs in once)", flush=True)
        warmUp(params, dovecot)
        warmed: dict = {}

        def warmCache(t) -> None:
            # casd's credential cache, again after the idle phase restarted the process.
            if t.name.startswith("casd") and "imap" in t.server.ports and warmed.get(t.name) != t.server.process.pid:
                print(f"bench: warming {t.name}'s credential cache (every user logs in once)", flush=True)
                warmUp(params, dovecot, port=t.port("imap", False), what=t.name)
                warmed[t.name] = t.server.process.pid

        if args.hold:
            print(json.dumps({t.name: t.server.ports for t in targets}), flush=True)
            input("bench: servers up; Enter stops them ")
            return 0
        results: dict = {}
        variants = [False] if args.no_tls else [False, True]
        for run in range(params.runs):
            for phase in phases:
                for proto in protocols:
                    if phase == "idle" and proto != "imap":
                        continue  # POP3 has no IDLE
                    for tls in variants:
                        for t in targets:
                            if phase not in t.phases or (proto not in t.server.ports):
                                continue
                            if phase == "login":
                                warmCache(t)
                            t0 = time.monotonic()
                            r = PHASES[phase](params, t, proto, tls, run)
                            results.setdefault((phase, proto, tls, t.name), []).append(r)
                            print(
                                f"bench: run {run + 1}/{params.runs} {phase} {proto}{'+tls' if tls else ''}"
                                f" {t.name}: {report.brief(phase, r)} ({time.monotonic() - t0:.1f}s)",
                                flush=True,
                            )
        output = args.output or (os.path.join(work, "RESULTS-quick.md") if args.quick else os.path.join(HERE, "RESULTS.md"))
        text = report.render(results, params, stamp, targets, protocols, casdProtos)
        report.writeResults(output, text)
        with open(os.path.join(work, "results.json"), "w") as f:
            json.dump({"|".join(map(str, k)): v for k, v in results.items()}, f, indent=1)
        print(text)
        print(f"bench: results written to {os.path.relpath(output, ROOT)}", flush=True)
        return 0
    finally:
        for server in reversed(started):
            try:
                server.stop()
            except Exception as e:  # keep stopping the others
                print(f"bench: stopping {server}: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
