# -*- test-case-name: tests.test_http_smuggling,tests.test_http_front -*-
"""
Header handling of the HTTP proxy: what goes to the backend, what comes back.

Headers are re-serialised by Twisted from parsed name/value pairs, never relayed as raw bytes.
Hop-by-hop headers (RFC 9110 7.6.1, and any named by C{Connection}) are removed both ways; the
client's own forwarding and identity headers are removed and casd's set from the real client
(the PROXY protocol's address when the listener has it).
"""

from __future__ import annotations

from base64 import b64encode

from twisted.web.http_headers import Headers

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
    for value in headers.getRawHeaders(b"Connection", []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return tokens


def backendRequestHeaders(
    incoming: Headers,
    vdir,
    client,
    host: bytes,
    user=None,
    strip=(),
    cookieFilter=None,
) -> Headers:
    """
    The headers to send to the backend for a client request.

    @param incoming: the client's request headers.
    @param vdir: the L{protocols.http.vdir.VirtualDirectory}.
    @param client: the L{casd.session.clientinfo.ClientInfo} (the real client).
    @param host: the C{Host} the client asked for (forwarded as C{X-Forwarded-Host}).
    @param user: the L{casd.interfaces.IMailboxUser}, or C{None} (anonymous).
    @param strip: more lower-case header names to drop (a credential source's own).
    @param cookieFilter: C{callable(name) -> bool}: whether a cookie of the client's C{Cookie}
        header goes on to the backend (casd's own cookies do not).
    """
    drop = set(HOP_BY_HOP | FORWARDING | IDENTITY) | connectionTokens(incoming) | set(strip)
    # The Agent frames the body (Content-Length from the body producer) and names the backend.
    drop.update((b"content-length", b"host"))
    drop.add(vdir.identityHeader.lower())
    if vdir.identity != "passthrough":
        drop.add(b"authorization")
    out = Headers()
    for name, values in incoming.getAllRawHeaders():
        lower = name.lower()
        if lower in drop:
            continue
        if lower == b"cookie" and cookieFilter is not None:
            values = [v for v in (filterCookies(v, cookieFilter) for v in values) if v]
            if not values:
                continue
        out.setRawHeaders(name, list(values))
    if incoming.hasHeader(b"te") and b"trailers" in b",".join(incoming.getRawHeaders(b"te")).lower():
        # The only TE value a proxy may pass on (RFC 9110 10.1.4).
        out.setRawHeaders(b"TE", [b"trailers"])
    peer = client.peerHost.encode("ascii", "replace")
    out.setRawHeaders(b"X-Forwarded-For", [peer])
    out.setRawHeaders(b"X-Forwarded-Proto", [b"https" if client.tls else b"http"])
    if host:
        out.setRawHeaders(b"X-Forwarded-Host", [host])
    node = peer if b":" not in peer else b'"[' + peer + b']"'
    forwarded = b"for=" + node + b";proto=" + (b"https" if client.tls else b"http")
    if host and _tokenSafe(host):
        forwarded += b";host=" + host
    out.setRawHeaders(b"Forwarded", [forwarded])
    out.setRawHeaders(b"X-Casd-Session", [client.sessionId.encode("ascii")])
    if user is not None and vdir.identity in ("header", "master"):
        name = user.address if vdir.identityValue == "address" and user.address else (
            getattr(user, "backendLogin", "") or user.login
        )
        out.setRawHeaders(vdir.identityHeader, [name.encode("utf-8")])
    if vdir.identity == "master":
        token = b64encode(vdir.masterUser.encode("utf-8") + b":" + vdir.masterPassword)
        out.setRawHeaders(b"Authorization", [b"Basic " + token])
    return out


def _tokenSafe(value: bytes) -> bool:
    return all(33 <= c < 127 and c not in b'",;' for c in value)


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


def copyResponseHeaders(backend: Headers, out: Headers) -> None:
    """
    Copy a backend response's end-to-end headers into the client response's C{out}.
    """
    drop = RESPONSE_DROP | connectionTokens(backend)
    for name, values in backend.getAllRawHeaders():
        if name.lower() in drop:
            continue
        if name.lower() == b"set-cookie":
            # casd may have set cookies of its own already (a refreshed forms session).
            out.setRawHeaders(name, (out.getRawHeaders(name) or []) + list(values))
            continue
        out.setRawHeaders(name, list(values))
