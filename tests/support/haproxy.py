"""
A private HAProxy in TCP mode in front of casd nodes: PROXY protocol v2 to the nodes, health
checks on casd's C{/health} (the admin listener) or, without one, checks that expect the
protocol's greeting (sent after a PROXY header, as casd's C{haproxy:} listeners require one on
every connection), the runtime API on a UNIX socket for the tests to
read each server's state (on a loopback port: a UNIX socket path under a test's temporary
directory is often longer than HAProxy accepts).
"""

import os
import socket
import subprocess

from .procs import freePort, pidAlive, requireBinary, stopPid, waitForPort

#: The greeting each protocol's health check expects.
GREETINGS = {"imap": "* OK", "pop3": "+OK"}


def haproxyConfig(frontends, adminPort, inter=200, fall=2, rise=1, healthPort=None):
    """
    @param frontends: C{(name, bindAddress, bindPort, protocol, [(server, address, port)])}.
    @param healthPort: when given, the servers are checked with C{GET /health} on this port (casd's
        admin listener) instead of by their greeting.
    @return: the configuration text.
    """
    lines = [
        "global",
        "    stats socket ipv4@127.0.0.1:%d level admin" % (adminPort,),
        "    maxconn 4000",
        "defaults",
        "    mode tcp",
        "    timeout connect 2s",
        "    timeout client 30s",
        "    timeout server 30s",
        "    timeout check 1s",
        # A node that dies: its clients are told at once, and a new session is never sent to it
        # again once the check says so (redispatch covers the window before).
        "    option redispatch",
        "    retries 2",
    ]
    for name, address, port, protocol, servers in frontends:
        lines += [
            "frontend %s" % (name,),
            "    bind %s:%d" % (address, port),
            "    default_backend %s_nodes" % (name,),
            "backend %s_nodes" % (name,),
            "    balance roundrobin",
        ]
        if healthPort is None:
            lines += ["    option tcp-check", '    tcp-check expect string "%s"' % (GREETINGS[protocol],)]
            check = "check check-send-proxy"
        else:
            lines += ["    option httpchk GET /health", "    http-check expect status 200"]
            check = "check port %d" % (healthPort,)
        for server, serverAddress, serverPort in servers:
            lines.append(
                "    server %s %s:%d send-proxy-v2 %s inter %dms fall %d rise %d"
                % (server, serverAddress, serverPort, check, inter, fall, rise)
            )
    return "\n".join(lines) + "\n"


class HAProxy:
    def __init__(self, directory, frontends, **checks):
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.adminPort = freePort()
        self.configPath = os.path.join(directory, "haproxy.cfg")
        with open(self.configPath, "w") as f:
            f.write(haproxyConfig(frontends, self.adminPort, **checks))
        self.frontends = frontends
        self.process = None

    def start(self):
        binary = requireBinary("haproxy", [("/usr/sbin/haproxy", "haproxy")])
        self._log = open(os.path.join(self.directory, "haproxy.out"), "wb")
        self.process = subprocess.Popen(
            [binary, "-db", "-f", self.configPath],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        pid = self.process.pid
        for _, address, port, _, _ in self.frontends:
            waitForPort(address, port, timeout=10.0, alive=lambda: pidAlive(pid))
        return self

    def stop(self):
        if self.process is not None:
            stopPid(self.process.pid)
            self.process.wait()
            self.process = None
            self._log.close()

    def command(self, text):
        s = socket.create_connection(("127.0.0.1", self.adminPort), 5)
        try:
            s.sendall(text.encode() + b"\n")
            chunks = []
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
        finally:
            s.close()
        return b"".join(chunks).decode()

    def serverStates(self, backend):
        """
        @return: server name -> C{"UP"}, C{"DOWN"}, ... as the health checks see it now.
        """
        states = {}
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == backend and row.get("svname") not in ("FRONTEND", "BACKEND"):
                states[row["svname"]] = row["status"].split()[0]
        return states
