# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
Apple configuration profiles (C{.mobileconfig}): a mail account (C{com.apple.mail.managed},
IMAP or POP3 plus SMTP) and, where ActiveSync is advertised, an Exchange account
(C{com.apple.eas.account}); signed as CMS SignedData with the server's TLS certificate and chain
so that iOS and macOS show the profile as verified.

The profile never carries a password: the device asks for it when the profile is installed.
"""

from __future__ import annotations

import plistlib
import uuid
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import pkcs7

CONTENT_TYPE = b"application/x-apple-aspen-config"


def _uuid(*parts: str) -> str:
    """
    A stable UUID for a payload, so that installing the profile again replaces it.
    """
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "casd:" + ":".join(parts))).upper()


def _identifier(domain: str) -> str:
    return ".".join(reversed(domain.split("."))) + ".casd"


def profile(settings, address: str, displayName: str, login: str) -> dict:
    """
    The profile of one user, as a dictionary for L{plistlib}.

    @param settings: the user's domain's L{casd.config.clientsettings.DomainSettings} as the
        client's network sees it.
    """
    base = _identifier(settings.domain)
    content = []
    incoming = settings.server("imap") or settings.server("pop3")
    outgoing = settings.server("smtp")
    if incoming is not None and outgoing is not None:
        content.append(
            {
                "PayloadType": "com.apple.mail.managed",
                "PayloadVersion": 1,
                "PayloadIdentifier": f"{base}.mail.{login}",
                "PayloadUUID": _uuid("mail", settings.domain, address),
                "PayloadDisplayName": f"{settings.displayName} mail",
                "EmailAccountDescription": settings.displayName,
                "EmailAccountName": displayName,
                "EmailAccountType": "EmailTypeIMAP" if incoming.protocol == "imap" else "EmailTypePOP",
                "EmailAddress": address,
                "IncomingMailServerAuthentication": "EmailAuthPassword",
                "IncomingMailServerHostName": incoming.host,
                "IncomingMailServerPortNumber": incoming.port,
                "IncomingMailServerUseSSL": True,
                "IncomingMailServerUsername": login,
                "OutgoingMailServerAuthentication": "EmailAuthPassword",
                "OutgoingMailServerHostName": outgoing.host,
                "OutgoingMailServerPortNumber": outgoing.port,
                "OutgoingMailServerUseSSL": True,
                "OutgoingMailServerUsername": login,
                "OutgoingPasswordSameAsIncomingPassword": True,
            }
        )
    if settings.activeSyncUrl:
        url = urlsplit(settings.activeSyncUrl)
        host = url.hostname + (f":{url.port}" if url.port and url.port != 443 else "")
        content.append(
            {
                "PayloadType": "com.apple.eas.account",
                "PayloadVersion": 1,
                "PayloadIdentifier": f"{base}.eas.{login}",
                "PayloadUUID": _uuid("eas", settings.domain, address),
                "PayloadDisplayName": f"{settings.displayName} Exchange ActiveSync",
                "EmailAddress": address,
                "Host": host,
                "SSL": True,
                "UserName": login,
                "MailNumberOfPastDaysToSync": 30,
            }
        )
    return {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{base}.{login}",
        "PayloadUUID": _uuid("profile", settings.domain, address),
        "PayloadDisplayName": f"{settings.displayName} ({address})",
        "PayloadDescription": f"Mail settings for {address}",
        "PayloadOrganization": settings.displayName,
        "PayloadRemovalDisallowed": False,
        "PayloadContent": content,
    }


def render(settings, address: str, displayName: str, login: str) -> bytes:
    """
    The profile as an XML property list.
    """
    return plistlib.dumps(profile(settings, address, displayName, login), fmt=plistlib.FMT_XML)


class ProfileSigner:
    """
    Signs profiles with a certificate, its private key and its chain (a PEM file each, as in
    C{[tls]}): the result is DER CMS SignedData with the profile attached.
    """

    def __init__(self, certificatePath: str, keyPath: str) -> None:
        with open(certificatePath, "rb") as f:
            certificates = x509.load_pem_x509_certificates(f.read())
        with open(keyPath, "rb") as f:
            self._key = serialization.load_pem_private_key(f.read(), password=None)
        self.certificate = certificates[0]
        self.chain = certificates[1:]

    def sign(self, data: bytes) -> bytes:
        builder = pkcs7.PKCS7SignatureBuilder().set_data(data).add_signer(
            self.certificate, self._key, hashes.SHA256()
        )
        for certificate in self.chain:
            builder = builder.add_certificate(certificate)
        return builder.sign(serialization.Encoding.DER, [pkcs7.PKCS7Options.Binary])
