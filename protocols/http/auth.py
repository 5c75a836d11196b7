# -*- test-case-name: tests.test_http_site,tests.test_http_front -*-
"""
HTTP authentication: one layer for every vdir, in front of the core's shared login path.

Each method (Basic here; forms cookies and client certificates in their own modules) is an
L{IHTTPCredentialSource}: it recognises its credentials in a request and knows the answer to give
when they are missing.  L{HTTPAuthenticator} asks the vdir's methods in order; a password goes
through the same L{casd.auth.authenticator.Authenticator} (portal, credential cache, penalty) as
IMAP, so guesses on C{/EWS} count against the same address and user as guesses on IMAP.
"""

from __future__ import annotations

import binascii
from base64 import b64decode

from zope.interface import Attribute, Interface, implementer

from twisted.internet import defer
from twisted.python.failure import Failure

from casd.auth.sasl import makeCredentials
from casd.failures import AuthenticationFailed, CASFailure, PrivacyRequired, ProtocolViolation
from protocols.http.channel import headerValues
from protocols.http.status import HTTPError, Unauthenticated


class IHTTPCredentialSource(Interface):
    """
    One authentication method of the HTTP front end (C{basic}, C{forms}, C{cert}): named in a
    vdir's C{auth} list, asked in that order by L{HTTPAuthenticator}.
    """

    method = Attribute("C{str}: the name used in C{[[http.vdir]] auth}, e.g. C{\"forms\"}.")

    def authenticate(request, vdir, client):
        """
        Recognise and check this method's credentials in C{request}.

        @param request: the L{twisted.web.http.Request} (headers read; body not necessarily).
        @param vdir: the L{protocols.http.vdir.VirtualDirectory}.
        @param client: the connection's L{casd.session.clientinfo.ClientInfo}.
        @return: C{None} when the request carries no credentials of this kind (the next method
            is asked); otherwise a L{Deferred} firing with the L{casd.interfaces.IMailboxUser},
            or failing with a L{casd.failures.CASFailure}: L{AuthenticationFailed} for refused
            credentials (the method's L{challenge} is then sent), L{DirectoryUnavailable} or
            L{Throttled} for the rest (503, 429: never a 401).
        """

    def challenge(request, vdir):
        """
        The answer when credentials are missing or refused and this method is the vdir's first
        (Basic: C{401} with C{WWW-Authenticate}; forms: a C{302} to the logon page, or C{440}
        for an XHR).

        @return: a L{protocols.http.status.HTTPError}.
        """


def basicChallenge(vdir) -> HTTPError:
    realm = vdir.realm.replace("\\", "\\\\").replace('"', '\\"')
    return HTTPError(
        401,
        (
            (b"WWW-Authenticate", f'Basic realm="{realm}", charset="UTF-8"'.encode("utf-8")),
            (b"Content-Type", b"text/plain; charset=utf-8"),
        ),
        b"Authentication required.\n",
    )


def parseBasic(header: bytes):
    """
    Split a C{Basic} C{Authorization} value.

    @return: C{(username, password)} as bytes, or C{None} when C{header} is not Basic.
    @raise ProtocolViolation: on bad base64 or a missing colon (a bad Basic header is
        refused credentials, not a 400: clients then prompt).
    """
    scheme, _, token = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolViolation("bad base64 in Basic credentials") from None
    user, colon, password = decoded.partition(b":")
    if not colon:
        raise ProtocolViolation("Basic credentials without a colon")
    return user, password


@implementer(IHTTPCredentialSource)
class BasicCredentials:
    """
    HTTP Basic (RFC 7617), checked by the shared authenticator.

    @ivar authenticator: the L{casd.auth.authenticator.Authenticator}.
    """

    method = "basic"

    def __init__(self, authenticator) -> None:
        self.authenticator = authenticator

    def authenticate(self, request, vdir, client):
        headers = headerValues(request.requestHeaders, b"Authorization")
        if not headers:
            return None
        if len(headers) > 1:
            return defer.fail(AuthenticationFailed("more than one Authorization header"))
        header = headers[0]
        channel = request.channel
        memo = getattr(channel, "basicMemo", None)
        if memo is not None and memo[0] == header and client.plaintextAllowed:
            # The connection's last Basic credentials, answered from the credential cache: the
            # same answer while the cache holds it (L{Authenticator.loginAgain}).
            avatar = self.authenticator.loginAgain(memo[1], client)
            if avatar is not None:
                return defer.succeed(avatar)
        try:
            parsed = parseBasic(header)
        except ProtocolViolation as e:
            return defer.fail(AuthenticationFailed(str(e)))
        if parsed is None:
            return None
        if not client.plaintextAllowed:
            return defer.fail(PrivacyRequired("Basic credentials over plain HTTP"))
        user, password = parsed
        try:
            credentials = makeCredentials(user, password)
        except ProtocolViolation as e:
            return defer.fail(AuthenticationFailed(str(e)))
        found = self.authenticator.loginNowMemo(credentials, client)
        if found is not None:
            # Remembered on the connection (never logged): its next request with the same
            # header skips the parsing and the cache's digest.
            channel.basicMemo = (header, found[1])
            return defer.succeed(found[0])
        channel.basicMemo = None
        return self.authenticator.login(credentials, client)

    def challenge(self, request, vdir):
        return basicChallenge(vdir)

    def again(self, request, client):
        """
        What L{authenticate} answers at once from the connection's memo (the same single
        C{Authorization} header as its last Basic login, the credential cache still holding that
        success, no lock-out since: L{casd.auth.authenticator.Authenticator.loginAgain}), else
        C{None}.
        """
        memo = request.channel.basicMemo
        if memo is None:
            return None
        headers = request.requestHeaders._rawHeaders.get(b"Authorization")
        if headers is None or headers[1:] or headers[0] != memo[0] or not client.plaintextAllowed:
            return None
        return self.authenticator.loginAgain(memo[1], client)


class HTTPAuthenticator:
    """
    Authenticates requests for every vdir: the vdir's methods are asked in order; the first that
    recognises credentials decides.

    @ivar sources: method name -> L{IHTTPCredentialSource}.
    """

    def __init__(self, sources) -> None:
        """
        @param sources: the L{IHTTPCredentialSource}s of this node (other modules add theirs
            with L{register}).
        """
        self.sources = {s.method: s for s in sources}

    def register(self, source) -> None:
        """
        Add (or replace) the method C{source.method}.
        """
        self.sources[source.method] = source

    def authenticatedAgain(self, request, vdir, client):
        """
        The user L{authenticate} would give at once for a vdir whose first method is Basic,
        from the connection's memo (L{BasicCredentials.again}), without a L{Deferred}; else
        C{None} (ask L{authenticate}).
        """
        auth = vdir.auth
        if auth and auth[0] == "basic" and request.channel.basicMemo is not None:
            source = self.sources.get("basic")
            if source.__class__ is BasicCredentials:
                return source.again(request, client)
        return None

    def _sourcesFor(self, vdir):
        for method in vdir.auth:
            source = self.sources.get(method)
            if source is not None:
                yield source

    def challengeFor(self, request, vdir) -> HTTPError:
        """
        The answer to a request without usable credentials: the challenge of the vdir's first
        available method.
        """
        for source in self._sourcesFor(vdir):
            return source.challenge(request, vdir)
        return basicChallenge(vdir)

    def authenticate(self, request, vdir, client=None):
        """
        @param request: the L{twisted.web.http.Request}, headers read.
        @param vdir: the L{protocols.http.vdir.VirtualDirectory} it matched.
        @param client: the connection's L{casd.session.clientinfo.ClientInfo}; by default the
            request's (C{request.client}: the connection's, or the real client a trusted
            balancer reported).
        @return: a L{Deferred} firing with the L{casd.interfaces.IMailboxUser} (C{None} for an
            anonymous vdir), or failing with a L{casd.failures.CASFailure}; missing or refused
            credentials fail with L{Unauthenticated}, which carries the challenge to send.
        """
        if client is None:
            client = getattr(request, "client", None) or request.channel.client
        if vdir.auth == ("none",):
            return defer.succeed(None)
        sources = self.sources
        for method in vdir.auth:
            source = sources.get(method)
            if source is None:
                continue
            try:
                d = source.authenticate(request, vdir, client)
            except CASFailure as e:
                d = defer.fail(e)
            if d is None:
                continue
            if d.called and not isinstance(d.result, Failure):
                return d  # authenticated at once: nothing to translate
            return d.addErrback(self._refused, source, request, vdir)
        return defer.fail(Unauthenticated("no credentials", self.challengeFor(request, vdir)))

    def _refused(self, failure, source, request, vdir):
        if failure.check(Unauthenticated):
            return failure
        if failure.check(AuthenticationFailed):
            raise Unauthenticated(str(failure.value), source.challenge(request, vdir))
        return failure
