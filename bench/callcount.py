"""
Python function calls per proxied login, counted with cProfile: deterministic where wall-clock
and CPU figures are not (a machine shared with other work).

    PYTHONPATH=$PWD .venv/bin/python -m bench.callcount [--sessions 400] [--tls] [--proto pop3]
    PYTHONPATH=$PWD .venv/bin/python -m bench.callcount --bulk-mib 64 [--tls]

Starts a small Dovecot and casd (as the benchmark does, under C{twistd -n cas}, but inside this
module's C{wrap} mode, which turns cProfile on at L{START} and off, writing the statistics, at
L{STOP}), warms casd's credential cache (every user logs in once), then counts the calls of
C{--sessions} logins, one session at a time.  Prints the calls per login and the functions called
most per login.  With C{--garbage}, also the objects casd leaves for the garbage collector and
their cycles (L{bench.garbage}).  With C{--bulk-mib}, the calls per MiB of a bulk relay instead (4 clients
fetching their INBOX of 1 MiB messages, as the benchmark's bulk phase).  Only casd's process is
profiled.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import signal
import sys
import time

from bench.garbage import GARBAGE_ENV
from bench.servers import HERE, ROOT

#: The signals that start and stop the profile: real-time ones, since casd itself handles
#: C{SIGUSR1} (drain) and C{SIGUSR2} (reopen its log file).
START = signal.SIGRTMIN + 1
STOP = signal.SIGRTMIN + 2

#: Written by the profiled casd at L{STOP}.
STATS_ENV = "CASD_CALLCOUNT_STATS"


def wrap(argv: list[str]) -> None:
    """
    Run C{twistd} with C{argv}, profiling between L{START} and L{STOP} (the reactor's thread).
    """
    profiles = [cProfile.Profile()]

    garbage = os.environ.get(GARBAGE_ENV)

    def start(*_):
        if garbage:
            from bench import garbage as watch

            watch.start()
        # A new count each time: one process may be counted for several phases.
        profiles[0] = cProfile.Profile()
        profiles[0].enable()

    def stop(*_):
        profiles[0].disable()
        if garbage:
            from bench import garbage as watch

            watch.stop(garbage)
        path = os.environ[STATS_ENV]
        # Written whole, then renamed: the reader waits for the file to appear.
        profiles[0].dump_stats(path + ".part")
        os.replace(path + ".part", path)

    signal.signal(START, start)
    signal.signal(STOP, stop)
    from twisted.scripts.twistd import run

    sys.argv = ["twistd", *argv]
    run()


def _wrappedCASD(base, garbage=None):
    class ProfiledCASD(base):
        def command(self):
            args = super().command()
            # [python, twistd, ...] -> [python, -m, bench.callcount, wrap, ...]
            return [args[0], "-m", "bench.callcount", "wrap", *args[2:]]

        def environment(self):
            env = dict(super().environment(), **{STATS_ENV: os.path.join(self.work, "calls.prof")})
            if garbage:
                env[GARBAGE_ENV] = garbage
            return env

    return ProfiledCASD


def _login(port, proto, tls, users, sessions, sequential=True):
    from bench.__main__ import _collect, _spawnLoad

    spec = dict(
        mode="login", proto=proto, host="127.0.0.1", port=port, tls=tls, concurrency=1,
        duration=300.0, maxSessions=sessions, users=users, sequential=sequential,
    )
    (result,) = _collect([_spawnLoad(spec)], 360)
    if result["errors"]:
        raise RuntimeError(f"logins failed: {result['errors']}")
    return result["sessions"]


def _bulk(port, proto, tls, users, mib):
    """
    Relay C{mib} MiB from Dovecot to 4 clients fetching their INBOX (the benchmark's bulk phase).

    @return: the MiB received.
    """
    from bench.__main__ import _collect, _spawnLoad
    from bench.servers import MIB

    spec = dict(
        mode="bulk", proto=proto, host="127.0.0.1", port=port, tls=tls, concurrency=4,
        bytes=mib * MIB, duration=300.0, users=users[:4], offset=0,
    )
    (result,) = _collect([_spawnLoad(spec)], 360)
    if result["errors"]:
        raise RuntimeError(f"bulk failed: {result['errors']}")
    return result["bytes"] / MIB


def measure(args) -> int:
    from bench.servers import CASD, password, startDovecot, userName, writeCertificate, writeUsers

    work = os.path.join(HERE, "scratch", "callcount")
    os.makedirs(work, exist_ok=True)
    users = [[userName(i), password(i)] for i in range(args.users)]
    started = []
    try:
        bulk = 4 if args.bulk_mib else 0
        dovecot = startDovecot(work, args.users, bulk, 8 if bulk else 0, args.proto == "pop3")
        started.append(dovecot)
        cert, key, _ = writeCertificate(work)
        casdUsers, _ = writeUsers(work, args.users, "SSHA256")
        garbage = os.path.join(work, "garbage.json") if args.garbage else None
        if garbage and os.path.exists(garbage):
            os.unlink(garbage)
        casd = _wrappedCASD(CASD, garbage)(
            os.path.join(work, "casd"), cert, key, casdUsers, dovecot.imapPort,
            dovecot.pop3Port if args.proto == "pop3" else None, workers=args.workers,
        )
        casd.start()
        started.append(casd)
        port = casd.ports[args.proto + ("s" if args.tls else "")]
        time.sleep(1.0)
        _login(dovecot.imapPort, "imap", False, users, len(users))  # Dovecot's indexes
        _login(port, args.proto, args.tls, users, len(users))  # casd's credential cache
        stats = os.path.join(casd.work, "calls.prof")
        if os.path.exists(stats):
            os.unlink(stats)
        os.kill(casd.process.pid, START)
        if args.bulk_mib:
            done, unit = _bulk(port, args.proto, args.tls, users, args.bulk_mib), "MiB"
        else:
            done, unit = _login(port, args.proto, args.tls, users, args.sessions, sequential=False), "Login"
        time.sleep(0.5)  # the last session's close
        os.kill(casd.process.pid, STOP)
        deadline = time.monotonic() + 30
        while not os.path.exists(stats) and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        result = pstats.Stats(stats)
        total = result.total_calls
        counted = {"sessions" if unit == "Login" else "MiB": done, "calls": total}
        print(json.dumps(dict(counted, **{"callsPer" + unit: round(total / done, 1)})))
        rows = sorted(result.stats.items(), key=lambda kv: -kv[1][1])[: args.top]
        for (path, line, name), (cc, nc, tt, ct, _) in rows:
            where = os.path.relpath(path, ROOT) if path.startswith(ROOT) else path.rsplit("site-packages/", 1)[-1]
            print(f"{nc / done:8.2f}  {where}:{line}({name})")
        if garbage:
            from bench.garbage import render

            with open(garbage) as f:
                print(render(json.load(f), done, "login" if unit == "Login" else unit))
        return 0
    finally:
        for server in reversed(started):
            server.stop()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["wrap"]:
        wrap(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--proto", default="imap", choices=("imap", "pop3"))
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--workers", type=int, default=1,
                        help="casd with --workers N: the parent alone is counted (what a worker's session costs it)")
    parser.add_argument("--bulk-mib", type=int, default=0, help="count calls per MiB of a bulk relay instead")
    parser.add_argument("--garbage", action="store_true", help="also report the cyclic garbage casd leaves (bench.garbage)")
    return measure(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
