# -*- test-case-name: tests.test_config -*-
"""
casd's configuration: one TOML file, parsed once into frozen, validated objects.

Every key is declared once as a L{Setting} (its type, default and documentation), so validation,
defaults and C{docs/configuration.md} speak from the same table.  An error names the file, the
key and what was expected, in one line.
"""

from __future__ import annotations

import os
import socket
import tomllib
from typing import Any, Iterable, Mapping

from attrs import field, frozen

from twisted.internet.endpoints import serverFromString
from twisted.python.filepath import FilePath
from twisted.internet.testing import MemoryReactor
from casd.config.clientsettings import (
    AUTODISCOVER_SETTINGS,
    DOMAIN_SETTINGS,
    AutodiscoverConfig,
    defaultAutodiscoverConfig,
    readAutodiscover,
)
from casd.config.settings import (  # re-exported: importers use casd.config
    AUTH_SETTINGS,
    ConfigError,
    DEMO_SETTINGS,
    LDAP_SETTINGS,
    LISTENER_SETTINGS,
    PROTOCOL_COMMON_SETTINGS,
    SERVER_SETTINGS,
    SNI_SETTINGS,
    STATE_SETTINGS,
    Setting,
    TLS_MODES,
    TLS_SETTINGS,
    Values,
    readSection,
)
from casd.config.routingsettings import (  # re-exported too
    BACKEND_PROTOCOL_SETTINGS,
    BACKEND_SERVER_SETTINGS,
    BACKEND_SETTINGS,
    GROUP_SETTINGS,
    HEALTH_SETTINGS,
    LOCATORS,
    ROUTING_SETTINGS,
    SITE_SETTINGS,
    TIMEOUT_KEYS,
)
from casd.config.operations import ADMIN_SETTINGS, LOG_SETTINGS


@frozen
class ListenerConfig:
    """
    One listening endpoint of a protocol.

    @ivar wrapTLS: C{True} when casd itself wraps the endpoint in TLS (C{tls = "implicit"} on a
        plain endpoint); an C{ssl:} endpoint does its own.
    """

    name: str
    endpoint: str
    tls: str
    trusted: bool
    wrapTLS: bool
    #: On a C{haproxy:} endpoint, the networks whose PROXY header is believed.
    proxyTrusted: tuple = ()
    #: C{"close"} or C{"ignore"}: what a C{haproxy:} endpoint does with a peer outside them.
    proxyUntrusted: str = "close"

    @property
    def proxyProtocol(self) -> bool:
        """
        Whether the endpoint reads a PROXY header (C{haproxy:}).
        """
        return self.endpoint.startswith("haproxy:")


@frozen(slots=False)
class ProtocolSection:
    """
    The validated section of one protocol: common keys and the protocol's own, as attributes.
    """

    name: str
    enabled: bool
    listeners: tuple[ListenerConfig, ...]
    values: Values

    def __attrs_post_init__(self) -> None:
        own = self.__dict__
        for key, value in self.values.asDict().items():  # plain attributes: no call per read
            own.setdefault(key, value)  # the fields above keep their own

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.values, name)


@frozen
class BackendProtocol:
    """
    How to speak one protocol to one backend server.
    """

    port: int
    tls: str
    masterUser: str = ""
    masterPassword: bytes = field(default=b"", repr=False)


@frozen
class BackendServer:
    """
    A mailbox server (or another site's casd).

    @ivar timeouts: the C{[backend]} timeouts this server overrides, key -> seconds.
    """

    name: str
    host: str
    tlsName: str
    protocols: Mapping[str, BackendProtocol] = field(factory=dict)
    site: str = ""
    drain: bool = False
    weight: int = 1
    healthCheck: bool = True
    timeouts: Mapping[str, float] = field(factory=dict)
    #: The protocols this server serves; C{None} means every protocol.
    serves: frozenset[str] | None = None

    def servesProtocol(self, name: str) -> bool:
        """
        Whether this server serves protocol C{name} (C{[backends.NAME] protocols}).
        """
        return self.serves is None or name in self.serves


@frozen
class BackendGroup:
    """
    A named set of backend servers holding the same mailboxes (a database availability group).

    @ivar members: server names in preference order.
    @ivar balance: C{"order"} or C{"hash"}.
    """

    name: str
    members: tuple[str, ...]
    balance: str = "order"
    site: str = ""


@frozen
class SiteConfig:
    """
    What this node does with users whose mailbox is in another site.
    """

    name: str
    action: str
    cas: str = ""
    redirectURL: str = ""


@frozen
class SNICertificate:
    names: tuple[str, ...]
    certificate: str
    key: str


@frozen
class TLSConfig:
    certificate: str
    key: str
    minimumVersion: str
    sni: tuple[SNICertificate, ...]
    #: The session-ticket key file, or C{""}.
    ticketKeys: str = ""

    @property
    def enabled(self) -> bool:
        return bool(self.certificate)


@frozen
class CASConfig:
    """
    The whole, validated configuration.
    """

    path: str
    server: Values
    tls: TLSConfig
    auth: Values
    routing: Values
    backend: Values
    backends: Mapping[str, BackendServer]
    protocols: Mapping[str, ProtocolSection]
    demo: Values
    groups: Mapping[str, BackendGroup] = field(factory=dict)
    sites: Mapping[str, SiteConfig] = field(factory=dict)
    health: Values = field(factory=lambda: Values({s.key: s.default for s in HEALTH_SETTINGS}))
    #: The static map file's entries: lower-cased user, address or domain -> server or group.
    routeMap: Mapping[str, str] = field(factory=dict)
    #: The C{[ldap]} section (C{urls} empty: no LDAP checker).
    ldap: Values = field(factory=lambda: Values({s.key: s.default for s in LDAP_SETTINGS}))
    #: The C{[admin]} section (C{listen} empty: no admin listener).
    admin: Values = field(factory=lambda: Values({s.key: s.default for s in ADMIN_SETTINGS}))
    #: The C{[log]} section.
    log: Values = field(factory=lambda: Values({s.key: s.default for s in LOG_SETTINGS}))
    #: The C{[autodiscover]} section (L{casd.config.clientsettings}).
    autodiscover: AutodiscoverConfig = field(factory=defaultAutodiscoverConfig)

    #: The C{[state]} section: where the array's shared state lives.
    state: Values = field(factory=lambda: Values({s.key: s.default for s in STATE_SETTINGS}))

    @property
    def hostname(self) -> str:
        return self.server.hostname or socket.getfqdn()


def _requireFile(path: str, key: str, value: str, what: str) -> None:
    if value and not os.access(value, os.R_OK):
        raise ConfigError(path, key, f"{what} {value!r} does not exist or is not readable")


def _checkEndpoint(path: str, key: str, description: str) -> None:
    try:
        serverFromString(MemoryReactor(), description)
    except Exception as e:
        reason = str(e) or type(e).__name__
        raise ConfigError(
            path, key, f"expected a Twisted endpoint string such as \"tcp:1143\" ({reason})"
        ) from None


def _readListeners(path, prefix, table, protocol, base) -> tuple[ListenerConfig, ...]:
    raw = table.get("listen")
    if raw is None:
        raw = list(protocol.defaultListeners)
    if not isinstance(raw, list):
        raise ConfigError(path, f"{prefix}.listen", "expected an array of tables [[...listen]]")
    listeners = []
    for i, item in enumerate(raw):
        where = f"{prefix}.listen[{i}]"
        v = readSection(path, where, item, LISTENER_SETTINGS, base)
        if not v.endpoint:
            raise ConfigError(path, f"{where}.endpoint", "expected an endpoint string, it is missing")
        _checkEndpoint(path, f"{where}.endpoint", v.endpoint)
        kind = v.endpoint.split(":", 1)[0]
        if kind == "haproxy":
            kind = v.endpoint.split(":", 2)[1]
            if not v.proxy_trusted:
                # No default that believes everyone: a forged header would make anyone trusted.
                raise ConfigError(
                    path,
                    f"{where}.proxy_trusted",
                    "a haproxy: listener needs the networks of its load balancers (e.g."
                    " [\"10.0.0.0/24\"]), whose PROXY headers alone are believed",
                )
        elif v.proxy_trusted:
            raise ConfigError(path, f"{where}.proxy_trusted", "expected only on a haproxy: endpoint")
        implicitByEndpoint = kind == "ssl"
        tls = "implicit" if implicitByEndpoint else v.tls
        listeners.append(
            ListenerConfig(
                name=v.name or f"{protocol.name}-{v.endpoint}",
                endpoint=v.endpoint,
                tls=tls,
                trusted=v.trusted,
                wrapTLS=(tls == "implicit" and not implicitByEndpoint),
                proxyTrusted=v.proxy_trusted,
                proxyUntrusted=v.proxy_untrusted,
            )
        )
    return tuple(listeners)


def protocolSettings(protocol) -> tuple[Setting, ...]:
    """
    The keys of a protocol's section: those every protocol has, with the protocol's own
    declarations taking precedence (a protocol may redeclare a common key, e.g. C{enabled} with
    default C{false} so that an older configuration opens no new port).
    """
    merged = {s.key: s for s in PROTOCOL_COMMON_SETTINGS}
    merged.update((s.key, s) for s in protocol.settings)
    return tuple(merged.values())


def _readProtocols(path, data, protocols, base) -> dict[str, ProtocolSection]:
    sections = {}
    for protocol in protocols:
        name = protocol.name
        table = data.get(name, {})
        values = readSection(
            path,
            name,
            table,
            protocolSettings(protocol),
            base,
            extra=("listen",),
        )
        listeners = _readListeners(path, name, table, protocol, base) if values.enabled else ()
        sections[name] = ProtocolSection(name, values.enabled, listeners, values)
    return sections


def _readBackends(path, data, protocols, base) -> dict[str, BackendServer]:
    table = data.get("backends", {})
    if not isinstance(table, dict):
        raise ConfigError(path, "backends", "expected a table of [backends.NAME] tables")
    names = {p.name for p in protocols}
    servers = {}
    for name, item in table.items():
        prefix = f"backends.{name}"
        v = readSection(path, prefix, item, BACKEND_SERVER_SETTINGS, base, extra=names)
        if not v.host:
            raise ConfigError(path, f"{prefix}.host", "expected a host name or address, it is missing")
        serves = _readServes(path, prefix, item, v.protocols, names)
        perProtocol = {}
        for protocol in protocols:
            sub = item.get(protocol.name, {})
            where = f"{prefix}.{protocol.name}"
            p = readSection(path, where, sub, BACKEND_PROTOCOL_SETTINGS, base)
            password = b""
            if p.master_user:
                if not p.master_password_file:
                    raise ConfigError(
                        path, f"{where}.master_password_file", "expected a file, required with master_user"
                    )
                _requireFile(path, f"{where}.master_password_file", p.master_password_file, "file")
                with open(p.master_password_file, "rb") as f:
                    password = f.read().strip()
            perProtocol[protocol.name] = BackendProtocol(
                port=p.port or protocol.defaultBackendPort,
                tls=p.tls or protocol.defaultBackendTLS,
                masterUser=p.master_user,
                masterPassword=password,
            )
        servers[name] = BackendServer(
            name,
            v.host,
            v.tls_name or v.host,
            perProtocol,
            site=v.site,
            drain=v.drain,
            weight=v.weight,
            healthCheck=v.health_check,
            timeouts={k: getattr(v, k) for k in TIMEOUT_KEYS if getattr(v, k)},
            serves=serves,
        )
    return servers


def _readServes(path, prefix, item, listed, names) -> frozenset[str] | None:
    """
    The C{protocols} a C{[backends.NAME]} serves: C{None} for C{["*"]}, every protocol.

    @raise ConfigError: for an unknown name, an empty list, or a C{[backends.NAME.PROTOCOL]}
        table of a protocol the server does not serve.
    """
    if tuple(listed) == ("*",):
        return None
    if not listed:
        raise ConfigError(path, f"{prefix}.protocols", 'expected at least one protocol, or ["*"]')
    for name in listed:
        if name not in names:
            raise ConfigError(
                path,
                f"{prefix}.protocols",
                f"expected names of protocols ({', '.join(sorted(names))}) or [\"*\"], got {name!r}",
            )
    serves = frozenset(listed)
    for name in sorted(names - serves):
        if name in item:
            raise ConfigError(
                path,
                f"{prefix}.{name}",
                f"a [{prefix}.{name}] table for a protocol the server does not serve: expected"
                f" {name!r} in {prefix}.protocols",
            )
    return serves


def _readGroups(path, data, servers, base) -> dict[str, BackendGroup]:
    table = data.get("groups", {})
    if not isinstance(table, dict):
        raise ConfigError(path, "groups", "expected a table of [groups.NAME] tables")
    groups = {}
    for name, item in table.items():
        prefix = f"groups.{name}"
        if name in servers:
            raise ConfigError(path, prefix, f"expected a name no [backends.NAME] uses, {name!r} does")
        v = readSection(path, prefix, item, GROUP_SETTINGS, base)
        if not v.members:
            raise ConfigError(path, f"{prefix}.members", "expected at least one [backends.NAME]")
        for member in v.members:
            if member not in servers:
                raise ConfigError(
                    path, f"{prefix}.members", f"expected names of [backends.NAME] tables, got {member!r}"
                )
        if len(set(v.members)) != len(v.members):
            raise ConfigError(path, f"{prefix}.members", "expected each member once")
        site = v.site
        if not site:
            memberSites = {servers[m].site for m in v.members}
            site = memberSites.pop() if len(memberSites) == 1 else ""
        groups[name] = BackendGroup(name, tuple(v.members), v.balance, site)
    return groups


def _readSites(path, data, localSite, known, base) -> dict[str, SiteConfig]:
    table = data.get("sites", {})
    if not isinstance(table, dict):
        raise ConfigError(path, "sites", "expected a table of [sites.NAME] tables")
    sites = {}
    for name, item in table.items():
        prefix = f"sites.{name}"
        v = readSection(path, prefix, item, SITE_SETTINGS, base)
        if name == localSite:
            raise ConfigError(path, prefix, f"expected another site than this node's own ({name!r})")
        if v.action == "proxy" and v.cas not in known:
            raise ConfigError(
                path, f"{prefix}.cas", f"expected a [backends.NAME] or [groups.NAME], got {v.cas!r}"
            )
        if v.action == "redirect" and not v.redirect_url:
            raise ConfigError(path, f"{prefix}.redirect_url", "expected a URL, required by redirect")
        sites[name] = SiteConfig(name, v.action, v.cas, v.redirect_url)
    return sites


def readRouteMap(path: str, mapFile: str, known) -> dict[str, str]:
    """
    Read a static map file: C{KEY TARGET} a line, where KEY is a login, an address or a domain and
    TARGET a server or group name; C{#} starts a comment.

    @param known: the server and group names a TARGET may be.
    @raise ConfigError: naming the file and line of the first bad entry.
    """
    key = "routing.map_file"
    try:
        with open(mapFile, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(path, key, f"expected a readable UTF-8 file {mapFile!r} ({e})") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{mapFile}:{number}"
        if len(words) != 2:
            raise ConfigError(path, key, f"{where}: expected USER-OR-DOMAIN BACKEND-OR-GROUP")
        name, target = words[0].lower(), words[1]
        if target not in known:
            raise ConfigError(path, key, f"{where}: expected a [backends.NAME] or [groups.NAME], got {target!r}")
        if name in entries:
            raise ConfigError(path, key, f"{where}: {name!r} is mapped twice")
        entries[name] = target
    return entries


def _readLDAP(path, data, base) -> Values:
    ldap = readSection(path, "ldap", data.get("ldap", {}), LDAP_SETTINGS, base)
    if ldap.urls:
        from casd.auth.ldapsettings import SettingProblem, checkSettings

        _requireFile(path, "ldap.ca_file", ldap.ca_file, "CA file")
        _requireFile(path, "ldap.bind_password_file", ldap.bind_password_file, "password file")
        try:
            checkSettings(ldap)
        except SettingProblem as e:
            raise ConfigError(path, f"ldap.{e.key}", e.message) from None
    return ldap


def _readTLS(path, data, base) -> TLSConfig:
    table = data.get("tls", {})
    v = readSection(path, "tls", table, TLS_SETTINGS, base, extra=("sni",))
    _requireFile(path, "tls.certificate", v.certificate, "certificate file")
    _requireFile(path, "tls.key", v.key, "key file")
    if bool(v.certificate) != bool(v.key):
        raise ConfigError(path, "tls", "expected both certificate and key, or neither")
    sni = []
    raw = table.get("sni", [])
    if isinstance(raw, dict):
        # [tls.sni] written as one table (as the docs once showed): the same as one [[tls.sni]].
        raw = [raw]
    if not isinstance(raw, list):
        raise ConfigError(path, "tls.sni", "expected an array of tables [[tls.sni]]")
    for i, item in enumerate(raw):
        where = f"tls.sni[{i}]"
        s = readSection(path, where, item, SNI_SETTINGS, base)
        if not s.names:
            raise ConfigError(path, f"{where}.names", "expected at least one server name")
        for key in ("certificate", "key"):
            if not getattr(s, key):
                raise ConfigError(path, f"{where}.{key}", "expected a file, it is missing")
            _requireFile(path, f"{where}.{key}", getattr(s, key), f"{key} file")
        sni.append(SNICertificate(tuple(n.lower() for n in s.names), s.certificate, s.key))
    if sni and not v.certificate:
        raise ConfigError(path, "tls.certificate", "expected a default certificate beside [[tls.sni]]")
    _requireFile(path, "tls.ticket_keys", v.ticket_keys, "ticket key file")
    if v.ticket_keys:
        from casd.ticketkeys import TicketKeyError, readKeyFile

        try:
            readKeyFile(v.ticket_keys)
        except TicketKeyError as e:
            raise ConfigError(path, "tls.ticket_keys", f"{v.ticket_keys}: {e}") from None
    return TLSConfig(v.certificate, v.key, v.minimum_version, tuple(sni), v.ticket_keys)


TOP_LEVEL = (
    "server", "tls", "auth", "ldap", "routing", "backend", "backends", "groups", "sites", "health", "demo",
    "admin", "log",
    "autodiscover",

    "state",
)


def _readState(path, data, base) -> Values:
    from casd.state.redis import RedisURLError, parseURL

    state = readSection(path, "state", data.get("state", {}), STATE_SETTINGS, base)
    for url in state.urls:
        try:
            parseURL(url)
        except RedisURLError as e:
            raise ConfigError(path, "state.urls", str(e)) from None
    if state.backend == "redis":
        if not state.urls:
            raise ConfigError(path, "state.urls", 'expected at least one redis:// URL with backend = "redis"')
        if not state.secret_file:
            raise ConfigError(
                path, "state.secret_file", 'expected the array secret file with backend = "redis"'
            )
    _requireFile(path, "state.secret_file", state.secret_file, "secret file")
    if state.backend == "redis":
        from casd.state.keys import SecretError, readSecret

        try:
            readSecret(state.secret_file)
        except SecretError as e:
            raise ConfigError(path, "state.secret_file", str(e)) from None
    _requireFile(path, "state.password_file", state.password_file, "password file")
    _requireFile(path, "state.ca_file", state.ca_file, "CA file")
    return state


def parseConfig(text: str, path: str, protocols: Iterable[Any]) -> CASConfig:
    """
    Parse and validate a configuration.

    @param text: the TOML text.
    @param path: the file name, for error messages and to resolve relative paths.
    @param protocols: the L{casd.interfaces.ICASProtocol} providers known to this process.
    @raise ConfigError: on any problem.
    """
    protocols = tuple(protocols)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, "(syntax)", f"expected valid TOML: {e}") from None
    base = FilePath(os.path.dirname(os.path.abspath(path)))
    known = set(TOP_LEVEL) | {p.name for p in protocols}
    for key in data:
        if key not in known:
            raise ConfigError(
                path, key, "unknown section (expected one of: " + ", ".join(sorted(known)) + ")"
            )
    server = readSection(path, "server", data.get("server", {}), SERVER_SETTINGS, base)
    auth = readSection(path, "auth", data.get("auth", {}), AUTH_SETTINGS, base)
    _requireFile(path, "auth.users_file", auth.users_file, "users file")
    ldap = _readLDAP(path, data, base)
    routing = readSection(path, "routing", data.get("routing", {}), ROUTING_SETTINGS, base)
    backend = readSection(path, "backend", data.get("backend", {}), BACKEND_SETTINGS, base)
    _requireFile(path, "backend.ca_file", backend.ca_file, "CA file")
    demo = readSection(path, "demo", data.get("demo", {}), DEMO_SETTINGS, base)
    tls = _readTLS(path, data, base)
    backends = _readBackends(path, data, protocols, base)
    groups = _readGroups(path, data, backends, base)
    targets = set(backends) | set(groups)
    if routing.default_backend and routing.default_backend not in targets:
        raise ConfigError(
            path,
            "routing.default_backend",
            f"expected the name of a [backends.NAME] or [groups.NAME] table, got"
            f" {routing.default_backend!r}",
        )
    if routing.hash_group and routing.hash_group not in groups:
        raise ConfigError(
            path, "routing.hash_group", f"expected a [groups.NAME], got {routing.hash_group!r}"
        )
    for name in routing.locators:
        if name not in LOCATORS or routing.locators.count(name) > 1:
            raise ConfigError(
                path, "routing.locators", f"expected each of {', '.join(LOCATORS)} at most once, got {name!r}"
            )
    routeMap = readRouteMap(path, routing.map_file, targets) if routing.map_file else {}
    sites = _readSites(path, data, server.site, targets, base)
    health = readSection(path, "health", data.get("health", {}), HEALTH_SETTINGS, base)
    sections = _readProtocols(path, data, protocols, base)
    admin = readSection(path, "admin", data.get("admin", {}), ADMIN_SETTINGS, base)
    if admin.listen:
        _checkEndpoint(path, "admin.listen", admin.listen)
    if admin.tls == "implicit" and not tls.enabled:
        raise ConfigError(path, "admin.tls", "expected [tls] certificate and key for an HTTPS admin listener")
    logSection = readSection(path, "log", data.get("log", {}), LOG_SETTINGS, base)
    autodiscover = readAutodiscover(path, data, base)

    state = _readState(path, data, base)
    for section in sections.values():
        for listener in section.listeners:
            if listener.wrapTLS and not tls.enabled:
                raise ConfigError(
                    path,
                    f"{section.name}.listen",
                    f"listener {listener.name!r} has tls = \"implicit\": expected [tls] certificate"
                    " and key",
                )
    return CASConfig(
        path=path,
        server=server,
        tls=tls,
        auth=auth,
        routing=routing,
        backend=backend,
        backends=backends,
        protocols=sections,
        demo=demo,
        groups=groups,
        sites=sites,
        health=health,
        routeMap=routeMap,
        ldap=ldap,
        admin=admin,
        log=logSection,
        autodiscover=autodiscover,

        state=state,
    )


def loadConfig(path: str, protocols: Iterable[Any]) -> CASConfig:
    """
    Read and parse the configuration file at C{path}.

    @raise ConfigError: when the file cannot be read or is invalid.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, "(file)", f"expected a readable file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(path, "(file)", "expected UTF-8 text") from None
    return parseConfig(text, path, protocols)


def allSettings() -> dict[str, tuple[Setting, ...]]:
    """
    Every core section's settings, for the configuration reference and its test.
    """
    return {
        "server": SERVER_SETTINGS,
        "tls": TLS_SETTINGS,
        "tls.sni": SNI_SETTINGS,
        "auth": AUTH_SETTINGS,
        "ldap": LDAP_SETTINGS,
        "routing": ROUTING_SETTINGS,
        "backend": BACKEND_SETTINGS,
        "backends.NAME": BACKEND_SERVER_SETTINGS,
        "backends.NAME.PROTOCOL": BACKEND_PROTOCOL_SETTINGS,
        "groups.NAME": GROUP_SETTINGS,
        "sites.NAME": SITE_SETTINGS,
        "health": HEALTH_SETTINGS,
        "PROTOCOL": PROTOCOL_COMMON_SETTINGS,
        "PROTOCOL.listen": LISTENER_SETTINGS,
        "demo": DEMO_SETTINGS,
        "admin": ADMIN_SETTINGS,
        "log": LOG_SETTINGS,
        "autodiscover": AUTODISCOVER_SETTINGS,
        "autodiscover.domains.NAME": DOMAIN_SETTINGS,

        "state": STATE_SETTINGS,
    }
