# -*- test-case-name: tests.test_http_forms_clientcert -*-
"""
Client-certificate logon (optional per vdir): the certificate's e-mail address or UPN maps to a
user through the directory.

The certificate is verified here, against the vdir's own client CA list, whatever the TLS layer
did: a listener may ask for certificates for several vdirs with different trust, and a
certificate that merely reached us proves nothing.  Names are tried in this order: the
subjectAltName C{otherName} UPN (Microsoft's 1.3.6.1.4.1.311.20.2.3), subjectAltName
C{rfc822Name}s, then the subject's C{emailAddress}.
"""

from __future__ import annotations

from typing import Iterable

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import Logger

from casd.config import ConfigError, Setting
from casd.failures import AuthenticationFailed
from protocols.http.auth import IHTTPCredentialSource
from protocols.http.status import HTTPError

UPN = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


def _derUTF8(value: bytes) -> str | None:
    """
    Decode the DER C{UTF8String} an otherName UPN holds (short or long form length).
    """
    if len(value) < 2 or value[0] != 0x0C:
        return None
    length, offset = value[1], 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 2 or len(value) < 2 + count:
            return None
        length, offset = int.from_bytes(value[2 : 2 + count], "big"), 2 + count
    body = value[offset : offset + length]
    if len(body) != length:
        return None
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return None


def certificateNames(cert: x509.Certificate) -> list[str]:
    """
    @return: the user names a certificate claims, best first (UPNs, then e-mail addresses).
    """
    upns: list[str] = []
    emails: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for other in san.get_values_for_type(x509.OtherName):
            if other.type_id == UPN:
                name = _derUTF8(other.value)
                if name:
                    upns.append(name)
        emails.extend(san.get_values_for_type(x509.RFC822Name))
    for attribute in cert.subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        emails.append(str(attribute.value))
    seen, names = set(), []
    for name in upns + emails:
        if "@" in name and name.lower() not in seen:
            seen.add(name.lower())
            names.append(name)
    return names


def peerCertificateChain(request) -> list[x509.Certificate]:
    """
    @return: the client's certificate chain (leaf first) from the request's TLS connection, or
        C{[]} when there is none.
    """
    transport = getattr(request.channel, "transport", None) if getattr(request, "channel", None) else None
    if transport is None or ISSLTransport(transport, None) is None:
        return []
    connection = getattr(transport, "getHandle", lambda: None)()
    chain = []
    if connection is not None and hasattr(connection, "get_peer_cert_chain"):
        chain = [c.to_cryptography() for c in (connection.get_peer_cert_chain() or [])]
    if not chain:
        leaf = transport.getPeerCertificate()
        chain = [leaf.to_cryptography()] if leaf is not None else []
    return chain


class ClientCertificateAuth:
    """
    Maps a verified client certificate to a directory user.

    @ivar directory: an L{casd.interfaces.IUserDirectory}.
    """

    log = Logger()

    def __init__(self, directory, trusted: Iterable[x509.Certificate], clock=None, chainOf=peerCertificateChain):
        """
        @param trusted: the CA certificates client certificates must chain to.
        @param chainOf: C{request -> [leaf, intermediates...]} (injectable for tests).
        """
        self.directory = directory
        self.store = Store(list(trusted))
        self.clock = clock
        self.chainOf = chainOf

    @classmethod
    def fromCAFile(cls, directory, path: str, **kw) -> "ClientCertificateAuth":
        with open(path, "rb") as f:
            return cls(directory, x509.load_pem_x509_certificates(f.read()), **kw)

    def hasCredentials(self, request) -> bool:
        return bool(self.chainOf(request))

    def verify(self, chain: list[x509.Certificate]) -> None:
        """
        @raise AuthenticationFailed: when the chain does not lead to a trusted CA, is outside its
            validity or is not for client authentication.
        """
        builder = PolicyBuilder().store(self.store)
        if self.clock is not None:
            import datetime

            builder = builder.time(
                datetime.datetime.fromtimestamp(self.clock.seconds(), datetime.timezone.utc)
            )
        try:
            builder.build_client_verifier().verify(chain[0], chain[1:])
        except (VerificationError, ValueError) as e:
            raise AuthenticationFailed(f"client certificate not trusted: {e}") from None

    def authenticate(self, request) -> defer.Deferred:
        """
        @return: a L{Deferred} firing with the L{casd.interfaces.IMailboxUser}, failing with
            L{AuthenticationFailed} (no, untrusted or unknown certificate) or with the
            directory's L{casd.failures.DirectoryUnavailable}.
        """
        chain = self.chainOf(request)
        if not chain:
            return defer.fail(AuthenticationFailed("no client certificate"))
        try:
            self.verify(chain)
        except AuthenticationFailed as e:
            return defer.fail(e)
        names = certificateNames(chain[0])
        if not names:
            return defer.fail(AuthenticationFailed("client certificate names no user"))
        return self._lookup(names)

    @defer.inlineCallbacks
    def _lookup(self, names):
        for name in names:
            user = yield self.directory.lookup(name)
            if user is not None:
                if getattr(user, "disabled", False):
                    raise AuthenticationFailed("account disabled")
                self.log.info("client certificate of {name!r} maps to {user!r}", name=name, user=user.login)
                return user
        raise AuthenticationFailed("client certificate names no known user")


# -- wiring into the HTTP front end -----------------------------------------------------------

#: The C{[http]} key of client-certificate logon.
CERT_SETTINGS = (
    Setting(
        "client_ca_file",
        "path",
        "",
        "PEM file of the CAs whose client certificates vdirs with C{auth} C{cert} accept (the"
        " certificate's UPN or e-mail address names the user in the directory).  When a vdir"
        " accepts C{cert}, the HTTP TLS listeners ask clients for a certificate issued by one"
        " of these CAs (without requiring one: other vdirs and methods work without).",
    ),
)


@implementer(IHTTPCredentialSource)
class CertificateCredentials:
    """
    The C{cert} method of L{protocols.http.auth.HTTPAuthenticator}.
    """

    method = "cert"
    stripHeaders = ()

    def __init__(self, auth: ClientCertificateAuth) -> None:
        self.auth = auth

    def authenticate(self, request, vdir, client):
        if not self.auth.hasCredentials(request):
            return None
        return self.auth.authenticate(request)

    def challenge(self, request, vdir):
        return HTTPError(
            403,
            ((b"Content-Type", b"text/plain; charset=utf-8"),),
            b"A valid client certificate is required.\n",
        )


def certServices(context, section, site):
    """
    The provider (in L{protocols.http.local.PROVIDERS}) that registers the C{cert} method when a
    vdir accepts it; it serves no page.
    """
    if not any("cert" in v.auth for v in site.vdirs.vdirs):
        return ()
    if isinstance(site.authenticator.sources.get("cert"), CertificateCredentials):
        return ()
    where = "http.client_ca_file"
    if not section.client_ca_file:
        raise ConfigError(context.config.path, where, "required by a vdir with auth \"cert\"")
    if context.directory is None or not hasattr(context.directory, "lookup"):
        raise ConfigError(context.config.path, where, "needs a directory that can look users up")
    try:
        auth = ClientCertificateAuth.fromCAFile(context.directory, section.client_ca_file, clock=context.reactor)
    except (OSError, ValueError) as e:
        raise ConfigError(context.config.path, where, f"no CA certificate read ({e})") from None
    site.authenticator.register(CertificateCredentials(auth))
    return ()
