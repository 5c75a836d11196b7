"""
Autodiscover against real clients, through a real casd node (HTTPS front end, the shared portal
and penalty, a users file) on loopback:

 - exchangelib 5.x C{get_user_settings} on C{autodiscover.svc} through a fixed service endpoint;
 - exchangelib 4.x's POX discovery (C{PoxAutodiscovery}), Debian's python3-exchangelib run by
   C{/usr/bin/python3} in a small driver with its DNS check turned off (no DNS leaves the
   machine: every URL is https://127.0.0.1:PORT);
 - the signed Apple profile verified by C{openssl smime}.

Each client must end with the EWS URL and version casd advertises.
"""

from __future__ import annotations

import json
import os
import plistlib
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode

from twisted.internet import defer, threads
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from casd.auth.hashing import makeHash
from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.procs import freePort

#: Debian's python3-exchangelib (4.9) lives in the system interpreter's dist-packages.
SYSTEM_PYTHON = "/usr/bin/python3"

CONFIG = """
[server]
hostname = "mail.example.com"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
users_file = "users"
failure_delay = 0.2

[imap]
[[imap.listen]]
endpoint = "tcp:{imap}:interface=127.0.0.1"
tls = "implicit"

[submission]
enabled = true
[[submission.listen]]
endpoint = "tcp:{submission}:interface=127.0.0.1"
tls = "implicit"

[http]
enabled = true
[[http.listen]]
endpoint = "tcp:{https}:interface=127.0.0.1"
tls = "implicit"
[[http.listen]]
endpoint = "tcp:{plain}:interface=127.0.0.1"
tls = "none"

[autodiscover]
imap_port = 993
submission_port = 465

[autodiscover.domains."example.com"]
display_name = "Example Mail"
"""

COMMON_DRIVER = """
import json, sys
import requests.adapters
from exchangelib.protocol import BaseProtocol

CA, URL, USER, PASSWORD, EMAIL = sys.argv[1:6]


class TestCA(requests.adapters.HTTPAdapter):
    # Trust the test CA only (exchangelib's documented hook for custom TLS).
    def cert_verify(self, conn, url, verify, cert):
        super().cert_verify(conn, url, CA, cert)


BaseProtocol.HTTP_ADAPTER_CLS = TestCA
"""

SOAP_DRIVER = COMMON_DRIVER + """
from exchangelib import Configuration, Credentials
from exchangelib.autodiscover.protocol import AutodiscoverProtocol

protocol = AutodiscoverProtocol(
    config=Configuration(service_endpoint=URL, credentials=Credentials(USER, PASSWORD))
)
try:
    r = protocol.get_user_settings(EMAIL)
except Exception as e:
    print(json.dumps({"exception": type(e).__name__}))
    sys.exit(0)
if isinstance(r, Exception):
    print(json.dumps({"exception": type(r).__name__}))
    sys.exit(0)
# exchangelib keeps no error code on a successful answer; an error answer has no settings.
settings = r.user_settings or {}
print(json.dumps({
    "auth": protocol.config.auth_type,
    "error": r.error_code or "NoError",
    "redirect": r.redirect_address,
    "ews_url": settings.get("external_ews_url"),
    "version": r.version.api_version if settings.get("external_ews_url") else None,
    "smtp": settings.get("auto_discover_smtp_address"),
    "name": settings.get("user_display_name"),
}))
"""

POX_DRIVER = COMMON_DRIVER + """
import exchangelib
from exchangelib import Credentials
from exchangelib.autodiscover.discovery.pox import PoxAutodiscovery

# The URL is fixed (https://127.0.0.1:PORT/...): skip the DNS check that would otherwise leave
# the machine (dnspython ignores /etc/hosts).
PoxAutodiscovery._ensure_valid_hostname = lambda self, url: None
discovery = PoxAutodiscovery(email=EMAIL, credentials=Credentials(USER, PASSWORD))
try:
    valid, ad = discovery._attempt_response(url=URL)
    if not valid:
        raise RuntimeError("no valid response")
    response = discovery._step_5(ad=ad)
    if response.redirect_address:
        print(json.dumps({"redirect": response.redirect_address}))
        sys.exit(0)
    ad_response, protocol = discovery._build_response(ad_response=response)
except Exception as e:
    print(json.dumps({"exception": type(e).__name__, "library": exchangelib.__version__}))
    sys.exit(0)
print(json.dumps({
    "library": exchangelib.__version__,
    "ews_url": protocol.service_endpoint,
    "version": protocol.version.api_version,
    "auth": protocol.auth_type,
    "smtp": ad_response.autodiscover_smtp_address,
}))
"""


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


class AutodiscoverClientsTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        ca = CertificateAuthority.create(os.path.join(self.directory, "pki"), keyType="rsa")
        cert, key = ca.issue(["mail.example.com", "127.0.0.1"], "server")
        self.ca = ca.caPath
        self.port = freePort()
        with open(os.path.join(self.directory, "users"), "w") as f:
            f.write(
                "alice:" + makeHash("SHA512-CRYPT", b"alice-secret")
                + ":address=alice@example.com aliases=a.smith@example.com display_name=Alice_Smith\n"
                + "bob:" + makeHash("SHA512-CRYPT", b"bob-secret") + ":address=bob@example.com\n"
            )
        self.plain = freePort()
        text = CONFIG.format(
            cert=cert, key=key, imap=freePort(), submission=freePort(), https=self.port, plain=self.plain
        )
        self.node = CASNode(self.directory, text).start()
        self.addCleanup(self.node.stop)
        self.base = f"https://127.0.0.1:{self.port}"
        self.ews = f"https://mail.example.com:{self.port}/EWS/Exchange.asmx"
        yield defer.succeed(None)

    def drive(self, python, script, path, user, password, email):
        name = os.path.join(self.directory, f"driver-{abs(hash(script))}.py")
        with open(name, "w") as f:
            f.write(script)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.directory, "LANG": "C.UTF-8"}
        d = getProcessOutputAndValue(
            python, [name, self.ca, self.base + path, user, password, email], env=env, path=self.directory
        )

        def parsed(result):
            out, err, code = result
            self.assertEqual(code, 0, err.decode("utf-8", "replace")[-2000:])
            return json.loads(out.decode("utf-8").strip().splitlines()[-1])

        return d.addCallback(parsed)

    # -- exchangelib 5.x: SOAP -------------------------------------------------------------

    @defer.inlineCallbacks
    def test_exchangelib5SOAP(self):
        result = yield self.drive(
            sys.executable, SOAP_DRIVER, "/autodiscover/autodiscover.svc", "alice", "alice-secret",
            "alice@example.com",
        )
        self.assertEqual(result["auth"], "basic")
        self.assertEqual(result["error"], "NoError")
        self.assertEqual(result["ews_url"], self.ews)
        self.assertEqual(result["version"], "Exchange2016")
        self.assertEqual(result["smtp"], "alice@example.com")
        self.assertEqual(result["name"], "Alice_Smith")

    @defer.inlineCallbacks
    def test_exchangelib5OtherUsers(self):
        """
        Another user's address, an unknown one and an alias: InvalidUser twice, then a redirect.
        """
        for email, error in (("bob@example.com", "InvalidUser"), ("ghost@example.com", "InvalidUser")):
            result = yield self.drive(
                sys.executable, SOAP_DRIVER, "/autodiscover/autodiscover.svc", "alice", "alice-secret", email
            )
            self.assertEqual(result.get("error"), error, result)
            self.assertIsNone(result.get("ews_url"))
        result = yield self.drive(
            sys.executable, SOAP_DRIVER, "/Autodiscover/Autodiscover.svc", "alice", "alice-secret",
            "a.smith@example.com",
        )
        # exchangelib keeps the RedirectTarget of a RedirectAddress answer, not its code.
        self.assertEqual((result["redirect"], result["ews_url"]), ("alice@example.com", None))

    # -- exchangelib 4.x: POX ----------------------------------------------------------------

    def requireSystemExchangelib(self):
        if not os.access(SYSTEM_PYTHON, os.X_OK):
            raise AssertionError(f"{SYSTEM_PYTHON} is missing (./run installs python3-exchangelib)")
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import exchangelib; print(exchangelib.__version__)"],
            capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(probe.returncode, 0, "python3-exchangelib is missing (./run installs it)")
        self.assertTrue(probe.stdout.startswith("4."), probe.stdout)

    @defer.inlineCallbacks
    def test_exchangelib4POX(self):
        self.requireSystemExchangelib()
        result = yield self.drive(
            SYSTEM_PYTHON, POX_DRIVER, "/Autodiscover/Autodiscover.xml", "alice", "alice-secret",
            "alice@example.com",
        )
        self.assertTrue(result["library"].startswith("4."), result)
        self.assertEqual(result["ews_url"], self.ews, result)
        self.assertEqual(result["version"], "Exchange2016")
        self.assertEqual(result["auth"], "basic")
        self.assertEqual(result["smtp"], "alice@example.com")

    @defer.inlineCallbacks
    def test_exchangelib4POXErrors(self):
        """
        Another user's address: exchangelib's ErrorNonExistentMailbox (error 500 with the message
        it knows); an alias: a redirect to the primary address; a wrong password: no answer.
        """
        self.requireSystemExchangelib()
        result = yield self.drive(
            SYSTEM_PYTHON, POX_DRIVER, "/autodiscover/autodiscover.xml", "alice", "alice-secret",
            "bob@example.com",
        )
        self.assertEqual(result["exception"], "ErrorNonExistentMailbox")
        result = yield self.drive(
            SYSTEM_PYTHON, POX_DRIVER, "/autodiscover/autodiscover.xml", "alice", "alice-secret",
            "a.smith@example.com",
        )
        self.assertEqual(result["redirect"], "alice@example.com")
        result = yield self.drive(
            SYSTEM_PYTHON, POX_DRIVER, "/autodiscover/autodiscover.xml", "alice", "wrong", "alice@example.com"
        )
        self.assertIn("exception", result)

    # -- plain HTTPS: the probe, Thunderbird and Apple -----------------------------------------

    def fetch(self, path, data=None, user=None, password=None):
        context = ssl.create_default_context(cafile=self.ca)

        def get():
            request = urllib.request.Request(self.base + path, data=data)
            if user:
                token = b64encode(f"{user}:{password}".encode()).decode()
                request.add_header("Authorization", f"Basic {token}")
            try:
                with urllib.request.urlopen(request, context=context, timeout=30) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read()

        return threads.deferToThread(get)

    @defer.inlineCallbacks
    def test_probeAndThunderbird(self):
        status, headers, _ = yield self.fetch("/autodiscover/autodiscover.svc", data=b"<x/>")
        self.assertEqual(status, 401)
        self.assertTrue(headers["WWW-Authenticate"].startswith("Basic"))
        status, headers, body = yield self.fetch("/mail/config-v1.1.xml?emailaddress=anyone%40example.com")
        self.assertEqual(status, 200)
        self.assertIn(b"<port>993</port>", body)
        self.assertIn(b"<displayName>Example Mail</displayName>", body)
        self.assertNotIn(b"anyone", body)

    @defer.inlineCallbacks
    def test_plainHTTP(self):
        """
        Thunderbird's answer is served over plain HTTP too (it holds nothing secret, and the same
        settings as over HTTPS); the authenticated endpoints are only redirected to https.
        """

        def get(path, data=None):
            request = urllib.request.Request(f"http://127.0.0.1:{self.plain}{path}", data=data)
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(request, timeout=30) as r:
                    return r.status, dict(r.headers), r.read()
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers), e.read()

        status, _, plain = yield threads.deferToThread(get, "/mail/config-v1.1.xml?emailaddress=a%40example.com")
        self.assertEqual(status, 200)
        _, _, secure = yield self.fetch("/mail/config-v1.1.xml?emailaddress=a%40example.com")
        self.assertEqual(plain, secure)
        for path in ("/autodiscover/autodiscover.xml", "/mobileconfig"):
            status, headers, _ = yield threads.deferToThread(get, path, b"<x/>" if "xml" in path else None)
            self.assertEqual(status, 301, path)
            self.assertTrue(headers["Location"].startswith("https://"), headers)

    @defer.inlineCallbacks
    def test_signedProfile(self):
        status, headers, body = yield self.fetch(
            "/mobileconfig?emailaddress=alice%40example.com", user="alice", password="alice-secret"
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/x-apple-aspen-config")
        verified = yield threads.deferToThread(
            subprocess.run,
            ["openssl", "smime", "-verify", "-inform", "der", "-purpose", "any", "-CAfile", self.ca],
            input=body, capture_output=True, timeout=30,
        )
        self.assertEqual(verified.returncode, 0, verified.stderr)
        profile = plistlib.loads(verified.stdout)
        mail = [p for p in profile["PayloadContent"] if p["PayloadType"] == "com.apple.mail.managed"][0]
        self.assertEqual((mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"]),
                         ("mail.example.com", 993))
        eas = [p for p in profile["PayloadContent"] if p["PayloadType"] == "com.apple.eas.account"][0]
        self.assertEqual(eas["Host"], f"mail.example.com:{self.port}")


    @defer.inlineCallbacks
    def test_oversizeBodies(self):
        """
        Through the real front end: a body over Autodiscover's 64 KiB is POX error 600; one over
        the local-service limit is refused with 413 before it is read.
        """
        request = (
            b'<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/'
            b'requestschema/2006"><Request><EMailAddress>alice@example.com</EMailAddress><Pad>'
        )
        status, _, body = yield self.fetch(
            "/autodiscover/autodiscover.xml", data=request + b"x" * 100_000, user="alice", password="alice-secret"
        )
        self.assertEqual(status, 200)
        self.assertIn(b"<ErrorCode>600</ErrorCode>", body)
        # Only the headers: the front end answers from Content-Length, before any body byte.
        head = yield threads.deferToThread(
            self.rawHeaders,
            b"POST /autodiscover/autodiscover.xml HTTP/1.1\r\nHost: mail.example.com\r\n"
            b"Content-Length: 2000000\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head[:100])

    def rawHeaders(self, data: bytes) -> bytes:
        import socket

        context = ssl.create_default_context(cafile=self.ca)
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(data)
                received = b""
                while b"\r\n\r\n" not in received:
                    chunk = tls.recv(4096)
                    if not chunk:
                        break
                    received += chunk
                return received
