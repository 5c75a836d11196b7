"""
Soak and exhaustion runs of casd (not in CI; issue 15): one command, three phases, a Markdown
section for C{bench/RESULTS.md} on standard output and a JSON file beside it.

    python -m bench.soak                                  # the scaled-down run (2,000 x 3 min)
    python -m bench.soak --sessions 10000 --hold 1800     # the full soak
    python -m bench.soak --phases loris,fd                # some phases only

Phases:
  - C{soak}: C{--sessions} authenticated IMAP sessions (LOGIN, SELECT, IDLE) held for C{--hold}
    seconds while casd's resident memory is sampled every C{--sample} seconds; a fresh login is
    tried at each sample (the node must keep serving); memory must stay flat.
  - C{loris}: on every protocol (IMAP, POP3, ManageSieve, SMTP, submission) C{--loris} clients
    of each kind: silent, sending one byte every 2 s without ever ending a line, and sending a
    harmless complete command (NOOP, CAPA) every 2 s.  Each should be cut at the protocol's
    pre-auth bound (C{preauth_timeout}; SMTP: C{command_timeout}), set to C{--preauth} seconds.
  - C{fd}: casd restarted with C{RLIMIT_NOFILE} = C{--nofile}; sessions are opened until casd
    runs out of descriptors.  Then: the existing sessions must keep working (NOOP), new
    connections must be refused cleanly (closed, or a temporary failure; no traceback in casd's
    log), and once half the sessions are closed new logins must work again.

Every wait is bounded.  Servers run on loopback high ports under C{--work} and are stopped by
PID.  Uses C{bench.servers} (Dovecot, the casd users file) and C{bench.load}'s IDLE sessions.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import socket
import subprocess
import sys
import time

from bench.servers import CASD, ROOT, password, startDovecot, userName, writeCertificate, writeUsers

HERE = os.path.dirname(os.path.abspath(__file__))

#: The protocols the loris phase visits.
LORIS_PROTOCOLS = ("imap", "pop3", "managesieve", "smtp", "submission")

#: A harmless complete command per protocol, for the slow client that keeps talking.
KEEPALIVE = {
    "imap": b"a NOOP\r\n",
    "pop3": b"CAPA\r\n",
    "managesieve": b"NOOP\r\n",
    "smtp": b"NOOP\r\n",
    "submission": b"NOOP\r\n",
}


class SoakCASD(CASD):
    """
    casd with every protocol listening, short pre-auth bounds, and optionally a low descriptor
    limit (set in the child before twistd starts).
    """

    name = "casd"

    def __init__(self, work, cert, key, usersPath, imapPort, pop3Port, preauth: float, nofile: int = 0):
        super().__init__(work, cert, key, usersPath, imapPort, pop3Port)
        self.preauth = preauth
        self.nofile = nofile

    def choosePorts(self):
        from tests.support.procs import freePort

        self.ports = {p: freePort() for p in LORIS_PROTOCOLS}

    def prepare(self):
        listen = []
        for proto in LORIS_PROTOCOLS:
            timeout = (
                f"command_timeout = {self.preauth}"
                if proto in ("smtp", "submission")
                else f"preauth_timeout = {self.preauth}"
            )
            extra = ""
            if proto in ("smtp", "submission"):
                # The slow clients all come from 127.0.0.1: the per-address cap (20) would cut
                # them before their bound does.
                extra = "max_connections_per_address = 0\n"
            if proto == "smtp":
                extra += 'accepted_domains = ["example.com"]\n'

            listen.append(
                f"""[{proto}]
enabled = true
{timeout}
{extra}[[{proto}.listen]]
endpoint = "tcp:{self.ports[proto]}:interface=127.0.0.1:backlog=1024"
tls = "none"
"""
            )
        config = f"""
[server]
hostname = "soak.test"
trusted_networks = ["127.0.0.0/8"]

[auth]
users_file = "{self.usersPath}"
failure_delay = 0.0
cache_ttl = 7200.0

[routing]
default_backend = "dovecot"

[backend]
connect_retry_time = 1.0

[backends.dovecot]
host = "127.0.0.1"
protocols = ["imap", "pop3"]
[backends.dovecot.imap]
port = {self.imapPort}
tls = "none"
[backends.dovecot.pop3]
port = {self.pop3Port}
tls = "none"

{chr(10).join(listen)}
"""
        with open(os.path.join(self.work, "casd.toml"), "w") as f:
            f.write(config)

    def command(self):
        args = super().command()
        if not self.nofile:
            return args
        # Lower the limit in the child, then become twistd.
        limit = (
            "import os, resource, sys; n = int(sys.argv[1]);"
            " resource.setrlimit(resource.RLIMIT_NOFILE, (n, n)); os.execv(sys.argv[2], sys.argv[2:])"
        )
        return [sys.executable, "-c", limit, str(self.nofile)] + args

    def logText(self) -> str:
        text = ""
        for path in sorted(glob.glob(os.path.join(self.work, "casd.log*")), reverse=True):
            with open(path, errors="replace") as f:
                text += f.read()
        return text


# -- clients --------------------------------------------------------------------------------------


def idleClients(port: int, count: int, offset: int, users: int, hold: float, processes: int = 2):
    """
    Start C{processes} load generators holding C{count} IDLE sessions in all.

    @return: the child processes (their first output line is C{{"ready": N, ...}}).
    """
    children = []
    share = [count // processes + (1 if i < count % processes else 0) for i in range(processes)]
    start = offset
    for n in share:
        spec = {
            "mode": "idle",
            "proto": "imap",
            "host": "127.0.0.1",
            "port": port,
            "tls": False,
            "count": n,
            "offset": start,
            "concurrency": 100,
            "duration": 600,
            "hold": hold + 600,
            "users": [[userName(i), password(i)] for i in range(users)],
        }
        start += n
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "bench.load", json.dumps(spec)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=ROOT),
            )
        )
    return children


def waitReady(children) -> tuple[int, dict]:
    ready, errors = 0, {}
    for child in children:
        line = json.loads(child.stdout.readline() or b"{}")
        ready += line.get("ready", 0)
        for key, n in line.get("errors", {}).items():
            errors[key] = errors.get(key, 0) + n
    return ready, errors


def release(children) -> list[dict]:
    results = []
    for child in children:
        try:
            out, _ = child.communicate(b"\n", timeout=120)
            results.append(json.loads(out.decode().strip().splitlines()[-1]))
        except (subprocess.TimeoutExpired, ValueError, IndexError):
            child.kill()
            results.append({})
    return results


def loginOnce(port: int, user: int) -> str:
    """
    One IMAP login, SELECT and LOGOUT, bounded: C{"ok"}, or what went wrong.
    """
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            f = s.makefile("rwb")
            if not f.readline().startswith(b"* OK"):
                return "no greeting"
            f.write(b"a LOGIN %s %s\r\nb SELECT INBOX\r\nc LOGOUT\r\n" % (userName(user).encode(), password(user).encode()))
            f.flush()
            replies = [line for line in f.read().split(b"\r\n") if line[:2] in (b"a ", b"b ")]
            if [r.split(b" ")[1] for r in replies] == [b"OK", b"OK"]:
                return "ok"
            return b" / ".join(replies).decode("ascii", "replace")[:120] or "closed"
    except OSError as e:
        return f"{type(e).__name__}: {e}"


# -- phases ---------------------------------------------------------------------------------------


def soakPhase(casd: SoakCASD, args) -> dict:
    users = min(args.sessions, args.users)
    started = time.monotonic()
    children = idleClients(casd.ports["imap"], args.sessions, 0, users, args.hold)
    ready, errors = waitReady(children)
    openTime = time.monotonic() - started
    samples, logins = [], {}
    end = time.monotonic() + args.hold
    while True:
        samples.append((round(time.monotonic() - started, 1), casd.group.rss()))
        result = loginOnce(casd.ports["imap"], len(samples) % users)
        logins[result] = logins.get(result, 0) + 1
        if time.monotonic() >= end:
            break
        time.sleep(min(args.sample, max(0.0, end - time.monotonic())))
    results = release(children)
    after = casd.group.rss()
    held = [s for s in samples]
    first, last = held[0][1], held[-1][1]
    return {
        "sessions": args.sessions,
        "ready": ready,
        "open_errors": errors,
        "open_seconds": round(openTime, 1),
        "hold_seconds": args.hold,
        "alive_at_release": sum(r.get("alive", 0) for r in results),
        "rss_first_mb": round(first / 1e6, 1),
        "rss_last_mb": round(last / 1e6, 1),
        "rss_max_mb": round(max(s[1] for s in held) / 1e6, 1),
        "rss_growth_pct": round(100.0 * (last - first) / first, 1) if first else None,
        "rss_after_release_mb": round(after / 1e6, 1),
        "rss_per_session_kb": round((first - args.baseline) / max(ready, 1) / 1e3, 1),
        "logins_during_hold": logins,
        "samples": samples,
    }


async def _loris(port: int, drip: bytes, limit: float) -> float | None:
    """
    One slow client, sending C{drip} every 2 s (nothing when empty): seconds until casd closed
    the connection, or C{None} if it did not within C{limit}.
    """
    started = time.monotonic()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return -1.0

    async def dripper():
        while True:
            await asyncio.sleep(2.0)
            writer.write(drip)
            await writer.drain()

    task = asyncio.ensure_future(dripper()) if drip else None
    try:
        while time.monotonic() - started < limit:
            chunk = await asyncio.wait_for(reader.read(4096), limit)
            if not chunk:
                return time.monotonic() - started
    except (asyncio.TimeoutError, OSError):
        if time.monotonic() - started < limit:
            return time.monotonic() - started  # reset by casd
        return None
    finally:
        if task is not None:
            task.cancel()
        writer.transport.abort()
    return None


async def _lorisAll(casd, count, limit):
    results = {}
    jobs = []
    for proto in LORIS_PROTOCOLS:
        kinds = {"silent": b"", "drip": b"a", "commands": KEEPALIVE[proto]}
        for kind, drip in kinds.items():
            for _ in range(count):
                jobs.append(((proto, kind), _loris(casd.ports[proto], drip, limit)))
    outcomes = await asyncio.gather(*(j for _, j in jobs))
    for (key, _), outcome in zip(jobs, outcomes):
        results.setdefault(key, []).append(outcome)
    return results


def lorisPhase(casd: SoakCASD, args) -> dict:
    limit = args.preauth * 3 + 30
    raw = asyncio.run(_lorisAll(casd, args.loris, limit))
    table = {}
    for (proto, kind), times in raw.items():
        cut = [t for t in times if t is not None and t >= 0]
        table[f"{proto} {kind}"] = {
            "clients": len(times),
            "cut": len(cut),
            "not_cut_within_s": limit if len(cut) < len(times) else None,
            "min_s": round(min(cut), 1) if cut else None,
            "max_s": round(max(cut), 1) if cut else None,
        }
    return {"bound_s": args.preauth, "clients": table}


def fdPhase(casd: SoakCASD, args) -> dict:
    logBefore = len(casd.logText())
    sockets, opened, refusedAt = [], 0, None
    # Open logged-in sessions one by one until casd can take no more.
    for i in range(args.nofile * 2):
        result, s = _openSession(casd.ports["imap"], i % args.users)
        if result != "ok":
            refusedAt = (i, result)
            break
        sockets.append(s)
        opened += 1
    # Existing sessions keep working.
    noops = [_noop(s) for s in sockets[: min(len(sockets), 50)]]
    # New connections are refused cleanly, again and again.
    refusals = {}
    for i in range(20):
        result, s = _openSession(casd.ports["imap"], i % args.users)
        refusals[result] = refusals.get(result, 0) + 1
        if s is not None:
            sockets.append(s)
    # Free half: casd recovers.
    freed = len(sockets) // 2
    for s in sockets[:freed]:
        s.close()
    del sockets[:freed]
    time.sleep(2.0)  # let casd see the closes and the backend sessions end (a bench, not a test)
    recovered = {}
    for i in range(20):
        result = loginOnce(casd.ports["imap"], i % args.users)
        recovered[result] = recovered.get(result, 0) + 1
    log = casd.logText()[logBefore:]
    for s in sockets:
        s.close()
    return {
        "nofile": args.nofile,
        "sessions_opened": opened,
        "first_refusal": refusedAt,
        "existing_noop_ok": sum(noops),
        "existing_noop_tried": len(noops),
        "new_while_exhausted": refusals,
        "freed": freed,
        "logins_after_freeing": recovered,
        "tracebacks_in_log": log.count("Traceback"),
        "emfile_lines_in_log": sum(1 for line in log.splitlines() if "EMFILE" in line or "Too many open files" in line),
    }


def _openSession(port, user):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as e:
        return f"connect: {type(e).__name__}", None
    try:
        s.settimeout(10)
        f = s.makefile("rwb")
        greeting = f.readline()
        if not greeting.startswith(b"* OK"):
            s.close()
            return "no greeting" if not greeting else greeting[:40].decode("ascii", "replace"), None
        f.write(b"a LOGIN %s %s\r\n" % (userName(user).encode(), password(user).encode()))
        f.flush()
        while True:
            line = f.readline()
            if not line:
                s.close()
                return "closed at login", None
            if line.startswith(b"a "):
                break
        if not line.startswith(b"a OK"):
            s.close()
            return line[:60].decode("ascii", "replace").strip(), None
        return "ok", s
    except OSError as e:
        s.close()
        return f"{type(e).__name__}", None


def _noop(s) -> bool:
    try:
        s.sendall(b"n NOOP\r\n")
        data = b""
        while b"n OK" not in data:
            chunk = s.recv(4096)
            if not chunk:
                return False
            data += chunk
        return True
    except OSError:
        return False


# -- main ------------------------------------------------------------------------------------


def markdown(results: dict, args) -> str:
    out = [
        "## Soak and exhaustion (`bench/soak.py`)",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: `python -m bench.soak "
        + " ".join(sys.argv[1:])
        + "`; casd single process, users file, Dovecot backend, all on one 2-core machine.",
        "",
    ]
    soak = results.get("soak")
    if soak:
        out += [
            f"**Soak:** {soak['ready']} of {soak['sessions']} IMAP sessions logged in and idling"
            f" (opened in {soak['open_seconds']} s), held {soak['hold_seconds']} s.",
            "",
            "| RSS first | RSS last | RSS max | growth | per session | after release | logins during hold |",
            "|---|---|---|---|---|---|---|",
            f"| {soak['rss_first_mb']} MB | {soak['rss_last_mb']} MB | {soak['rss_max_mb']} MB |"
            f" {soak['rss_growth_pct']} % | {soak['rss_per_session_kb']} kB |"
            f" {soak['rss_after_release_mb']} MB | {soak['logins_during_hold']} |",
            "",
            f"Sessions still open when released: {soak['alive_at_release']}; errors while opening:"
            f" {soak['open_errors'] or 'none'}.",
            "",
        ]
    loris = results.get("loris")
    if loris:
        out += [
            f"**Slow clients** (bound set to {loris['bound_s']} s): seconds until casd closed them.",
            "",
            "| protocol, client | clients | cut | min s | max s |",
            "|---|---|---|---|---|",
        ]
        for key, row in loris["clients"].items():
            out.append(
                f"| {key} | {row['clients']} | {row['cut']}"
                + (f" (rest not within {row['not_cut_within_s']} s)" if row["not_cut_within_s"] else "")
                + f" | {row['min_s']} | {row['max_s']} |"
            )
        out.append("")
    fd = results.get("fd")
    if fd:
        out += [
            f"**Descriptors exhausted** (`RLIMIT_NOFILE` = {fd['nofile']}): {fd['sessions_opened']} sessions"
            f" opened before the first refusal ({fd['first_refusal']}); {fd['existing_noop_ok']} of"
            f" {fd['existing_noop_tried']} existing sessions answered NOOP while exhausted; new"
            f" connections then: {fd['new_while_exhausted']}; after closing {fd['freed']} sessions,"
            f" new logins: {fd['logins_after_freeing']}; tracebacks in casd's log:"
            f" {fd['tracebacks_in_log']}, EMFILE lines: {fd['emfile_lines_in_log']}.",
            "",
        ]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--hold", type=float, default=180.0, help="seconds the sessions are held")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--loris", type=int, default=20, help="slow clients per protocol and kind")
    parser.add_argument("--preauth", type=float, default=10.0, help="pre-auth bound set on casd")
    parser.add_argument("--nofile", type=int, default=256, help="casd's RLIMIT_NOFILE in the fd phase")
    parser.add_argument("--phases", default="soak,loris,fd")
    parser.add_argument("--work", default=os.path.join(HERE, "scratch", "soak"))
    args = parser.parse_args(argv)
    phases = args.phases.split(",")
    os.makedirs(args.work, exist_ok=True)
    users = max(args.users, 1)
    usersPath, _ = writeUsers(args.work, users, "SSHA256")
    cert, key, _ = writeCertificate(args.work)
    # Over a few thousand held sessions, one IMAP process per session would not fit in memory.
    dovecot = startDovecot(args.work, users, 0, 0, pop3=True, imapClients=1 if args.sessions <= 4000 else 50)
    results: dict = {}
    try:
        for phase in phases:
            nofile = args.nofile if phase == "fd" else 0
            casd = SoakCASD(
                os.path.join(args.work, f"casd-{phase}"), cert, key, usersPath,
                dovecot.imapPort, dovecot.pop3Port, args.preauth, nofile,
            )
            casd.start()
            try:
                args.baseline = casd.group.rss()
                # Warm the credential cache and Dovecot's auth cache: one login per user.
                for i in range(min(users, args.sessions if phase == "soak" else 50)):
                    loginOnce(casd.ports["imap"], i)
                print(f"phase {phase}...", file=sys.stderr, flush=True)
                results[phase] = {"soak": soakPhase, "loris": lorisPhase, "fd": fdPhase}[phase](casd, args)
                results[phase]["tracebacks_in_log"] = casd.logText().count("Traceback")
            finally:
                casd.stop()
    finally:
        dovecot.stop()
    with open(os.path.join(args.work, "soak.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(markdown(results, args))


if __name__ == "__main__":
    main()
