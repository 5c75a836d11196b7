"""
A private nginx for integration tests: a generic HTTP backend (and, for the benchmark, a reverse
proxy to compare casd with).

nginx runs in the foreground (C{-g 'daemon off;'}) as a child of the test process with C{-p DIR}
and every path under C{DIR}: configuration, pid, logs and all C{*_temp_path}s.  Run as root, its
workers run as C{nobody}, so the directories they write are made writable for them.

The backend's locations:
    - C{/echo/...}: 200 with one line of what the request carried, C{|}-separated:
      X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Remote-User, Authorization,
      Content-Length, method, URI, Forwarded, Connection;
    - C{/files/NAME}: static files from C{DIR/files} (L{NginxServer.makeFile});
    - C{/upload/NAME}: C{PUT} stores the body in C{DIR/uploads/NAME} (WebDAV module);
    - C{/status/503}: answers 503.
"""

import os
import shutil
import subprocess
import tempfile

from .procs import freePort, pidAlive, requireBinary, stopPid, waitForPort, waitForPortClosed

ECHO = (
    '"$http_x_forwarded_for|$http_x_forwarded_proto|$http_x_forwarded_host|'
    "$http_x_remote_user|$http_authorization|$content_length|$request_method|$request_uri|"
    '$http_forwarded|$http_connection\\n"'
)

BACKEND_LOCATIONS = """
        location /echo/ {{
            default_type text/plain;
            return 200 {echo};
        }}
        location /files/ {{
            alias {dir}/files/;
        }}
        location /upload/ {{
            alias {dir}/uploads/;
            dav_methods PUT;
            create_full_put_path on;
            client_max_body_size 0;
        }}
        location = /status/503 {{
            return 503;
        }}
"""

CONFIG = """
{user}
worker_processes {workers};
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    sendfile on;
    keepalive_requests 100000;
    {upstreams}
    server {{
        listen 127.0.0.1:{port}{ssl};
        {tls}
        {locations}
    }}
}}
"""


class NginxServer:
    """
    One private nginx.

    @ivar port: its loopback port.
    @ivar directory: its prefix directory.
    """

    def __init__(self, directory=None, port=None, locations=None, upstreams="", workers=1,
                 tls=None):
        """
        @param directory: the prefix directory; by default a new one under the system's
            temporary directory (nginx's workers, as C{nobody}, must be able to reach it),
            removed by L{stop}.
        @param locations: the C{server} block's locations; by default the backend's.
        @param upstreams: C{upstream} blocks (for a reverse-proxy configuration).
        @param tls: C{(certificatePath, keyPath)} to serve HTTPS instead of HTTP.
        """
        self.binary = requireBinary("nginx", [("/usr/sbin/nginx", "nginx-light")])
        self.temporary = directory is None
        if directory is None:
            directory = tempfile.mkdtemp(prefix="casd-nginx-")
        self.directory = os.path.abspath(directory)
        self.port = port or freePort()
        self.process = None
        for sub in ("tmp", "files", "uploads", "logs"):
            os.makedirs(os.path.join(self.directory, sub), exist_ok=True)
        if os.getuid() == 0:
            for sub in ("tmp", "uploads"):
                os.chmod(os.path.join(self.directory, sub), 0o777)
            os.chmod(self.directory, 0o755)
        if locations is None:
            locations = BACKEND_LOCATIONS.format(dir=self.directory, echo=ECHO)
        self.configPath = os.path.join(self.directory, "nginx.conf")
        with open(self.configPath, "w") as f:
            f.write(
                CONFIG.format(
                    user="user nobody nogroup;" if os.getuid() == 0 else "",
                    workers=workers,
                    dir=self.directory,
                    port=self.port,
                    upstreams=upstreams,
                    locations=locations,
                    ssl=" ssl" if tls else "",
                    tls=(f"ssl_certificate {tls[0]};\n        ssl_certificate_key {tls[1]};" if tls else ""),
                )
            )

    def makeFile(self, name, size):
        """
        Write a sparse file of C{size} bytes served at C{/files/NAME}.

        @return: its path.
        """
        path = os.path.join(self.directory, "files", name)
        with open(path, "wb") as f:
            f.truncate(size)
        os.chmod(path, 0o644)
        return path

    def uploaded(self, name):
        return os.path.join(self.directory, "uploads", name)

    def start(self, timeout=10.0):
        self.process = subprocess.Popen(
            [self.binary, "-p", self.directory, "-c", self.configPath, "-g", "daemon off;"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.directory, "stderr.log"), "wb"),
        )
        try:
            waitForPort("127.0.0.1", self.port, timeout, alive=lambda: pidAlive(self.process.pid))
        except RuntimeError:
            self.stop()
            with open(os.path.join(self.directory, "stderr.log")) as f:
                raise RuntimeError("nginx did not start: " + f.read()[-2000:])
        return self

    def stop(self):
        """
        Stop nginx (a no-op when it is not running).
        """
        if self.process is not None:
            # SIGTERM is nginx's fast shutdown: the master stops its workers first.
            stopPid(self.process.pid)
            self.process.wait()
            self.process = None
            waitForPortClosed("127.0.0.1", self.port)

    def remove(self):
        """
        Stop nginx and remove a temporary prefix directory.
        """
        self.stop()
        if self.temporary:
            shutil.rmtree(self.directory, ignore_errors=True)
