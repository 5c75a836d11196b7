"""
Network namespaces for array tests: one per casd node, each joined to the test's namespace by a
veth pair, so every node has its own address (as on its own machine) and is killed, drained or
cut off on its own.

Node C{i} lives at C{10.B.i.2}; the test's side of its link is C{10.B.i.1}, where the shared
servers (Dovecot, slapd, Redis) are reached.  Where namespaces cannot be made (no root, no
C{ip}), L{Namespaces.create} falls back to distinct loopback addresses (C{127.0.1.i+1}, servers
on C{127.0.0.1}) and says so in L{Namespaces.isolated}.
"""

import os
import random
import subprocess


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


class Namespaces:
    """
    @ivar isolated: C{True} with real namespaces, C{False} on the loopback fallback.
    @ivar why: why namespaces were not used, or C{""}.
    """

    def __init__(self, count):
        self.count = count
        self.tag = "%04x" % (random.getrandbits(16),)
        self.octet = random.randint(100, 250)
        self.isolated = False
        self.why = ""
        self._made = []

    def name(self, i):
        return "casd%sn%d" % (self.tag, i)

    def nodeAddress(self, i):
        """
        The address node C{i} listens on.
        """
        return "10.%d.%d.2" % (self.octet, i) if self.isolated else "127.0.1.%d" % (i + 1,)

    def serverAddress(self, i):
        """
        The address node C{i} reaches the shared servers at.
        """
        return "10.%d.%d.1" % (self.octet, i) if self.isolated else "127.0.0.1"

    def command(self, i, argv):
        """
        C{argv} run inside node C{i}'s namespace.
        """
        return ["ip", "netns", "exec", self.name(i), *argv] if self.isolated else list(argv)

    def create(self):
        if os.geteuid() != 0:
            self.why = "not root"
            return self
        try:
            for i in range(self.count):
                ns, outer, inner = self.name(i), "cv%s%d" % (self.tag, i), "cp%s%d" % (self.tag, i)
                _ip("netns", "add", ns)
                self._made.append(ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
                _ip("link", "set", inner, "netns", ns)
                _ip("addr", "add", "10.%d.%d.1/24" % (self.octet, i), "dev", outer)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", "10.%d.%d.2/24" % (self.octet, i), "dev", inner)
                _ip("-n", ns, "link", "set", inner, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except (OSError, subprocess.SubprocessError) as e:
            self.why = "ip netns unavailable: %s" % (getattr(e, "stderr", b"") or e,)
            self.destroy()
            return self
        self.isolated = True
        return self

    def destroy(self):
        """
        Delete the namespaces (their veth pairs go with them).
        """
        for ns in self._made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self._made = []
