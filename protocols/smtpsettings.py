"""
The settings of casd's two SMTP services (C{[smtp]}, C{[submission]}), and the view one server
class reads them through.
"""

from __future__ import annotations

from casd.config import Setting

COMMON_SETTINGS = (
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
        "Seconds to wait for the backend's reply to the end of data; then the client gets"
        " C{451} and will send the message again.",
        minimum=0.001,
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
        "Clients exempt from the connection limits, the pregreet test and DNSBLs.",
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

MX_SETTINGS = (
    Setting(
        "enabled",
        "bool",
        False,
        "Serve SMTP on port 25.  Off unless set, so that a configuration written before casd"
        " spoke SMTP opens no new port.",
    ),
    Setting(
        "accepted_domains",
        "strlist",
        (),
        "Domains casd takes mail for (C{.domain} for its subdomains); a recipient elsewhere gets"
        " C{554 5.7.1} (casd is never an open relay), an unknown one here C{550 5.1.1}.",
    ),
    Setting(
        "recipient_delimiter",
        "str",
        "",
        "Separates an address extension (C{user+tag@domain}): an unknown address is looked up"
        " again without it.",
    ),
    Setting(
        "pregreet_delay",
        "float",
        0.0,
        "Seconds casd waits, after a partial greeting, before the real one; a client that"
        " talks first is refused (Postfix postscreen's pregreet test); 0 turns it off.",
        minimum=0,
    ),
    Setting(
        "dnsbl_zones",
        "strlist",
        (),
        "DNS block lists asked about each client (e.g. C{zen.spamhaus.org}); a listed client"
        " is refused with C{554 5.7.1}.",
    ),
    Setting(
        "dnsbl_timeout",
        "float",
        2.0,
        "Seconds the DNSBL look-ups may take together; no answer in time means not listed.",
        minimum=0.001,
    ),
    Setting("dnsbl_cache_ttl", "float", 300.0, "Seconds a DNSBL answer is remembered.", minimum=0),
    Setting(
        "dnsbl_servers",
        "strlist",
        (),
        "DNS servers (C{address:port}) for the DNSBL look-ups; empty means C{/etc/resolv.conf}.",
    ),
)

SUBMISSION_SETTINGS = (
    Setting(
        "enabled",
        "bool",
        False,
        "Serve submission on ports 587 and 465.  Off unless set, so that a configuration"
        " written before casd spoke SMTP opens no new port.",
    ),
    Setting(
        "enforce_sender",
        "bool",
        False,
        "Refuse (C{553 5.7.1}) an envelope sender other than the user's own address.",
    ),
    Setting(
        "backend_login_required",
        "bool",
        True,
        "Use only backends that can be told who the user is (XCLIENT LOGIN, or AUTH as the"
        " backend's C{master_user}); false for one that trusts casd's connections as they are"
        " (an Exchange receive connector with Externally Secured): then set C{enforce_sender}.",
    ),
    Setting(
        "user_messages_per_hour",
        "int",
        0,
        "Messages one user may send per hour through this node (a user's"
        " C{smtp_messages_per_hour} policy attribute overrides it); 0 means no limit.",
        minimum=0,
    ),
)

# Keys only the other service has, fixed here so that one server class serves both.
MX_ONLY = {
    "accepted_domains": (),
    "recipient_delimiter": "",
    "pregreet_delay": 0.0,
    "dnsbl_zones": (),
    "dnsbl_timeout": 2.0,
    "dnsbl_cache_ttl": 0.0,
    "dnsbl_servers": (),
}


SUBMISSION_ONLY = {
    "user_messages_per_hour": 0,
    "enforce_sender": False,
    "backend_login_required": False,
}


class SectionView:
    """
    A protocol section with the other mode's keys at fixed values.
    """

    def __init__(self, section, fixed) -> None:
        self._section = section
        self._fixed = fixed

    def __getattr__(self, name):
        if name in self._fixed:
            return self._fixed[name]
        return getattr(self._section, name)
