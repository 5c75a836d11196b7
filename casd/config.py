"""
casd's configuration: one TOML file, parsed once into frozen, validated objects.

Every key is declared once as a L{Setting} (its type, default and documentation), so validation,
defaults and C{docs/configuration.md} speak from the same table.  An error names the file, the
key and what was expected, in one line.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tomllib
from typing import Any, Iterable, Mapping

import attr
from attrs import field, frozen

from twisted.internet.endpoints import serverFromString
from twisted.python.filepath import FilePath
from twisted.test.proto_helpers import MemoryReactor

TLS_MODES = ("none", "starttls", "implicit")


class ConfigError(Exception):
    """
    The configuration is unusable.  C{str()} is one line naming the file, the key and what was
    expected.
    """

    def __init__(self, path: str, key: str, message: str) -> None:
        super().__init__(f"{path}: {key}: {message}")
        self.path = path
        self.key = key
        self.message = message


@frozen
class Setting:
    """
    The declaration of one configuration key.

    @ivar key: the TOML key.
    @ivar kind: one of C{str}, C{int}, C{float}, C{bool}, C{strlist}, C{path}, C{choice},
        C{networks}.
    @ivar default: the value when the key is absent.
    @ivar doc: one sentence for the configuration reference.
    @ivar choices: for C{choice}, the allowed values.
    @ivar minimum: for numbers, the smallest allowed value.
    """

    key: str
    kind: str
    default: Any
    doc: str
    choices: tuple = ()
    minimum: float | None = None


class Values:
    """
    A frozen bag of validated settings with attribute access, e.g. C{section.max_line_length}.
    """

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any]) -> None:
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise attr.exceptions.FrozenInstanceError()

    def __repr__(self) -> str:
        return f"Values({self._values!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Values) and other._values == self._values

    def asDict(self) -> dict[str, Any]:
        return dict(self._values)


def _where(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check(path: str, where: str, setting: Setting, value: Any, base: FilePath) -> Any:
    kind = setting.kind

    def bad(expected: str) -> ConfigError:
        return ConfigError(path, where, f"expected {expected}, got {value!r}")

    if kind in ("str", "path", "choice"):
        if not isinstance(value, str):
            raise bad("a string")
        if kind == "choice" and value not in setting.choices:
            raise bad("one of " + ", ".join(repr(c) for c in setting.choices))
        if kind == "path" and value:
            return base.preauthChild(value).path if not os.path.isabs(value) else value
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        if kind == "int" and not isinstance(value, int):
            raise bad("a whole number")
        if setting.minimum is not None and value < setting.minimum:
            raise bad(f"a number of at least {setting.minimum}")
        return value
    if kind == "strlist":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of strings")
        return tuple(value)
    if kind == "networks":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad("a list of networks such as \"127.0.0.0/8\"")
        try:
            return tuple(ipaddress.ip_network(v, strict=False) for v in value)
        except ValueError as e:
            raise bad(f"networks such as \"10.0.0.0/8\" ({e})") from None
    raise AssertionError(f"unknown setting kind {kind!r}")


def readSection(
    path: str,
    prefix: str,
    table: Any,
    settings: Iterable[Setting],
    base: FilePath,
    extra: Iterable[str] = (),
) -> Values:
    """
    Validate one TOML table against its settings.

    @param prefix: the table's dotted name, for error messages.
    @param extra: keys handled by the caller (sub-tables), not reported as unknown.
    @raise ConfigError: on an unknown key or a value of the wrong type.
    """
    if not isinstance(table, dict):
        raise ConfigError(path, prefix, f"expected a table, got {table!r}")
    settings = tuple(settings)
    known = {s.key for s in settings} | set(extra)
    for key in table:
        if key not in known:
            raise ConfigError(
                path, _where(prefix, key), "unknown key (expected one of: " + ", ".join(sorted(known)) + ")"
            )
    values = {}
    for s in settings:
        if s.key in table:
            values[s.key] = _check(path, _where(prefix, s.key), s, table[s.key], base)
        else:
            values[s.key] = s.default
    return Values(values)


SERVER_SETTINGS = (
    Setting("hostname", "str", "", "Name used in greetings and logs; empty means the machine's FQDN."),
    Setting("site", "str", "", "The site (data centre) this node belongs to."),
    Setting(
        "trusted_networks",
        "networks",
        (),
        "Client networks allowed plaintext authentication without TLS and exempt from penalties.",
    ),
)

TLS_SETTINGS = (
    Setting("certificate", "path", "", "PEM file with the server certificate and its chain."),
    Setting("key", "path", "", "PEM file with the private key of C{certificate}."),
    Setting(
        "minimum_version",
        "choice",
        "TLSv1.2",
        "Oldest TLS version accepted from clients.",
        choices=("TLSv1.2", "TLSv1.3"),
    ),
)

SNI_SETTINGS = (
    Setting("names", "strlist", (), "Server names (SNI) this certificate answers for."),
    Setting("certificate", "path", "", "PEM file with the certificate and its chain."),
    Setting("key", "path", "", "PEM file with the private key."),
)

AUTH_SETTINGS = (
    Setting("users_file", "path", "", "The users file (the embedded default checker)."),
    Setting(
        "failure_delay",
        "float",
        2.0,
        "Seconds before the first failed login from an address is answered; the delay doubles with"
        " each further distinct failure, up to C{failure_delay_max} (trusted clients: none).",
        minimum=0,
    ),
    Setting(
        "hash_threads", "int", 4, "Threads verifying password hashes off the reactor.", minimum=1
    ),
    Setting(
        "failure_delay_max", "float", 15.0, "Longest delay before a failed login is answered.", minimum=0
    ),
    Setting(
        "penalty_ipv4_prefix",
        "int",
        32,
        "IPv4 clients count for penalties and lockout by their network of this prefix length.",
        minimum=8,
    ),
    Setting(
        "penalty_ipv6_prefix",
        "int",
        64,
        "IPv6 clients count for penalties and lockout by their network of this prefix length.",
        minimum=16,
    ),
    Setting(
        "penalty_expiry",
        "float",
        900.0,
        "Seconds after its last failed login when an address's or user's failures are forgotten.",
        minimum=1,
    ),
    Setting(
        "user_lockout_threshold",
        "int",
        20,
        "Distinct failed logins of one user name that lock it out for C{lockout_duration}"
        " (refused before any directory is asked); 0 disables.",
        minimum=0,
    ),
    Setting(
        "address_lockout_threshold",
        "int",
        50,
        "Distinct failed logins from one address (network) that lock it out; 0 disables.",
        minimum=0,
    ),
    Setting("lockout_duration", "float", 600.0, "Seconds a lockout lasts.", minimum=1),
    Setting(
        "penalty_max_entries",
        "int",
        100000,
        "Addresses and users whose failures are remembered (least recent forgotten first).",
        minimum=1,
    ),
    Setting(
        "cache_ttl",
        "float",
        300.0,
        "Seconds a successful login is remembered, so the same user with the same password is not"
        " checked again (an old password works that long after a change); 0 disables the cache.",
        minimum=0,
    ),
    Setting(
        "cache_negative_ttl",
        "float",
        20.0,
        "Seconds a refused login (same user, same password) is remembered; 0 disables.",
        minimum=0,
    ),
    Setting("cache_size", "int", 100000, "Most entries the credential cache holds.", minimum=1),
)

LDAP_SETTINGS = (
    Setting(
        "urls",
        "strlist",
        (),
        "LDAP servers, tried in this order: ldap://HOST[:PORT]/ (with C{starttls}) or"
        " ldaps://HOST[:PORT]/; empty disables the LDAP checker.",
    ),
    Setting(
        "starttls",
        "bool",
        True,
        "Upgrade ldap:// connections with StartTLS before anything else is sent.",
    ),
    Setting(
        "ca_file",
        "path",
        "",
        "PEM file of the CAs that sign the LDAP servers' certificates; empty means the system's"
        " trust store.  Certificates are always verified.",
    ),
    Setting(
        "bind_dn",
        "str",
        "",
        "DN of the service account that searches for users; empty: search anonymously.",
    ),
    Setting("bind_password_file", "path", "", "File whose first line is the service account's password."),
    Setting("base_dn", "str", "", "DN under which users are searched (required with C{urls})."),
    Setting(
        "scope", "choice", "sub", "Search scope under C{base_dn}.", choices=("base", "one", "sub")
    ),
    Setting(
        "filter",
        "str",
        "(|(uid={login})(mail={login}))",
        "Search filter template; the placeholders login (the name as typed), user (before the @)"
        " and domain (after it), each in braces, stand for values and are always escaped.",
    ),
    Setting(
        "lookup_filter",
        "str",
        "",
        "Filter template for look-ups without a password (SMTP recipients, e.g. with alias"
        " attributes); empty: C{filter}.",
    ),
    Setting(
        "dn_template",
        "str",
        "",
        "Direct bind: bind as this DN template (placeholders as in C{filter}, escaped as DN"
        " values) instead of searching first; the user's entry is then read with the user's own"
        " rights.",
    ),
    Setting(
        "login_attribute",
        "str",
        "uid",
        "Attribute holding the canonical login (AD: sAMAccountName); empty: the name as typed.",
    ),
    Setting("address_attribute", "str", "mail", "Attribute holding the canonical e-mail address."),
    Setting(
        "backend_login_attribute",
        "str",
        "",
        "Attribute holding the login for the mailbox server; empty: the canonical login.",
    ),
    Setting("mailhost_attribute", "str", "mailHost", "Attribute naming the user's mailbox server."),
    Setting("site_attribute", "str", "", "Attribute naming the user's site."),
    Setting(
        "status_attribute",
        "str",
        "",
        "Attribute saying whether the account is enabled (e.g. accountStatus; AD:"
        " userAccountControl); empty: every account is enabled.",
    ),
    Setting(
        "disabled_values",
        "strlist",
        ("disabled",),
        "Values of C{status_attribute} (any case) that disable the account.",
    ),
    Setting(
        "enabled_values",
        "strlist",
        (),
        "When not empty, a value of C{status_attribute} outside this list disables the account.",
    ),
    Setting(
        "disabled_bitmask",
        "int",
        0,
        "When not 0, C{status_attribute} is an integer and these bits disable the account (AD: 2).",
        minimum=0,
    ),
    Setting(
        "policy_attributes",
        "strlist",
        (),
        "Per-user policy read from the directory: NAME=ATTRIBUTE (or ATTRIBUTE, NAME being it in"
        " lower case).",
    ),
    Setting("connect_timeout", "float", 3.0, "Seconds to connect to an LDAP server.", minimum=0.001),
    Setting(
        "timeout",
        "float",
        5.0,
        "Seconds for each LDAP operation (StartTLS, bind, search); then the connection is dropped"
        " and the login fails temporarily.",
        minimum=0.001,
    ),
    Setting(
        "pool_size",
        "int",
        4,
        "Connections for user binds (one bind in flight each), beside one shared search connection.",
        minimum=1,
    ),
    Setting(
        "retry_down_after",
        "float",
        30.0,
        "Seconds a server that failed is tried only after the others.",
        minimum=0,
    ),
)

#: The locators C{[routing] locators} may name, in their default order.
LOCATORS = ("mailhost", "map", "hash", "default")

ROUTING_SETTINGS = (
    Setting(
        "default_backend",
        "str",
        "",
        "Backend server or group for users whose directory entry names no mailbox server.",
    ),
    Setting(
        "locators",
        "strlist",
        LOCATORS,
        "The mailbox locators, asked in this order (see docs/routing.md): mailhost (the directory"
        " attribute), map (C{map_file}), hash (C{hash_group}), default (C{default_backend}).",
    ),
    Setting(
        "map_file",
        "path",
        "",
        "Static map: lines of C{USER-OR-DOMAIN BACKEND-OR-GROUP}; re-read on reload (SIGHUP).",
    ),
    Setting(
        "hash_group",
        "str",
        "",
        "Group over which users with no explicit mailbox server are spread by rendezvous hashing.",
    ),
    Setting(
        "proxy_ttl",
        "int",
        5,
        "Proxy hops a session may take (sent to backends as IMAP ID x-proxy-ttl, taken from"
        " trusted clients); a node whose TTL is down to 1 refuses the session as a loop.",
        minimum=2,
    ),
)

GROUP_SETTINGS = (
    Setting("members", "strlist", (), "Names of [backends.NAME] servers, in preference order."),
    Setting(
        "balance",
        "choice",
        "order",
        "order: the first healthy member in C{members} order; hash: each user's own order by"
        " rendezvous hashing, so a user stays on one member while it is healthy.",
        choices=("order", "hash"),
    ),
    Setting("site", "str", "", "The site the group is in; empty means its members' common site."),
)

SITE_SETTINGS = (
    Setting(
        "action",
        "choice",
        "proxy",
        "What to do with a user whose mailbox is in this site: proxy (to its casd, C{cas}),"
        " refuse (a temporary failure) or redirect (to C{redirect_url}).",
        choices=("proxy", "refuse", "redirect"),
    ),
    Setting("cas", "str", "", "Backend server or group holding that site's casd nodes."),
    Setting("redirect_url", "str", "", "Where C{action = \"redirect\"} sends clients that can follow."),
)

HEALTH_SETTINGS = (
    Setting("enabled", "bool", True, "Actively check every [backends.NAME] for each enabled protocol."),
    Setting("interval", "float", 5.0, "Seconds between two checks of one member.", minimum=0.01),
    Setting(
        "timeout",
        "float",
        3.0,
        "Seconds a check may take: connect, TLS and the protocol's greeting.",
        minimum=0.001,
    ),
    Setting("rise", "int", 2, "Consecutive good checks that bring a DOWN member UP.", minimum=1),
    Setting("fall", "int", 3, "Consecutive failed checks that take an UP member DOWN.", minimum=1),
    Setting(
        "passive_fall",
        "int",
        3,
        "Consecutive failed connections of real sessions that take a member DOWN at once.",
        minimum=1,
    ),
    Setting(
        "passive_recovery",
        "float",
        30.0,
        "Seconds after which a member taken DOWN by sessions, and not actively checked, is"
        " tried again.",
        minimum=0.001,
    ),
)

BACKEND_SETTINGS = (
    Setting("connect_timeout", "float", 10.0, "Seconds to connect to a backend.", minimum=0.001),
    Setting(
        "tls_timeout", "float", 10.0, "Seconds for the TLS handshake with a backend.", minimum=0.001
    ),
    Setting(
        "reply_timeout",
        "float",
        30.0,
        "Seconds to wait for each reply of a backend during the login dialogue.",
        minimum=0.001,
    ),
    Setting(
        "banner_timeout",
        "float",
        0.0,
        "Seconds to wait for a backend's greeting; 0 means C{reply_timeout}.",
        minimum=0,
    ),
    Setting(
        "max_tries",
        "int",
        3,
        "Members of a route tried for one session before the client gets a temporary failure.",
        minimum=1,
    ),
    Setting(
        "failover_timeout",
        "float",
        30.0,
        "Seconds all tries for one session may take together.",
        minimum=0.001,
    ),
    Setting(
        "drain_close_period",
        "float",
        0.0,
        "When a member is put into drain, close its sessions spread over this many seconds;"
        " 0 lets them end by themselves.",
        minimum=0,
    ),
    Setting(
        "ca_file",
        "path",
        "",
        "PEM file of the CAs that sign backend certificates; empty means the system's trust store.",
    ),
)

BACKEND_SERVER_SETTINGS = (
    Setting("host", "str", "", "Host name or address of the mailbox server."),
    Setting(
        "tls_name",
        "str",
        "",
        "Name verified in the backend's certificate; empty means C{host}.",
    ),
    Setting("site", "str", "", "The site the server is in."),
    Setting(
        "drain",
        "bool",
        False,
        "Drain: no new sessions; existing ones go on (see C{[backend] drain_close_period}).",
    ),
    Setting("weight", "int", 1, "Share of a hashed group's users, relative to the others.", minimum=1),
    Setting("health_check", "bool", True, "Check this server actively ([health])."),
    Setting("connect_timeout", "float", 0.0, "Overrides [backend] connect_timeout when not 0.", minimum=0),
    Setting("tls_timeout", "float", 0.0, "Overrides [backend] tls_timeout when not 0.", minimum=0),
    Setting("banner_timeout", "float", 0.0, "Overrides [backend] banner_timeout when not 0.", minimum=0),
    Setting("reply_timeout", "float", 0.0, "Overrides [backend] reply_timeout when not 0.", minimum=0),
)

#: The per-server keys that override a C{[backend]} timeout.
TIMEOUT_KEYS = ("connect_timeout", "tls_timeout", "banner_timeout", "reply_timeout")

BACKEND_PROTOCOL_SETTINGS = (
    Setting("port", "int", 0, "Port of this protocol; 0 means the protocol's default.", minimum=0),
    Setting(
        "tls",
        "choice",
        "",
        "TLS to the backend: none, starttls or implicit; empty means the protocol's default.",
        choices=("",) + TLS_MODES,
    ),
    Setting(
        "master_user",
        "str",
        "",
        "Log in as this master user with the user as authorisation identity (empty: the user's own"
        " credentials).",
    ),
    Setting("master_password_file", "path", "", "File holding the master user's password."),
)

PROTOCOL_COMMON_SETTINGS = (
    Setting("enabled", "bool", True, "Serve this protocol."),
    Setting(
        "max_line_length", "int", 8192, "Longest command line accepted before login.", minimum=64
    ),
    Setting(
        "max_bad_commands",
        "int",
        10,
        "Invalid commands tolerated before the connection is closed.",
        minimum=1,
    ),
    Setting(
        "preauth_timeout",
        "float",
        60.0,
        "Seconds a client may stay unauthenticated.",
        minimum=0.001,
    ),
    Setting(
        "idle_timeout",
        "float",
        1860.0,
        "Seconds without a byte either way before a relayed session is closed.",
        minimum=1,
    ),
)

LISTENER_SETTINGS = (
    Setting("endpoint", "str", "", "Twisted endpoint string: tcp:PORT, ssl:PORT:..., haproxy:tcp:PORT."),
    Setting("name", "str", "", "Name of this listener in logs; default PROTOCOL-ENDPOINT."),
    Setting(
        "tls",
        "choice",
        "starttls",
        "none, starttls (offered in the protocol) or implicit (TLS from the first byte).",
        choices=TLS_MODES,
    ),
    Setting(
        "trusted",
        "bool",
        False,
        "Treat every client of this listener as trusted (plaintext login allowed).",
    ),
)

DEMO_SETTINGS = (
    Setting(
        "enabled",
        "bool",
        False,
        "Run the in-process demo mailbox backend (demo only: it keeps mail in memory).",
    ),
    Setting("imap_port", "int", 11143, "Loopback port of the demo IMAP backend.", minimum=0),
    Setting("pop3_port", "int", 11110, "Loopback port of the demo POP3 backend.", minimum=0),
)


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


@frozen
class ProtocolSection:
    """
    The validated section of one protocol: common keys and the protocol's own.
    """

    name: str
    enabled: bool
    listeners: tuple[ListenerConfig, ...]
    values: Values

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
        implicitByEndpoint = kind == "ssl"
        tls = "implicit" if implicitByEndpoint else v.tls
        listeners.append(
            ListenerConfig(
                name=v.name or f"{protocol.name}-{v.endpoint}",
                endpoint=v.endpoint,
                tls=tls,
                trusted=v.trusted,
                wrapTLS=(tls == "implicit" and not implicitByEndpoint),
            )
        )
    return tuple(listeners)


def _readProtocols(path, data, protocols, base) -> dict[str, ProtocolSection]:
    sections = {}
    for protocol in protocols:
        name = protocol.name
        table = data.get(name, {})
        values = readSection(
            path,
            name,
            table,
            PROTOCOL_COMMON_SETTINGS + tuple(protocol.settings),
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
        )
    return servers


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
        from casd.auth.ldap import SettingProblem, checkSettings

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
    return TLSConfig(v.certificate, v.key, v.minimum_version, tuple(sni))


TOP_LEVEL = (
    "server", "tls", "auth", "ldap", "routing", "backend", "backends", "groups", "sites", "health", "demo"
)


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
    }
