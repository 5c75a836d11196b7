"""
Process and port helpers shared by the server fixtures.
"""

import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time


#: The ports L{freePort} handed out in this process: never handed out twice.
_handedOut: set = set()


def freePort():
    """
    Ask the kernel for an unused TCP port on the loopback interface.

    The port is released again before returning, so another process may
    in principle take it first; in practice this is good enough for tests.
    The kernel may offer a port it just offered again (a test that asks for
    several ports in a row, for one configuration, then got two listeners on
    one port): a port this process was given before is never returned again.

    @return: A free port number on C{127.0.0.1}.
    @rtype: L{int}
    """
    for _ in range(1000):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        finally:
            s.close()
        if port not in _handedOut:
            _handedOut.add(port)
            return port
    raise RuntimeError("no loopback port left that was not handed out before")


def portAccepts(host, port):
    """
    Check whether something accepts TCP connections on C{(host, port)}.

    @rtype: L{bool}
    """
    try:
        s = socket.create_connection((host, port), timeout=1.0)
    except OSError:
        return False
    s.close()
    return True


def waitForPort(host, port, timeout=10.0, alive=None):
    """
    Poll until a TCP connection to C{(host, port)} succeeds.

    @param alive: Optional callable returning C{False} once the server
        process is known to have died, to fail fast instead of waiting
        for the whole timeout.

    @raise RuntimeError: If nothing accepts within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if portAccepts(host, port):
            return
        if alive is not None and not alive():
            raise RuntimeError(
                "server process exited before listening on %s:%d"
                % (host, port))
        if time.monotonic() >= deadline:
            raise RuntimeError(
                "nothing accepted connections on %s:%d within %.1f s"
                % (host, port, timeout))
        time.sleep(0.05)


def waitForPortClosed(host, port, timeout=10.0):
    """
    Poll until TCP connections to C{(host, port)} are refused.

    @raise RuntimeError: If the port still accepts after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while portAccepts(host, port):
        if time.monotonic() >= deadline:
            raise RuntimeError(
                "%s:%d still accepts connections after %.1f s"
                % (host, port, timeout))
        time.sleep(0.05)


def requireBinary(name, candidates=()):
    """
    Locate an executable needed by a fixture.

    @param name: The program name, looked up on C{PATH}.
    @param candidates: Further paths to try (servers live in C{/usr/sbin},
        which is often not on a non-root C{PATH}).  A candidate may also
        be a C{(path, package)} pair; the package name of the first entry
        is used in the error message.

    @return: The path of the executable.
    @rtype: L{str}

    @raise RuntimeError: If the program cannot be found.
    """
    package = name
    paths = []
    for candidate in candidates:
        if isinstance(candidate, tuple):
            candidate, package = candidate
        paths.append(candidate)
    found = shutil.which(name)
    if found:
        return found
    for path in paths:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    raise RuntimeError(
        "%s not installed: apt-get install %s" % (name, package))


def pidAlive(pid):
    """
    Check whether process C{pid} is still running (reaping it if it is an
    exited child of ours).

    @rtype: L{bool}
    """
    try:
        reaped, _ = os.waitpid(pid, os.WNOHANG)
        if reaped == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open("/proc/%d/stat" % (pid,)) as f:
            # Field 3 is the state; "Z" is a zombie we cannot reap.
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
    except (OSError, IndexError):
        pass
    return True


def stopPid(pid, timeout=5.0, processGroup=False):
    """
    Terminate process C{pid}: C{SIGTERM}, wait up to C{timeout} seconds,
    then C{SIGKILL}.  A process that is already gone is not an error.

    @param processGroup: Signal C{pid}'s whole process group instead, if
        C{pid} leads its own group (as a daemon that called C{setsid}
        does) and it is not ours, repeating C{SIGTERM} until C{pid} exits.
        This stops the daemon's children at the same time instead of the
        master waiting for them to time out.
    """
    if pid is None or pid <= 0:
        return
    if processGroup:
        try:
            useGroup = os.getpgid(pid) == pid and pid != os.getpgrp()
        except ProcessLookupError:
            useGroup = False
    else:
        useGroup = False

    def signalIt(signum):
        if useGroup:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)

    try:
        signalIt(signal.SIGTERM)
    except ProcessLookupError:
        pidAlive(pid)
        return
    deadline = time.monotonic() + timeout
    resend = time.monotonic() + 0.2
    while pidAlive(pid):
        if useGroup and time.monotonic() >= resend:
            # Children spawned after the first signal (Dovecot starts its
            # auth process on demand) would otherwise keep the master
            # waiting for them.
            try:
                signalIt(signal.SIGTERM)
            except ProcessLookupError:
                pass
            resend = time.monotonic() + 0.2
        if time.monotonic() >= deadline:
            try:
                signalIt(signal.SIGKILL)
            except ProcessLookupError:
                return
            killDeadline = time.monotonic() + 5.0
            while pidAlive(pid) and time.monotonic() < killDeadline:
                time.sleep(0.02)
            return
        time.sleep(0.02)


class ServerProcess:
    """
    A private server run as a child process in its own session, its output in C{logPath},
    listening on C{(host, port)}; L{launch} starts it and waits for the port, L{stop} stops it
    by its process group.  Subclasses set C{directory}, C{host}, C{port}, C{logPath} and give
    C{logText()}.
    """

    pid = None
    _process = None

    def launch(self, args, env, what, timeout):
        self._log = open(self.logPath, "ab")
        self._process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, env=env, cwd=self.directory,
        )
        self.pid = self._process.pid
        try:
            waitForPort(self.host, self.port, timeout=timeout, alive=lambda: self._process.poll() is None)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"{what} did not start:\n" + self.logText())
        return self

    def stop(self):
        if self.pid is not None:
            stopPid(self.pid, processGroup=True)
            self.pid = None
        if self._process is not None:
            self._process.wait()
            self._process = None
            self._log.close()


def readPidFile(path, timeout=10.0, alive=None):
    """
    Wait for a daemon's PID file to appear and return the PID in it.

    @param alive: As for L{waitForPort}.
    @raise RuntimeError: If no valid PID file appears within C{timeout}.
    @rtype: L{int}
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None and not alive():
            raise RuntimeError("server process exited before writing %s"
                               % (path,))
        try:
            with open(path) as f:
                text = f.read().strip()
            if text:
                return int(text.split()[0])
        except FileNotFoundError:
            pass
        except ValueError:
            pass
        if time.monotonic() >= deadline:
            raise RuntimeError("no PID file %s after %.1f s" % (path, timeout))
        time.sleep(0.05)


def _ancestors(path):
    path = os.path.abspath(path)
    result = []
    while True:
        result.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            return list(reversed(result))
        path = parent


def _searchable(st, uid, gid):
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def checkTraversable(path, uid, gid, fixWithin=None):
    """
    Check that a user can reach C{path}: every ancestor directory must be
    searchable by C{uid}/C{gid} (judged by the mode bits).

    Server processes that drop privileges (Dovecot's auth and mail
    processes) must reach files inside the fixture directory, but
    C{TestCase.mktemp} and C{tempfile.mkdtemp} create mode 0700
    directories.

    @param fixWithin: Directories (default: the working directory, where
        trial puts C{_trial_temp}, and the system temp directory) below
        which blocking ancestors get the search-only bit C{o+x} added
        (which does not allow listing them).

    @raise RuntimeError: Naming the first directory that blocks access.
    """
    if fixWithin is None:
        fixWithin = (os.getcwd(), tempfile.gettempdir())
    roots = [os.path.realpath(root) for root in fixWithin]
    for directory in _ancestors(path):
        st = os.stat(directory)
        if _searchable(st, uid, gid):
            continue
        real = os.path.realpath(directory)
        if any(real != root and real.startswith(root + os.sep)
               for root in roots):
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
            continue
        raise RuntimeError(
            "%s is not searchable by uid %d; the server cannot reach "
            "its files (chmod o+x it or use another temp directory)"
            % (directory, uid))


__all__ = [
    "freePort", "waitForPort", "waitForPortClosed", "requireBinary",
    "stopPid", "pidAlive", "readPidFile", "checkTraversable", "portAccepts",
]
