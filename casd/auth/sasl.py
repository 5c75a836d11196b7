# -*- test-case-name: tests.test_auth,tests.test_imap -*-
"""
SASL decoding shared by every protocol: one place turns PLAIN and LOGIN exchanges (and the
protocol's own plaintext commands) into one L{Credentials} object.
"""

from __future__ import annotations

import binascii
import enum
from base64 import b64decode

from attrs import field, frozen
from zope.interface import implementer

from twisted.cred.credentials import IUsernamePassword

from casd.failures import ProtocolViolation

#: Mechanisms casd accepts from clients, in the order it advertises them.
MECHANISMS = ("PLAIN", "LOGIN")

#: Longest username accepted from any client, in bytes.
MAX_USERNAME = 256


class SASLCancelled(Exception):
    """
    The client cancelled the exchange (C{*}).
    """


class SASLRefusal(enum.Enum):
    """
    Why a SASL exchange ended without credentials (see
    L{casd.session.frontend.FrontendProtocol.saslFailed}); each protocol words these itself.
    """

    #: The mechanism is not one of L{MECHANISMS}.
    UNSUPPORTED = "unsupported mechanism"
    #: A password may not be sent on this connection yet (no TLS, not trusted).
    PRIVACY_REQUIRED = "privacy required"
    #: The initial response is not valid base64.
    BAD_INITIAL = "invalid base64 in the initial response"
    #: A response to a challenge is not valid base64.
    BAD_RESPONSE = "invalid base64 in a response"
    #: The client answered a challenge with C{*}.
    CANCELLED = "cancelled by the client"
    #: The decoded message is malformed (a PLAIN message without its NULs, a name that is not
    #: UTF-8 or too long): protocols render it as failed authentication.
    MALFORMED = "malformed message"


@implementer(IUsernamePassword)
@frozen
class Credentials:
    """
    A login with a password, however the protocol carried it.

    @ivar username: the authentication identity (str).
    @ivar password: the password (bytes); never logged, never in C{repr}.
    @ivar authzid: the authorisation identity the client asked for, or C{''}.
    """

    username: str
    password: bytes = field(repr=False)
    authzid: str = ""

    def checkPassword(self, password: bytes) -> bool:
        import hmac

        return hmac.compare_digest(self.password, password)


def decodeBase64(data: bytes) -> bytes:
    """
    Strict base64 decoding of a client's SASL line.

    @raise ProtocolViolation: when C{data} is not valid base64.
    """
    try:
        return b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolViolation("invalid base64") from None


def encodeBase64(data: bytes) -> bytes:
    return binascii.b2a_base64(data, newline=False)


def _text(value: bytes, what: str) -> str:
    if len(value) > MAX_USERNAME or b"\x00" in value:
        raise ProtocolViolation(f"invalid {what}")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolViolation(f"{what} is not UTF-8") from None


def makeCredentials(username: bytes, password: bytes, authzid: bytes = b"") -> Credentials:
    """
    Build credentials from raw protocol fields (IMAP LOGIN, POP3 USER/PASS, ...).

    @raise ProtocolViolation: on a username that is not UTF-8, too long or holds NUL.
    """
    return Credentials(
        _text(username, "username"), password, _text(authzid, "authzid") if authzid else ""
    )


def parsePlain(message: bytes) -> Credentials:
    """
    Decode a PLAIN message (RFC 4616): C{authzid NUL authcid NUL passwd}.
    """
    parts = message.split(b"\x00")
    if len(parts) != 3:
        raise ProtocolViolation("malformed PLAIN message")
    authzid, authcid, passwd = parts
    creds = makeCredentials(authcid, passwd, authzid)
    if creds.authzid == creds.username:
        creds = Credentials(creds.username, creds.password)
    return creds


class SASLExchange:
    """
    The server side of one SASL exchange, independent of how the protocol frames it.

    Call L{start} with the initial response (or C{None}), then L{respond} with each decoded client
    response until one of them returns L{Credentials}.  Each call returns either the next challenge
    (C{bytes}, to be base64-encoded by the protocol) or the final L{Credentials}.
    """

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism.upper()
        if self.mechanism not in MECHANISMS:
            raise ValueError(mechanism)
        self._username: bytes | None = None

    def start(self, initial: bytes | None):
        if self.mechanism == "PLAIN":
            if initial is None:
                return b""
            return parsePlain(initial)
        # LOGIN: the initial response, when given, is the username.
        if initial is None or initial == b"":
            return b"Username:"
        self._username = initial
        return b"Password:"

    def respond(self, response: bytes):
        if self.mechanism == "PLAIN":
            return parsePlain(response)
        if self._username is None:
            self._username = response
            return b"Password:"
        return makeCredentials(self._username, response)

    def decode(self, line: bytes) -> bytes:
        """
        Decode one client line of this exchange.

        @raise SASLCancelled: on C{*}.
        @raise ProtocolViolation: on invalid base64.
        """
        line = line.strip()
        if line == b"*":
            raise SASLCancelled()
        return decodeBase64(line)

    @staticmethod
    def decodeInitial(data: bytes) -> bytes:
        """
        Decode an initial response; C{=} is the empty response (RFC 4959).
        """
        if data == b"=":
            return b""
        return decodeBase64(data)


def encodePlain(authcid: str, password: bytes, authzid: str = "") -> bytes:
    """
    Encode a PLAIN initial response for a backend login, base64-encoded.
    """
    # binascii directly: base64.b64encode is a Python wrapper around the same call.
    return binascii.b2a_base64(
        authzid.encode("utf-8") + b"\x00" + authcid.encode("utf-8") + b"\x00" + password, newline=False
    )
