"""
The demo answers Autodiscover on its HTTPS listener: the README's own curl lines (a POX POST
for the demo user, the Thunderbird URL), the SOAP probe and mobilesync, run against a demo
node (the demo configuration with its HTTPS overlay, on free ports).
"""

from __future__ import annotations

import os
import re
import subprocess


from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.support.casdnode import startDemoNode
from tests.support.procs import requireBinary
from tests.test_autodiscover import R, assertValid, checkClientConfig, poxRequest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readmeCommands() -> tuple[str, str]:
    """
    The POX body and the Thunderbird path of the README's Autodiscover lines.
    """
    with open(README, encoding="utf-8") as f:
        text = f.read()
    body = re.search(r"autodiscover\.xml \\\n\s+-d '([^']+)'", text).group(1)
    path = re.search(r"https://127\.0\.0\.1:8443(/mail/config-v1\.1\.xml\?[^']+)'", text).group(1)
    return body, path


class DemoAutodiscoverTests(TestCase):
    timeout = 60

    def setUp(self):
        self.curl = requireBinary("curl")
        self.node, self.ca, self.ports = startDemoNode(self, os.path.abspath(self.mktemp()))
        self.base = f"https://127.0.0.1:{self.ports['https']}"

    def curl_(self, *args):
        return threads.deferToThread(
            subprocess.run,
            [self.curl, "-sS", "--cacert", self.ca, *args],
            capture_output=True,
            timeout=30,
        )

    @defer.inlineCallbacks
    def test_readmeLines(self):
        body, path = readmeCommands()
        result = yield self.curl_(
            "-u", "demo:demo", "-H", "Content-Type: text/xml", self.base + "/autodiscover/autodiscover.xml",
            "-d", body,
        )
        document = assertValid(self, result.stdout)
        self.assertEqual(document.findtext(f".//{R}AutoDiscoverSMTPAddress"), "demo@example.com")
        self.assertEqual(
            document.findtext(f".//{R}Protocol[{R}Type='EXPR']/{R}EwsUrl"),
            f"https://127.0.0.1:{self.ports['https']}/EWS/Exchange.asmx",
        )
        imap = document.find(f".//{R}Protocol[{R}Type='IMAP']")
        self.assertEqual(imap.findtext(f"{R}Port"), str(self.ports["imap"]))
        result = yield self.curl_(self.base + path)
        # The demo runs no submission service: nothing to advertise as outgoing.
        root = checkClientConfig(self, result.stdout, "example.com", requireOutgoing=False)
        imap = root.find("emailProvider/incomingServer[@type='imap']")
        self.assertEqual((imap.findtext("port"), imap.findtext("socketType")), (str(self.ports["imap"]), "STARTTLS"))
        self.assertEqual(root.findtext("emailProvider/displayName"), "casd demo")

    @defer.inlineCallbacks
    def test_probeAndMobileSync(self):
        result = yield self.curl_("-o", "/dev/null", "-w", "%{http_code}", "-d", "<x/>",
                                  self.base + "/autodiscover/autodiscover.svc")
        self.assertEqual(result.stdout, b"401")
        result = yield self.curl_(
            "-u", "alice:alice", self.base + "/Autodiscover/Autodiscover.xml",
            "--data-binary", poxRequest("alice@example.com", "mobilesync"),
        )
        document = assertValid(self, result.stdout)
        self.assertEqual(
            document.findtext(".//{*}Server/{*}Url"),
            f"https://127.0.0.1:{self.ports['https']}/Microsoft-Server-ActiveSync",
        )
