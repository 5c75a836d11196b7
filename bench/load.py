"""
The load generator: one process of an asyncio client (uvloop when installed).  The benchmark
starts several of them at once so that the client is not the bottleneck.

    python -m bench.load '{"mode": "login", "proto": "imap", "port": 1143, ...}'

Modes:
  - C{login}: C{concurrency} sessions at a time, each connect, log in, SELECT INBOX (POP3: STAT),
    log out, for C{duration} seconds or C{maxSessions} sessions, whichever comes first;
  - C{bulk}: C{concurrency} logged-in sessions, each fetching its whole INBOX (IMAP
    C{FETCH 1:* BODY.PEEK[]}, POP3 C{RETR} of each message) until C{bytes} were read or
    C{duration} passed;
  - C{idle}: C{count} sessions logged in and held in IDLE; prints C{{"ready": ...}} and holds them
    until a line arrives on standard input (or C{hold} seconds pass), then closes them.

The result is one JSON object on standard output.  Every loop is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import random
import ssl
import sys
import time

#: Seconds one login-storm session may take before it counts as an error.
SESSION_TIMEOUT = 15.0


def _sslContext(enabled: bool):
    if not enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class ProtocolError(Exception):
    pass


class Session:
    """
    One client connection speaking just enough IMAP or POP3.
    """

    def __init__(self, reader, writer, proto: str) -> None:
        self.reader = reader
        self.writer = writer
        self.proto = proto

    @classmethod
    async def open(cls, spec, sslContext):
        reader, writer = await asyncio.open_connection(
            spec["host"], spec["port"], ssl=sslContext, limit=1 << 20
        )
        s = cls(reader, writer, spec["proto"])
        greeting = await reader.readline()
        ok = b"* OK" if s.proto == "imap" else b"+OK"
        if not greeting.startswith(ok):
            raise ProtocolError(f"greeting {greeting[:60]!r}")
        return s

    async def imapCommand(self, tag: bytes, command: bytes) -> bytes:
        self.writer.write(tag + b" " + command + b"\r\n")
        prefix = tag + b" "
        while True:
            line = await self.reader.readline()
            if not line:
                raise ProtocolError(f"closed during {command.split()[0]!r}")
            if line.startswith(prefix):
                if not line.startswith(prefix + b"OK"):
                    raise ProtocolError(line[:80].decode("ascii", "replace").strip())
                return line

    async def popCommand(self, command: bytes) -> bytes:
        self.writer.write(command + b"\r\n")
        line = await self.reader.readline()
        if not line.startswith(b"+OK"):
            raise ProtocolError(f"{command.split()[0]!r}: {line[:80]!r}")
        return line

    async def login(self, user: str, password: str) -> None:
        if self.proto == "imap":
            await self.imapCommand(b"a", b"LOGIN " + user.encode() + b" " + password.encode())
            await self.imapCommand(b"b", b"SELECT INBOX")
        else:
            await self.popCommand(b"USER " + user.encode())
            await self.popCommand(b"PASS " + password.encode())
            await self.popCommand(b"STAT")

    async def logout(self) -> None:
        if self.proto == "imap":
            self.writer.write(b"z LOGOUT\r\n")
        else:
            self.writer.write(b"QUIT\r\n")
        # Read to the end: the server closes after its goodbye.
        while await self.reader.read(65536):
            pass
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()

    async def readUntil(self, done) -> int:
        """
        Count bytes until C{done(tail)} is true for the last bytes read.
        """
        total = 0
        tail = b""
        read = self.reader.read
        while True:
            chunk = await read(1 << 20)
            if not chunk:
                raise ProtocolError("closed during a transfer")
            total += len(chunk)
            tail = chunk[-128:] if len(chunk) >= 128 else (tail + chunk)[-128:]
            if done(tail):
                return total


def _users(spec):
    return [tuple(u) for u in spec["users"]]


async def loginStorm(spec) -> dict:
    sslContext = _sslContext(spec["tls"])
    users = _users(spec)
    deadline = time.monotonic() + spec["duration"]
    budget = [spec["maxSessions"]]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    rng = random.Random(spec.get("seed", 0))

    order = iter(users) if spec.get("sequential") else None

    async def one(user, password):
        s = await Session.open(spec, sslContext)
        try:
            await s.login(user, password)
            await s.logout()
        except BaseException:
            s.abort()
            raise

    async def worker():
        while budget[0] > 0 and time.monotonic() < deadline:
            budget[0] -= 1
            if order is not None:
                user = next(order, None)
                if user is None:
                    return
            else:
                user = rng.choice(users)
            t0 = time.monotonic()
            try:
                await asyncio.wait_for(one(*user), SESSION_TIMEOUT)
            except Exception as e:
                key = type(e).__name__ + (f": {e}" if str(e) else "")
                errors[key[:120]] = errors.get(key[:120], 0) + 1
                continue
            latencies.append((time.monotonic() - t0) * 1000.0)

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(spec["concurrency"])))
    return {
        "start": start,
        "end": time.monotonic(),
        "sessions": len(latencies),
        "errors": errors,
        "latencies": [round(x, 3) for x in latencies],
    }


async def bulk(spec) -> dict:
    sslContext = _sslContext(spec["tls"])
    users = _users(spec)
    perConnection = spec["bytes"] // spec["concurrency"]
    deadline = time.monotonic() + spec["duration"]
    received = [0]
    errors: dict[str, int] = {}

    async def worker(i):
        user, password = users[i % len(users)]
        s = await Session.open(spec, sslContext)
        try:
            if s.proto == "imap":
                await s.imapCommand(b"a", b"LOGIN " + user.encode() + b" " + password.encode())
                line = await s.imapCommand(b"b", b"EXAMINE INBOX")
            else:
                await s.popCommand(b"USER " + user.encode())
                await s.popCommand(b"PASS " + password.encode())
                stat = await s.popCommand(b"STAT")
                count = int(stat.split()[1])
            got, n = 0, 0
            while got < perConnection and time.monotonic() < deadline:
                n += 1
                if s.proto == "imap":
                    tag = b"f%d" % n
                    s.writer.write(tag + b" FETCH 1:* BODY.PEEK[]\r\n")
                    marker = b"\r\n" + tag + b" "

                    def done(tail, marker=marker):
                        i = tail.rfind(marker)
                        return i >= 0 and tail.endswith(b"\r\n") and tail.find(b"\r\n", i + 2) == len(tail) - 2
                    got += await s.readUntil(done)
                else:
                    s.writer.write(b"RETR %d\r\n" % ((n - 1) % count + 1))
                    got += await s.readUntil(lambda tail: tail.endswith(b"\r\n.\r\n"))
            received[0] += got
            await s.logout()
        except Exception as e:
            s.abort()
            key = type(e).__name__ + (f": {e}" if str(e) else "")
            errors[key[:120]] = errors.get(key[:120], 0) + 1

    start = time.monotonic()
    await asyncio.gather(*(worker(i + spec.get("offset", 0)) for i in range(spec["concurrency"])))
    return {"start": start, "end": time.monotonic(), "bytes": received[0], "errors": errors}


async def idle(spec) -> dict:
    sslContext = _sslContext(spec["tls"])
    users = _users(spec)
    sessions: list[Session] = []
    errors: dict[str, int] = {}
    gate = asyncio.Semaphore(spec["concurrency"])
    deadline = time.monotonic() + spec["duration"]

    async def one(i):
        async with gate:
            if time.monotonic() > deadline:
                errors["not started in time"] = errors.get("not started in time", 0) + 1
                return
            user, password = users[i % len(users)]
            try:
                s = await asyncio.wait_for(Session.open(spec, sslContext), SESSION_TIMEOUT)
                await asyncio.wait_for(s.login(user, password), SESSION_TIMEOUT)
                s.writer.write(b"i IDLE\r\n")
                line = await asyncio.wait_for(s.reader.readline(), SESSION_TIMEOUT)
                if not line.startswith(b"+"):
                    raise ProtocolError(f"IDLE: {line[:60]!r}")
            except Exception as e:
                key = type(e).__name__ + (f": {e}" if str(e) else "")
                errors[key[:120]] = errors.get(key[:120], 0) + 1
                return
            sessions.append(s)

    start = time.monotonic()
    await asyncio.gather(*(one(i + spec.get("offset", 0)) for i in range(spec["count"])))
    ready = time.monotonic()
    print(json.dumps({"ready": len(sessions), "errors": errors}), flush=True)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.readline), spec.get("hold", 120))
    except asyncio.TimeoutError:
        pass
    # How many were still open when released (a proxy's idle timeout would show here).
    alive = sum(1 for s in sessions if not s.reader.at_eof())
    for s in sessions:
        s.abort()
    await asyncio.sleep(0)
    return {"start": start, "ready": ready, "sessions": len(sessions), "alive": alive, "errors": errors}


MODES = {"login": loginStorm, "bulk": bulk, "idle": idle}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    try:
        import uvloop
    except ImportError:
        uvloop = None
    run = MODES[spec["mode"]](spec)
    result = uvloop.run(run) if uvloop is not None else asyncio.run(run)
    result["uvloop"] = uvloop is not None
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
