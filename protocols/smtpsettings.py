# -*- test-case-name: tests.test_smtpmx -*-
"""
The settings both of casd's SMTP services have (besides those of every protocol); each
service declares its own beside its server class (L{protocols.smtpmx}, L{protocols.submission}).
"""

from __future__ import annotations

from casd.plugin import Setting

#: The keys both SMTP services have (besides those of every protocol).
COMMON_SETTINGS = (
    Setting(
        "junk_command_limit",
        "int",
        100,
        "Commands that move no mail (NOOP, RSET, VRFY, HELP) a client may send since its last"
        " accepted message; the next one is answered C{421 4.7.0} and the connection closed, so"
        " that no client holds a session open for ever (Postfix's C{smtpd_junk_command_limit});"
        " 0: no limit.",
        minimum=0,
    ),
    Setting(
        "message_size_limit",
        "int",
        10240000,
        "Largest message accepted, in bytes, advertised as SIZE: set it to the backends' own"
        " limit (Postfix C{message_size_limit}); 0 means no limit.",
        minimum=0,
    ),
    Setting(
        "max_recipients",
        "int",
        100,
        "Recipients accepted in one transaction, more get C{452 4.5.3} (a user's"
        " C{smtp_max_recipients} policy attribute overrides it on submission).",
        minimum=1,
    ),
    Setting(
        "smtputf8", "bool", False, "Advertise SMTPUTF8 (RFC 6531): only when every backend has it."
    ),
    Setting(
        "bare_line_endings",
        "choice",
        "normalise",
        "A bare CR or LF in DATA: normalise (made CRLF, dots stuffed: exactly one message"
        " reaches the backend) or reject (C{554 5.6.0}, nothing reaches it).",
        choices=("normalise", "reject"),
    ),
    Setting(
        "command_timeout",
        "float",
        300.0,
        "Seconds to wait for each command and each chunk of DATA (RFC 5321 4.5.3.2); this, not"
        " C{preauth_timeout}, bounds an SMTP client's silence.",
        minimum=0.001,
    ),
    Setting(
        "data_timeout",
        "float",
        300.0,
        "Seconds to wait for the backend's reply to the end of data (its only bound: the"
        " backend login's C{failover_timeout} ends with the login); then the client gets"
        " C{451} and will send the message again.",
        minimum=0.001,
    ),
    Setting(
        "preauth_timeout",
        "float",
        0.0,
        "Not used by SMTP: C{command_timeout} bounds every wait for a client, before and after"
        " AUTH.  A value other than 0 is ignored, with a warning when casd starts.",
        minimum=0,
    ),
    Setting(
        "blocked_senders",
        "strlist",
        (),
        "Envelope senders refused at MAIL (C{550 5.7.1}): C{user@domain}, C{@domain} or"
        " C{domain}, C{.domain} for its subdomains.",
    ),
    Setting(
        "allow_networks",
        "networks",
        (),
        "Clients exempt from the connection limits (and on port 25 the pregreet test and"
        " DNSBLs).",
    ),
    Setting("deny_networks", "networks", (), "Clients refused at connection (C{554 5.7.1})."),
    Setting(
        "max_connections_per_address",
        "int",
        20,
        "Connections one address may hold at once on this node; 0 means no limit.",
        minimum=0,
    ),
    Setting(
        "connection_rate_limit",
        "int",
        0,
        "New connections one address may open per minute on this node; 0 means no limit.",
        minimum=0,
    ),
)
