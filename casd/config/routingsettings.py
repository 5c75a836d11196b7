# -*- test-case-name: tests.test_config -*-
"""
The keys of routing and of the backend pool: C{[routing]}, C{[groups.NAME]}, C{[sites.NAME]},
C{[health]}, C{[backend]}, C{[backends.NAME]} and C{[backends.NAME.PROTOCOL]} (the core's other
keys are in L{casd.config.settings}).
"""

from __future__ import annotations

from casd.config.settings import TLS_MODES, Setting

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
    Setting("enabled", "bool", True, "Actively check every [backends.NAME] for each enabled protocol it serves (its protocols)."),
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
        "connect_retry_time",
        "float",
        10.0,
        "Seconds during which members of a route that refused the connection, or closed it before"
        " anything was said or sent (a restarting server), are tried again with a short back-off"
        " (50 ms doubling to 1 s), within failover_timeout; 0 disables.  A connection on which a"
        " byte of the login was sent is never tried again.",
        minimum=0,
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
    Setting(
        "protocols",
        "strlist",
        ("*",),
        "Protocols this server serves, e.g. [\"imap\", \"pop3\", \"managesieve\"]: only these are"
        " health-checked and routed to it; [\"*\"] (the default) means every protocol casd serves.",
    ),
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
