# -*- test-case-name: tests.test_config -*-
"""
The operator's sections: C{[admin]} (the admin listener: metrics, health, status, dashboard) and
C{[log]} (casd's own log file and its format).
"""

from __future__ import annotations

from casd.config.settings import Setting

ADMIN_SETTINGS = (
    Setting(
        "listen",
        "str",
        "",
        "Endpoint string of the admin listener (C{/metrics}, C{/health}, C{/status}, the dashboard),"
        " e.g. C{tcp:9100:interface=127.0.0.1}; empty: no admin listener.",
    ),
    Setting(
        "tls",
        "choice",
        "none",
        "C{implicit}: HTTPS with the C{[tls]} certificate; C{none}: plain HTTP (keep it on loopback"
        " or a management network).",
        choices=("none", "implicit"),
    ),
    Setting(
        "users",
        "strlist",
        (),
        "Logins allowed on the admin listener, authenticated with HTTP Basic through the same portal"
        " as every protocol; empty: no authentication (C{/health} is always anonymous).",
    ),
    Setting(
        "refresh",
        "int",
        5,
        "Seconds between two refreshes of the dashboard page.",
        minimum=1,
    ),
)

LOG_SETTINGS = (
    Setting(
        "file",
        "path",
        "",
        "casd's own log file, reopened on C{SIGUSR2} and C{SIGHUP} (for logrotate); empty: only the"
        " log that twistd writes (C{--logfile}, or standard output with C{--nodaemon}).",
    ),
    Setting(
        "format",
        "choice",
        "text",
        "Format of C{file}: C{text} (one line per event) or C{json} (one JSON object per line, the"
        " session fields as keys).",
        choices=("text", "json"),
    ),
)
