# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
Plain-old-XML Autodiscover (MS-OXDSCLI): the request parser shared by Outlook and ActiveSync
devices, and Outlook's response (C{…/outlook/responseschema/2006a}).

Errors follow the schema: 600 (invalid request), 601 (the response schema asked for is not
served), 500 (an address this user may not query); HTTP status stays 200.
"""

from __future__ import annotations

import time
import zlib
from xml.etree.ElementTree import Element

from attrs import frozen

from protocols.http.autodiscover.common import BadRequest, parseXML, serialise, sub, text

NS = "http://schemas.microsoft.com/exchange/autodiscover"
BASE_RESPONSE = f"{NS}/responseschema/2006"
OUTLOOK_REQUEST = f"{NS}/outlook/requestschema/2006"
OUTLOOK_RESPONSE = f"{NS}/outlook/responseschema/2006a"
MOBILESYNC_REQUEST = f"{NS}/mobilesync/requestschema/2006"
MOBILESYNC_RESPONSE = f"{NS}/mobilesync/responseschema/2006"

#: request namespace -> (flavour, the response schema it may ask for)
FLAVOURS = {
    OUTLOOK_REQUEST: ("outlook", OUTLOOK_RESPONSE),
    MOBILESYNC_REQUEST: ("mobilesync", MOBILESYNC_RESPONSE),
}

INVALID_REQUEST = (600, "Invalid Request")
SCHEMA_NOT_AVAILABLE = (601, "Provider is not available for the requested schema")
#: exchangelib maps this very message to ErrorNonExistentMailbox.
ADDRESS_NOT_FOUND = (500, "The e-mail address cannot be found.")


@frozen
class PoxRequest:
    """
    A parsed POX request.

    @ivar flavour: C{outlook} or C{mobilesync}.
    """

    flavour: str
    email: str
    legacyDN: str


class PoxError(Exception):
    """
    A request answered with an Autodiscover error.

    @ivar flavour: the schema to answer in (C{outlook} when the request's is unknown).
    """

    def __init__(self, flavour: str, code: int, message: str, reason: str = "") -> None:
        super().__init__(f"{code} {message}")
        self.flavour = flavour
        self.code = code
        self.message = message
        self.reason = reason or message


def _flavourOf(tag: str) -> tuple[str, str] | None:
    if not tag.startswith("{"):
        return None
    ns, _, local = tag[1:].partition("}")
    if local != "Autodiscover":
        return None
    return FLAVOURS.get(ns)


def parseRequest(body: bytes) -> PoxRequest:
    """
    Parse an Outlook or mobilesync request.

    @raise PoxError: 600 for anything but a well-formed request of a known schema with an
        address or legacy DN, 601 when its C{AcceptableResponseSchema} is not the one we serve.
    """
    try:
        root = parseXML(body)
    except BadRequest as e:
        raise PoxError("outlook", *INVALID_REQUEST, reason=str(e)) from None
    known = _flavourOf(root.tag)
    if known is None:
        raise PoxError("outlook", *INVALID_REQUEST, reason="unknown request schema")
    flavour, responseSchema = known
    ns = root.tag[1:].partition("}")[0]
    request = root.find(f"{{{ns}}}Request")
    if request is None:
        raise PoxError(flavour, *INVALID_REQUEST, reason="no Request element")
    acceptable = text(request.find(f"{{{ns}}}AcceptableResponseSchema"))
    if not acceptable:
        raise PoxError(flavour, *INVALID_REQUEST, reason="no AcceptableResponseSchema")
    if acceptable != responseSchema:
        raise PoxError(flavour, *SCHEMA_NOT_AVAILABLE, reason="response schema not served")
    email = text(request.find(f"{{{ns}}}EMailAddress"))
    legacyDN = text(request.find(f"{{{ns}}}LegacyDN")) if flavour == "outlook" else ""
    if not email and not legacyDN:
        raise PoxError(flavour, *INVALID_REQUEST, reason="no EMailAddress or LegacyDN")
    if len(email) > 320 or len(legacyDN) > 1024:
        raise PoxError(flavour, *INVALID_REQUEST, reason="address too long")
    return PoxRequest(flavour, email, legacyDN)


def errorElement(parent: Element, code: int, message: str, hostname: str = "casd") -> Element:
    """
    The C{Error} element of both schemas: C{Time} and an C{Id} hashed from the server name.
    """
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e7):07d}"
    error = sub(parent, "Error", Time=stamp, Id=str(zlib.crc32(hostname.encode("utf-8"))))
    sub(error, "ErrorCode", str(code))
    sub(error, "Message", message)
    sub(error, "DebugData")
    return error


def outlookError(code: int, message: str, hostname: str = "casd") -> bytes:
    """
    An Outlook error response: C{Response} in the base namespace holding the C{Error}.
    """
    root = Element("Autodiscover", xmlns=BASE_RESPONSE)
    errorElement(sub(root, "Response"), code, message, hostname)
    return serialise(root)


def _outlookRoot() -> tuple[Element, Element]:
    root = Element("Autodiscover", xmlns=BASE_RESPONSE)
    return root, sub(root, "Response", xmlns=OUTLOOK_RESPONSE)


def _onOff(flag: bool) -> str:
    return "on" if flag else "off"


def outlookSettings(views, address: str, displayName: str, login: str) -> bytes:
    """
    Outlook's settings answer for a user.

    @param views: the user's domain as (the client's network, internal, external)
        L{casd.config.clientsettings.DomainSettings}: C{EXCH} carries the internal URLs, C{EXPR}
        the external ones (Outlook Anywhere), the mail protocols the client's network's host.
    @param address: the user's primary address.
    @param login: what the user logs in with (the mail protocols' C{LoginName}).
    """
    settings, internal, external = views
    root, response = _outlookRoot()
    user = sub(response, "User")
    sub(user, "DisplayName", displayName)
    sub(user, "LegacyDN", settings.legacyDN(login))
    sub(user, "AutoDiscoverSMTPAddress", address)
    sub(user, "DeploymentId", settings.deploymentId)
    account = sub(response, "Account")
    sub(account, "AccountType", "email")
    sub(account, "Action", "settings")
    sub(account, "MicrosoftOnline", "False")
    for kind, view in (("EXCH", internal), ("EXPR", external)):
        if not view.ewsUrl:
            continue
        protocol = sub(account, "Protocol")
        sub(protocol, "Type", kind)
        sub(protocol, "Server", view.host)
        sub(protocol, "ServerVersion", view.serverVersion)
        if kind == "EXPR":
            sub(protocol, "SSL", "On")
            sub(protocol, "AuthPackage", "Basic")
        if view.activeSyncUrl:
            sub(protocol, "ASUrl", view.activeSyncUrl)
        sub(protocol, "EwsUrl", view.ewsUrl)
        sub(protocol, "OOFUrl", view.ewsUrl)
        if view.oabUrl:
            sub(protocol, "OABUrl", view.oabUrl)
    if external.owaUrl:
        protocol = sub(account, "Protocol")
        sub(protocol, "Type", "WEB")
        for name, view in (("Internal", internal), ("External", external)):
            sub(sub(protocol, name), "OWAUrl", view.owaUrl, AuthenticationMethod="Basic")
    for kind, name in (("imap", "IMAP"), ("pop3", "POP3"), ("smtp", "SMTP")):
        server = settings.server(kind)
        if server is None:
            continue
        protocol = sub(account, "Protocol")
        sub(protocol, "Type", name)
        sub(protocol, "Server", server.host)
        sub(protocol, "Port", str(server.port))
        sub(protocol, "LoginName", login)
        sub(protocol, "DomainRequired", "off")
        sub(protocol, "SPA", "off")
        sub(protocol, "SSL", _onOff(server.implicitTLS))
        if not server.implicitTLS:
            sub(protocol, "Encryption", "TLS")
        sub(protocol, "AuthRequired", "on")
        if kind == "smtp":
            sub(protocol, "UsePOPAuth", "on")
            sub(protocol, "SMTPLast", "off")
    return serialise(root)


def outlookRedirectAddress(address: str) -> bytes:
    root, response = _outlookRoot()
    account = sub(response, "Account")
    sub(account, "AccountType", "email")
    sub(account, "Action", "redirectAddr")
    sub(account, "RedirectAddr", address)
    return serialise(root)


def outlookRedirectURL(url: str) -> bytes:
    root, response = _outlookRoot()
    account = sub(response, "Account")
    sub(account, "AccountType", "email")
    sub(account, "Action", "redirectUrl")
    sub(account, "RedirectUrl", url)
    return serialise(root)
