"""
A throw-away certificate authority for TLS integration tests.

Keys are EC P-256 by default (fast to generate; accepted by OpenSSL in
Dovecot and Python and by GnuTLS in slapd); pass C{keyType="rsa"} for
RSA 2048.  Files are PEM; private keys are unencrypted PKCS#8, mode 0600.
"""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _newKey(keyType):
    if keyType == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if keyType == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError("keyType must be 'ec' or 'rsa', not %r" % (keyType,))


def _validity():
    now = datetime.datetime.now(datetime.timezone.utc)
    notBefore = now - datetime.timedelta(days=1)
    return notBefore, notBefore + datetime.timedelta(days=30)


def _subjectAltNames(names):
    entries = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            # An e-mail address (a client certificate's rfc822Name), else a host name.
            entries.append(x509.RFC822Name(name) if "@" in name else x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _writeKey(path, key):
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _writeCert(path, cert):
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))


def _serverCertificate(names, subjectKey, issuerName, signingKey,
                       issuerKeyForAKI):
    """
    Build a server (leaf) certificate for C{names}.
    """
    notBefore, notAfter = _validity()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    keyUsage = x509.KeyUsage(
        digital_signature=True,
        key_encipherment=isinstance(subjectKey, rsa.RSAPrivateKey),
        content_commitment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=False, crl_sign=False,
        encipher_only=False, decipher_only=False)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuerName or subject)
        .public_key(subjectKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(notBefore)
        .not_valid_after(notAfter)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None),
                       critical=True)
        .add_extension(keyUsage, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False)
        .add_extension(_subjectAltNames(names), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(
                subjectKey.public_key()),
            critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(
                issuerKeyForAKI.public_key()),
            critical=False)
        .sign(signingKey, hashes.SHA256())
    )


class CertificateAuthority:
    """
    A private CA whose certificate tests trust explicitly.

    @ivar directory: Where the CA and issued files are written.
    @ivar caPath: Path of the CA certificate (C{ca.pem}); pass it as
        C{cafile} to L{ssl.create_default_context}.
    @ivar keyPath: Path of the CA private key (C{ca.key}).
    @ivar certificate: The CA L{x509.Certificate}.
    """

    def __init__(self, directory, certificate, key, caPath, keyPath,
                 keyType="ec"):
        self.directory = directory
        self.certificate = certificate
        self._key = key
        self.caPath = caPath
        self.keyPath = keyPath
        self.keyType = keyType

    @classmethod
    def create(cls, directory, name="casd test CA", keyType="ec"):
        """
        Create a new CA and write C{ca.pem} and C{ca.key} in C{directory}
        (created if missing).

        @param keyType: C{"ec"} (P-256) or C{"rsa"} (2048 bits), used for
            the CA and, by default, for certificates it issues.
        @rtype: L{CertificateAuthority}
        """
        os.makedirs(directory, exist_ok=True)
        key = _newKey(keyType)
        subject = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "casd tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ])
        notBefore, notAfter = _validity()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(notBefore)
            .not_valid_after(notAfter)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0),
                           critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True,
                    crl_sign=True, content_commitment=False,
                    key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False,
                    decipher_only=False),
                critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                critical=False)
            .sign(key, hashes.SHA256())
        )
        caPath = os.path.join(directory, "ca.pem")
        keyPath = os.path.join(directory, "ca.key")
        _writeCert(caPath, cert)
        _writeKey(keyPath, key)
        return cls(directory, cert, key, caPath, keyPath, keyType)

    def issue(self, names, basename, keyType=None):
        """
        Issue a server certificate signed by this CA.

        @param names: Host names and/or IP addresses (e.g. C{"localhost"},
            C{"127.0.0.1"}); the first is also the subject CN.  IP
            addresses become IP SANs, e-mail addresses rfc822Name SANs (a
            client certificate), everything else DNS SANs.
        @param basename: Files are written as C{<basename>.pem} and
            C{<basename>.key} in the CA's directory.
        @param keyType: C{"ec"} or C{"rsa"}; defaults to the CA's type.

        @return: C{(certPath, keyPath)}.
        @rtype: L{tuple} of L{str}
        """
        names = list(names)
        if not names:
            raise ValueError("at least one name is required")
        key = _newKey(keyType or self.keyType)
        cert = _serverCertificate(
            names, key, self.certificate.subject, self._key, self._key)
        certPath = os.path.join(self.directory, basename + ".pem")
        keyPath = os.path.join(self.directory, basename + ".key")
        _writeCert(certPath, cert)
        _writeKey(keyPath, key)
        return certPath, keyPath


def selfSigned(directory, names, basename, keyType="ec"):
    """
    Write a self-signed server certificate that no test CA vouches for,
    to check that a client refuses the wrong certificate.

    @param names: As for L{CertificateAuthority.issue}.
    @return: C{(certPath, keyPath)}.
    @rtype: L{tuple} of L{str}
    """
    names = list(names)
    if not names:
        raise ValueError("at least one name is required")
    os.makedirs(directory, exist_ok=True)
    key = _newKey(keyType)
    cert = _serverCertificate(names, key, None, key, key)
    certPath = os.path.join(directory, basename + ".pem")
    keyPath = os.path.join(directory, basename + ".key")
    _writeCert(certPath, cert)
    _writeKey(keyPath, key)
    return certPath, keyPath
