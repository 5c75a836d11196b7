# -*- test-case-name: tests.test_config -*-
"""
The declaration of every core configuration key: one L{Setting} each (type, default, one line of
documentation), and the generic validation of a TOML table against such a declaration.

L{casd.config} assembles these into the frozen configuration; L{casd.config.reference} renders them as the
configuration reference.  Protocols declare their own keys the same way (C{ICASProtocol.settings}).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any, Iterable, Mapping

import attr
from attrs import frozen

from twisted.python.filepath import FilePath

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
        C{networks}, C{tables} (an array of tables C{[[section.key]]}, each validated against
        C{schema}; the value is a C{tuple} of L{Values}).
    @ivar default: the value when the key is absent.
    @ivar doc: one sentence for the configuration reference.
    @ivar choices: for C{choice}, the allowed values.
    @ivar minimum: for numbers, the smallest allowed value.
    @ivar schema: for C{tables}, the L{Setting}s of each table.
    """

    key: str
    kind: str
    default: Any
    doc: str
    choices: tuple = ()
    minimum: float | None = None
    schema: tuple = ()


class Values:
    """
    A frozen bag of validated settings with attribute access, e.g. C{section.max_line_length}.

    The values are the instance's attributes too, so that reading one on a session's path is a
    plain attribute lookup rather than a Python call (C{__getattr__} only answers unknown names).
    """

    def __init__(self, values: Mapping[str, Any]) -> None:
        values = dict(values)
        object.__setattr__(self, "_values", values)
        self.__dict__.update(values)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)

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
    if kind == "tables":
        if not isinstance(value, list):
            raise bad(f"an array of tables [[{where}]]")
        return tuple(
            readSection(path, f"{where}[{i}]", item, setting.schema, base) for i, item in enumerate(value)
        )
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
    Setting(
        "drain",
        "bool",
        False,
        "Drain this node: its health check (C{/health} on the admin listener, the HTTP health pages)"
        " fails so that the load balancer sends it nothing new; open sessions go on.  Applied on"
        " C{SIGHUP}; C{SIGUSR1} (or C{casd drain}) drains a running node too.",
    ),
    Setting(
        "shutdown_grace",
        "float",
        30.0,
        "On C{SIGTERM}, stop accepting and let open sessions finish for up to this many seconds,"
        " then close the rest.",
        minimum=0,
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
    Setting(
        "ticket_keys",
        "path",
        "",
        "Session-ticket key file shared by every worker and node, first key encrypting (see"
        " docs/operations.md); empty: a key per node, shared by its workers (C{--workers N}),"
        " so resumption within one node only.",
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
        " checked again (an old password, a deleted or a disabled account works that long after the"
        " change); 0 disables the cache.",
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
    Setting(
        "cache_during_outage",
        "bool",
        True,
        "While the directory fails, answer logins and look-ups cached within cache_ttl from the"
        " cache, so users keep working through an outage (a deleted or disabled account too, up"
        " to cache_ttl); false: every login waits for the directory and gets its temporary failure.",
    ),
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
    Setting(
        "max_sessions_per_user",
        "int",
        0,
        "Sessions of this protocol one user may have open at once, across the array when"
        " C{[state] backend} is \"redis\" (POP3 answers C{-ERR [IN-USE]}); otherwise per process"
        " (with C{--workers N}, each worker counts its own: up to N times this); 0: no limit.",
        minimum=0,
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
    Setting(
        "proxy_trusted",
        "networks",
        (),
        "On a haproxy: endpoint (required there): the load balancers whose PROXY header is believed.",
    ),
    Setting(
        "proxy_untrusted",
        "choice",
        "close",
        "On a haproxy: endpoint, a peer outside C{proxy_trusted}: close, or ignore (header read, the"
        " peer's own address used).",
        choices=("close", "ignore"),
    ),
)

STATE_SETTINGS = (
    Setting(
        "backend",
        "choice",
        "local",
        "Where the state an array shares lives (penalties, lockouts, per-user session counts):"
        " local (this node's memory) or redis.",
        choices=("local", "redis"),
    ),
    Setting(
        "urls",
        "strlist",
        (),
        "Redis servers, redis://HOST[:PORT][/DB] or rediss://... (TLS); the first is used, the"
        " next after an outage (required with backend = \"redis\").",
    ),
    Setting("password_file", "path", "", "File whose first line is the Redis password (AUTH)."),
    Setting(
        "ca_file",
        "path",
        "",
        "PEM file of the CAs that sign rediss:// servers' certificates; empty: the system's.",
    ),
    Setting(
        "secret_file",
        "path",
        "",
        "The array secret (at least 32 bytes, the same file on every node): Redis keys are HMACs"
        " made with it, never names or passwords (required with backend = \"redis\").",
    ),
    Setting("key_prefix", "str", "casd:", "Prefix of every Redis key casd writes."),
    Setting(
        "timeout",
        "float",
        0.05,
        "Seconds a decision waits for Redis before it is taken from this node's memory.",
        minimum=0.001,
    ),
    Setting("connect_timeout", "float", 2.0, "Seconds to connect to Redis.", minimum=0.001),
    Setting(
        "retry_interval",
        "float",
        1.0,
        "Seconds between attempts to reach Redis again during an outage (meanwhile decisions are"
        " local at once).",
        minimum=0.01,
    ),
    Setting(
        "session_lease",
        "float",
        60.0,
        "Seconds a per-user session slot lives in Redis unless its node renews it (a node that"
        " dies frees its slots after this).",
        minimum=1,
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
    Setting("http_port", "int", 11080, "Loopback port of the demo web backend.", minimum=0),
)


__all__ = [
    "TLS_MODES",
    "SERVER_SETTINGS",
    "TLS_SETTINGS",
    "SNI_SETTINGS",
    "AUTH_SETTINGS",
    "LDAP_SETTINGS",
    "PROTOCOL_COMMON_SETTINGS",
    "LISTENER_SETTINGS",
    "DEMO_SETTINGS",
    "STATE_SETTINGS",
    "ConfigError",
    "Setting",
    "Values",
    "_where",
    "_check",
    "readSection",
]
