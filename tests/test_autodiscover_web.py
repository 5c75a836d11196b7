"""
The Autodiscover endpoints over HTTP (a twisted.web Site on a StringTransport): authentication,
each client's answer, internal versus external, bad input, the signed Apple profile (checked
with openssl and plistlib), and C{casd dns-records}.
"""

from __future__ import annotations

import base64
import io
import os
import plistlib
import subprocess
from contextlib import redirect_stdout

from lxml import etree

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from casd.cli.commands import main as casdMain
from casd.cli.dnsrecords import dnsRecords
from casd.config.clientsettings import ClientSettings
from casd.failures import AuthenticationFailed, DirectoryUnavailable, Throttled
from protocols.http.autodiscover import pox
from protocols.http.auth import parseBasic
from protocols.http.autodiscover.mobileconfig import ProfileSigner
from protocols.http.autodiscover.resources import AutodiscoverRoot, AutodiscoverService
from tests.test_autodiscover import (
    AUTODISCOVER,
    B,
    M,
    R,
    alice,
    assertValid,
    checkClientConfig,
    makeConfig,
    pki,
    poxRequest,
    soapRequest,
)

A = "{http://schemas.microsoft.com/exchange/2010/Autodiscover}"
PASSWORD = "correct horse"


def fakeAuthenticate(request):
    """
    alice with L{PASSWORD}; no header: refused; C{down} and C{slow} stand for a directory outage
    and a lockout.
    """
    header = request.getHeader(b"authorization")
    parsed = parseBasic(header) if header else None
    if parsed is None:
        return defer.fail(AuthenticationFailed("no credentials"))
    username, password = parsed
    if username == b"down":
        return defer.fail(DirectoryUnavailable("ldap down"))
    if username == b"locked":
        return defer.fail(Throttled("locked out"))
    if username == b"alice" and password == PASSWORD.encode():
        return defer.succeed(alice())
    return defer.fail(AuthenticationFailed("wrong password"))


def basic(user="alice", password=PASSWORD) -> bytes:
    return b"Basic " + base64.b64encode(f"{user}:{password}".encode())


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()


class WebTestCase(SynchronousTestCase):
    signed = True

    def setUp(self):
        config = makeConfig()
        ca, cert, key = pki()
        self.ca = ca
        self.service = AutodiscoverService(
            ClientSettings(config), fakeAuthenticate, ProfileSigner(cert, key) if self.signed else None
        )
        self.site = Site(AutodiscoverRoot(self.service))

    def request(self, method, path, body=b"", authorization=None, peer="192.0.2.7", extra=b""):
        address = IPv4Address("TCP", peer, 40000)
        channel = self.site.buildProtocol(address)
        transport = StringTransport(peerAddress=address, hostAddress=IPv4Address("TCP", "127.0.0.1", 443))
        channel.makeConnection(transport)
        head = [f"{method} {path} HTTP/1.1".encode(), b"Host: mail.example.com", b"Connection: close"]
        if body or method == "POST":
            head.append(b"Content-Length: %d" % len(body))
            head.append(b"Content-Type: text/xml")
        if authorization:
            head.append(b"Authorization: " + authorization)
        if extra:
            head.append(extra)
        channel.dataReceived(b"\r\n".join(head) + b"\r\n\r\n" + body)
        response = Response(transport.value())
        channel.connectionLost(None)
        return response


class PoxEndpointTests(WebTestCase):
    def test_unauthenticated(self):
        response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest())
        self.assertEqual(response.status, 401)
        self.assertEqual(response.headers[b"www-authenticate"], b'Basic realm="casd"')

    def test_wrongPasswordNoSecretInAnswer(self):
        response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest(), basic(password="hunter2"))
        self.assertEqual(response.status, 401)
        self.assertNotIn(b"hunter2", response.body)

    def test_outlookSettingsBothCasings(self):
        for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"):
            response = self.request("POST", path, poxRequest(), basic())
            self.assertEqual(response.status, 200)
            document = assertValid(self, response.body)
            self.assertEqual(
                document.findtext(f".//{R}Protocol[{R}Type='EXPR']/{R}EwsUrl"),
                "https://mail.example.com/EWS/Exchange.asmx",
            )

    def test_internalClientGetsInternalHost(self):
        outside = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest(), basic())
        inside = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest(), basic(), peer="10.9.8.7")
        server = f".//{R}Protocol[{R}Type='IMAP']/{R}Server"
        self.assertEqual(etree.fromstring(outside.body).findtext(server), "mail.example.com")
        self.assertEqual(etree.fromstring(inside.body).findtext(server), "mail.corp.example.com")

    def test_mobileSync(self):
        response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest(flavour="mobilesync"), basic())
        document = assertValid(self, response.body)
        self.assertEqual(
            document.findtext(f".//{M}Server/{M}Url"), "https://mail.example.com/Microsoft-Server-ActiveSync"
        )

    def test_alias(self):
        response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest("a.smith@example.com"), basic())
        document = assertValid(self, response.body)
        self.assertEqual(document.findtext(f".//{R}RedirectAddr"), "alice@example.com")
        response = self.request(
            "POST", "/autodiscover/autodiscover.xml", poxRequest("a.smith@example.com", "mobilesync"), basic()
        )
        self.assertEqual(assertValid(self, response.body).findtext(f".//{M}Redirect"), "alice@example.com")

    def test_redirectUrl(self):
        response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest("c@partner.example"), basic())
        self.assertEqual(
            assertValid(self, response.body).findtext(f".//{R}RedirectUrl"),
            "https://autodiscover.partner.example/autodiscover/autodiscover.xml",
        )
        response = self.request(
            "POST", "/autodiscover/autodiscover.xml", poxRequest("c@partner.example", "mobilesync"), basic()
        )
        self.assertEqual(response.status, 302)
        self.assertTrue(response.headers[b"location"].startswith(b"https://autodiscover.partner.example/"))

    def test_anotherUsersAndUnknownAddressesAlike(self):
        bodies = []
        for address in ("bob@example.com", "nobody@example.com"):
            response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest(address), basic())
            self.assertEqual(response.status, 200)
            document = assertValid(self, response.body)
            self.assertEqual(document.findtext(f"{B}Response/{B}Error/{B}ErrorCode"), "500")
            self.assertEqual(document.findtext(f".//{B}Message"), pox.ADDRESS_NOT_FOUND[1])
            bodies.append(document.findtext(f".//{B}Message"))
        self.assertEqual(bodies[0], bodies[1])

    def test_badInput(self):
        """
        Malformed XML, entities, billion laughs, wrong schemas and oversize bodies: each the
        schema's error with HTTP 200, never a 500 or a traceback.
        """
        laughs = "".join(f'<!ENTITY l{i} "{"&l%d;" % (i - 1) * 10}">' for i in range(1, 10))
        cases = [
            (b"<Autodiscover><Request>", 600),
            (b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>', 600),
            (f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l0 "lol">{laughs}]><a>&l9;</a>'.encode(), 600),
            (b'<Autodiscover xmlns="urn:wrong"><Request/></Autodiscover>', 600),
            (poxRequest(acceptable="http://example.com/other"), 601),
            (poxRequest().replace(b"</Request>", b"<Pad>" + b"x" * 70000 + b"</Pad></Request>"), 600),
            (b"", 600),
        ]
        for body, code in cases:
            response = self.request("POST", "/autodiscover/autodiscover.xml", body, basic())
            self.assertEqual(response.status, 200, body[:60])
            document = assertValid(self, response.body)
            self.assertEqual(document.findtext(f".//{B}ErrorCode"), str(code), body[:60])
            self.assertNotIn(b"Traceback", response.body)
            self.assertNotIn(b"root:", response.body)
        response = self.request(
            "POST", "/autodiscover/autodiscover.xml", poxRequest(flavour="mobilesync", acceptable="urn:x"), basic()
        )
        self.assertEqual(assertValid(self, response.body).findtext(f".//{M}ErrorCode"), "601")

    def test_failuresOfTheSharedVocabulary(self):
        response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest(), basic("down"))
        self.assertEqual((response.status, response.headers[b"retry-after"]), (503, b"30"))
        self.assertNotIn(b"www-authenticate", response.headers)
        response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest(), basic("locked"))
        self.assertEqual(response.status, 429)

    def test_unexpectedErrorIsAProtocolError(self):
        """
        A bug in a handler is logged by type and answered with the schema's 600, never a 500.
        """
        def broken(*a, **kw):
            raise RuntimeError("boom")

        self.patch(pox, "outlookSettings", broken)
        response = self.request("POST", "/autodiscover/autodiscover.xml", poxRequest(), basic())
        self.assertEqual(response.status, 200)
        self.assertEqual(etree.fromstring(response.body).findtext(f".//{B}ErrorCode"), "600")
        self.assertNotIn(b"boom", response.body)
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_get(self):
        response = self.request("GET", "/autodiscover/autodiscover.xml", authorization=basic())
        self.assertEqual(assertValid(self, response.body).findtext(f".//{B}ErrorCode"), "600")


class SoapEndpointTests(WebTestCase):
    def test_probe(self):
        """
        The unauthenticated probe clients send first: 401 with a Basic challenge.
        """
        response = self.request("POST", "/autodiscover/autodiscover.svc", soapRequest())
        self.assertEqual(response.status, 401)
        self.assertTrue(response.headers[b"www-authenticate"].startswith(b"Basic"))

    def test_perUserErrors(self):
        body = soapRequest(
            subjects=("alice@example.com", "a.smith@example.com", "bob@example.com", "x@partner.example"),
            settings=("ExternalEwsUrl", "UserDisplayName"),
        )
        response = self.request("POST", "/autodiscover/autodiscover.svc", body, basic())
        self.assertEqual(response.status, 200)
        users = etree.fromstring(response.body).findall(f".//{A}UserResponse")
        self.assertEqual(
            [u.findtext(f"{A}ErrorCode") for u in users],
            ["NoError", "RedirectAddress", "InvalidUser", "RedirectUrl"],
        )
        self.assertEqual(users[1].findtext(f"{A}RedirectTarget"), "alice@example.com")
        self.assertEqual(users[0].findtext(f".//{A}UserSetting[{A}Name='UserDisplayName']/{A}Value"), "Alice Smith")

    def test_domainSettings(self):
        body = soapRequest("GetDomainSettings", ("example.com", "partner.example"), ("ExternalEwsUrl",))
        response = self.request("POST", "/autodiscover/autodiscover.svc", body, basic())
        domains = etree.fromstring(response.body).findall(f".//{A}DomainResponse")
        self.assertEqual([d.findtext(f"{A}ErrorCode") for d in domains], ["NoError", "RedirectUrl"])

    def test_badInput(self):
        for body, status, code in [
            (b"<<<", 400, None),
            (b'<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>', 400, None),
            (soapRequest(settings=()), 200, "InvalidRequest"),
            (soapRequest() + b" " * 70000, 400, None),
        ]:
            response = self.request("POST", "/autodiscover/autodiscover.svc", body, basic())
            self.assertEqual(response.status, status)
            document = etree.fromstring(response.body)
            if code:
                self.assertEqual(document.findtext(f".//{A}Response/{A}ErrorCode"), code)
            else:
                self.assertEqual(document.findtext(".//faultcode"), "s:Client")


class AutoconfigEndpointTests(WebTestCase):
    def test_bothPaths(self):
        for path in ("/mail/config-v1.1.xml", "/.well-known/autoconfig/mail/config-v1.1.xml"):
            response = self.request("GET", path + "?emailaddress=alice%40example.com")
            self.assertEqual(response.status, 200)
            checkClientConfig(self, response.body, "example.com")

    def test_revealsNothingAboutAddresses(self):
        """
        Anonymous; the same bytes for an existing address, another one and none at all; no
        address in the answer.
        """
        answers = {
            self.request("GET", f"/mail/config-v1.1.xml?emailaddress={a}").body
            for a in ("alice%40example.com", "nobody%40example.com", "bob%40example.com")
        }
        self.assertEqual(len(answers), 1)
        body = answers.pop()
        self.assertNotIn(b"alice", body)
        self.assertNotIn(b"nobody", body)

    def test_unknownDomain(self):
        self.assertEqual(self.request("GET", "/mail/config-v1.1.xml?emailaddress=x%40elsewhere.example").status, 404)
        self.assertEqual(self.request("GET", "/mail/config-v1.1.xml?emailaddress=%3Cscript%3E").status, 404)


def openssl(*args, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run(["openssl", *args], input=data, capture_output=True, timeout=30)


class MobileconfigEndpointTests(WebTestCase):
    def test_signedProfileVerifies(self):
        response = self.request("GET", "/mobileconfig?emailaddress=alice%40example.com", authorization=basic())
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers[b"content-type"], b"application/x-apple-aspen-config")
        verified = openssl("smime", "-verify", "-inform", "der", "-purpose", "any", "-CAfile", self.ca, data=response.body)
        self.assertEqual(verified.returncode, 0, verified.stderr)
        self.assertIn(b"Verification successful", verified.stderr)
        profile = plistlib.loads(verified.stdout)
        self.assertEqual(profile["PayloadType"], "Configuration")
        payloads = {p["PayloadType"]: p for p in profile["PayloadContent"]}
        mail = payloads["com.apple.mail.managed"]
        self.assertEqual(
            (mail["EmailAccountType"], mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"]),
            ("EmailTypeIMAP", "mail.example.com", 993),
        )
        self.assertEqual((mail["OutgoingMailServerPortNumber"], mail["OutgoingMailServerUseSSL"]), (465, True))
        self.assertEqual(payloads["com.apple.eas.account"]["Host"], "mail.example.com")
        self.assertNotIn(PASSWORD.encode(), verified.stdout)

    def test_tamperedProfileFails(self):
        response = self.request("GET", "/mobileconfig", authorization=basic())
        tampered = response.body.replace(b"mail.example.com", b"evil.example.com", 1)
        self.assertNotEqual(openssl("smime", "-verify", "-inform", "der", "-purpose", "any", "-CAfile", self.ca,
                                    data=tampered).returncode, 0)

    def test_refusals(self):
        self.assertEqual(self.request("GET", "/mobileconfig?emailaddress=alice%40example.com").status, 401)
        response = self.request("GET", "/mobileconfig?emailaddress=bob%40example.com", authorization=basic())
        self.assertEqual(response.status, 403)


class UnsignedMobileconfigTests(WebTestCase):
    signed = False

    def test_plist(self):
        response = self.request("GET", "/mobileconfig", authorization=basic(), peer="10.0.0.5")
        profile = plistlib.loads(response.body)
        hosts = {p.get("IncomingMailServerHostName") for p in profile["PayloadContent"]}
        self.assertIn("mail.corp.example.com", hosts)


class DNSRecordsTests(SynchronousTestCase):
    def test_records(self):
        records = dnsRecords(makeConfig(), "example.com")
        table = {(owner, kind): data for owner, kind, data in records}
        self.assertEqual(table[("autodiscover.example.com.", "CNAME")], "mail.example.com.")
        self.assertEqual(table[("_autodiscover._tcp.example.com.", "SRV")], "0 0 443 mail.example.com.")
        self.assertEqual(table[("_imaps._tcp.example.com.", "SRV")], "0 1 993 mail.example.com.")
        self.assertEqual(table[("_imap._tcp.example.com.", "SRV")], "10 1 143 mail.example.com.")
        self.assertEqual(table[("_pop3._tcp.example.com.", "SRV")], "0 0 0 .")
        self.assertEqual(table[("_submissions._tcp.example.com.", "SRV")], "0 1 465 mail.example.com.")

    def test_command(self):
        """
        The command prints the records and which names the configured certificate misses
        (the test certificate has mail. and autodiscover., not autoconfig.).
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        _, cert, key = pki()
        from tests.test_autodiscover import BASE

        path = os.path.join(directory, "casd.toml")
        with open(path, "w") as f:
            f.write(BASE.format(cert=cert, key=key) + AUTODISCOVER)
        out = io.StringIO()
        with redirect_stdout(out):
            status = casdMain(["dns-records", "-c", path, "example.com"])
        self.assertEqual(status, 0)
        text = out.getvalue()
        self.assertIn("_imaps._tcp.example.com.", text)
        self.assertIn("; autodiscover.example.com: covered by", text)
        self.assertIn("; autoconfig.example.com: NOT covered", text)
        self.assertIn("; mail.corp.example.com: NOT covered", text)


class ProviderTests(SynchronousTestCase):
    """
    The local services the HTTP front end mounts.
    """

    def services(self, extra=AUTODISCOVER):
        from protocols.http.autodiscover.provider import autodiscoverServices
        from protocols.http.local import PROVIDERS

        self.assertIn("protocols.http.autodiscover.provider.autodiscoverServices", PROVIDERS)

        class Context:
            config = makeConfig(extra)

        return {s.name: s for s in autodiscoverServices(Context(), None, None)}

    def test_mounted(self):
        services = self.services()
        self.assertTrue(services["autodiscover"].matches(b"/Autodiscover/Autodiscover.xml"))
        self.assertTrue(services["autodiscover-soap"].matches(b"/autodiscover/autodiscover.svc"))
        self.assertTrue(services["autoconfig"].matches(b"/.well-known/autoconfig/mail/config-v1.1.xml?x=1"))
        self.assertTrue(services["mobileconfig"].matches(b"/mobileconfig"))
        for name in ("autodiscover", "autodiscover-soap", "mobileconfig"):
            self.assertTrue(services[name].needsAuth, name)
            self.assertFalse(services[name].anonymousOnPlain, name)
        self.assertFalse(services["autoconfig"].needsAuth)
        self.assertTrue(services["autoconfig"].anonymousOnPlain)
        self.assertIsNotNone(services["mobileconfig"].resource.service.signer)

    def test_disabled(self):
        self.assertEqual(self.services(AUTODISCOVER.replace("https_port = 443", "enabled = false")), {})
