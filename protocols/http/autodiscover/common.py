# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
What every Autodiscover flavour shares: hardened XML parsing, the size limit, and the one
decision of what a user may be told about an address.

The decision needs no directory look-up: it compares the requested address with the
authenticated user's own (primary address, login, aliases).  Any other address, whether it
exists or not, gets the same answer, so Autodiscover cannot be used to learn who exists.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.etree.ElementTree import Element

import defusedxml
import defusedxml.ElementTree as safeET
from attrs import frozen

#: Largest request body read (Autodiscover requests are a few hundred bytes).
MAX_BODY = 64 * 1024


class BadRequest(Exception):
    """
    The request body is not acceptable XML (malformed, a DTD or entities, too large).
    """


def parseXML(body: bytes) -> Element:
    """
    Parse a request body with every DTD refused: no external entities, no entity expansion
    (billion laughs), no network or file access.

    @raise BadRequest: with a reason safe to log (never the body).
    """
    if len(body) > MAX_BODY:
        raise BadRequest(f"body over {MAX_BODY} bytes")
    if not body.strip():
        raise BadRequest("empty body")
    try:
        return safeET.fromstring(body, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except defusedxml.DTDForbidden:
        raise BadRequest("a DTD is not accepted") from None
    except defusedxml.EntitiesForbidden:
        raise BadRequest("entities are not accepted") from None
    except defusedxml.DefusedXmlException:
        raise BadRequest("external references are not accepted") from None
    except (ET.ParseError, ValueError, UnicodeError):
        raise BadRequest("malformed XML") from None


def text(element: Element | None) -> str:
    return (element.text or "").strip() if element is not None else ""


def serialise(root: Element, defaultNamespace: str | None = None) -> bytes:
    """
    An element tree as a UTF-8 document with its declaration.
    """
    return ET.tostring(root, encoding="utf-8", xml_declaration=True, default_namespace=defaultNamespace)


def sub(parent: Element, tag: str, value: str | None = None, **attrib) -> Element:
    e = ET.SubElement(parent, tag, attrib)
    if value is not None:
        e.text = value
    return e


# -- who may be told what ------------------------------------------------------------------------


def policyValue(user, *keys: str) -> str:
    policy = dict(getattr(user, "policy", ()) or ())
    for key in keys:
        if policy.get(key):
            return policy[key]
    return ""


def primaryAddress(user) -> str:
    """
    The user's primary SMTP address: the directory's, else a login that looks like one.
    """
    if user.address:
        return user.address
    return user.login if "@" in user.login else ""


def aliases(user) -> set[str]:
    """
    The user's other addresses: the C{aliases} policy attribute (comma-separated) and a login
    that is an address other than the primary one.
    """
    found = {a.strip().lower() for a in policyValue(user, "aliases").split(",") if a.strip()}
    if "@" in user.login:
        found.add(user.login.lower())
    found.discard(primaryAddress(user).lower())
    return found


def displayName(user) -> str:
    return policyValue(user, "display_name", "displayname", "cn") or user.login


def domainOf(address: str) -> str:
    return address.rpartition("@")[2].lower()


@frozen
class Settings:
    """
    Answer with the settings of C{address} (the user's primary address).
    """

    address: str


@frozen
class RedirectAddress:
    """
    The address is an alias: ask again with C{address}.
    """

    address: str


@frozen
class RedirectURL:
    """
    Another organisation answers for the address's domain.
    """

    url: str


@frozen
class NotAllowed:
    """
    The user may not query this address (someone else's, or no one's: the same answer).
    """


def decide(user, address: str, clientSettings, legacyDN: str = ""):
    """
    What the authenticated C{user} is told about C{address}.

    @param clientSettings: a L{casd.config.clientsettings.ClientSettings}.
    @param legacyDN: a legacy DN asked for instead (it wins over the address, MS-OXDSCLI 3.2.5).
    @return: L{Settings}, L{RedirectAddress}, L{RedirectURL} or L{NotAllowed}.
    """
    primary = primaryAddress(user)
    if legacyDN:
        if primary:
            mine = clientSettings.forDomain(domainOf(primary)).legacyDN(user.login)
            if legacyDN.lower() == mine.lower():
                return Settings(primary)
        return NotAllowed()
    wanted = address.strip().lower()
    if "@" not in wanted:
        return NotAllowed()
    if primary and wanted == primary.lower():
        return Settings(primary)
    if primary and wanted in aliases(user):
        return RedirectAddress(primary)
    domain = clientSettings.domainConfig(domainOf(wanted))
    if domain is not None and domain.values.redirect_url:
        return RedirectURL(domain.values.redirect_url)
    return NotAllowed()
