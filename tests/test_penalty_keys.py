"""
L{casd.auth.penalty.LoginPenalty.addressKey} remembers its answers: the same keys as computing
them, an address parsed once, the prefixes of the moment honoured, the memory bounded.
"""

from __future__ import annotations

import ipaddress

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import penalty as penaltyModule
from casd.auth.penalty import LoginPenalty
from casd.net import parseAddress

HOSTS = ("198.51.100.7", "::ffff:198.51.100.7", "2001:db8::1", "fe80::1%eth0", "/run/casd.sock")


def computed(host, v4, v6):
    ip = parseAddress(host)
    if ip is None:
        return host
    return str(ipaddress.ip_network(f"{ip}/{v4 if ip.version == 4 else v6}", strict=False))


class AddressKeyTests(SynchronousTestCase):
    def setUp(self):
        self.penalty = LoginPenalty(Clock(), ipv4Prefix=24, ipv6Prefix=48)
        self.parsed = []

        def spy(host):
            self.parsed.append(host)
            return parseAddress(host)

        self.patch(penaltyModule, "parseAddress", spy)

    def test_sameKeys(self):
        for _ in range(2):
            for host in HOSTS:
                self.assertEqual(self.penalty.addressKey(host), computed(host, 24, 48), host)
        self.assertEqual(sorted(self.parsed), sorted(HOSTS))  # each parsed once

    def test_prefixesChanged(self):
        self.penalty.addressKey("198.51.100.7")
        self.penalty.ipv4Prefix = 32
        self.assertEqual(self.penalty.addressKey("198.51.100.7"), "198.51.100.7/32")

    def test_bounded(self):
        self.patch(LoginPenalty, "_ADDRESS_KEYS_MAX", 10)
        for i in range(25):
            self.penalty.addressKey(f"192.0.2.{i}")
        self.assertLessEqual(len(self.penalty._addressKeys), 10)
        self.assertEqual(self.penalty.addressKey("192.0.2.24"), "192.0.2.0/24")

    def test_lockoutByNetwork(self):
        """
        Failures from two addresses of one network count together, as before.
        """
        self.penalty.addressLockout = 2

        class Client:
            trusted = False

            def __init__(self, host):
                self.peerHost = host

        self.penalty.failed("a", b"x", Client("198.51.100.7"))
        self.penalty.failed("b", b"y", Client("198.51.100.8"))
        self.assertIsNotNone(self.penalty.locked("c", Client("198.51.100.9")))
        self.assertIsNone(self.penalty.locked("c", Client("198.51.101.9")))
