"""
A private redis-server for tests, and a blackhole: a listening socket that never answers.

redis-server runs in the foreground as a child of the test process, on a loopback high port,
without persistence, with its configuration and log under the fixture directory.
"""

import os
import socket
import subprocess

from .procs import freePort, pidAlive, requireBinary, stopPid, waitForPort, waitForPortClosed


class RedisServer:
    """
    @ivar port: the TCP port (kept across L{stop} and L{start}, so clients reconnect).
    @ivar password: the C{requirepass} password, or C{None}.
    """

    def __init__(self, directory, password=None, host="127.0.0.1", port=None, tls=None, caPath=None):
        """
        @param tls: C{(certPath, keyPath)}: serve TLS only (C{rediss://}), with C{caPath} for
            L{cli}.
        """
        self.directory = directory
        self.password = password
        self.tls = tls
        self.caPath = caPath
        self.host = host
        self.port = port or freePort()
        self.process = None
        os.makedirs(directory, exist_ok=True)
        self.binary = requireBinary(
            "redis-server", [("/usr/bin/redis-server", "redis-server")]
        )

    @property
    def url(self):
        return "%s://%s:%d/0" % ("rediss" if self.tls else "redis", self.host, self.port)

    def _config(self):
        lines = [
            "bind %s" % (self.host,),
            "port %d" % (0 if self.tls else self.port,),
            "protected-mode no",
            "daemonize no",
            'save ""',
            "appendonly no",
            "dir %s" % (self.directory,),
            "logfile %s" % (os.path.join(self.directory, "redis.log"),),
        ]
        if self.password:
            lines.append("requirepass %s" % (self.password,))
        if self.tls:
            lines += [
                "tls-port %d" % (self.port,),
                "tls-cert-file %s" % (self.tls[0],),
                "tls-key-file %s" % (self.tls[1],),
                "tls-auth-clients no",
            ]
        path = os.path.join(self.directory, "redis.conf")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    def start(self):
        self.process = subprocess.Popen(
            [self.binary, self._config()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        pid = self.process.pid
        waitForPort(self.host, self.port, timeout=10.0, alive=lambda: pidAlive(pid))
        return self

    def stop(self):
        if self.process is not None:
            stopPid(self.process.pid)
            self.process.wait()
            self.process = None
            waitForPortClosed(self.host, self.port)

    def cli(self, *args):
        """
        Run one command with redis-cli and return its output (for assertions).
        """
        command = ["redis-cli", "-h", self.host, "-p", str(self.port), "--no-auth-warning"]
        if self.password:
            command += ["-a", self.password]
        if self.tls:
            command += ["--tls", "--cacert", self.caPath]
        return subprocess.run(
            command + [str(a) for a in args], check=True, capture_output=True, text=True, timeout=10
        ).stdout

    def commandCount(self, names=None):
        """
        Commands the server processed: those named (e.g. C{("evalsha", "eval")}), or all but
        C{INFO}.  Commands a Lua script calls count too, so a round-trip count names the
        commands a client sends itself.
        """
        total = 0
        for line in self.cli("INFO", "commandstats").splitlines():
            if not line.startswith("cmdstat_"):
                continue
            command, _, fields = line.partition(":")
            command = command[len("cmdstat_"):]
            if command == "info" or (names is not None and command not in names):
                continue
            total += int(dict(f.split("=") for f in fields.split(","))["calls"])
        return total

    def dump(self):
        """
        Every key and its value(s), as text, for checks that nothing secret is stored.
        """
        out = []
        for key in self.cli("--scan").split():
            kind = self.cli("TYPE", key).strip()
            value = {
                "string": ("GET",),
                "list": ("LRANGE", key, 0, -1),
                "zset": ("ZRANGE", key, 0, -1),
            }.get(kind)
            out.append(key)
            if value is not None:
                out.append(self.cli(*(value if len(value) > 1 else (value[0], key))))
        return "\n".join(out)


class Blackhole:
    """
    A listening socket that accepts (the kernel completes the handshake) and never answers.
    """

    def __init__(self, host="127.0.0.1"):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind((host, 0))
        self.socket.listen(64)
        self.host = host
        self.port = self.socket.getsockname()[1]

    @property
    def url(self):
        return "redis://%s:%d/0" % (self.host, self.port)

    def close(self):
        self.socket.close()
