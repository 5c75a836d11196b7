"""
Autodiscover: the client settings derived from the configuration, and the POX, mobilesync, SOAP
and Thunderbird documents, validated against the schemas in tests/xsd/ (written from MS-OXDSCLI
and MS-ASCMD) and against Thunderbird's config-v1.1 rules restated here.
"""

from __future__ import annotations

import os
import re
import tempfile
import xml.etree.ElementTree as ET

from lxml import etree

from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.config import ConfigError, parseConfig
from casd.config.clientsettings import ClientSettings, certificateCovers, endpointPort
from casd.service.discovery import discoverProtocols
from protocols.http.autodiscover import autoconfig, mobilesync, pox, soap
from protocols.http.autodiscover.common import (
    BadRequest,
    NotAllowed,
    RedirectAddress,
    RedirectURL,
    Settings,
    decide,
    parseXML,
)
from tests.support.certs import CertificateAuthority

XSD = os.path.join(os.path.dirname(__file__), "xsd")

BASE = """
[server]
hostname = "mail.example.com"
trusted_networks = ["10.0.0.0/8"]

[tls]
certificate = "{cert}"
key = "{key}"

[imap]
[[imap.listen]]
endpoint = "tcp:993"
tls = "implicit"
[[imap.listen]]
endpoint = "tcp:143"
tls = "starttls"

[pop3]
enabled = true
[[pop3.listen]]
endpoint = "tcp:995"
tls = "implicit"

[submission]
enabled = true
[[submission.listen]]
endpoint = "tcp:465"
tls = "implicit"
[[submission.listen]]
endpoint = "tcp:587"
tls = "starttls"
"""

AUTODISCOVER = """
[autodiscover]
https_port = 443
internal_host = "mail.corp.example.com"

[autodiscover.domains."example.com"]
display_name = "Example Mail"

[autodiscover.domains."partner.example"]
redirect_url = "https://autodiscover.partner.example/autodiscover/autodiscover.xml"
"""

_pki: dict = {}


def pki() -> tuple[str, str, str]:
    """
    (CA, certificate, key) paths of one test CA for the module, the certificate for the names a
    domain needs.
    """
    if not _pki:
        # Under trial's working directory (_trial_temp), made once for the module: RSA keys are slow.
        directory = os.path.abspath(tempfile.mkdtemp(prefix="casd-autodiscover-", dir="."))
        ca = CertificateAuthority.create(directory)
        cert, key = ca.issue(
            ["mail.example.com", "autodiscover.example.com", "127.0.0.1"], "server", keyType="rsa"
        )
        _pki.update(ca=ca.caPath, cert=cert, key=key, dir=directory)
    return _pki["ca"], _pki["cert"], _pki["key"]


def makeConfig(extra: str = AUTODISCOVER, base: str = BASE):
    _, cert, key = pki()
    text = base.format(cert=cert, key=key) + extra
    return parseConfig(text, os.path.join(_pki["dir"], "casd.toml"), discoverProtocols().values())


def alice(**kw) -> UserRecord:
    values = dict(
        login="alice",
        address="alice@example.com",
        policy=[("aliases", "a.smith@example.com,Alice.Smith@example.com"), ("display_name", "Alice Smith")],
    )
    values.update(kw)
    return UserRecord(**values)


def validator(name: str) -> etree.XMLSchema:
    return etree.XMLSchema(etree.parse(os.path.join(XSD, name)))


def assertValid(testCase, body: bytes, schema: str = "AutodiscoverResponse.xsd") -> etree._Element:
    document = etree.fromstring(body)
    xsd = validator(schema)
    testCase.assertTrue(xsd.validate(document), str(xsd.error_log))
    return document


def poxRequest(email: str = "alice@example.com", flavour: str = "outlook", acceptable=None, legacyDN=""):
    ns = pox.OUTLOOK_REQUEST if flavour == "outlook" else pox.MOBILESYNC_REQUEST
    if acceptable is None:
        acceptable = pox.OUTLOOK_RESPONSE if flavour == "outlook" else pox.MOBILESYNC_RESPONSE
    parts = [f'<?xml version="1.0" encoding="utf-8"?><Autodiscover xmlns="{ns}"><Request>']
    if email:
        parts.append(f"<EMailAddress>{email}</EMailAddress>")
    if legacyDN:
        parts.append(f"<LegacyDN>{legacyDN}</LegacyDN>")
    parts.append(f"<AcceptableResponseSchema>{acceptable}</AcceptableResponseSchema></Request></Autodiscover>")
    return "".join(parts).encode("utf-8")


R = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
M = "{http://schemas.microsoft.com/exchange/autodiscover/mobilesync/responseschema/2006}"
B = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"


class ClientSettingsTests(SynchronousTestCase):
    def test_endpointPort(self):
        self.assertEqual(endpointPort("tcp:993"), 993)
        self.assertEqual(endpointPort("haproxy:tcp:port=143:interface=10.0.0.1"), 143)
        self.assertEqual(endpointPort("ssl:995:privateKey=k.pem"), 995)
        self.assertEqual(endpointPort("unix:/run/casd.sock"), 0)

    def test_minimalConfigurationDerivesEverything(self):
        """
        Without an [autodiscover] section: the hostname, and every TLS listener, implicit TLS
        first; no HTTPS listener, so no HTTP services.
        """
        view = ClientSettings(makeConfig("")).forDomain("example.com")
        self.assertEqual(view.host, "mail.example.com")
        self.assertEqual(
            [(s.protocol, s.port, s.socketType) for s in view.servers],
            [("imap", 993, "SSL"), ("imap", 143, "STARTTLS"), ("pop3", 995, "SSL"),
             ("smtp", 465, "SSL"), ("smtp", 587, "STARTTLS")],
        )
        self.assertEqual((view.ewsUrl, view.activeSyncUrl, view.owaUrl), ("", "", ""))
        self.assertEqual(view.displayName, "example.com")

    def test_noCertificateNoSTARTTLS(self):
        """
        Without a certificate no STARTTLS is offered, so nothing is advertised: never plaintext.
        """
        base = '[server]\nhostname = "mail.example.com"\n[imap]\n[[imap.listen]]\nendpoint = "tcp:143"\n'
        view = ClientSettings(makeConfig("", base=base)).forDomain("example.com")
        self.assertEqual(view.servers, ())

    def test_internalAndExternal(self):
        settings = ClientSettings(makeConfig())
        self.assertTrue(settings.isInternal("10.1.2.3"))
        self.assertFalse(settings.isInternal("192.0.2.1"))
        inside = settings.forDomain("example.com", internal=True)
        outside = settings.forDomain("example.com")
        self.assertEqual(inside.ewsUrl, "https://mail.corp.example.com/EWS/Exchange.asmx")
        self.assertEqual(outside.ewsUrl, "https://mail.example.com/EWS/Exchange.asmx")
        self.assertEqual(outside.activeSyncUrl, "https://mail.example.com/Microsoft-Server-ActiveSync")
        self.assertEqual(outside.displayName, "Example Mail")
        self.assertEqual(inside.server("imap").host, "mail.corp.example.com")

    def test_perDomainAdvertiseAndPorts(self):
        config = makeConfig(
            AUTODISCOVER.replace('display_name = "Example Mail"', 'advertise = ["imap", "ews"]')
            + "\n[autodiscover.domains.\"other.example\"]\nexternal_host = \"mx.other.example\"\n"
        )
        settings = ClientSettings(config)
        view = settings.forDomain("example.com")
        self.assertEqual({s.protocol for s in view.servers}, {"imap"})
        self.assertEqual(view.activeSyncUrl, "")
        self.assertTrue(view.ewsUrl)
        other = settings.forDomain("other.example")
        self.assertEqual(other.host, "mx.other.example")
        self.assertEqual(other.server("smtp").port, 465)

    def test_badConfiguration(self):
        for extra, key in [
            ('[autodiscover]\nadvertise = ["gopher"]\n', "autodiscover.advertise"),
            ('[autodiscover]\news_url = "http://plain/EWS"\n', "autodiscover.ews_url"),
            ('[autodiscover]\news_versions = ["Exchange1999"]\n', "autodiscover.ews_versions"),
            ('[autodiscover.domains."x.example"]\ncolour = "red"\n', "autodiscover.domains.x.example.colour"),
        ]:
            with self.assertRaises(ConfigError) as e:
                makeConfig(extra)
            self.assertEqual(e.exception.key, key)

    def test_serverVersion(self):
        """
        The POX ServerVersion encodes the newest advertised build as exchangelib decodes it.
        """
        view = ClientSettings(makeConfig()).forDomain("example.com")
        bits = f"{int(view.serverVersion, 16):032b}"
        self.assertEqual((int(bits[4:10], 2), int(bits[10:16], 2), int(bits[17:], 2)), (15, 1, 225))

    def test_certificateCovers(self):
        self.assertTrue(certificateCovers(["*.example.com"], "autodiscover.example.com"))
        self.assertFalse(certificateCovers(["*.example.com"], "a.b.example.com"))
        self.assertFalse(certificateCovers(["*.example.com"], "example.com"))
        self.assertTrue(certificateCovers(["Mail.Example.com"], "mail.example.com."))


class DecisionTests(SynchronousTestCase):
    def setUp(self):
        self.settings = ClientSettings(makeConfig())

    def test_own(self):
        self.assertEqual(decide(alice(), "Alice@Example.com", self.settings), Settings("alice@example.com"))

    def test_alias(self):
        self.assertEqual(
            decide(alice(), "alice.smith@example.com", self.settings), RedirectAddress("alice@example.com")
        )

    def test_otherAndUnknownAlike(self):
        """
        Another user's address and an address nobody has get the same answer.
        """
        self.assertEqual(decide(alice(), "bob@example.com", self.settings), NotAllowed())
        self.assertEqual(decide(alice(), "nobody@example.com", self.settings), NotAllowed())
        self.assertEqual(decide(alice(), "not an address", self.settings), NotAllowed())

    def test_redirectUrl(self):
        self.assertEqual(
            decide(alice(), "carol@partner.example", self.settings),
            RedirectURL("https://autodiscover.partner.example/autodiscover/autodiscover.xml"),
        )

    def test_legacyDNWins(self):
        mine = self.settings.forDomain("example.com").legacyDN("alice")
        self.assertEqual(decide(alice(), "bob@example.com", self.settings, legacyDN=mine), Settings("alice@example.com"))
        self.assertEqual(
            decide(alice(), "alice@example.com", self.settings, legacyDN=mine.replace("alice", "bob")),
            NotAllowed(),
        )


class SafeParsingTests(SynchronousTestCase):
    def test_malformed(self):
        self.assertRaises(BadRequest, parseXML, b"<Autodiscover><Request>")
        self.assertRaises(BadRequest, parseXML, b"")
        self.assertRaises(BadRequest, parseXML, b"\xff\xfe<a/>")

    def test_externalEntity(self):
        body = (
            b'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            b"<a>&x;</a>"
        )
        with self.assertRaises(BadRequest) as e:
            parseXML(body)
        self.assertNotIn("root:", str(e.exception))

    def test_billionLaughs(self):
        entities = "".join(f'<!ENTITY l{i} "{"&l%d;" % (i - 1) * 10}">' for i in range(1, 10))
        body = f'<?xml version="1.0"?><!DOCTYPE a [<!ENTITY l0 "lol">{entities}]><a>&l9;</a>'.encode()
        self.assertRaises(BadRequest, parseXML, body)

    def test_oversize(self):
        self.assertRaises(BadRequest, parseXML, b"<a>" + b"x" * 70000 + b"</a>")


class PoxTests(SynchronousTestCase):
    def setUp(self):
        settings = ClientSettings(makeConfig())
        self.views = (
            settings.forDomain("example.com"),
            settings.forDomain("example.com", internal=True),
            settings.forDomain("example.com"),
        )

    def test_parse(self):
        request = pox.parseRequest(poxRequest())
        self.assertEqual((request.flavour, request.email), ("outlook", "alice@example.com"))
        request = pox.parseRequest(poxRequest(flavour="mobilesync"))
        self.assertEqual(request.flavour, "mobilesync")
        request = pox.parseRequest(poxRequest(email="", legacyDN="/o=casd/cn=alice"))
        self.assertEqual(request.legacyDN, "/o=casd/cn=alice")

    def test_parseErrors(self):
        cases = [
            (b"<Autodiscover", "outlook", 600),
            (b'<Autodiscover xmlns="urn:other"><Request/></Autodiscover>', "outlook", 600),
            (poxRequest(email=""), "outlook", 600),
            (poxRequest(acceptable="urn:nope"), "outlook", 601),
            (poxRequest(flavour="mobilesync", acceptable=pox.OUTLOOK_RESPONSE), "mobilesync", 601),
            (poxRequest(flavour="mobilesync", email=""), "mobilesync", 600),
        ]
        for body, flavour, code in cases:
            with self.assertRaises(pox.PoxError) as e:
                pox.parseRequest(body)
            self.assertEqual((e.exception.flavour, e.exception.code), (flavour, code), body)

    def test_settingsValidate(self):
        body = pox.outlookSettings(self.views, "alice@example.com", "Alice Smith", "alice")
        document = assertValid(self, body)
        protocols = {p.findtext(f"{R}Type"): p for p in document.iter(f"{R}Protocol")}
        self.assertEqual(set(protocols), {"EXCH", "EXPR", "WEB", "IMAP", "POP3", "SMTP"})
        self.assertEqual(protocols["EXPR"].findtext(f"{R}EwsUrl"), "https://mail.example.com/EWS/Exchange.asmx")
        self.assertEqual(
            protocols["EXCH"].findtext(f"{R}EwsUrl"), "https://mail.corp.example.com/EWS/Exchange.asmx"
        )
        self.assertEqual(protocols["IMAP"].findtext(f"{R}Port"), "993")
        self.assertEqual(protocols["IMAP"].findtext(f"{R}SSL"), "on")
        self.assertEqual(document.findtext(f"{R}Response/{R}User/{R}AutoDiscoverSMTPAddress"), "alice@example.com")

    def test_redirectsValidate(self):
        document = assertValid(self, pox.outlookRedirectAddress("alice@example.com"))
        self.assertEqual(document.findtext(f".//{R}Action"), "redirectAddr")
        document = assertValid(self, pox.outlookRedirectURL("https://elsewhere.example/autodiscover/autodiscover.xml"))
        self.assertEqual(document.findtext(f".//{R}Action"), "redirectUrl")

    def test_errorValidates(self):
        for code, message in (pox.INVALID_REQUEST, pox.SCHEMA_NOT_AVAILABLE, pox.ADDRESS_NOT_FOUND):
            document = assertValid(self, pox.outlookError(code, message))
            self.assertEqual(document.findtext(f"{B}Response/{B}Error/{B}ErrorCode"), str(code))

    def test_schemaCatchesMistakes(self):
        """
        The schema is strict enough to fail a response with a wrong element.
        """
        body = pox.outlookSettings(self.views, "alice@example.com", "Alice", "alice").replace(
            b"<AccountType>email</AccountType>", b"<AccountType>mailbox</AccountType>"
        )
        self.assertFalse(validator("AutodiscoverResponse.xsd").validate(etree.fromstring(body)))


class MobileSyncTests(SynchronousTestCase):
    def test_settings(self):
        url = "https://mail.example.com/Microsoft-Server-ActiveSync"
        document = assertValid(self, mobilesync.mobileSyncSettings(url, "alice@example.com", "Alice"))
        server = document.find(f"{M}Response/{M}Action/{M}Settings/{M}Server")
        self.assertEqual(server.findtext(f"{M}Type"), "MobileSync")
        self.assertEqual((server.findtext(f"{M}Url"), server.findtext(f"{M}Name")), (url, url))
        self.assertEqual(document.findtext(f"{M}Response/{M}Culture"), "en:us")

    def test_redirectAndErrors(self):
        document = assertValid(self, mobilesync.mobileSyncRedirect("alice@example.com"))
        self.assertEqual(document.findtext(f".//{M}Redirect"), "alice@example.com")
        for code in (600, 601):
            document = assertValid(self, mobilesync.mobileSyncError(code, "Invalid Request"))
            self.assertEqual(document.findtext(f"{M}Response/{M}Error/{M}ErrorCode"), str(code))
        assertValid(self, mobilesync.mobileSyncActionError("bob@example.com", "not found"))


def soapRequest(operation="GetUserSettings", subjects=("alice@example.com",), settings=("ExternalEwsUrl",)):
    if operation == "GetUserSettings":
        who = "".join(f"<a:User><a:Mailbox>{s}</a:Mailbox></a:User>" for s in subjects)
        who = f"<a:Users>{who}</a:Users>"
    else:
        who = "<a:Domains>" + "".join(f"<a:Domain>{s}</a:Domain>" for s in subjects) + "</a:Domains>"
    wanted = "".join(f"<a:Setting>{s}</a:Setting>" for s in settings)
    return (
        '<?xml version="1.0" encoding="utf-8"?>'
        f'<s:Envelope xmlns:s="{soap.SOAP}" xmlns:a="{soap.A}" xmlns:wsa="{soap.WSA}">'
        f"<s:Header><a:RequestedServerVersion>Exchange2013</a:RequestedServerVersion>"
        f"<wsa:Action>{soap.ACTION}{operation}</wsa:Action></s:Header>"
        f"<s:Body><a:{operation}RequestMessage><a:Request>{who}"
        f"<a:RequestedSettings>{wanted}</a:RequestedSettings></a:Request></a:{operation}RequestMessage>"
        "</s:Body></s:Envelope>"
    ).encode("utf-8")


class SoapTests(SynchronousTestCase):
    def test_parse(self):
        request = soap.parseRequest(soapRequest(subjects=("a@example.com", "b@example.com")))
        self.assertEqual(request.operation, "GetUserSettings")
        self.assertEqual(request.subjects, ("a@example.com", "b@example.com"))
        self.assertEqual(soap.parseRequest(soapRequest("GetDomainSettings", ("example.com",))).subjects, ("example.com",))

    def test_parseErrors(self):
        self.assertRaises(soap.SoapFault, soap.parseRequest, b"<not-soap/>")
        self.assertRaises(soap.SoapFault, soap.parseRequest, soapRequest().replace(b"GetUserSettingsRequestMessage", b"DeleteEverything"))
        self.assertRaises(soap.InvalidRequest, soap.parseRequest, soapRequest(settings=()))
        self.assertRaises(soap.InvalidRequest, soap.parseRequest, soapRequest(subjects=()))

    def test_response(self):
        settings = ClientSettings(makeConfig())
        views = (settings.forDomain("example.com", True), settings.forDomain("example.com"))
        values = soap.userSettingValues(views, "alice@example.com", "Alice", "alice")
        body = soap.userSettingsResponse(
            [soap.UserAnswer("NoError", values=values), soap.UserAnswer("InvalidUser", "Invalid user")],
            ("ExternalEwsUrl", "EwsSupportedSchemas", "ExternalImap4Connections", "UnheardOfSetting"),
            views[1],
        )
        root = ET.fromstring(body)
        A = f"{{{soap.A}}}"
        users = root.findall(f".//{A}UserResponse")
        self.assertEqual([u.findtext(f"{A}ErrorCode") for u in users], ["NoError", "InvalidUser"])
        found = {s.findtext(f"{A}Name"): s for s in users[0].iter(f"{A}UserSetting")}
        self.assertEqual(found["ExternalEwsUrl"].findtext(f"{A}Value"), "https://mail.example.com/EWS/Exchange.asmx")
        self.assertEqual(found["EwsSupportedSchemas"].findtext(f"{A}Value"), "Exchange2013, Exchange2013_SP1, Exchange2016")
        ports = [c.findtext(f"{A}Port") for c in found["ExternalImap4Connections"].iter(f"{A}ProtocolConnection")]
        self.assertEqual(ports, ["993", "143"])
        errors = [e.findtext(f"{A}SettingName") for e in users[0].iter(f"{A}UserSettingError")]
        self.assertEqual(errors, ["UnheardOfSetting"])


#: Thunderbird's config-v1.1 rules (as its ISPDB validation checks them), restated.
SOCKET_TYPES = {"plain", "SSL", "STARTTLS"}
AUTHENTICATIONS = {
    "password-cleartext", "password-encrypted", "NTLM", "GSSAPI", "client-IP-address",
    "TLS-client-cert", "OAuth2", "none",
}
USERNAMES = {"%EMAILADDRESS%", "%EMAILLOCALPART%", "%EMAILDOMAIN%"}


def checkClientConfig(testCase, body: bytes, domain: str, requireOutgoing: bool = True) -> ET.Element:
    """
    Check a Thunderbird answer against the config-v1.1 rules.

    @param requireOutgoing: whether an C{outgoingServer} must be there (the demo has no
        submission service to advertise).
    """
    root = ET.fromstring(body)
    testCase.assertEqual((root.tag, root.get("version")), ("clientConfig", "1.1"))
    providers = root.findall("emailProvider")
    testCase.assertEqual(len(providers), 1)
    provider = providers[0]
    testCase.assertEqual(provider.get("id"), domain)
    testCase.assertIn(domain, [d.text for d in provider.findall("domain")])
    testCase.assertTrue(provider.findtext("displayName"))
    testCase.assertTrue(provider.findtext("displayShortName"))
    incoming = provider.findall("incomingServer")
    outgoing = provider.findall("outgoingServer")
    testCase.assertTrue(incoming)
    if requireOutgoing:
        testCase.assertTrue(outgoing)
    for server in incoming + outgoing:
        kind = server.get("type")
        testCase.assertIn(kind, {"imap", "pop3", "exchange"} if server in incoming else {"smtp"})
        testCase.assertRegex(server.findtext("hostname"), r"^[a-z0-9.-]+$")
        port = int(server.findtext("port"))
        testCase.assertTrue(0 < port < 65536)
        testCase.assertIn(server.findtext("socketType"), SOCKET_TYPES)
        testCase.assertNotEqual(server.findtext("socketType"), "plain", "never advertise plaintext")
        testCase.assertIn(server.findtext("authentication"), AUTHENTICATIONS)
        testCase.assertIn(server.findtext("username"), USERNAMES)
        testCase.assertIsNone(server.find("password"))
    # Order matters: the first of a type is the preferred one.
    tags = [child.tag for child in provider]
    testCase.assertLess(tags.index("displayShortName"), tags.index("incomingServer"))
    if outgoing:
        testCase.assertLess(
            max(i for i, t in enumerate(tags) if t == "incomingServer"), tags.index("outgoingServer")
        )
    return root


class AutoconfigTests(SynchronousTestCase):
    def test_rules(self):
        view = ClientSettings(makeConfig()).forDomain("example.com")
        root = checkClientConfig(self, autoconfig.clientConfig(view), "example.com")
        imap = root.find("emailProvider/incomingServer[@type='imap']")
        self.assertEqual((imap.findtext("port"), imap.findtext("socketType")), ("993", "SSL"))
        exchange = root.find("emailProvider/incomingServer[@type='exchange']")
        self.assertEqual(exchange.findtext("ewsURL"), "https://mail.example.com/EWS/Exchange.asmx")
        self.assertEqual(root.find("webMail/loginPage").get("url"), "https://mail.example.com/owa/")

    def test_domainFromQuery(self):
        self.assertEqual(autoconfig.domainFromQuery("Alice@Example.COM", ""), "example.com")
        self.assertEqual(autoconfig.domainFromQuery("", "autoconfig.example.com:443"), "example.com")
        self.assertEqual(autoconfig.domainFromQuery("x@<script>", ""), "")
        self.assertEqual(autoconfig.domainFromQuery("no-at-sign", ""), "")
        self.assertTrue(re.match(r"^$", autoconfig.domainFromQuery("a@" + "x" * 300 + ".com", "")))


class DemoConfigurationTests(SynchronousTestCase):
    def test_demo(self):
        """
        The demo's configuration names its domain and gives local clients 127.0.0.1.
        """
        import casd.demo

        path = os.path.join(os.path.dirname(casd.demo.__file__), "data", "casd.toml")
        with open(path) as f:
            config = parseConfig(f.read(), path, discoverProtocols().values())
        view = ClientSettings(config).forDomain("example.com")
        self.assertEqual((view.host, view.displayName), ("127.0.0.1", "casd demo"))
        for server in view.servers:
            self.assertEqual(server.host, "127.0.0.1")
            self.assertIn(server.port, (1143, 1110))
