# -*- test-case-name: tests.test_health,tests.integration.test_imap_dovecot -*-
"""
TLS contexts: the server side (certificates, SNI, ALPN, session resumption) and the client side
towards backends (chain and name verified, with service_identity, every refusal one clear
reason: L{ClientTLS}).  Contexts are built once and shared.

Server contexts follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3 only, forward-secret
AEAD suites, the X25519, P-256 and P-384 groups, no renegotiation.  Each protocol gets its own
contexts (L{ServerTLS.optionsFor}):

  - ALPN: a client offering ALPN ids of which none is the protocol's (C{http/1.1} on an IMAP
    port) is refused with the C{no_application_protocol} alert, the ALPACA countermeasure; a
    matching id is selected; a client without ALPN is served.  A protocol that declares no ids
    (a plugin written before C{alpnProtocols}) ignores the client's ALPN, as a server without
    ALPN support does.
  - Resumption: TLS 1.2 session ids (a per-process cache) and tickets, TLS 1.3 tickets.  The
    session id context is the protocol's name, so a session made on an IMAP port never resumes
    on a POP3 port.  With C{[tls] ticket_keys}, tickets are encrypted with the key file's keys
    (L{casd.ticketkeys}), so any worker of any node given the same file resumes them; without
    it, the workers of one node share a key derived from its node secret (L{casd.nodesecret}),
    and a single process leaves OpenSSL its random keys per context (resumption within it).
"""

from __future__ import annotations

from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from zope.interface import implementer

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLContextFactory,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.python.failure import Failure

from casd.config import ConfigError, TLSConfig
from casd.nodesecret import TLS_TICKET_KEY, derivedKey
from casd.ticketkeys import KEY_SIZE, TicketKey, TicketKeyError, TicketKeyring, readKeyFile

log = Logger()


def _loadChain(path: str, keyPath: str):
    certificates = readCAFile(path)
    with open(keyPath, "rb") as f:
        keyPem = f.read()
    leaf = PrivateCertificate.loadPEM(crypto.dump_certificate(crypto.FILETYPE_PEM, certificates[0]) + keyPem)
    return leaf, list(certificates[1:])


_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}

#: Mozilla's "intermediate" TLS 1.2 suites (2025), less the DHE ones (no DH parameters are set,
#: so they could not be chosen).  TLS 1.3 suites are OpenSSL's defaults, all of them AEAD.
CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
#: Key exchange groups, Mozilla's "intermediate" list.
GROUPS = b"X25519:P-256:P-384"


class ALPNRefused(SSL.Error):
    """
    The client offered ALPN ids, none of them this listener's protocol's.
    """


def alpnSelector(acceptable: tuple[bytes, ...]):
    """
    @param acceptable: the protocol's ALPN ids, preferred first; empty: ALPN is ignored.
    @return: a callback for L{SSL.Context.set_alpn_select_callback}: the first of C{acceptable}
        the client offers; when it offers none of them, raising L{ALPNRefused} makes OpenSSL
        send the C{no_application_protocol} alert (pyOpenSSL turns the exception into
        C{SSL_TLSEXT_ERR_ALERT_FATAL}, and raises it again from the handshake).
    """

    def select(connection, offered):
        for name in acceptable:
            if name in offered:
                return name
        if not acceptable:
            return SSL.NO_OVERLAPPING_PROTOCOLS
        # The shape of OpenSSL's own errors (a list of (library, function, reason)), which
        # Twisted's TLS layer reads when the handshake fails.
        raise ALPNRefused([("SSL routines", "", f"no application protocol (offered {offered!r})")])

    return select


class _ServerOptions(CertificateOptions):
    """
    L{CertificateOptions} with what Twisted does not set: a fixed session id context (Twisted's
    is random per context, which would stop tickets made by another worker from resuming), the
    ALPN policy, the groups and no renegotiation.
    """

    def __init__(
        self, *args, alpn: tuple[bytes, ...] = (), sessionContext: bytes = b"casd", keyring=None,
        clientCAs: tuple = (), **kwargs
    ):
        super().__init__(*args, **kwargs)
        self._alpn = alpn
        self._clientCAs = clientCAs
        self._keyring = keyring
        self._sessionContext = sessionContext[:32]
        # No client-initiated renegotiation.  An EOF without close_notify (clients that just
        # close, as most do) is an end, not a fatal error: OpenSSL would otherwise drop the
        # session from its cache and TLS 1.2 session ids would never resume (nginx does the
        # same).  The protocols frame their own data (lines, literals, Content-Length, chunks),
        # so a truncation is seen as an incomplete command, not taken for a whole one.
        self._options |= SSL.OP_NO_RENEGOTIATION | SSL.OP_IGNORE_UNEXPECTED_EOF

    def _makeContext(self, *args, **kwargs) -> SSL.Context:
        ctx = super()._makeContext(*args, **kwargs)
        ctx.set_session_id(self._sessionContext)
        ctx.set_alpn_select_callback(alpnSelector(self._alpn))
        # pyOpenSSL has set_tmp_ecdh (one curve) but no groups list: its own binding.
        if not _lib.SSL_CTX_set1_curves_list(ctx._context, GROUPS):
            raise SSL.Error("cannot set the key exchange groups")
        if self._keyring is not None:
            self._keyring.install(ctx)
        if self._clientCAs:
            # Ask for a certificate (naming these CAs) without requiring one, and let any through:
            # what a certificate proves is decided by the protocol that reads it, against its
            # own trust (protocols.http.clientcert), never by its mere presence.
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE, _anyCertificate)
            ctx.set_client_ca_list([ca.get_subject() for ca in self._clientCAs])
        return ctx


def _anyCertificate(connection, certificate, errno, depth, ok) -> bool:
    return True


def readCAFile(path: str) -> tuple:
    """
    @return: the certificates of a PEM file (pyOpenSSL C{X509}s).
    @raise ValueError: when it holds none.
    @raise OSError: when it cannot be read.
    """
    with open(path, "rb") as f:
        pem = f.read()
    blocks = [
        b"-----BEGIN CERTIFICATE-----" + block for block in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    if not blocks:
        raise ValueError("no certificate in file")
    return tuple(Certificate.loadPEM(b).original for b in blocks)


def alpnProtocolsOf(descriptor) -> tuple[bytes, ...]:
    """
    @return: a protocol descriptor's ALPN ids as bytes (C{ICASProtocol.alpnProtocols}; a plugin
        that does not declare them has none).
    """
    return tuple(name.encode("ascii") for name in getattr(descriptor, "alpnProtocols", ()))


def clientCAFileOf(descriptor, section) -> str:
    """
    @return: the PEM file of CAs whose client certificates a protocol's listeners ask for, by
        its configuration C{section} (C{ICASProtocol.tlsClientCAFile}), or C{""}: none asked.
    """
    hook = getattr(descriptor, "tlsClientCAFile", None)
    return hook(section) if hook is not None else ""


@implementer(IOpenSSLServerConnectionCreator, IOpenSSLContextFactory)
class _Reloadable:
    """
    The options a listener keeps for its life: each new connection (implicit TLS or STARTTLS)
    asks for the context of the options in force now, so a reload (L{ServerTLS.reload}) reaches
    new connections while the established ones keep theirs.

    @ivar current: the L{_ServerOptions} in force.
    """

    def __init__(self, current) -> None:
        self.current = current

    def getContext(self) -> SSL.Context:
        return self.current.getContext()

    def serverConnectionForTLS(self, tlsProtocol) -> SSL.Connection:
        return SSL.Connection(self.current.getContext(), None)

    def __getattr__(self, name):
        return getattr(self.current, name)


class ServerTLS:
    """
    The certificates casd presents to clients, with SNI: a client asking for one of a
    C{[[tls.sni]]} entry's names gets that entry's certificate, any other the default.
    L{reload} replaces them (and the ticket keys) for new connections.

    @ivar options: the options of a listener whose protocol is not known (no ALPN policy, session
        id context C{casd}); listeners use L{optionsFor}.
    """

    def __init__(self, config: TLSConfig, path: str = "casd.toml") -> None:
        self.config = config
        self.path = path
        self.options = None
        self.keyring = None
        self._byProtocol: dict = {}
        #: id(descriptor) -> (descriptor, its entry of _byProtocol); reload updates the entries.
        self._byDescriptor: dict = {}
        self._chains: dict = {}
        if not config.enabled:
            return
        try:
            for entry in (config, *config.sni):
                self._chains[entry.certificate, entry.key] = _loadChain(entry.certificate, entry.key)
        except (ValueError, SSL.Error, crypto.Error, OSError) as e:
            raise ConfigError(path, "tls", f"expected a usable certificate and key ({e})") from None
        self.keyring = self._keyring(config.ticketKeys, path)
        self.options = _Reloadable(self._build((), b"casd"))

    def reload(self, config: TLSConfig) -> bool:
        """
        Read the certificates, keys and ticket keys of C{config} again and use them for every new
        connection; established sessions keep theirs.  Nothing changes when a file is unusable.

        @return: whether the TLS files in force changed (C{False} when TLS was or is off: turning
            it on or off needs a restart, as the listeners' STARTTLS offer depends on it).
        @raise ConfigError: when a certificate, key or ticket-key file is unusable.
        """
        if not (config.enabled and self.options is not None):
            return False
        fresh = ServerTLS(config, self.path)
        built = {key: fresh._build(*self._buildArguments(key)) for key in self._byProtocol}
        # Everything built: only now does anything change.
        self.config, self.keyring, self._chains = fresh.config, fresh.keyring, fresh._chains
        self.options.current = fresh.options.current
        for key, options in built.items():
            self._byProtocol[key].current = options
        return True

    @staticmethod
    def _keyring(keyFile: str, path: str):
        """
        @return: the L{TicketKeyring} of C{[tls] ticket_keys}, or C{None} (not configured, or
            OpenSSL's ticket callback unreachable: logged).
        """
        if not keyFile:
            return ServerTLS._nodeKeyring()
        try:
            keys = readKeyFile(keyFile)
        except TicketKeyError as e:
            raise ConfigError(path, "tls.ticket_keys", f"{keyFile}: {e}") from None
        try:
            keyring = TicketKeyring(keys)
        except TicketKeyError as e:
            log.error(
                "tls.ticket_keys: {reason}; TLS sessions resume only within each process",
                reason=str(e),
            )
            return None
        log.info(
            "TLS session tickets: {count} shared key(s) from {file}, the first encrypting",
            count=len(keys),
            file=keyFile,
        )
        return keyring

    @staticmethod
    def _nodeKeyring():
        """
        @return: under C{--workers N}, a L{TicketKeyring} of one key derived from the node secret
            (L{casd.nodesecret}), so every worker of the node resumes every other's tickets;
            else (a single process, or OpenSSL's ticket callback unreachable) C{None}: OpenSSL's
            own random keys.
        """
        raw = derivedKey(TLS_TICKET_KEY, KEY_SIZE)
        if raw is None:
            return None
        try:
            keyring = TicketKeyring((TicketKey(raw[:16], raw[16:48], raw[48:]),))
        except TicketKeyError as e:
            log.error("TLS session tickets: {reason}; sessions resume only within each worker", reason=str(e))
            return None
        log.info("TLS session tickets: one key derived from the node secret, shared by the node's workers")
        return keyring

    def _buildArguments(self, key):
        """
        @param key: a key of C{_byProtocol}: the protocol's name, ALPN ids and client CA file.
        @return: the arguments of L{_build} for it (the CA file read now).
        """
        name, alpn, clientCAFile = key
        try:
            clientCAs = readCAFile(clientCAFile) if clientCAFile else ()
        except (OSError, ValueError, crypto.Error) as e:
            raise ConfigError(self.path, f"{name}: client CA file", f"{clientCAFile}: {e}") from None
        return alpn, b"casd-" + name.encode("utf-8"), clientCAs

    def _build(self, alpn: tuple[bytes, ...], sessionContext: bytes, clientCAs: tuple = ()):
        try:
            contexts: dict[bytes, SSL.Context] = {}
            for entry in self.config.sni:
                context = self._options(entry, alpn, sessionContext, clientCAs=clientCAs).getContext()
                for name in entry.names:
                    contexts[name.encode("idna")] = context

            def contextFor(serverName: bytes | None):
                if serverName is None:
                    return None
                return contexts.get(serverName.lower())

            options = self._options(
                self.config, alpn, sessionContext, clientCAs=clientCAs,
                contextForServerName=contextFor if contexts else None,
            )
            options.getContext()
        except (ValueError, SSL.Error, crypto.Error, OSError) as e:
            raise ConfigError(self.path, "tls", f"expected a usable certificate and key ({e})") from None
        return options

    def _options(self, entry, alpn, sessionContext, **extra) -> CertificateOptions:
        leaf, chain = self._chains[entry.certificate, entry.key]
        return _ServerOptions(
            privateKey=leaf.privateKey.original,
            certificate=leaf.original,
            extraCertChain=chain,
            raiseMinimumTo=_VERSIONS[self.config.minimumVersion],
            acceptableCiphers=CIPHERS,
            enableSessions=True,
            enableSessionTickets=True,
            alpn=alpn,
            sessionContext=sessionContext,
            keyring=self.keyring,
            **extra,
        )

    def optionsFor(self, descriptor, clientCAFile: str = ""):
        """
        @param descriptor: the listener's L{casd.interfaces.ICASProtocol}.
        @param clientCAFile: a PEM file of CAs: ask clients for a certificate issued by one of
            them (not requiring one, and letting any through: the protocol judges it); C{""}:
            ask for none (see C{ICASProtocol.tlsClientCAFile}).
        @return: the server options for that protocol's listeners, implicit TLS and STARTTLS
            alike (its ALPN ids; session id context its name), built once; C{None} without a
            certificate.
        @raise ConfigError: when C{clientCAFile} holds no usable certificate.
        """
        if self.options is None:
            return None
        # Each STARTTLS asks: the descriptor's own entry first, without working out its key.
        known = self._byDescriptor.get(id(descriptor))
        if known is not None and known[0] is descriptor and known[1] == clientCAFile:
            return known[2]
        key = (descriptor.name, alpnProtocolsOf(descriptor), clientCAFile)
        options = self._byProtocol.get(key)
        if options is None:
            options = self._byProtocol[key] = _Reloadable(self._build(*self._buildArguments(key)))
        self._byDescriptor[id(descriptor)] = (descriptor, clientCAFile, options)
        return options

    @property
    def enabled(self) -> bool:
        return self.options is not None


class BackendCertificateError(Exception):
    """
    A backend's certificate was not accepted; C{str()} says why, in one line.
    """


def _x509Reason(errno: int) -> str:
    from OpenSSL._util import ffi

    return ffi.string(_lib.X509_verify_cert_error_string(errno)).decode("ascii", "replace")


def _identityReason(e: Exception, name: str) -> str:
    if isinstance(e, VerificationError):
        return f"TLS certificate refused: not valid for {name!r}"
    # service_identity.CertificateError: the certificate names nothing checkable.
    return f"TLS certificate refused: not usable for {name!r} ({e})"


@implementer(IOpenSSLClientConnectionCreator)
class _BackendTLSOptions:
    """
    Twisted's client TLS options with casd's own certificate check: chain (OpenSSL) and name
    (service_identity), every failure becoming one L{BackendCertificateError} that ends the
    connection, so the backend dialogue logs one warning naming the backend and the reason.

    Twisted's own check logs a certificate without a usable subjectAltName as a critical
    traceback (C{service_identity}'s C{CertificateError} is not a C{VerificationError}) and
    then lets the handshake go on: such a certificate, issued by a trusted CA for any other
    name, would be accepted.  Here it is refused.
    """

    def __init__(self, name: str, trustRoot) -> None:
        self._name = name
        self._options = optionsForClientTLS(name, trustRoot=trustRoot)
        if isIPAddress(name) or isIPv6Address(name):
            self._id = IPAddress_ID(name)
        else:
            self._id = DNS_ID(name)

    def clientConnectionForTLS(self, tlsProtocol):
        connection = self._options.clientConnectionForTLS(tlsProtocol)
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verifier(tlsProtocol))
        return connection

    def _verifier(self, tlsProtocol):
        protocol = [tlsProtocol]

        def verify(connection, certificate, errno, depth, ok) -> bool:
            if not protocol:
                return False  # failed already
            reason = None
            if not ok:
                reason = f"TLS certificate refused: not trusted ({_x509Reason(errno)}, depth {depth})"
            elif depth == 0:
                try:
                    verify_service_identity(extract_patterns(certificate), [self._id], [])
                except (VerificationError, CertificateError) as e:
                    reason = _identityReason(e, self._name)
            if reason is None:
                return True
            protocol.pop().failVerification(Failure(BackendCertificateError(reason)))
            return False

        return verify


class ClientTLS:
    """
    The TLS client options towards backends, one per verified name, cached.
    """

    def __init__(self, caFile: str = "") -> None:
        if caFile:
            with open(caFile, "rb") as f:
                pem = f.read()
            certs = [
                Certificate.loadPEM(b"-----BEGIN CERTIFICATE-----" + block)
                for block in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
            ]
            self.trustRoot = trustRootFromCertificates(certs)
        else:
            self.trustRoot = platformTrust()
        self._cache: dict[str, object] = {}

    def optionsFor(self, name: str):
        """
        @return: the L{IOpenSSLClientConnectionCreator} that verifies C{name}.
        """
        options = self._cache.get(name)
        if options is None:
            options = self._cache[name] = _BackendTLSOptions(name, self.trustRoot)
        return options
