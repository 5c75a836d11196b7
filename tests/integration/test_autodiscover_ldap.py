"""
Autodiscover with users in a real OpenLDAP slapd (tests/support/slapd.py): the user's aliases and
display name come from directory attributes mapped as policy attributes
(C{aliases=mailLocalAddress}, C{display_name=cn}), through a real casd node's HTTPS front end.
"""

from __future__ import annotations

import os
import ssl
import urllib.error
import urllib.request
from base64 import b64encode

from lxml import etree

from twisted.internet import threads
from twisted.trial.unittest import TestCase

from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.procs import freePort
from tests.support.slapd import SERVICE_PASSWORD, Slapd, fixtureLDIF, serviceDN

CONFIG = """
[server]
hostname = "mail.example.com"

[tls]
certificate = "{cert}"
key = "{key}"

[auth]
failure_delay = 0.2

[ldap]
urls = ["{url}"]
starttls = true
ca_file = "{ca}"
base_dn = "ou=people,dc=example,dc=com"
filter = "(&(objectClass=inetOrgPerson)(|(uid={{login}})(mail={{login}})))"
bind_dn = "{bindDN}"
bind_password_file = "{secret}"
address_attribute = "mail"
policy_attributes = ["aliases=mailLocalAddress", "display_name=cn"]

[imap]
[[imap.listen]]
endpoint = "tcp:{imap}:interface=127.0.0.1"
tls = "implicit"

[http]
enabled = true
[[http.listen]]
endpoint = "tcp:{https}:interface=127.0.0.1"
tls = "implicit"
"""

POX = (
    '<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
    "<Request><EMailAddress>{}</EMailAddress><AcceptableResponseSchema>"
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
    "</AcceptableResponseSchema></Request></Autodiscover>"
)
R = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
B = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"


class AutodiscoverLDAPTests(TestCase):
    timeout = 120

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        ca = CertificateAuthority.create(os.path.join(self.tmp, "pki"))
        self.ca = ca.caPath
        slapdCert = ca.issue(["127.0.0.1", "localhost"], "slapd")
        self.slapd = Slapd(os.path.join(self.tmp, "slapd"), tls=slapdCert, caPath=ca.caPath)
        self.slapd.start()
        self.addCleanup(self.slapd.stop)
        ldif = fixtureLDIF().replace(
            "uid: alice\n",
            "objectClass: inetLocalMailRecipient\nmailLocalAddress: a.smith@example.com\n"
            "mailLocalAddress: alice.smith@example.com\nuid: alice\n",
        )
        self.slapd.load(ldif)
        secret = os.path.join(self.tmp, "service.secret")
        with open(secret, "w") as f:
            f.write(SERVICE_PASSWORD + "\n")
        cert, key = ca.issue(["mail.example.com", "127.0.0.1"], "casd")
        self.port = freePort()
        text = CONFIG.format(
            cert=cert, key=key, url=self.slapd.url, ca=ca.caPath, bindDN=serviceDN(), secret=secret,
            imap=freePort(), https=self.port,
        )
        self.node = CASNode(os.path.join(self.tmp, "casd"), text).start()
        self.addCleanup(self.node.stop)

    def post(self, address, user="alice", password="alice-secret"):
        context = ssl.create_default_context(cafile=self.ca)

        def send():
            request = urllib.request.Request(
                f"https://127.0.0.1:{self.port}/autodiscover/autodiscover.xml",
                data=POX.format(address).encode(),
                headers={
                    "Content-Type": "text/xml",
                    "Authorization": "Basic " + b64encode(f"{user}:{password}".encode()).decode(),
                },
            )
            try:
                with urllib.request.urlopen(request, context=context, timeout=30) as r:
                    return r.status, r.read()
            except urllib.error.HTTPError as e:
                return e.code, e.read()

        return threads.deferToThread(send)

    async def test_aliasesAndDisplayNameFromTheDirectory(self):
        status, body = await self.post("alice@example.com")
        self.assertEqual(status, 200)
        document = etree.fromstring(body)
        self.assertEqual(document.findtext(f".//{R}User/{R}DisplayName"), "Alice Example")
        self.assertEqual(document.findtext(f".//{R}Action"), "settings")
        for alias in ("a.smith@example.com", "Alice.Smith@example.com"):
            status, body = await self.post(alias)
            document = etree.fromstring(body)
            self.assertEqual(document.findtext(f".//{R}Action"), "redirectAddr", body)
            self.assertEqual(document.findtext(f".//{R}RedirectAddr"), "alice@example.com")

    async def test_otherUsersAddressAndWrongPassword(self):
        status, body = await self.post("bob@example.com")
        self.assertEqual(status, 200)
        self.assertEqual(etree.fromstring(body).findtext(f"{B}Response/{B}Error/{B}ErrorCode"), "500")
        status, _ = await self.post("alice@example.com", password="wrong")
        self.assertEqual(status, 401)
