# -*- test-case-name: tests.test_http_smuggling,tests.test_http_front -*-
"""
Header handling of the HTTP proxy: what goes to the backend, what comes back.

Headers are re-serialised by Twisted from parsed name/value pairs, never relayed as raw bytes.
Hop-by-hop headers (RFC 9110 7.6.1, and any named by C{Connection}) are removed both ways; the
client's own forwarding and identity headers are removed and casd's set from the real client
(the PROXY protocol's address when the listener has it).
"""

from __future__ import annotations

import re
from base64 import b64encode

from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder

#: Removed in both directions (lower case).
HOP_BY_HOP = frozenset(
    (
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        # casd answered the client's 100-continue itself; the backend gets the body at once.
        b"expect",
    )
)

#: The hops a request may still take between casd nodes (sites), as IMAP's C{x-proxy-ttl}.
PROXY_TTL = b"X-Casd-Proxy-TTL"

#: Forwarding headers casd sets itself; a client's are dropped.
FORWARDING = frozenset(
    (
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-real-ip",
        PROXY_TTL.lower(),
    )
)

#: Identity headers that backends are commonly told to trust; removed from every client request
#: whatever the vdir's own C{identity_header}.
IDENTITY = frozenset(
    (
        b"x-remote-user",
        b"remote-user",
        b"x-webobjects-remote-user",
        b"x-forwarded-user",
        b"x-authenticated-user",
        b"x-casd-user",
    )
)

#: Response headers casd does not take from a backend (Twisted writes its own framing; a
#: backend's C{Content-Length} is kept, so the client sees the length and no chunking).
RESPONSE_DROP = HOP_BY_HOP


def connectionTokens(headers: Headers) -> set[bytes]:
    """
    The header names a C{Connection} header lists (they are hop-by-hop for this message).
    """
    tokens = set()
    for value in headers._rawHeaders.get(b"Connection", ()):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def _canonicalTokens(tokens: set[bytes]) -> set[bytes]:
    """
    C{Connection}'s tokens as L{Headers} spells its keys (a token that is no field name names
    no field).
    """
    out = set()
    for token in tokens:
        try:
            out.add(_nameEncoder.encode(token))
        except InvalidHeaderName:
            pass
    return out


def backendRequestHeaders(
    incoming: Headers,
    vdir,
    client,
    host: bytes,
    user=None,
    strip=(),
    cookieFilter=None,
) -> list[tuple[bytes, bytes]]:
    """
    The header fields to send to the backend for a client request, as C{(name, value)} pairs
    in the client's order, casd's own last (L{protocols.http.upstream} serialises them).

    @param incoming: the client's request headers.
    @param vdir: the L{protocols.http.vdir.VirtualDirectory}.
    @param client: the L{casd.session.clientinfo.ClientInfo} (the real client).
    @param host: the C{Host} the client asked for (forwarded as C{X-Forwarded-Host}).
    @param user: the L{casd.interfaces.IMailboxUser}, or C{None} (anonymous).
    @param strip: more lower-case header names to drop (a credential source's own), a
        C{frozenset} or a tuple.
    @param cookieFilter: C{callable(name) -> bool}: whether a cookie of the client's C{Cookie}
        header goes on to the backend (casd's own cookies do not).
    """
    # The names compared as L{Headers} keys them (canonical spelling, a function of the lower
    # case name): no lower() per field.
    drop = _dropSet(strip, vdir.identityHeader, vdir.identity != "passthrough")
    raw = incoming._rawHeaders
    if b"Connection" in raw:
        tokens = connectionTokens(incoming)
        if tokens:
            drop = drop | _canonicalTokens(tokens)
    out = []
    te = False
    for name, values in raw.items():
        if name in drop:
            if name == b"TE":
                te = b"trailers" in b",".join(values).lower()
            continue
        if name == b"Cookie" and cookieFilter is not None:
            values = [v for v in (filterCookies(v, cookieFilter) for v in values) if v]
        if len(values) == 1:
            out.append((name, values[0]))
        else:
            out += [(name, value) for value in values]
    if te:
        # The only TE value a proxy may pass on (RFC 9110 10.1.4).
        out.append((b"TE", b"trailers"))
    sessionId = client.sessionId
    peerHost = client.peerHost
    peer = _ASCII.get(peerHost)
    if peer is None:
        peer = _ascii(peerHost)
    scheme = b"https" if client.tls else b"http"
    node = peer if b":" not in peer else b'"[' + peer + b']"'
    forwarded = b"for=" + node + b";proto=" + scheme
    if host:
        if _tokenSafe(host):
            forwarded += b";host=" + host
        out += [
            (b"X-Forwarded-For", peer),
            (b"X-Forwarded-Proto", scheme),
            (b"X-Forwarded-Host", host),
            (b"Forwarded", forwarded),
            (b"X-Casd-Session", sessionId.encode("ascii")),
        ]
    else:
        out += [
            (b"X-Forwarded-For", peer),
            (b"X-Forwarded-Proto", scheme),
            (b"Forwarded", forwarded),
            (b"X-Casd-Session", sessionId.encode("ascii")),
        ]
    identity = vdir.identity
    if identity == "passthrough":
        return out
    if user is not None and (identity == "header" or identity == "master"):
        name = user.address if vdir.identityValue == "address" and user.address else (
            getattr(user, "backendLogin", "") or user.login
        )
        out.append((vdir.identityHeader, name.encode("utf-8")))
    if identity == "master":
        token = b64encode(vdir.masterUser.encode("utf-8") + b":" + vdir.masterPassword)
        out.append((b"Authorization", b"Basic " + token))
    return out


#: Client addresses as bytes (a bounded memo: the same clients come back).
_ASCII: dict = {}


def _ascii(text: str) -> bytes:
    value = text.encode("ascii", "replace")
    if len(_ASCII) < 4096:
        _ASCII[text] = value
    return value


_DROP_SETS: dict = {}


def _dropSet(strip, identityHeader: bytes, ownAuthorization: bool) -> frozenset:
    """
    The names dropped from a client request, spelt as L{Headers} keys them, for a credential
    source's C{strip} (lower-case names), a vdir's identity header and whether the client's
    C{Authorization} stays with casd.
    """
    key = (strip, identityHeader, ownAuthorization)
    drop = _DROP_SETS.get(key)
    if drop is None:
        lower = _ALWAYS_DROP | frozenset(strip) | {identityHeader.lower()}
        if ownAuthorization:
            lower |= {b"authorization"}
        drop = frozenset(_canonicalTokens(lower))
        if len(_DROP_SETS) < 1024:
            _DROP_SETS[key] = drop
    return drop


#: Dropped from every client request: hop-by-hop, forwarding and identity fields, and the
#: framing and C{Host}, which the backend client writes itself.
_ALWAYS_DROP = frozenset(
    HOP_BY_HOP | FORWARDING | IDENTITY | {b"content-length", b"host"}
)


#: A byte that may not appear unquoted in a C{Forwarded} parameter here.
_UNSAFE = re.compile(rb'[^\x21-\x7e]|[",;]')


def _tokenSafe(value: bytes) -> bool:
    return _UNSAFE.search(value) is None


def filterCookies(header: bytes, keep) -> bytes:
    """
    C{header} (a C{Cookie} value) without the cookies C{keep(name)} refuses.
    """
    parts = []
    for part in header.split(b";"):
        name = part.strip().split(b"=", 1)[0]
        if name and keep(name):
            parts.append(part.strip())
    return b"; ".join(parts)


def copyResponseHeaders(backend, out: Headers) -> None:
    """
    Copy a backend response's end-to-end fields (C{(name, value)} pairs, hop-by-hop ones
    already removed by L{protocols.http.upstream}) into the client response's C{out}: each
    replaces casd's own of that name, but C{Set-Cookie} adds to casd's.
    """
    seen = set()
    for name, value in backend:
        lower = name.lower()
        if lower in RESPONSE_DROP:
            continue
        if lower in seen or lower == b"set-cookie":
            out.addRawHeader(name, value)
        else:
            seen.add(lower)
            out.setRawHeaders(name, [value])
