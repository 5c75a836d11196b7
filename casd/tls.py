# -*- test-case-name: tests.test_health,tests.integration.test_imap_dovecot -*-
"""
TLS contexts: the server side (certificates, SNI) and the client side towards backends (verified
with service_identity through L{optionsForClientTLS}).  Contexts are built once and shared.
"""

from __future__ import annotations

from OpenSSL import SSL

from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

from casd.config import ConfigError, TLSConfig


def _loadChain(path: str, keyPath: str):
    with open(path, "rb") as f:
        pem = f.read()
    with open(keyPath, "rb") as f:
        keyPem = f.read()
    blocks = [
        b"-----BEGIN CERTIFICATE-----" + block
        for block in pem.split(b"-----BEGIN CERTIFICATE-----")[1:]
    ]
    if not blocks:
        raise ValueError("no certificate in file")
    leaf = PrivateCertificate.loadPEM(blocks[0] + keyPem)
    chain = [Certificate.loadPEM(b).original for b in blocks[1:]]
    return leaf, chain


_VERSIONS = {"TLSv1.2": TLSVersion.TLSv1_2, "TLSv1.3": TLSVersion.TLSv1_3}


class ServerTLS:
    """
    The certificates casd presents to clients, with SNI: a client asking for one of a
    C{[[tls.sni]]} entry's names gets that entry's certificate, any other the default.
    """

    def __init__(self, config: TLSConfig, path: str = "casd.toml") -> None:
        self.config = config
        self.options = None
        if not config.enabled:
            return
        try:
            self._contexts: dict[bytes, SSL.Context] = {}
            for entry in config.sni:
                options = self._options(entry.certificate, entry.key, config.minimumVersion)
                context = options.getContext()
                for name in entry.names:
                    self._contexts[name.encode("idna")] = context
            self.options = self._options(
                config.certificate,
                config.key,
                config.minimumVersion,
                contextForServerName=self._contextFor if self._contexts else None,
            )
            self.options.getContext()
        except (ValueError, SSL.Error, OSError) as e:
            raise ConfigError(path, "tls", f"expected a usable certificate and key ({e})") from None

    def _options(self, certPath, keyPath, minimum, **extra) -> CertificateOptions:
        leaf, chain = _loadChain(certPath, keyPath)
        return CertificateOptions(
            privateKey=leaf.privateKey.original,
            certificate=leaf.original,
            extraCertChain=chain,
            raiseMinimumTo=_VERSIONS[minimum],
            **extra,
        )

    def _contextFor(self, serverName: bytes | None):
        if serverName is None:
            return None
        return self._contexts.get(serverName.lower())

    @property
    def enabled(self) -> bool:
        return self.options is not None


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
            options = self._cache[name] = optionsForClientTLS(name, trustRoot=self.trustRoot)
        return options

