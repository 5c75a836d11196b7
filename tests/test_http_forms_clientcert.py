"""
Client-certificate logon: verification against the vdir's CA, UPN and e-mail mapping through the
directory.
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UserRecord
from casd.failures import AuthenticationFailed, DirectoryUnavailable
from casd.testing import MemoryDirectory
from protocols.http.clientcert import UPN, ClientCertificateAuth, certificateNames

NOW = datetime.datetime(2026, 12, 7, tzinfo=datetime.timezone.utc)


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def makeCA(cn="client CA"):
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name(cn))
        .issuer_name(name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def makeClient(ca, emails=(), upn=None, subjectEmail=None, eku=ExtendedKeyUsageOID.CLIENT_AUTH, days=10):
    caCert, caKey = ca
    key = ec.generate_private_key(ec.SECP256R1())
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, "someone")]
    if subjectEmail:
        attrs.append(x509.NameAttribute(NameOID.EMAIL_ADDRESS, subjectEmail))
    sans = [x509.RFC822Name(e) for e in emails]
    if upn:
        encoded = upn.encode()
        sans.append(x509.OtherName(UPN, b"\x0c" + bytes([len(encoded)]) + encoded))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(caCert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=days))
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(caKey.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(caKey, hashes.SHA256())


def result(d):
    out = []
    d.addBoth(out.append)
    return out[0]


class ClientCertificateTests(SynchronousTestCase):
    def setUp(self):
        self.ca = makeCA()
        self.clock = Clock()
        self.clock.advance(NOW.timestamp())
        self.directory = MemoryDirectory(
            {
                "alice": ("x", UserRecord(login="alice", address="alice@example.com")),
                "carol": ("x", UserRecord(login="carol", address="carol@example.com", disabled=True)),
            }
        )
        self.chain = []
        self.auth = ClientCertificateAuth(
            self.directory, [self.ca[0]], clock=self.clock, chainOf=lambda request: self.chain
        )

    def login(self, cert):
        self.chain = [cert]
        return result(self.auth.authenticate(object()))

    def test_names(self):
        cert = makeClient(self.ca, emails=["a@example.com"], upn="alice@corp.example", subjectEmail="s@example.com")
        self.assertEqual(certificateNames(cert), ["alice@corp.example", "a@example.com", "s@example.com"])
        self.assertEqual(certificateNames(makeClient(self.ca)), [])

    def test_emailMapsToUser(self):
        user = self.login(makeClient(self.ca, emails=["alice@example.com"]))
        self.assertEqual(user.login, "alice")

    def test_upnFirst(self):
        """
        The UPN is tried before e-mail addresses; an unknown UPN falls through to the address.
        """
        self.assertEqual(self.login(makeClient(self.ca, upn="alice@example.com", emails=["carol@example.com"])).login, "alice")
        self.assertEqual(
            self.login(makeClient(self.ca, upn="ghost@example.com", emails=["alice@example.com"])).login,
            "alice",
        )

    def test_refused(self):
        """
        No certificate, an untrusted issuer, an expired certificate, a server-only certificate, an
        unknown or disabled user: all are refused as bad credentials.
        """
        other = makeCA("other CA")
        cases = [
            makeClient(other, emails=["alice@example.com"]),
            makeClient(self.ca, emails=["ghost@example.com"]),
            makeClient(self.ca, emails=["carol@example.com"]),
            makeClient(self.ca, emails=["alice@example.com"], eku=ExtendedKeyUsageOID.SERVER_AUTH),
            makeClient(self.ca),
        ]
        for cert in cases:
            failure = self.login(cert)
            self.assertTrue(failure.check(AuthenticationFailed), cert.subject)
        self.clock.advance(20 * 86400)
        self.assertTrue(self.login(makeClient(self.ca, emails=["alice@example.com"])).check(AuthenticationFailed))
        self.chain = []
        self.assertFalse(self.auth.hasCredentials(object()))
        self.assertTrue(result(self.auth.authenticate(object())).check(AuthenticationFailed))

    def test_directoryDown(self):
        self.directory.error = DirectoryUnavailable("down")
        self.assertTrue(self.login(makeClient(self.ca, emails=["alice@example.com"])).check(DirectoryUnavailable))


CERT_CONFIG = """
[routing]
default_backend = "web"

[backends.web]
host = "127.0.0.1"

[backends.web.http]
port = 8080

[http]
enabled = true
plain_http = "serve"
{ca}

[[http.listen]]
endpoint = "tcp:8081"
tls = "none"
trusted = true

[[http.vdir]]
path = "/ecp"
auth = ["cert", "basic"]
identity = "header"
"""


class CertificateSiteTests(SynchronousTestCase):
    """
    The C{cert} method inside the HTTP front end: registered when a vdir names it, a verified
    certificate reaches the backend as its user, no certificate falls through to Basic.
    """

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        self.ca = makeCA()
        self.caPath = self.mktemp()
        from cryptography.hazmat.primitives.serialization import Encoding

        with open(self.caPath, "wb") as f:
            f.write(self.ca[0].public_bytes(Encoding.PEM))
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW.timestamp())

    def context(self, ca=True):
        from casd.testing import makeContext

        line = f'client_ca_file = "{self.caPath}"' if ca else ""
        return makeContext(
            self.reactor,
            users={"alice": ("pw", UserRecord(login="alice", address="alice@example.com"))},
            config=CERT_CONFIG.replace("{ca}", line),
        )

    def test_missingCA(self):
        from casd.config import ConfigError
        from casd.testing import connectFrontend
        from protocols.http import http

        e = self.assertRaises(ConfigError, connectFrontend, http, self.context(ca=False))
        self.assertIn("client_ca_file", str(e))

    def test_certificateUser(self):
        from casd.testing import acceptBackend, connectFrontend
        from protocols.http import http

        context = self.context()
        client, transport = connectFrontend(http, context)
        source = client.site.authenticator.sources["cert"]
        cert = makeClient(self.ca, emails=["alice@example.com"])
        source.auth.chainOf = lambda request: [cert]
        client.dataReceived(b"GET /ecp/ HTTP/1.1\r\nHost: h\r\nX-Remote-User: mallory\r\n\r\n")
        self.reactor.advance(0)
        server, backend = acceptBackend(self.reactor)
        sent = backend.value()
        self.assertIn(b"X-Remote-User: alice\r\n", sent)
        self.assertNotIn(b"mallory", sent)

    def test_untrustedCertificate(self):
        from casd.testing import connectFrontend
        from protocols.http import http

        client, transport = connectFrontend(http, self.context())
        source = client.site.authenticator.sources["cert"]
        source.auth.chainOf = lambda request: [makeClient(makeCA("other"), emails=["alice@example.com"])]
        client.dataReceived(b"GET /ecp/ HTTP/1.1\r\nHost: h\r\n\r\n")
        self.reactor.advance(0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "), transport.value())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_noCertificateFallsThrough(self):
        """
        Without a certificate the next method (Basic) decides; with no credentials at all the
        first method's answer (403, not a Basic prompt) is given.
        """
        from base64 import b64encode

        from casd.testing import acceptBackend, connectFrontend
        from protocols.http import http

        context = self.context()
        client, transport = connectFrontend(http, context)
        client.dataReceived(b"GET /ecp/ HTTP/1.1\r\nHost: h\r\n\r\n")
        self.reactor.advance(0)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 403 "), transport.value())
        client, transport = connectFrontend(http, context)
        client.dataReceived(
            b"GET /ecp/ HTTP/1.1\r\nHost: h\r\nAuthorization: Basic " + b64encode(b"alice:pw") + b"\r\n\r\n"
        )
        self.reactor.advance(0)
        server, backend = acceptBackend(self.reactor)
        self.assertIn(b"X-Remote-User: alice\r\n", backend.value())
