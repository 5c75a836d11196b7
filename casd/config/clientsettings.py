# -*- test-case-name: tests.test_autodiscover -*-
"""
What clients are told to configure: host names, ports, TLS modes and URLs, derived from the
listeners and the C{[autodiscover]} section.

Autodiscover (Outlook, ActiveSync devices, Thunderbird, Apple profiles) and C{casd dns-records}
speak from this one derivation, so the DNS records an operator publishes and the settings clients
receive cannot disagree.  A minimal configuration (no C{[autodiscover]} section) answers correctly:
host names come from C{[server] hostname}, ports and TLS modes from the enabled listeners, URLs
from the HTTPS listener.
"""

from __future__ import annotations

import uuid
from typing import Iterable, Mapping

from attrs import field, frozen

from casd.config.settings import ConfigError, Setting, Values, readSection
from casd.session.clientinfo import isTrusted

#: What a domain may advertise.  The first three are the mail protocols; the rest live on HTTPS.
ADVERTISABLE = ("imap", "pop3", "smtp", "ews", "activesync", "owa", "oab")
HTTP_SERVICES = ("ews", "activesync", "owa", "oab")

#: The names the HTTPS front end's section may have.
HTTP_SECTIONS = ("http", "https")

#: Fixed paths of the Exchange-style services on the HTTPS front end.
PATHS = {
    "ews": "/EWS/Exchange.asmx",
    "activesync": "/Microsoft-Server-ActiveSync",
    "owa": "/owa/",
    "oab": "/OAB/",
    "autodiscover": "/autodiscover/autodiscover.xml",
}

#: EWS schema name -> (major, minor, build) of the Exchange version that introduced it; the POX
#: C{ServerVersion} and the SOAP answers report the newest one advertised.
EWS_BUILDS = {
    "Exchange2007": (8, 0, 685),
    "Exchange2007_SP1": (8, 1, 240),
    "Exchange2010": (14, 0, 639),
    "Exchange2010_SP1": (14, 1, 218),
    "Exchange2010_SP2": (14, 2, 247),
    "Exchange2013": (15, 0, 516),
    "Exchange2013_SP1": (15, 0, 847),
    "Exchange2016": (15, 1, 225),
    "Exchange2019": (15, 2, 221),
}

_URL_KEYS = ("ews_url", "activesync_url", "owa_url", "oab_url")

AUTODISCOVER_SETTINGS = (
    Setting(
        "enabled",
        "bool",
        True,
        "Answer Autodiscover, Thunderbird autoconfig and Apple profile requests on the HTTPS"
        " listeners.",
    ),
    Setting(
        "external_host",
        "str",
        "",
        "Host name clients outside C{internal_networks} are given; empty: C{[server] hostname}.",
    ),
    Setting(
        "internal_host",
        "str",
        "",
        "Host name clients inside C{internal_networks} are given; empty: C{external_host}.",
    ),
    Setting(
        "internal_networks",
        "networks",
        (),
        "Client networks that get the internal host and URLs; empty: C{[server] trusted_networks}.",
    ),
    Setting(
        "https_port",
        "int",
        0,
        "Port clients reach HTTPS on (behind NAT or a load balancer); 0: the HTTPS listener's.",
        minimum=0,
    ),
    Setting("imap_port", "int", 0, "Advertised IMAP port; 0: the IMAP listeners'.", minimum=0),
    Setting("pop3_port", "int", 0, "Advertised POP3 port; 0: the POP3 listeners'.", minimum=0),
    Setting(
        "submission_port", "int", 0, "Advertised submission port; 0: the submission listeners'.", minimum=0
    ),
    Setting(
        "advertise",
        "strlist",
        (),
        "What to advertise, of " + ", ".join(ADVERTISABLE) + "; empty: every mail protocol with a TLS"
        " listener, and the HTTPS services when the HTTPS front end is on.",
    ),
    Setting("ews_url", "str", "", "External EWS URL; empty: https://HOST/EWS/Exchange.asmx."),
    Setting(
        "activesync_url",
        "str",
        "",
        "External ActiveSync URL; empty: https://HOST/Microsoft-Server-ActiveSync.",
    ),
    Setting("owa_url", "str", "", "External web mail URL; empty: https://HOST/owa/."),
    Setting("oab_url", "str", "", "External offline address book URL; empty: https://HOST/OAB/."),
    Setting(
        "ews_versions",
        "strlist",
        ("Exchange2013", "Exchange2013_SP1", "Exchange2016"),
        "EWS schema versions advertised (EwsSupportedSchemas; the newest sets the server version).",
    ),
    Setting(
        "organization",
        "str",
        "casd",
        "Organisation name in the users' legacy distinguished names (/o=ORGANIZATION/...).",
    ),
    Setting(
        "deployment_id",
        "str",
        "",
        "Deployment GUID reported to Outlook; empty: one derived from the external host.",
    ),
    Setting(
        "sign_mobileconfig",
        "bool",
        True,
        "Sign Apple profiles with the [tls] certificate so devices show them as verified.",
    ),
)

DOMAIN_SETTINGS = (
    Setting("display_name", "str", "", "Name clients show for the account's provider; empty: the domain."),
    Setting("short_name", "str", "", "Short provider name (Thunderbird); empty: the first label."),
    Setting("advertise", "strlist", (), "What to advertise for this domain; empty: the global list."),
    Setting("external_host", "str", "", "This domain's external host; empty: the global one."),
    Setting("internal_host", "str", "", "This domain's internal host; empty: the global one."),
    Setting(
        "redirect_url",
        "str",
        "",
        "Another organisation answers for this domain: Autodiscover clients are sent to this URL.",
    ),
)


@frozen
class DomainConfig:
    """
    One C{[autodiscover.domains.NAME]} table.
    """

    name: str
    values: Values


@frozen
class AutodiscoverConfig:
    """
    The validated C{[autodiscover]} section.
    """

    values: Values
    domains: Mapping[str, DomainConfig] = field(factory=dict)

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.values, name)


def defaultAutodiscoverConfig() -> AutodiscoverConfig:
    return AutodiscoverConfig(Values({s.key: s.default for s in AUTODISCOVER_SETTINGS}))


def readAutodiscover(path, data, base) -> AutodiscoverConfig:
    """
    Read the C{[autodiscover]} section and its C{[autodiscover.domains.NAME]} tables.

    @raise ConfigError: naming the key.
    """
    table = data.get("autodiscover", {})
    v = readSection(path, "autodiscover", table, AUTODISCOVER_SETTINGS, base, extra=("domains",))
    _checkAdvertise(path, "autodiscover.advertise", v.advertise)
    for name in v.ews_versions:
        if name not in EWS_BUILDS:
            raise ConfigError(
                path, "autodiscover.ews_versions", f"expected names among {', '.join(EWS_BUILDS)}, got {name!r}"
            )
    for key in _URL_KEYS:
        _checkURL(path, f"autodiscover.{key}", getattr(v, key))
    raw = table.get("domains", {})
    if not isinstance(raw, dict):
        raise ConfigError(path, "autodiscover.domains", "expected a table of [autodiscover.domains.NAME] tables")
    domains = {}
    for name, item in raw.items():
        where = f"autodiscover.domains.{name}"
        d = readSection(path, where, item, DOMAIN_SETTINGS, base)
        _checkAdvertise(path, f"{where}.advertise", d.advertise)
        _checkURL(path, f"{where}.redirect_url", d.redirect_url)
        domains[name.lower()] = DomainConfig(name.lower(), d)
    return AutodiscoverConfig(v, domains)


def _checkAdvertise(path, key, names) -> None:
    for name in names:
        if name not in ADVERTISABLE:
            raise ConfigError(path, key, f"expected names among {', '.join(ADVERTISABLE)}, got {name!r}")


def _checkURL(path, key, url) -> None:
    if url and not url.startswith("https://"):
        raise ConfigError(path, key, f"expected an https:// URL, got {url!r}")


# -- listeners -----------------------------------------------------------------------------------


def endpointPort(endpoint: str) -> int:
    """
    The port of a Twisted server endpoint string, or 0 when it has none (C{unix:}, C{systemd:}).

    >>> endpointPort("haproxy:tcp:993:interface=127.0.0.1")
    993
    """
    parts = endpoint.split(":")
    if parts and parts[0] == "haproxy":
        parts = parts[1:]
    if not parts or parts[0] not in ("tcp", "tcp6", "ssl", "ssl6", "tls"):
        return 0
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if sep and key == "port":
            return int(value) if value.isdigit() else 0
        if not sep:
            return int(part) if part.isdigit() else 0
    return 0


@frozen
class MailServer:
    """
    One way to reach a mail protocol.

    @ivar protocol: C{imap}, C{pop3} or C{smtp} (submission).
    @ivar socketType: C{SSL} (TLS from the first byte) or C{STARTTLS}.
    """

    protocol: str
    host: str
    port: int
    socketType: str

    @property
    def implicitTLS(self) -> bool:
        return self.socketType == "SSL"


#: casd's section name of each advertised mail protocol.
_SECTIONS = {"imap": "imap", "pop3": "pop3", "smtp": "submission"}
_PORT_KEYS = {"imap": "imap_port", "pop3": "pop3_port", "smtp": "submission_port"}


def _listenerPorts(config, protocol: str) -> list[tuple[int, str]]:
    """
    (port, socketType) of each TLS listener of a protocol, implicit TLS first (RFC 8314).
    """
    section = config.protocols.get(_SECTIONS[protocol])
    if section is None or not section.enabled:
        return []
    found = []
    for listener in section.listeners:
        port = endpointPort(listener.endpoint)
        if not port or listener.tls == "none":
            continue
        if listener.tls == "starttls" and not config.tls.enabled:
            continue  # no certificate: STARTTLS is not offered there
        kind = "SSL" if listener.tls == "implicit" else "STARTTLS"
        if (port, kind) not in found:
            found.append((port, kind))
    found.sort(key=lambda pk: pk[1] != "SSL")
    return found


def httpsPort(config) -> int:
    """
    The port clients reach the HTTPS front end on, or 0 when it has no TLS listener.
    """
    if config.autodiscover.https_port:
        return config.autodiscover.https_port
    for name in HTTP_SECTIONS:
        section = config.protocols.get(name)
        if section is None or not section.enabled:
            continue
        for listener in section.listeners:
            port = endpointPort(listener.endpoint)
            if port and listener.tls == "implicit":
                return port
        if section.listeners and getattr(section.values, "plain_http", "") == "serve":
            # TLS ends at a load balancer in front: clients reach it on the redirect port.
            return getattr(section.values, "https_port", 443)
    return 0


# -- the derivation ------------------------------------------------------------------------------


@frozen
class DomainSettings:
    """
    Everything a client of one domain is told, in one network view (internal or external).

    @ivar servers: the mail servers in preference order (implicit TLS before STARTTLS).
    @ivar ewsUrl: and the other URLs: C{""} when not advertised.
    @ivar redirectUrl: another organisation answers for this domain (C{""}: we do).
    """

    domain: str
    displayName: str
    shortName: str
    host: str
    internal: bool
    servers: tuple[MailServer, ...]
    ewsUrl: str
    activeSyncUrl: str
    owaUrl: str
    oabUrl: str
    autodiscoverUrl: str
    ewsVersions: tuple[str, ...]
    redirectUrl: str
    organization: str
    deploymentId: str

    def server(self, protocol: str) -> MailServer | None:
        """
        The preferred server of a mail protocol, or C{None}.
        """
        for s in self.servers:
            if s.protocol == protocol:
                return s
        return None

    @property
    def serverVersion(self) -> str:
        """
        The newest advertised Exchange build as POX's C{ServerVersion} (8 hex digits: 4 bits of
        structure version, 6 major, 6 minor, 1 flag, 15 build).
        """
        major, minor, build = self.build
        return f"{(0x7 << 28) | (major << 22) | (minor << 16) | (1 << 15) | build:08X}"

    @property
    def build(self) -> tuple[int, int, int]:
        builds = [EWS_BUILDS[v] for v in self.ewsVersions] or [EWS_BUILDS["Exchange2016"]]
        return max(builds)

    def legacyDN(self, login: str) -> str:
        """
        A legacy Exchange distinguished name for a user (Outlook keys its profile on it).
        """
        safe = "".join(c for c in login if c.isalnum() or c in "._-") or "user"
        return (
            f"/o={self.organization}/ou=Exchange Administrative Group (FYDIBOHF23SPDLT)"
            f"/cn=Recipients/cn={safe}"
        )


class ClientSettings:
    """
    The derivation of client settings from a L{casd.config.CASConfig}.
    """

    #: Most derived views kept (domains asked about are bounded by the directory's and the
    #: configuration's, but an unlisted-domains setup answers for any).
    cacheSize = 1024

    def __init__(self, config) -> None:
        self.config = config
        self.section: AutodiscoverConfig = config.autodiscover
        self._views: dict[tuple[str, bool], DomainSettings] = {}

    @property
    def internalNetworks(self):
        return self.section.internal_networks or self.config.server.trusted_networks

    def isInternal(self, clientHost: str) -> bool:
        """
        Whether a client at C{clientHost} gets the internal host and URLs.
        """
        return isTrusted(clientHost, tuple(self.internalNetworks))

    def domainConfig(self, domain: str) -> DomainConfig | None:
        return self.section.domains.get(domain.lower())

    def servesDomain(self, domain: str) -> bool:
        """
        Whether casd answers for C{domain}: any domain when none is listed, else the listed ones.
        """
        return not self.section.domains or domain.lower() in self.section.domains

    def domains(self) -> tuple[str, ...]:
        return tuple(self.section.domains)

    def hosts(self, domain: str) -> tuple[str, str]:
        """
        (external, internal) host names for a domain.
        """
        d = self.domainConfig(domain)
        external = (d and d.values.external_host) or self.section.external_host or self.config.hostname
        internal = (d and d.values.internal_host) or self.section.internal_host or external
        return external.lower(), internal.lower()

    def advertised(self, domain: str) -> tuple[str, ...]:
        """
        What a domain advertises, explicit or derived.
        """
        d = self.domainConfig(domain)
        if d is not None and d.values.advertise:
            return tuple(d.values.advertise)
        if self.section.advertise:
            return tuple(self.section.advertise)
        derived = [p for p in ("imap", "pop3", "smtp") if _listenerPorts(self.config, p)]
        if httpsPort(self.config):
            derived.extend(HTTP_SERVICES)
        return tuple(derived)

    def mailServers(self, domain: str, host: str) -> tuple[MailServer, ...]:
        advertised = self.advertised(domain)
        servers = []
        for protocol in ("imap", "pop3", "smtp"):
            if protocol not in advertised:
                continue
            override = getattr(self.section, _PORT_KEYS[protocol])
            for port, kind in _listenerPorts(self.config, protocol):
                if override:
                    port = override
                server = MailServer(protocol, host, port, kind)
                if server not in servers:
                    servers.append(server)
        return tuple(servers)

    def baseURL(self, host: str) -> str:
        port = httpsPort(self.config)
        return f"https://{host}" + (f":{port}" if port and port != 443 else "")

    def forDomain(self, domain: str, internal: bool = False) -> DomainSettings:
        """
        The settings of a domain as a client inside (C{internal}) or outside sees them.
        """
        domain = domain.lower()
        key = (domain, internal)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self.cacheSize:
                self._views.clear()
            view = self._views[key] = self._derive(domain, internal)
        return view

    def _derive(self, domain: str, internal: bool) -> DomainSettings:
        d = self.domainConfig(domain)
        external, internalHost = self.hosts(domain)
        host = internalHost if internal else external
        advertised = self.advertised(domain)
        base = self.baseURL(host)

        def url(service: str) -> str:
            if service not in advertised:
                return ""
            configured = getattr(self.section, f"{service}_url")
            if configured and not internal:
                return configured
            return base + PATHS[service]

        display = (d and d.values.display_name) or domain
        short = (d and d.values.short_name) or domain.split(".")[0]
        return DomainSettings(
            domain=domain,
            displayName=display,
            shortName=short,
            host=host,
            internal=internal,
            servers=self.mailServers(domain, host),
            ewsUrl=url("ews"),
            activeSyncUrl=url("activesync"),
            owaUrl=url("owa"),
            oabUrl=url("oab"),
            autodiscoverUrl=(base + PATHS["autodiscover"]) if httpsPort(self.config) else "",
            ewsVersions=tuple(self.section.ews_versions),
            redirectUrl=(d and d.values.redirect_url) or "",
            organization=self.section.organization,
            deploymentId=self.deploymentId,
        )

    @property
    def deploymentId(self) -> str:
        if self.section.deployment_id:
            return self.section.deployment_id
        return str(uuid.uuid5(uuid.NAMESPACE_DNS, self.hosts("")[0] or "casd"))

    def certificateNames(self, domain: str) -> tuple[str, ...]:
        """
        The names the TLS certificate must cover for a domain's clients.
        """
        external, internal = self.hosts(domain)
        names = [external, f"autodiscover.{domain.lower()}", f"autoconfig.{domain.lower()}"]
        if internal != external:
            names.append(internal)
        return tuple(dict.fromkeys(names))


def certificateCovers(patterns: Iterable[str], name: str) -> bool:
    """
    Whether a certificate's DNS names cover C{name} (RFC 6125: a wildcard only as the whole
    left-most label, matching exactly one label).
    """
    name = name.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern == name:
            return True
        if pattern.startswith("*.") and "." in name:
            if name.split(".", 1)[1] == pattern[2:]:
                return True
    return False
