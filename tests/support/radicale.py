"""
A private Radicale (CalDAV/CardDAV, from PyPI) on C{127.0.0.1} for integration tests.

It trusts C{X-Remote-User} (C{--auth-type http_x_remote_user}) and lets each user reach only
their own collections (C{--rights-type owner_only}): casd sets the header, Radicale decides.
Radicale's WSGI application runs under Twisted Web in a child process of the test (C{python -m
twisted web --wsgi radicale.application}), stopped by PID.
"""

import os
import sys

from .procs import ServerProcess, freePort


class Radicale(ServerProcess):
    """
    @ivar port: the listening port.
    @ivar pid: the process ID while running.
    @ivar logPath: Radicale's output.
    """

    host = "127.0.0.1"

    def __init__(self, directory, auth="http_x_remote_user", scriptName=""):
        """
        @param auth: Radicale's C{--auth-type}.
        @param scriptName: the path prefix Radicale is published under (C{/dav}), as behind a
            reverse proxy that keeps the prefix.
        """
        self.scriptName = scriptName
        self.directory = os.path.abspath(directory)
        self.auth = auth
        self.port = None
        self.pid = None
        self._process = None
        self.logPath = os.path.join(self.directory, "radicale.log")

    @property
    def url(self):
        return "http://%s:%d%s/" % (self.host, self.port, self.scriptName)

    def start(self, timeout=20.0):
        os.makedirs(self.directory, exist_ok=True)
        self.port = freePort()
        configPath = os.path.join(self.directory, "radicale.conf")
        with open(configPath, "w") as f:
            f.write(
                "[server]\n"
                + ("script_name = %s\n" % (self.scriptName,) if self.scriptName else "")
                + "[auth]\ntype = %s\n" % (self.auth,)
                + "[rights]\ntype = owner_only\n"
                + "[storage]\nfilesystem_folder = %s\n" % (os.path.join(self.directory, "collections"),)
                + "[logging]\nlevel = info\n"
            )
        # Radicale's WSGI application under Twisted Web (an HTTP/1.1 server with persistent
        # connections), not its own wsgiref server: that one answers HTTP/1.0 without
        # "Connection: close" and then closes, which Twisted's Agent takes for a persistent
        # connection; a request sent on it before the close is seen fails.
        args = [
            sys.executable, "-m", "twisted", "web",
            "--listen", "tcp:%d:interface=%s" % (self.port, self.host),
            "--wsgi", "radicale.application",
        ]
        env = dict(os.environ, RADICALE_CONFIG=configPath)
        return self.launch(args, env, 'Radicale', timeout)

    def logText(self):
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""
