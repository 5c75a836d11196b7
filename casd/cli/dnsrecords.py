# -*- test-case-name: tests.test_autodiscover_web -*-
"""
C{casd dns-records DOMAIN}: the DNS records to publish so that clients find casd, and the names
its TLS certificate must cover.

    $ casd dns-records -c /etc/casd/casd.toml example.com
    ; DNS records for example.com (from /etc/casd/casd.toml)
    autodiscover.example.com.       3600 IN CNAME mail.example.com.
    autoconfig.example.com.         3600 IN CNAME mail.example.com.
    _autodiscover._tcp.example.com. 3600 IN SRV   0 0 443 mail.example.com.
    _imaps._tcp.example.com.        3600 IN SRV   0 1 993 mail.example.com.
    _imap._tcp.example.com.         3600 IN SRV   10 1 143 mail.example.com.
    _pop3s._tcp.example.com.        3600 IN SRV   0 0 0 .
    ...

RFC 6186 and RFC 8314 SRV records, with target C{.} for a service that is not offered; the
host names, ports and TLS modes are those Autodiscover advertises (L{casd.config.clientsettings}).
"""

from __future__ import annotations

import sys

from casd.config.clientsettings import ClientSettings, certificateCovers, httpsPort

#: (SRV service, protocol, implicit TLS?) in the order printed.
SERVICES = (
    ("_imaps", "imap", True),
    ("_imap", "imap", False),
    ("_pop3s", "pop3", True),
    ("_pop3", "pop3", False),
    ("_submissions", "smtp", True),
    ("_submission", "smtp", False),
)


def addDNSRecordsCommand(sub) -> None:
    """
    Register C{casd dns-records} with the C{casd} command's sub-parsers.
    """
    p = sub.add_parser("dns-records", help="print the DNS records to publish for a mail domain")
    p.add_argument("domain", help="the mail domain, e.g. example.com")
    p.add_argument("-c", "--config", required=True, help="the TOML configuration file")
    p.add_argument("--ttl", type=int, default=3600, help="TTL of the records (default 3600)")
    p.set_defaults(func=dnsRecordsCommand)


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def dnsRecords(config, domain: str, ttl: int = 3600) -> list[tuple[str, str, str]]:
    """
    The records to publish, as (owner, type, data).
    """
    settings = ClientSettings(config)
    domain = domain.lower().rstrip(".")
    view = settings.forDomain(domain)
    host = _fqdn(view.host)
    records = []
    port = httpsPort(config)
    if port:
        for name in ("autodiscover", "autoconfig"):
            owner = f"{name}.{domain}."
            if _fqdn(owner) != host:
                records.append((owner, "CNAME", host))
        records.append((f"_autodiscover._tcp.{domain}.", "SRV", f"0 0 {port} {host}"))
    for service, protocol, implicit in SERVICES:
        found = [s for s in view.servers if s.protocol == protocol and s.implicitTLS == implicit]
        owner = f"{service}._tcp.{domain}."
        if found:
            priority = 0 if implicit else 10
            records.append((owner, "SRV", f"{priority} 1 {found[0].port} {host}"))
        else:
            records.append((owner, "SRV", "0 0 0 ."))
    return records


def certificateReport(config, domain: str) -> list[str]:
    """
    Comment lines: the names the certificate must cover, and whether the configured ones do.
    """
    from cryptography import x509

    names = ClientSettings(config).certificateNames(domain)
    lines = ["; the TLS certificate must cover: " + " ".join(names)]
    paths = [config.tls.certificate] + [s.certificate for s in config.tls.sni]
    if not config.tls.certificate:
        return lines + ["; no [tls] certificate is configured"]
    covered: dict[str, str] = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                certificate = x509.load_pem_x509_certificates(f.read())[0]
            dns = certificate.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.DNSName)
        except (OSError, ValueError, x509.ExtensionNotFound) as e:
            lines.append(f"; {path}: unreadable or without DNS names ({type(e).__name__})")
            continue
        for name in names:
            if name not in covered and certificateCovers(dns, name):
                covered[name] = path
    for name in names:
        if name in covered:
            lines.append(f"; {name}: covered by {covered[name]}")
        else:
            lines.append(f"; {name}: NOT covered by the configured certificates")
    return lines


def dnsRecordsCommand(args) -> int:
    from casd.config import ConfigError, loadConfig
    from casd.service.discovery import discoverProtocols

    try:
        config = loadConfig(args.config, discoverProtocols().values())
    except ConfigError as e:
        print(f"casd: configuration error: {e}", file=sys.stderr)
        return 1
    domain = args.domain.lower().rstrip(".")
    if not domain or "." not in domain:
        print(f"casd: expected a domain such as example.com, got {args.domain!r}", file=sys.stderr)
        return 2
    print(f"; DNS records for {domain} (from {args.config})")
    records = dnsRecords(config, domain, args.ttl)
    width = max(len(owner) for owner, _, _ in records)
    for owner, kind, data in records:
        print(f"{owner:<{width}} {args.ttl} IN {kind:<5} {data}")
    for line in certificateReport(config, domain):
        print(line)
    return 0
