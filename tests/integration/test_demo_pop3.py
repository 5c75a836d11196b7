"""
POP3 in the embedded demo: the shipped configuration serves it, and curl reads the demo mailbox
through casd's POP3 proxy and the in-process demo backend.
"""

import os
import shutil

from twisted.internet import defer, reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from casd.config import loadConfig
from casd.service.discovery import discoverProtocols
from casd.service.tap import DEMO_CONFIG
from tests.support.casdnode import CASNode
from tests.support.procs import freePort


class DemoPOP3Tests(TestCase):
    timeout = 60

    def test_shippedDemoConfig(self):
        """
        C{twistd -n cas --demo} serves POP3 on 127.0.0.1:1110, relayed to the demo POP3 backend.
        """
        config = loadConfig(DEMO_CONFIG, discoverProtocols().values())
        pop3 = config.protocols["pop3"]
        self.assertTrue(pop3.enabled)
        self.assertEqual([l.endpoint for l in pop3.listeners], ["tcp:1110:interface=127.0.0.1"])
        backend = config.backends["demo"].protocols["pop3"]
        self.assertEqual((backend.port, backend.tls), (config.demo.pop3_port, "none"))

    @defer.inlineCallbacks
    def test_curlThroughDemo(self):
        """
        The demo's path on free ports: curl, casd's POP3 proxy, the demo POP3 backend.
        """
        directory = os.path.abspath(self.mktemp())
        port, imapBackend, popBackend = freePort(), freePort(), freePort()
        users = os.path.join(os.path.dirname(DEMO_CONFIG), "users")
        node = CASNode(
            directory,
            f"""
[server]
trusted_networks = ["127.0.0.0/8"]
[auth]
users_file = "{users}"
failure_delay = 0.1
[routing]
default_backend = "demo"
[backends.demo]
host = "127.0.0.1"
[backends.demo.pop3]
port = {popBackend}
tls = "none"
[demo]
enabled = true
imap_port = {imapBackend}
pop3_port = {popBackend}
[imap]
enabled = false
[pop3]
enabled = true
[[pop3.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
""",
        ).start(reactor)
        self.addCleanup(node.stop)
        curl = shutil.which("curl")
        self.assertIsNotNone(curl, "curl is not installed: apt-get install curl")
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-s", "--max-time", "15", f"pop3://demo:demo@127.0.0.1:{port}/1"], env=os.environ
        )
        self.assertEqual(code, 0, err)
        self.assertIn(b"Subject: Welcome to casd", out)
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-s", "--max-time", "15", f"pop3://demo:wrong@127.0.0.1:{port}/1"], env=os.environ
        )
        self.assertNotEqual(code, 0)
