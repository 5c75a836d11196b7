# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
ActiveSync devices' Autodiscover answers (MS-ASCMD 2.2.1.1, C{…/mobilesync/responseschema/2006}).

The request is parsed by L{protocols.http.autodiscover.pox.parseRequest}; this module renders
the settings (one C{Server} of type C{MobileSync}), the redirect to another address, and the
600/601 errors inside the mobilesync C{Response}.
"""

from __future__ import annotations

from xml.etree.ElementTree import Element

from protocols.http.autodiscover.common import serialise, sub
from protocols.http.autodiscover.pox import BASE_RESPONSE, MOBILESYNC_RESPONSE, errorElement

CULTURE = "en:us"


def _root() -> tuple[Element, Element]:
    root = Element("Autodiscover", xmlns=BASE_RESPONSE)
    return root, sub(root, "Response", xmlns=MOBILESYNC_RESPONSE)


def mobileSyncSettings(activeSyncUrl: str, address: str, displayName: str) -> bytes:
    """
    The settings answer: the ActiveSync URL as both C{Url} and C{Name}.
    """
    root, response = _root()
    sub(response, "Culture", CULTURE)
    user = sub(response, "User")
    sub(user, "DisplayName", displayName)
    sub(user, "EMailAddress", address)
    action = sub(response, "Action")
    settings = sub(action, "Settings")
    server = sub(settings, "Server")
    sub(server, "Type", "MobileSync")
    sub(server, "Url", activeSyncUrl)
    sub(server, "Name", activeSyncUrl)
    return serialise(root)


def mobileSyncRedirect(address: str) -> bytes:
    """
    Ask again with another address (the client uses its domain).
    """
    root, response = _root()
    sub(response, "Culture", CULTURE)
    user = sub(response, "User")
    sub(user, "EMailAddress", address)
    action = sub(response, "Action")
    sub(action, "Redirect", address)
    return serialise(root)


def mobileSyncActionError(address: str, message: str, status: int = 2) -> bytes:
    """
    An error about the user (MS-ASCMD 4.2.2): C{Action/Error} with a C{Status}.
    """
    root, response = _root()
    sub(response, "Culture", CULTURE)
    user = sub(response, "User")
    sub(user, "EMailAddress", address)
    action = sub(response, "Action")
    error = sub(action, "Error")
    sub(error, "Status", str(status))
    sub(error, "Message", message)
    sub(error, "DebugData")
    return serialise(root)


def mobileSyncError(code: int, message: str, hostname: str = "casd") -> bytes:
    """
    A request error, 600 or 601 (MS-ASCMD 4.2.4): C{Error} inside the mobilesync C{Response}.
    """
    root, response = _root()
    errorElement(response, code, message, hostname)
    return serialise(root)
