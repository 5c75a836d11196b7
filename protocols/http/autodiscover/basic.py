"""
HTTP Basic authentication of a C{twisted.web} request through casd's shared login path (portal,
penalty, credential cache): the seam the Autodiscover resources use to learn who is asking.
"""

from __future__ import annotations

import binascii
from base64 import b64decode

from twisted.internet import defer

from casd.auth.sasl import Credentials
from casd.failures import AuthenticationFailed, PrivacyRequired
from casd.session.clientinfo import ClientInfo, isTrusted, newSessionId


def basicCredentials(header: bytes | None) -> Credentials | None:
    """
    The credentials of an C{Authorization: Basic} header, or C{None} when there is none or it
    does not decode.
    """
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"basic" or not value:
        return None
    try:
        decoded = b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    username, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return Credentials(username.decode("utf-8"), password)
    except UnicodeDecodeError:
        return None


def clientInfoOf(request, listener: str, trustedNetworks) -> ClientInfo:
    """
    What casd knows of the client of an HTTP request.
    """
    peer = request.getClientAddress()
    local = request.getHost()
    host = getattr(peer, "host", "") or ""
    return ClientInfo(
        sessionId=newSessionId(),
        protocol="http",
        listener=listener,
        peerHost=host,
        peerPort=getattr(peer, "port", 0) or 0,
        localHost=getattr(local, "host", "") or "",
        localPort=getattr(local, "port", 0) or 0,
        tls=request.isSecure(),
        trusted=isTrusted(host, tuple(trustedNetworks)),
    )


class BasicAuthenticator:
    """
    C{authenticate(request)}: the request's Basic credentials through the shared
    L{casd.auth.authenticator.Authenticator}.
    """

    def __init__(self, authenticator, trustedNetworks=(), listener: str = "https") -> None:
        self.authenticator = authenticator
        self.trustedNetworks = tuple(trustedNetworks)
        self.listener = listener

    def __call__(self, request):
        credentials = basicCredentials(request.getHeader(b"authorization"))
        if credentials is None:
            return defer.fail(AuthenticationFailed("no credentials"))
        client = clientInfoOf(request, self.listener, self.trustedNetworks)
        if not client.plaintextAllowed:
            return defer.fail(PrivacyRequired("Basic authentication needs TLS"))
        return self.authenticator.login(credentials, client)
