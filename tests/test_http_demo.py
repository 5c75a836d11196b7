"""
The demo's HTTPS part: the generated certificate, the demo web backend, and the whole path
(curl -> casd over TLS -> demo web backend) in a casd built from the demo configuration.
"""

from __future__ import annotations

import os
import subprocess

from cryptography import x509
from twisted.internet import defer, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from casd.config import parseConfig
from casd.demo.store import DemoMailStore
from casd.demo.web import DemoWebPage, demoCertificates, demoConfigText
from casd.service.discovery import discoverProtocols
from casd.service.tap import DEMO_CONFIG
from tests.support.casdnode import startDemoNode
from tests.support.procs import requireBinary


class DemoWebPageTests(SynchronousTestCase):
    def render(self, user=None, accept=None):
        request = DummyRequest([b""])
        if user is not None:
            request.requestHeaders.addRawHeader(b"X-Remote-User", user)
        if accept is not None:
            request.requestHeaders.addRawHeader(b"Accept", accept)
        body = DemoWebPage(DemoMailStore()).render(request)
        return request, body

    def test_user(self):
        """
        The page names the user casd sends and lists their demo mailboxes.
        """
        request, body = self.render(b"demo")
        self.assertIn(b"user: demo", body)
        self.assertIn(b"INBOX: 1 message", body)
        self.assertIn(b"DEMO ONLY", body)

    def test_html(self):
        """
        For a browser: HTML, with the user's name escaped.
        """
        request, body = self.render(b"<b>x", b"text/html")
        self.assertIn(b"Hello, &lt;b&gt;x", body)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"Content-Type"), [b"text/html; charset=utf-8"])

    def test_noUser(self):
        """
        Without casd's header: 403.
        """
        request, body = self.render()
        self.assertEqual(request.responseCode, 403)


class DemoCertificateTests(SynchronousTestCase):
    def test_certificate(self):
        """
        The demo certificate names localhost and 127.0.0.1 and is signed by the demo CA.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        ca, cert, key = demoCertificates(directory)
        with open(ca, "rb") as f:
            caCert = x509.load_pem_x509_certificate(f.read())
        with open(cert, "rb") as f:
            server = x509.load_pem_x509_certificate(f.read())
        server.verify_directly_issued_by(caCert)
        names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertIn("localhost", names.get_values_for_type(x509.DNSName))
        self.assertEqual(oct(os.stat(key).st_mode & 0o777), "0o600")

    def test_config(self):
        """
        The demo configuration with its overlay: an implicit-TLS listener on 127.0.0.1:8443,
        /EWS with Basic and /owa ready for forms.
        """
        os.environ["CASD_DEMO_DIR"] = os.path.abspath(self.mktemp())
        self.addCleanup(os.environ.pop, "CASD_DEMO_DIR")
        with open(DEMO_CONFIG) as f:
            text, ca = demoConfigText(f.read(), 11080)
        config = parseConfig(text, DEMO_CONFIG, discoverProtocols().values())
        http = config.protocols["http"]
        self.assertEqual(http.listeners[0].endpoint, "tcp:8443:interface=127.0.0.1")
        self.assertEqual(http.listeners[0].tls, "implicit")
        self.assertEqual([v.path for v in http.vdir], ["/EWS", "/owa"])
        self.assertEqual(http.vdir[1].auth, ("forms", "basic"))
        self.assertTrue(os.path.exists(ca))


class DemoPathTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_curl(self):
        """
        C{curl --cacert CA -u demo:demo https://.../EWS/} shows the demo user's mailboxes.
        """
        curl = requireBinary("curl")
        node, ca, ports = startDemoNode(self, os.path.abspath(self.mktemp()))
        url = f"https://127.0.0.1:{ports['https']}/EWS/"
        result = yield threads.deferToThread(
            subprocess.run, [curl, "-sS", "--cacert", ca, "-u", "demo:demo", url],
            capture_output=True, timeout=30,
        )
        self.assertIn(b"user: demo", result.stdout, result.stderr)
        self.assertIn(b"INBOX: 1 message", result.stdout)
