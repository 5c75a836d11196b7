# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
SOAP Autodiscover (C{/autodiscover/autodiscover.svc}, SOAP 1.1): C{GetUserSettings} and
C{GetDomainSettings}, as Outlook 2010+, exchangelib and EWS clients call them.

Per-user errors travel in each C{UserResponse} (C{InvalidUser}, C{RedirectAddress},
C{RedirectUrl}); a request that is not a SOAP envelope gets a SOAP fault with HTTP 400.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from xml.etree.ElementTree import Element

from attrs import frozen

from protocols.http.autodiscover.common import BadRequest, parseXML, serialise, sub, text

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
A = "http://schemas.microsoft.com/exchange/2010/Autodiscover"
WSA = "http://www.w3.org/2005/08/addressing"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
ACTION = f"{A}/Autodiscover/"

for _prefix, _uri in (("s", SOAP), ("wsa", WSA), ("i", XSI)):
    ET.register_namespace(_prefix, _uri)

OPERATIONS = ("GetUserSettings", "GetDomainSettings")
MAX_USERS = 100
MAX_SETTINGS = 200


@frozen
class SoapRequest:
    """
    @ivar operation: C{GetUserSettings} or C{GetDomainSettings}.
    @ivar subjects: the mailboxes (or domains) asked about.
    @ivar settings: the setting names asked for.
    """

    operation: str
    subjects: tuple[str, ...]
    settings: tuple[str, ...]


class SoapFault(Exception):
    """
    Not a SOAP request we understand: answered with a fault (HTTP 400).
    """


class InvalidRequest(Exception):
    """
    A SOAP request of a known operation with a bad message: C{ErrorCode} C{InvalidRequest}.
    """

    def __init__(self, operation: str, reason: str) -> None:
        super().__init__(reason)
        self.operation = operation


def parseRequest(body: bytes) -> SoapRequest:
    """
    @raise SoapFault: not a SOAP 1.1 envelope with a known operation.
    @raise InvalidRequest: a known operation without subjects, or too many of them.
    """
    try:
        root = parseXML(body)
    except BadRequest as e:
        raise SoapFault(str(e)) from None
    if root.tag != f"{{{SOAP}}}Envelope":
        raise SoapFault("not a SOAP 1.1 envelope")
    soapBody = root.find(f"{{{SOAP}}}Body")
    if soapBody is None or len(soapBody) != 1:
        raise SoapFault("expected one operation in the SOAP body")
    message = soapBody[0]
    operation = ""
    for name in OPERATIONS:
        if message.tag == f"{{{A}}}{name}RequestMessage":
            operation = name
    if not operation:
        raise SoapFault("unknown operation")
    request = message.find(f"{{{A}}}Request")
    if request is None:
        raise InvalidRequest(operation, "no Request")
    if operation == "GetUserSettings":
        subjects = [text(m) for m in request.iterfind(f"{{{A}}}Users/{{{A}}}User/{{{A}}}Mailbox")]
    else:
        subjects = [text(d) for d in request.iterfind(f"{{{A}}}Domains/{{{A}}}Domain")]
    settings = [text(s) for s in request.iterfind(f"{{{A}}}RequestedSettings/{{{A}}}Setting")]
    if not subjects or not all(subjects):
        raise InvalidRequest(operation, "nothing asked about")
    if not settings:
        raise InvalidRequest(operation, "no settings asked for")
    if len(subjects) > MAX_USERS or len(settings) > MAX_SETTINGS:
        raise InvalidRequest(operation, "too many users or settings")
    return SoapRequest(operation, tuple(subjects), tuple(settings))


# -- settings --------------------------------------------------------------------------------------


def _connections(view, protocol: str) -> list[tuple[str, int, str]]:
    return [
        (s.host, s.port, "SSL" if s.implicitTLS else "TLS") for s in view.servers if s.protocol == protocol
    ]


def _build(view) -> str:
    major, minor, build = view.build
    return f"{major}.{minor:02d}.{build:04d}.000"


def userSettingValues(views, address: str, displayName: str, login: str) -> dict:
    """
    Every user setting casd can answer: name -> a string, or a list of (host, port,
    encryption) for the C{ProtocolConnectionCollectionSetting}s.

    @param views: (internal, external) L{casd.config.clientsettings.DomainSettings}.
    """
    internal, external = views
    values = {
        "UserDisplayName": displayName,
        "UserDN": external.legacyDN(login),
        "UserDeploymentId": external.deploymentId,
        "AutoDiscoverSMTPAddress": address,
        "CasVersion": _build(external),
        "EwsSupportedSchemas": ", ".join(external.ewsVersions),
        "InternalMailboxServer": internal.host,
        "ExternalMailboxServer": external.host,
        "ExternalMailboxServerRequiresSSL": "True",
        "ExternalMailboxServerAuthenticationMethods": "Basic",
        "InternalImap4Connections": _connections(internal, "imap"),
        "ExternalImap4Connections": _connections(external, "imap"),
        "InternalPop3Connections": _connections(internal, "pop3"),
        "ExternalPop3Connections": _connections(external, "pop3"),
        "InternalSmtpConnections": _connections(internal, "smtp"),
        "ExternalSmtpConnections": _connections(external, "smtp"),
    }
    urls = {
        "EwsUrl": ("ewsUrl",),
        "OABUrl": ("oabUrl",),
        "WebClientUrl": ("owaUrl",),
        "MobileSyncUrl": ("activeSyncUrl",),
    }
    for suffix, (attribute,) in urls.items():
        for prefix, view in (("Internal", internal), ("External", external)):
            url = getattr(view, attribute)
            if url:
                values[f"{prefix}{suffix}"] = url
    if external.ewsUrl:
        values["ExternalEwsVersion"] = _build(external)
    for key in [k for k, v in values.items() if v == []]:
        del values[key]
    return values


def domainSettingValues(external) -> dict:
    values = {}
    if external.ewsUrl:
        values["ExternalEwsUrl"] = external.ewsUrl
        values["ExternalEwsVersion"] = _build(external)
    return values


# -- responses -------------------------------------------------------------------------------------


def _envelope(operation: str, view) -> tuple[Element, Element]:
    root = Element(f"{{{SOAP}}}Envelope")
    header = sub(root, f"{{{SOAP}}}Header")
    sub(header, f"{{{WSA}}}Action", f"{ACTION}{operation}Response", **{f"{{{SOAP}}}mustUnderstand": "1"})
    info = sub(header, f"{{{A}}}ServerVersionInfo")
    major, minor, build = view.build if view is not None else (15, 1, 225)
    sub(info, f"{{{A}}}MajorVersion", str(major))
    sub(info, f"{{{A}}}MinorVersion", str(minor))
    sub(info, f"{{{A}}}MajorBuildNumber", str(build))
    sub(info, f"{{{A}}}MinorBuildNumber", "0")
    versions = view.ewsVersions if view is not None else ()
    sub(info, f"{{{A}}}Version", versions[-1] if versions else "Exchange2016")
    soapBody = sub(root, f"{{{SOAP}}}Body")
    message = sub(soapBody, f"{{{A}}}{operation}ResponseMessage")
    return root, sub(message, f"{{{A}}}Response")


def _nil(parent: Element, tag: str) -> None:
    sub(parent, f"{{{A}}}{tag}", **{f"{{{XSI}}}nil": "true"})


def _setting(parent: Element, kind: str, name: str, value) -> None:
    element = sub(parent, f"{{{A}}}{kind}", **{f"{{{XSI}}}type": "StringSetting"})
    sub(element, f"{{{A}}}Name", name)
    if isinstance(value, list):
        element.set(f"{{{XSI}}}type", "ProtocolConnectionCollectionSetting")
        connections = sub(element, f"{{{A}}}ProtocolConnections")
        for host, port, encryption in value:
            c = sub(connections, f"{{{A}}}ProtocolConnection")
            sub(c, f"{{{A}}}Hostname", host)
            sub(c, f"{{{A}}}Port", str(port))
            sub(c, f"{{{A}}}EncryptionMethod", encryption)
    else:
        if kind == "DomainSetting":
            element.set(f"{{{XSI}}}type", "DomainStringSetting")
        sub(element, f"{{{A}}}Value", value)


@frozen
class UserAnswer:
    """
    One C{UserResponse}: C{errorCode} C{NoError} with C{values}, or an error.

    @ivar target: the C{RedirectTarget} of a redirect.
    """

    errorCode: str
    message: str = ""
    target: str = ""
    values: dict | None = None


def userSettingsResponse(answers, requested, view=None) -> bytes:
    """
    A C{GetUserSettingsResponseMessage}.

    @param answers: one L{UserAnswer} per user asked about, in order.
    @param requested: the setting names asked for.
    """
    root, response = _envelope("GetUserSettings", view)
    sub(response, f"{{{A}}}ErrorCode", "NoError")
    sub(response, f"{{{A}}}ErrorMessage")
    users = sub(response, f"{{{A}}}UserResponses")
    for answer in answers:
        user = sub(users, f"{{{A}}}UserResponse")
        sub(user, f"{{{A}}}ErrorCode", answer.errorCode)
        sub(user, f"{{{A}}}ErrorMessage", answer.message or "No error.")
        if answer.target:
            sub(user, f"{{{A}}}RedirectTarget", answer.target)
        else:
            _nil(user, "RedirectTarget")
        errors = sub(user, f"{{{A}}}UserSettingErrors")
        settings = sub(user, f"{{{A}}}UserSettings")
        if answer.values is None:
            continue
        for name in dict.fromkeys(requested):
            if name in answer.values:
                _setting(settings, "UserSetting", name, answer.values[name])
            else:
                error = sub(errors, f"{{{A}}}UserSettingError")
                sub(error, f"{{{A}}}ErrorCode", "SettingIsNotAvailable")
                sub(error, f"{{{A}}}ErrorMessage", "The setting is not available.")
                sub(error, f"{{{A}}}SettingName", name)
    return serialise(root, A)


def domainSettingsResponse(answers, requested, view=None) -> bytes:
    """
    A C{GetDomainSettingsResponseMessage}; C{answers} as for L{userSettingsResponse}.
    """
    root, response = _envelope("GetDomainSettings", view)
    sub(response, f"{{{A}}}ErrorCode", "NoError")
    sub(response, f"{{{A}}}ErrorMessage")
    domains = sub(response, f"{{{A}}}DomainResponses")
    for answer in answers:
        domain = sub(domains, f"{{{A}}}DomainResponse")
        sub(domain, f"{{{A}}}ErrorCode", answer.errorCode)
        sub(domain, f"{{{A}}}ErrorMessage", answer.message or "No error.")
        errors = sub(domain, f"{{{A}}}DomainSettingErrors")
        settings = sub(domain, f"{{{A}}}DomainSettings")
        if answer.target:
            sub(domain, f"{{{A}}}RedirectTarget", answer.target)
        else:
            _nil(domain, "RedirectTarget")
        for name in dict.fromkeys(requested) if answer.values is not None else ():
            if name in answer.values:
                _setting(settings, "DomainSetting", name, answer.values[name])
            else:
                error = sub(errors, f"{{{A}}}DomainSettingError")
                sub(error, f"{{{A}}}ErrorCode", "SettingIsNotAvailable")
                sub(error, f"{{{A}}}ErrorMessage", "The setting is not available.")
                sub(error, f"{{{A}}}SettingName", name)
    return serialise(root, A)


def invalidRequestResponse(operation: str, message: str) -> bytes:
    """
    The whole request is invalid: C{ErrorCode} C{InvalidRequest} in the response message.
    """
    root, response = _envelope(operation, None)
    sub(response, f"{{{A}}}ErrorCode", "InvalidRequest")
    sub(response, f"{{{A}}}ErrorMessage", message)
    return serialise(root, A)


def fault(message: str) -> bytes:
    """
    A SOAP 1.1 client fault (sent with HTTP 400).
    """
    root = Element(f"{{{SOAP}}}Envelope")
    f = sub(sub(root, f"{{{SOAP}}}Body"), f"{{{SOAP}}}Fault")
    sub(f, "faultcode", "s:Client")
    sub(f, "faultstring", message)
    return serialise(root)
