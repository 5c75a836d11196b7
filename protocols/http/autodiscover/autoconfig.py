# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
Thunderbird's autoconfig (C{/mail/config-v1.1.xml} on C{autoconfig.DOMAIN}, and
C{/.well-known/autoconfig/mail/config-v1.1.xml}): a C{clientConfig version="1.1"}.

The answer depends only on the domain of the address asked about, never on the user: it is
fetched without authentication (sometimes over plain HTTP), so it holds nothing secret and says
nothing about whether an address exists.  User names are the placeholders C{%EMAILADDRESS%}.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit
from xml.etree.ElementTree import Element

from protocols.http.autodiscover.common import serialise, sub

#: What a domain may look like (LDH labels); anything else is refused before it is echoed.
_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z][a-z0-9-]{0,62}$")

_TYPES = {"imap": "imap", "pop3": "pop3"}


def validDomain(domain: str) -> bool:
    return bool(_DOMAIN.match(domain))


def domainFromQuery(address: str, host: str) -> str:
    """
    The domain a request is about: that of C{emailaddress}, else the C{Host} header's without an
    C{autoconfig.} prefix.  C{""} when neither gives a valid domain.
    """
    if address:
        domain = address.rpartition("@")[2].strip().lower() if "@" in address else ""
    else:
        domain = host.partition(":")[0].lower()
        if domain.startswith("autoconfig."):
            domain = domain[len("autoconfig."):]
    return domain if validDomain(domain) else ""


def _server(parent: Element, tag: str, server) -> None:
    kind = _TYPES.get(server.protocol, "smtp")
    element = sub(parent, tag, type=kind)
    sub(element, "hostname", server.host)
    sub(element, "port", str(server.port))
    sub(element, "socketType", server.socketType)
    sub(element, "authentication", "password-cleartext")
    sub(element, "username", "%EMAILADDRESS%")


def clientConfig(settings) -> bytes:
    """
    The C{clientConfig} of one domain.

    @param settings: the domain's L{casd.config.clientsettings.DomainSettings}.
    """
    root = Element("clientConfig", version="1.1")
    provider = sub(root, "emailProvider", id=settings.domain)
    sub(provider, "domain", settings.domain)
    sub(provider, "displayName", settings.displayName)
    sub(provider, "displayShortName", settings.shortName)
    for server in settings.servers:
        if server.protocol in _TYPES:
            _server(provider, "incomingServer", server)
    if settings.ewsUrl:
        exchange = sub(provider, "incomingServer", type="exchange")
        url = urlsplit(settings.ewsUrl)
        sub(exchange, "hostname", url.hostname or settings.host)
        sub(exchange, "port", str(url.port or 443))
        sub(exchange, "username", "%EMAILADDRESS%")
        sub(exchange, "socketType", "SSL")
        sub(exchange, "authentication", "password-cleartext")
        if settings.owaUrl:
            sub(exchange, "owaURL", settings.owaUrl)
        sub(exchange, "ewsURL", settings.ewsUrl)
    for server in settings.servers:
        if server.protocol == "smtp":
            _server(provider, "outgoingServer", server)
    if settings.owaUrl:
        sub(sub(root, "webMail"), "loginPage", url=settings.owaUrl)
    return serialise(root)
