"""
A private PostgreSQL cluster (Debian C{postgresql}) on C{127.0.0.1} for integration tests.

C{initdb -A trust} into the fixture directory and C{postgres} in the foreground as a child of the
test, run as the C{postgres} user (PostgreSQL refuses root); the socket directory is private too.
Stopped by PID (SIGTERM is PostgreSQL's "smart" shutdown; the fixture then waits for the port).
"""

import glob
import os
import pwd
import subprocess

from .procs import checkTraversable, freePort, stopPid, waitForPort, waitForPortClosed


def _binDir():
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        raise RuntimeError("PostgreSQL not installed: apt-get install postgresql")
    return os.path.dirname(found[-1])


class PostgreSQL:
    """
    @ivar port: the TCP port on 127.0.0.1.
    @ivar pid: the postmaster's process ID while running.
    """

    host = "127.0.0.1"

    def __init__(self, directory, user="postgres"):
        self.directory = os.path.abspath(directory)
        self.dataDir = os.path.join(self.directory, "data")
        self.socketDir = os.path.join(self.directory, "sock")
        self.logPath = os.path.join(self.directory, "postgres.log")
        self.user = user
        self.bin = _binDir()
        self.port = None
        self.pid = None
        self._process = None

    def _demote(self):
        account = pwd.getpwnam(self.user)

        def demote():
            os.setsid()
            if os.getuid() == 0:
                os.setgid(account.pw_gid)
                os.initgroups(self.user, account.pw_gid)
                os.setuid(account.pw_uid)

        return demote, account

    def start(self, timeout=30.0):
        demote, account = self._demote()
        os.makedirs(self.directory, exist_ok=True)
        if os.getuid() == 0:
            checkTraversable(self.directory, account.pw_uid, account.pw_gid)
            os.chown(self.directory, account.pw_uid, account.pw_gid)
        for path in (self.socketDir,):
            os.makedirs(path, exist_ok=True)
            if os.getuid() == 0:
                os.chown(path, account.pw_uid, account.pw_gid)
        env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
        if not os.path.exists(os.path.join(self.dataDir, "PG_VERSION")):
            result = subprocess.run(
                [os.path.join(self.bin, "initdb"), "-D", self.dataDir, "-A", "trust", "-U", "postgres",
                 "-E", "UTF8", "--no-sync"],
                preexec_fn=demote, env=env, capture_output=True, cwd=self.directory,
            )
            if result.returncode:
                raise RuntimeError("initdb failed:\n" + result.stdout.decode() + result.stderr.decode())
        self.port = freePort()
        self._log = open(self.logPath, "ab")
        if os.getuid() == 0:
            os.chown(self.logPath, account.pw_uid, account.pw_gid)
        self._process = subprocess.Popen(
            [os.path.join(self.bin, "postgres"), "-D", self.dataDir, "-p", str(self.port),
             "-k", self.socketDir, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            preexec_fn=demote, env=env, cwd=self.directory,
        )
        self.pid = self._process.pid
        try:
            waitForPort(self.host, self.port, timeout=timeout,
                        alive=lambda: self._process.poll() is None)
        except RuntimeError:
            self.stop()
            raise RuntimeError("PostgreSQL did not start:\n" + self.logText())
        return self

    def psql(self, sql, database="postgres"):
        """
        Run SQL as the superuser.

        @return: psql's output.
        """
        demote, _ = self._demote()
        result = subprocess.run(
            [os.path.join(self.bin, "psql"), "-h", self.socketDir, "-p", str(self.port), "-U",
             "postgres", "-d", database, "-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-c", sql],
            preexec_fn=demote, capture_output=True, cwd=self.directory,
        )
        if result.returncode:
            raise RuntimeError("psql failed: " + result.stderr.decode())
        return result.stdout.decode()

    def url(self, database, table=None):
        """
        @return: a C{postgresql://} URL for C{database} (and C{/table}) as the superuser.
        """
        url = "postgresql://postgres@%s:%d/%s" % (self.host, self.port, database)
        return url + "/" + table if table else url

    def stop(self):
        if self.pid is not None:
            # SIGINT: PostgreSQL's "fast" shutdown (SIGTERM waits for clients).
            try:
                os.kill(self.pid, 2)
            except ProcessLookupError:
                pass
            stopPid(self.pid, timeout=15.0)
            self.pid = None
        if self._process is not None:
            self._process.wait()
            self._process = None
            self._log.close()
            waitForPortClosed(self.host, self.port)

    def logText(self):
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""
