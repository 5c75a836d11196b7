# -*- test-case-name: tests.test_ldapwire -*-
"""
The LDAP replies of a login, read without ldaptor's generic BER decoder.

ldaptor decodes a message through a tree of decoder contexts, one Python object per BER element:
about 630 Python calls for a search result entry of four attributes, 170 for a bind response.  A
login through the LDAP checker reads three such replies (the entry, the end of the search, the
bind's answer), so its decoding cost more than a whole login answered from the credential cache.
L{decodeResponse} reads the replies casd asks for (bind, search entry, search done, extended)
directly from the bytes and builds the same ldaptor objects; anything else (a reply with controls,
referrals or SASL credentials, a search reference, an unknown operation) is left to ldaptor's
decoder, so nothing is read differently.

L{search} sends a search and collects its entries without ldaptor's L{LDAPEntry} (which parses
every entry's DN and builds a case-insensitive dictionary per entry).  L{bindRequest} and
L{searchRequest} encode the two requests of a login directly (the same bytes as ldaptor's, about
300 Python calls fewer), for ldaptor's client to send like any other operation.
"""

from __future__ import annotations

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldaperrors
from twisted.internet import defer

#: BER tags read here.
_SEQUENCE, _INTEGER, _OCTETS, _ENUMERATED, _SET = 0x30, 0x02, 0x04, 0x0A, 0x31
_BIND, _ENTRY, _DONE, _EXTENDED = 0x61, 0x64, 0x65, 0x78
_RESPONSE_NAME = 0x8A
#: The bit of a constructed element's tag (ldaptor keeps its objects' tags without it).
_CONSTRUCTED = 0x20

#: The search's result codes that end it with the entries found: success, and the size limit
#: (casd asks for at most two entries to tell "one" from "several").
_SEARCH_DONE = (0, 4)


def _length(data: bytes, i: int, end: int) -> tuple[int, int]:
    """
    The BER length at C{data[i]}.

    @return: C{(length, index of the first content byte)}.
    @raise ValueError: an indefinite or over-long length, or one that runs past C{end}.
    """
    if i >= end:
        raise ValueError("truncated BER element")
    first = data[i]
    if first < 0x80:
        return first, i + 1
    count = first & 0x7F
    if count == 0 or count > 4:
        raise ValueError("unsupported BER length")
    if i + 1 + count > end:
        raise ValueError("truncated BER length")
    return int.from_bytes(data[i + 1 : i + 1 + count], "big"), i + 1 + count


def _element(data: bytes, i: int, end: int) -> tuple[int, int, int]:
    """
    The BER element at C{data[i]} (single-byte tags only, as LDAP's).

    @return: C{(tag, start of its content, end of its content)}.
    @raise ValueError: when it does not fit before C{end}.
    """
    if i >= end:
        raise ValueError("truncated BER element")
    tag = data[i]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte BER tag")
    length, start = _length(data, i + 1, end)
    stop = start + length
    if stop > end:
        raise ValueError("BER element longer than its container")
    return tag, start, stop


def messageSize(data: bytes) -> int | None:
    """
    The size of the LDAPMessage that C{data} starts with.

    @return: its size in bytes, header included, or C{None} while its header is incomplete.
    @raise ValueError: when C{data} does not start with a SEQUENCE of a definite length.
    """
    if data[0] != _SEQUENCE:
        raise ValueError("not an LDAPMessage")
    if len(data) < 2:
        return None
    first = data[1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    if count == 0 or count > 4:
        raise ValueError("unsupported BER length")
    if len(data) < 2 + count:
        return None
    return 2 + count + int.from_bytes(data[2 : 2 + count], "big")


def _octets(data: bytes, i: int, end: int) -> tuple[bytes, int]:
    tag, start, stop = _element(data, i, end)
    if tag != _OCTETS:
        raise ValueError("expected an OCTET STRING")
    return data[start:stop], stop


def _result(data: bytes, i: int, end: int) -> tuple[int, bytes, bytes, int]:
    """
    The LDAPResult fields at C{data[i]}: C{(resultCode, matchedDN, errorMessage, next index)}.
    """
    tag, start, stop = _element(data, i, end)
    if tag != _ENUMERATED or stop == start:
        raise ValueError("expected a result code")
    code = int.from_bytes(data[start:stop], "big", signed=True)
    matched, i = _octets(data, stop, end)
    message, i = _octets(data, i, end)
    return code, matched, message, i


def _entry(data: bytes, i: int, end: int):
    objectName, i = _octets(data, i, end)
    tag, start, stop = _element(data, i, end)
    if tag != _SEQUENCE or stop != end:
        raise ValueError("expected the entry's attributes")
    attributes = []
    i = start
    while i < stop:
        tag, aStart, aStop = _element(data, i, stop)
        if tag != _SEQUENCE:
            raise ValueError("expected an attribute")
        kind, j = _octets(data, aStart, aStop)
        tag, vStart, vStop = _element(data, j, aStop)
        if tag != _SET or vStop != aStop:
            raise ValueError("expected an attribute's values")
        values = []
        j = vStart
        while j < vStop:
            value, j = _octets(data, j, vStop)
            values.append(value)
        attributes.append((kind, values))
        i = aStop
    return pureldap.LDAPSearchResultEntry(objectName=objectName, attributes=attributes, tag=_ENTRY & ~_CONSTRUCTED)


def decodeResponse(data: bytes):
    """
    Decode one whole LDAPMessage (C{data} is exactly its bytes, see L{messageSize}).

    @return: the L{pureldap.LDAPMessage} ldaptor's decoder would give, or C{None} for a message
        this module leaves to ldaptor.
    @raise ValueError: when C{data} is not a well-formed LDAPMessage.
    """
    end = len(data)
    tag, i, stop = _element(data, 0, end)
    if tag != _SEQUENCE or stop != end:
        raise ValueError("not one LDAPMessage")
    tag, start, stop = _element(data, i, end)
    if tag != _INTEGER or stop == start:
        raise ValueError("expected a message id")
    messageID = int.from_bytes(data[start:stop], "big", signed=True)
    op, start, stop = _element(data, stop, end)
    if stop != end:
        return None  # controls follow
    if op == _ENTRY:
        value = _entry(data, start, stop)
    elif op in (_BIND, _DONE, _EXTENDED):
        code, matched, message, i = _result(data, start, stop)
        name = None
        if op == _EXTENDED and i < stop:
            tag, nStart, nStop = _element(data, i, stop)
            if tag == _RESPONSE_NAME:
                name, i = data[nStart:nStop], nStop
        if i != stop:
            return None  # referrals, SASL credentials, an extended response's value
        if op == _BIND:
            value = pureldap.LDAPBindResponse(resultCode=code, matchedDN=matched, errorMessage=message)
        elif op == _DONE:
            value = pureldap.LDAPSearchResultDone(
                resultCode=code, matchedDN=matched, errorMessage=message, tag=_DONE & ~_CONSTRUCTED
            )
        else:
            value = pureldap.LDAPExtendedResponse(
                resultCode=code, matchedDN=matched, errorMessage=message, responseName=name, tag=_EXTENDED & ~_CONSTRUCTED
            )
    else:
        return None
    return pureldap.LDAPMessage(value, id=messageID)


# -- requests -----------------------------------------------------------------------------------


def _encodeLength(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    """
    A BER element: C{tag}, the length of C{content}, C{content}.
    """
    return bytes((tag,)) + _encodeLength(len(content)) + content


def _integer(tag: int, n: int) -> bytes:
    return tlv(tag, n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True))


def octetString(value) -> bytes:
    """
    An OCTET STRING of C{value} (text in UTF-8).
    """
    return tlv(_OCTETS, value.encode("utf-8") if isinstance(value, str) else value)


class Encoded:
    """
    A request already encoded, sent by ldaptor's client as it sends its own operation objects
    (it asks them C{needs_answer} and C{toWire()}).
    """

    needs_answer = 1

    def __init__(self, data: bytes) -> None:
        self.data = data

    def toWire(self) -> bytes:
        return self.data


def bindRequest(dn, password: bytes) -> Encoded:
    """
    A simple bind (LDAPv3) as C{dn} with C{password}.
    """
    return Encoded(tlv(0x60, b"\x02\x01\x03" + octetString(dn) + tlv(0x80, password)))


def searchRequest(base, scope: int, sizeLimit: int, timeLimit: int, filter, attributes) -> Encoded:
    """
    A search never dereferencing aliases, for C{attributes} (names) with C{filter}: its encoding
    (L{casd.auth.ldapfilter.FilterTemplate.wire}) or an ldaptor filter object.
    """
    return Encoded(
        tlv(
            0x63,
            octetString(base)
            + _integer(_ENUMERATED, scope)
            + _integer(_ENUMERATED, pureldap.LDAP_DEREF_neverDerefAliases)
            + _integer(_INTEGER, sizeLimit)
            + _integer(_INTEGER, timeLimit)
            + b"\x01\x01\x00"
            + (filter if isinstance(filter, bytes) else filter.toWire())
            + tlv(_SEQUENCE, b"".join(octetString(a) for a in attributes)),
        )
    )


def search(client, request) -> defer.Deferred:
    """
    Send C{request} on ldaptor's C{client} and collect its entries.

    @return: a L{Deferred} firing with the L{pureldap.LDAPSearchResultEntry} list when the search
        ends with success or its size limit, failing with the L{ldaperrors.LDAPException} of any
        other result, or with the reason the connection was lost.
    @raise ldaptor.protocols.ldap.ldapclient.LDAPClientConnectionLostException: when the
        connection is already gone.
    """
    done = defer.Deferred()
    entries: list = []

    def handler(message) -> bool:
        if isinstance(message, pureldap.LDAPSearchResultEntry):
            entries.append(message)
            return False
        if isinstance(message, pureldap.LDAPSearchResultReference):
            return False
        if isinstance(message, pureldap.LDAPSearchResultDone):
            if message.resultCode in _SEARCH_DONE:
                done.callback(entries)
            else:
                done.errback(ldaperrors.get(message.resultCode, message.errorMessage))
            return True
        # Raised into the client's dataReceived: the connection is dropped.
        raise ldaperrors.LDAPProtocolError(f"bad search response: {type(message).__name__}")

    def lost(failure):
        if not done.called:
            done.errback(failure)

    client.send_multiResponse(request, handler).addErrback(lost)
    return done
