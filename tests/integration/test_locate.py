"""
C{casd locate USER}: the route and why, from the same router a running node uses.
"""

import os
import subprocess
import sys

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.auth.hashing import makeHash
from casd.cli.locate import describeRoute
from casd.routing.router import rendezvousOrder
from casd.testing import makeContext

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = """
[server]
site = "east"

[routing]
hash_group = "pool"

[backends.m1]
host = "192.0.2.11"
drain = true
[backends.m2]
host = "192.0.2.12"
[backends.west-cas]
host = "198.51.100.1"

[groups.pool]
members = ["m1", "m2"]

[sites.west]
cas = "west-cas"
[sites.north]
action = "refuse"
[sites.south]
action = "redirect"
redirect_url = "imap://imap.south.example/"
"""


class DescribeRouteTests(SynchronousTestCase):
    def setUp(self):
        self.context = makeContext(
            MemoryReactorClock(),
            users={
                "alice": ("pw", UserRecord(login="alice", address="alice@example.com")),
                "wendy": ("pw", UserRecord(login="wendy", site="west")),
                "nora": ("pw", UserRecord(login="nora", site="north")),
                "sam": ("pw", UserRecord(login="sam", site="south")),
            },
            config=CONFIG,
        )

    def describe(self, name):
        return self.successResultOf(describeRoute(self.context, name))

    def test_hashed(self):
        code, text = self.describe("alice")
        self.assertEqual(code, 0)
        lines = text.splitlines()
        self.assertEqual(lines[0], "user      alice (address alice@example.com)")
        self.assertEqual(lines[1], "node      site east")
        self.assertEqual(lines[2], "route     mailbox servers, group pool")
        self.assertEqual(lines[3], "why       hash_group: group pool (rendezvous hashing)")
        order = rendezvousOrder("alice", [("m1", 1), ("m2", 1)])
        members = [l.split()[1].split("(")[0] for l in lines[5:7]]
        self.assertEqual(members, order)
        self.assertIn("draining", lines[5 + order.index("m1")])
        self.assertIn("not checked", lines[5 + order.index("m2")])
        self.assertEqual(lines[-1], "proxy TTL 4")

    def test_otherSite(self):
        code, text = self.describe("wendy")
        self.assertEqual(code, 0)
        self.assertIn("route     site west's casd, server west-cas", text)
        self.assertIn("directory site 'west': proxied to that site's casd", text)

    def test_refusedSite(self):
        code, text = self.describe("nora")
        self.assertEqual(code, 1)
        self.assertIn("none: the client gets a temporary failure", text)
        self.assertIn("refused by [sites.north]", text)

    def test_redirect(self):
        code, text = self.describe("sam")
        self.assertIn("redirect to imap://imap.south.example/", text)

    def test_unknownUser(self):
        code, text = self.describe("ghost")
        self.assertIn("not in the directory", text)
        self.assertIn("group pool", text)


class CommandTests(SynchronousTestCase):
    def test_command(self):
        """
        The console command, in a process of its own, with the users file as directory.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        with open(os.path.join(directory, "users"), "w") as f:
            f.write(f"alice:{makeHash('SHA512-CRYPT', b'pw')}:mailhost=m2\n")
        path = os.path.join(directory, "casd.toml")
        with open(path, "w") as f:
            f.write(CONFIG + "\n[auth]\nusers_file = \"users\"\n[health]\ntimeout = 0.5\n")
        env = dict(os.environ, PYTHONPATH=ROOT)
        run = subprocess.run(
            [sys.executable, "-m", "casd", "locate", "-c", path, "alice"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
            timeout=60,
        )
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertIn("why       mailhost attribute: server m2", run.stdout)
        self.assertIn("  1. m2(192.0.2.12:143) starttls", run.stdout)

        run = subprocess.run(
            [sys.executable, "-m", "casd", "locate", "-c", path, "--check", "alice"],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=60,
        )
        # 192.0.2.0/24 is TEST-NET: the probe cannot succeed.
        self.assertIn("DOWN (checked now:", run.stdout)
