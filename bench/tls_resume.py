"""
A TLS login storm with and without session resumption: casd beside nginx's mail proxy, both
with resumption configured (casd: C{[tls] ticket_keys}; nginx: C{ssl_session_cache} and
C{ssl_session_tickets} with a ticket key file), over implicit-TLS IMAP to the same Dovecot.

    bench/run is not needed: PYTHONPATH=. .venv/bin/python -m bench.tls_resume [--seconds 5]

Each client thread connects, logs in, selects INBOX and logs out, again and again; in the
"resumed" variant it offers the TLS session of its previous connection (TLS 1.3 tickets, or
TLS 1.2 with C{--tls12}: tickets).  Reported: sessions/s, the proxy's CPU per session, and how
many sessions were resumed.  The load generator is Python threads (C{ssl} resumes sessions only
with blocking sockets), in two processes.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import socket
import ssl
import sys
import threading
import time

from bench.measure import cpuDelta
from bench.servers import (
    CASD,
    HERE,
    AuthHTTP,
    Nginx,
    password,
    startDovecot,
    userName,
    writeCertificate,
    writeUsers,
)


class ResumingNginx(Nginx):
    name = "nginx"

    def prepare(self):
        super().prepare()
        path = os.path.join(self.work, "nginx.conf")
        keyFile = os.path.join(self.work, "ticket.key")
        with open(keyFile, "wb") as f:
            f.write(os.urandom(80))
        with open(path) as f:
            conf = f.read()
        conf = conf.replace(
            "    ssl_session_cache off;\n    ssl_session_tickets off;\n",
            "    ssl_session_cache shared:MAIL:10m;\n    ssl_session_tickets on;\n"
            f"    ssl_session_ticket_key {keyFile};\n",
        )
        with open(path, "w") as f:
            f.write(conf)


class ResumingCASD(CASD):
    def prepare(self):
        super().prepare()
        path = os.path.join(self.work, "casd.toml")
        keyFile = os.path.join(self.work, "ticket.keys")
        fd = os.open(keyFile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(80).hex() + "\n")
        with open(path) as f:
            conf = f.read()
        conf = conf.replace("[tls]\n", f'[tls]\nticket_keys = "{keyFile}"\n', 1)
        with open(path, "w") as f:
            f.write(conf)


def _session(port, user, pw, context, previous):
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    tls = context.wrap_socket(raw, session=previous)
    try:
        f = tls.makefile("rb")
        if not f.readline().startswith(b"* OK"):
            raise RuntimeError("no greeting")
        for tag, command in ((b"a", b"LOGIN %s %s" % (user.encode(), pw.encode())), (b"b", b"SELECT INBOX")):
            tls.sendall(tag + b" " + command + b"\r\n")
            while True:
                line = f.readline()
                if not line:
                    raise RuntimeError("closed")
                if line.startswith(tag + b" "):
                    if not line.startswith(tag + b" OK"):
                        raise RuntimeError(line[:60])
                    break
        tls.sendall(b"z LOGOUT\r\n")
        while f.read(65536):
            pass
        return tls.session, tls.session_reused
    finally:
        tls.close()


def _loadProcess(args):
    port, users, threads, seconds, resume, tls12, seed = args
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    deadline = time.monotonic() + seconds
    counts = {"sessions": 0, "reused": 0, "errors": 0}
    lock = threading.Lock()

    def worker(i):
        rng = random.Random(seed * 1000 + i)
        previous = None
        while time.monotonic() < deadline:
            user, pw = rng.choice(users)
            try:
                session, reused = _session(port, user, pw, context, previous if resume else None)
            except Exception:
                with lock:
                    counts["errors"] += 1
                previous = None
                continue
            previous = session
            with lock:
                counts["sessions"] += 1
                counts["reused"] += int(reused)

    start = time.monotonic()
    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    counts["wall"] = time.monotonic() - start
    return counts


def storm(server, port, users, args, resume) -> dict:
    before = server.group.cpu()
    jobs = [(port, users, args.threads, args.seconds, resume, args.tls12, i) for i in range(args.processes)]
    with multiprocessing.Pool(args.processes) as pool:
        results = pool.map(_loadProcess, jobs)
    time.sleep(0.3)
    cpu = cpuDelta(before, server.group.cpu())
    sessions = sum(r["sessions"] for r in results)
    return {
        "sessions": sessions,
        "rate": sessions / max(r["wall"] for r in results),
        "cpuMs": cpu / sessions * 1000.0 if sessions else float("nan"),
        "reused": sum(r["reused"] for r in results),
        "errors": sum(r["errors"] for r in results),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench.tls_resume", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=10, help="client threads per process")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--tls12", action="store_true", help="TLS 1.2 (tickets) instead of 1.3")
    args = parser.parse_args(argv)
    work = os.path.join(HERE, "scratch", "tls-resume")
    os.makedirs(work, exist_ok=True)
    started = []
    try:
        dovecot = startDovecot(work, args.users, 1, 1, False)
        started.append(dovecot)
        cert, key, _ = writeCertificate(work)
        casdUsers, clearUsers = writeUsers(work, args.users, "SSHA256")
        auth = AuthHTTP(os.path.join(work, "authhttp"), clearUsers, dovecot.imapPort)
        auth.start()
        started.append(auth)
        targets = [
            ("nginx", ResumingNginx(os.path.join(work, "nginx"), auth.ports["http"], cert, key, False)),
            ("casd", ResumingCASD(os.path.join(work, "casd"), cert, key, casdUsers, dovecot.imapPort)),
        ]
        for _, server in targets:
            server.start()
            started.append(server)
        users = [(userName(i), password(i)) for i in range(args.users)]
        # Warm: every user once through each proxy (Dovecot's indexes, casd's credential cache).
        for name, server in targets:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
            for user, pw in users:
                _session(server.ports["imaps"], user, pw, context, None)
        rows = []
        for run in range(args.runs):
            for resume in (False, True):
                for name, server in targets:
                    r = storm(server, server.ports["imaps"], users, args, resume)
                    r.update(target=name, resume=resume, run=run + 1)
                    rows.append(r)
                    print(json.dumps(r), flush=True)
        version = "TLS 1.2" if args.tls12 else "TLS 1.3"
        print(f"\n| target | handshakes | sessions/s | proxy CPU ms/session | resumed | errors |  ({version})")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['target']} | {'resumed' if r['resume'] else 'full'} | {r['rate']:.0f} | {r['cpuMs']:.3f}"
                f" | {r['reused']}/{r['sessions']} | {r['errors']} |"
            )
        return 0
    finally:
        for server in reversed(started):
            try:
                server.stop()
            except Exception as e:
                print(f"bench: stopping {server}: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
