# -*- test-case-name: tests.test_http_forms,tests.test_http_forms_site -*-
"""
Forms login for browsers (C{/owa} style): casd's own logon page, the session cookie of
L{protocols.http.cookies}, logoff, and the answers to a request without a valid session.

Paths, under the vdir's prefix C{P}:
  - C{P/_casd/logon}: C{GET} shows the logon page, C{POST} logs on (fields C{username},
    C{password}, C{security} = C{public}|C{private}, C{url}, C{csrf}) and redirects (302) to C{url}
    when it is a path inside the vdir, else to C{P/};
  - C{P/_casd/logoff} (and any configured alias such as C{logoff.owa}): revokes and clears the
    cookie, then shows the logon page.

A request of the vdir without a valid session gets a 302 to the logon page when it is a
navigation and C{440 Login Timeout} otherwise (an XHR or fetch; see L{isNavigation}).

CSRF on the logon form: a double-submit token (a random C{__Host-} cookie, C{SameSite=Strict},
echoed in a hidden field, compared in constant time) plus C{Origin}/C{Sec-Fetch-Site} checks.
"""

from __future__ import annotations

import base64
import hmac
import os
import re
from urllib.parse import parse_qs, quote, unquote, urlsplit

from zope.interface import implementer

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from casd.auth import UserRecord
from casd.auth.sasl import makeCredentials
from casd.config import ConfigError, Setting
from casd.failures import (
    AuthenticationFailed,
    CASFailure,
    DirectoryUnavailable,
    ProtocolViolation,
    Throttled,
)
import protocols.http.cookies as _cookies
from protocols.http.auth import IHTTPCredentialSource
from protocols.http.local import LocalService
from protocols.http.logonpage import renderLogonPage
from protocols.http.status import HTTPError

LOGON = "/_casd/logon"
LOGOFF = "/_casd/logoff"

#: Largest logon form body read, in bytes.
MAX_FORM = 8192

_CSRF_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")


class LogonRequired(AuthenticationFailed):
    """
    The request has no valid forms session.  Rendered by L{FormsLogon.challenge}: a 302 to the
    logon page or a 440, never a 401.

    @ivar state: the L{protocols.http.cookies.CookieCheck} state (C{absent}, C{invalid},
        C{expired}, C{revoked}).
    """

    def __init__(self, state: str) -> None:
        super().__init__(f"no valid forms session ({state})")
        self.state = state


def safeTarget(url: str, prefix: str) -> str | None:
    """
    Accept a post-logon target only when it is a path inside the vdir on this origin: no scheme,
    no host, no C{//} or backslash tricks (also once percent-decoded), no control characters, not
    casd's own logon paths.

    @param prefix: the vdir's path prefix, e.g. C{/owa}.
    @return: C{url}, or C{None} when it must not be used.
    """
    if not url or len(url) > 2048 or any(not 0x21 <= ord(c) <= 0x7E for c in url):
        return None
    if "\\" in url or not url.startswith("/") or url.startswith("//"):
        return None
    decoded = unquote(unquote(url))
    if "\\" in decoded or decoded.startswith("//") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return None
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        return None
    path = parts.path
    base = prefix.rstrip("/")
    if base and not (path.lower() == base.lower() or path.lower().startswith(base.lower() + "/")):
        return None
    if "/_casd/" in decoded.lower() + "/":
        return None
    return url


def isNavigation(request) -> bool:
    """
    Tell a page load (answered with a redirect to the logon page) from a script's request
    (answered with C{440 Login Timeout}, which scripts of OWA-style applications understand):
      - C{X-Requested-With} present: a script;
      - else C{Sec-Fetch-Mode} present: a navigation exactly when it says C{navigate};
      - else a C{GET} or C{HEAD} accepting C{text/html} is a navigation, anything else a script.
    """
    headers = request.requestHeaders
    if headers.hasHeader(b"x-requested-with"):
        return False
    mode = headers.getRawHeaders(b"sec-fetch-mode")
    if mode:
        return mode[0].strip().lower() == b"navigate"
    if request.method not in (b"GET", b"HEAD"):
        return False
    accept = b",".join(headers.getRawHeaders(b"accept", ())).lower()
    return b"text/html" in accept


def _ownOrigin(request) -> str:
    host = (request.getHeader(b"host") or b"").decode("latin-1").strip().lower()
    return f"{'https' if request.isSecure() else 'http'}://{host}"


def _defaultPort(origin: str) -> str:
    for scheme, port in (("https://", ":443"), ("http://", ":80")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


def _avatarRecord(avatar) -> UserRecord:
    if isinstance(avatar, UserRecord):
        return avatar
    return UserRecord(
        login=avatar.login,
        address=avatar.address,
        backendLogin=avatar.backendLogin,
        mailHost=avatar.mailHost,
        site=avatar.site,
        policy=tuple(dict(avatar.policy).items()),
    )


class FormsLogon:
    """
    Forms login for one vdir.

    @ivar prefix: the vdir's path prefix (C{/owa}).
    @ivar cookies: the shared L{protocols.http.cookies.SessionCookies}.
    """

    log = Logger()

    def __init__(
        self,
        prefix: str,
        cookies: _cookies.SessionCookies,
        authenticator,
        clientInfo,
        background=None,
        title: str = "Mail",
        offerChoice: bool = True,
        logoffAliases=(),
        csrfCookieName: str = "__Host-casd-logon",
    ) -> None:
        """
        @param authenticator: the core's L{casd.auth.authenticator.Authenticator} (the same
            portal, cache and penalty as every protocol).
        @param clientInfo: C{request -> ClientInfo}, the HTTP listener's view of the client.
        @param background: the compiled background patterns (L{cookies.compileBackground}).
        @param offerChoice: show the public/private choice; without it every session is public.
        @param logoffAliases: further paths, relative to the prefix, that log off (C{logoff.owa}).
        """
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        self.cookies = cookies
        self.authenticator = authenticator
        self.clientInfo = clientInfo
        if background is None:
            background = _cookies.compileBackground(_cookies.DEFAULT_BACKGROUND_PATTERNS)
        self.background = background
        self.title = title
        self.offerChoice = offerChoice
        self.logonPath = self.prefix + LOGON
        self.logoffPaths = {self.prefix + LOGOFF} | {
            self.prefix + "/" + a.strip("/") for a in logoffAliases
        }
        self.csrfCookieName = csrfCookieName

    # -- authenticating the vdir's requests -----------------------------------------------------

    def ownsPath(self, path: bytes) -> bool:
        """
        @param path: the request path (no query).
        @return: whether the request is for the logon or logoff page (answered here, never
            proxied and never needing a session).
        """
        p = path.decode("latin-1").lower()
        return p == self.logonPath.lower() or p in {q.lower() for q in self.logoffPaths}

    def hasCredentials(self, request) -> bool:
        return bool(
            _cookies.cookieValues(request.requestHeaders.getRawHeaders(b"cookie", ()), self.cookies.name)
        )

    def authenticate(self, request, longPoll: bool = False) -> defer.Deferred:
        """
        Check the request's session cookie; slide it on a foreground request (adding a
        C{Set-Cookie} to the response); remove casd's cookies from the request so that they never
        reach a backend.

        @param longPoll: the vdir treats this request as a long poll (never slides).
        @return: a L{Deferred} firing with the L{casd.interfaces.IMailboxUser}, or failing with
            L{LogonRequired}.
        """
        d = self.cookies.check(request)
        self._stripOwnCookies(request)
        d.addCallback(self._checked, request, longPoll)
        return d

    def _checked(self, check, request, longPoll):
        if not check.valid:
            raise LogonRequired(check.state)
        background = _cookies.isBackground(request, self.background, longPoll)
        refreshed = self.cookies.touch(check.session, background)
        if refreshed is not None:
            request.responseHeaders.addRawHeader(b"set-cookie", self.cookies.setCookie(refreshed))
        return check.session.user

    def _stripOwnCookies(self, request) -> None:
        headers = request.requestHeaders
        values = headers.getRawHeaders(b"cookie")
        if not values:
            return
        names = (self.cookies.name, self.csrfCookieName)
        kept = [v for v in (_cookies.stripCookies(value, names) for value in values) if v]
        if kept:
            headers.setRawHeaders(b"cookie", kept)
        else:
            headers.removeHeader(b"cookie")

    def challenge(self, request, state: str = "absent") -> HTTPError:
        """
        The answer to a request without a valid session: 302 to the logon page for a
        navigation, else C{440 Login Timeout}.  An unusable cookie is cleared by the redirect.
        """
        headers = [(b"Cache-Control", b"no-store"), (b"Content-Type", b"text/plain; charset=utf-8")]
        if isNavigation(request):
            # Cleared on the navigation only: after a script's 440 the page reloads, and the
            # unusable cookie still tells the logon page why the session ended.
            if state != "absent":
                headers.append((b"Set-Cookie", self.cookies.clearCookie()))
            target = request.uri.decode("latin-1")
            location = f"{self.logonPath}?url={quote(target, safe='')}"
            if state in ("expired", "revoked"):
                location += "&reason=expired"
            headers.append((b"Location", location.encode("ascii")))
            return HTTPError(302, tuple(headers), b"Sign-in required.\n")
        return HTTPError(440, tuple(headers), b"Login Timeout\n", reason=b"Login Timeout")

    # -- the logon and logoff pages ---------------------------------------------------------------

    def render(self, request):
        """
        Answer a request for which L{ownsPath} is true.

        @return: the body, or L{NOT_DONE_YET} (the logon POST waits for the portal).
        """
        path = request.path.decode("latin-1").lower()
        self._securityHeaders(request)
        if path in {p.lower() for p in self.logoffPaths}:
            return self._logoff(request)
        if request.method == b"POST":
            return self._logon(request)
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD, POST")
            return b"Method Not Allowed\n"
        url = self._arg(request.args, b"url")
        reason = self._arg(request.args, b"reason")
        return self._page(request, url, reason=reason)

    @staticmethod
    def _arg(args, name: bytes) -> str:
        values = args.get(name) or [b""]
        try:
            return values[0].decode("utf-8")
        except UnicodeDecodeError:
            return ""

    def _securityHeaders(self, request) -> None:
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"referrer-policy", b"same-origin")
        request.setHeader(
            b"content-security-policy",
            b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self';"
            b" frame-ancestors 'none'; base-uri 'none'",
        )

    def _csrfToken(self, request) -> str:
        existing = _cookies.cookieValues(
            request.requestHeaders.getRawHeaders(b"cookie", ()), self.csrfCookieName
        )
        for value in existing:
            if _CSRF_SHAPE.fullmatch(value):
                return value
        return base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode("ascii")

    def _csrfCookie(self, token: str) -> bytes:
        expiry = "" if token else "; Max-Age=0"
        return (
            f"{self.csrfCookieName}={token}; Path=/; Secure; HttpOnly; SameSite=Strict{expiry}"
        ).encode("ascii")

    def _page(self, request, url: str, reason: str = "", username: str = "", public=True) -> bytes:
        token = self._csrfToken(request)
        request.responseHeaders.addRawHeader(b"set-cookie", self._csrfCookie(token))
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return renderLogonPage(
            title=self.title,
            action=self.logonPath,
            csrf=token,
            url=safeTarget(url, self.prefix) or self.prefix + "/",
            username=username,
            reason=reason,
            offerChoice=self.offerChoice,
            public=public,
            publicTimeout=self.cookies.publicTimeout,
            privateTimeout=self.cookies.privateTimeout,
        )

    def _crossSite(self, request) -> bool:
        site = request.getHeader(b"sec-fetch-site")
        if site is not None and site.strip().lower() not in (b"same-origin", b"none"):
            return True
        origin = request.getHeader(b"origin")
        if origin is not None:
            ours = _defaultPort(_ownOrigin(request))
            if _defaultPort(origin.decode("latin-1").strip().lower()) != ours:
                return True
        return False

    def _readForm(self, request) -> dict | None:
        ctype = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if ctype != b"application/x-www-form-urlencoded":
            return None
        content = request.content
        if content is None:
            return None
        content.seek(0)
        body = content.read(MAX_FORM + 1)
        if len(body) > MAX_FORM:
            return None
        try:
            return parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            return None

    def _logon(self, request):
        form = self._readForm(request)
        if form is None:
            request.setResponseCode(400)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Bad Request\n"
        field = lambda name: (form.get(name) or [""])[0]
        url = field("url")
        username = field("username").strip()
        public = not self.offerChoice or field("security") != "private"
        sent = field("csrf")
        expected = _cookies.cookieValues(
            request.requestHeaders.getRawHeaders(b"cookie", ()), self.csrfCookieName
        )
        tokenOK = bool(sent) and any(
            hmac.compare_digest(sent.encode(), value.encode()) for value in expected
        )
        if not tokenOK or self._crossSite(request):
            self.log.info(
                "forms logon refused: CSRF check failed (client {client})",
                client=self.clientInfo(request).peerHost,
            )
            request.setResponseCode(403)
            return self._page(request, url, reason="retry", username=username, public=public)
        client = self.clientInfo(request)
        if not client.plaintextAllowed:
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"TLS is required.\n"
        password = field("password")
        if not username or not password or len(username) > 256 or len(password) > 1024:
            request.setResponseCode(200)
            return self._page(request, url, reason="failed", username=username, public=public)
        try:
            credentials = makeCredentials(username.encode("utf-8"), password.encode("utf-8"))
        except ProtocolViolation:
            request.setResponseCode(200)
            return self._page(request, url, reason="failed", public=public)
        del password, form
        d = defer.maybeDeferred(self.authenticator.login, credentials, client)
        d.addCallbacks(
            self._loggedOn,
            self._logonFailed,
            callbackArgs=(request, url, public),
            errbackArgs=(request, url, username, public),
        )
        d.addErrback(self._renderError, request)
        return NOT_DONE_YET

    def _loggedOn(self, avatar, request, url, public):
        session = self.cookies.issue(_avatarRecord(avatar), public)
        request.responseHeaders.addRawHeader(b"set-cookie", self.cookies.setCookie(session))
        request.responseHeaders.addRawHeader(b"set-cookie", self._csrfCookie(""))
        target = safeTarget(url, self.prefix) or self.prefix + "/"
        self.log.info(
            "forms logon of {user!r} ({kind} computer)",
            user=session.user.login,
            kind="public" if public else "private",
        )
        request.setResponseCode(302)
        request.setHeader(b"location", target.encode("ascii"))
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        self._finish(request, b"Signed in.\n")

    def _logonFailed(self, failure, request, url, username, public):
        if failure.check(AuthenticationFailed):
            reason, code = "failed", 200
        elif failure.check(Throttled):
            reason, code = "throttled", 429
        elif failure.check(CASFailure):
            reason, code = "unavailable", 503
            request.setHeader(b"retry-after", b"30")
        else:
            self.log.failure("forms logon of {user!r} could not complete", failure, user=username)
            reason, code = "unavailable", 503
            request.setHeader(b"retry-after", b"30")
        request.setResponseCode(code)
        self._finish(request, self._page(request, url, reason=reason, username=username, public=public))

    def _renderError(self, failure, request):
        self.log.failure("forms logon page failed", failure)
        if not request.startedWriting:
            request.setResponseCode(500)
        self._finish(request, b"")

    @staticmethod
    def _finish(request, body: bytes) -> None:
        if request.finished or getattr(request, "_disconnected", False):
            return
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _logoff(self, request):
        d = self.cookies.check(request)

        def checked(check):
            if check.session is not None and check.state in ("valid", "expired"):
                self.log.info("forms logoff of {user!r}", user=check.session.user.login)
                revoked = self.cookies.revoke(check.session)
                # The cookie is cleared even when the shared set cannot record the revocation.
                revoked.addErrback(
                    lambda f: self.log.failure("recording a forms logoff failed", f)
                )
                return revoked

        d.addCallback(checked)

        def done(_):
            request.responseHeaders.addRawHeader(b"set-cookie", self.cookies.clearCookie())
            self._finish(request, self._page(request, "", reason="loggedoff"))

        d.addCallback(done)
        d.addErrback(self._renderError, request)
        return NOT_DONE_YET


# -- wiring into the HTTP front end -----------------------------------------------------------

#: The C{[http]} keys of forms login (shared by every forms vdir of the node).
FORMS_SETTINGS = (
    Setting(
        "forms_key_files",
        "strlist",
        (),
        "Files of forms-cookie keys (base64 of 32 random bytes, one a line, e.g. C{openssl rand"
        " -base64 32}), shared by the array: the first key seals, every key opens (rotation"
        " without logging users out).  Empty: a random key per node, shared by its workers"
        " (C{--workers N}); cookies die with the node.",
    ),
    Setting(
        "forms_public_timeout",
        "float",
        float(_cookies.PUBLIC_TIMEOUT),
        "Seconds of inactivity after which a forms session from a public computer ends.",
        minimum=1,
    ),
    Setting(
        "forms_private_timeout",
        "float",
        float(_cookies.PRIVATE_TIMEOUT),
        "Seconds of inactivity after which a forms session from a private computer ends.",
        minimum=1,
    ),
    Setting(
        "forms_background",
        "strlist",
        _cookies.DEFAULT_BACKGROUND_PATTERNS,
        "Regular expressions searched in a request's path and query: matching requests are"
        " background polls that do not extend a forms session (requests of long-poll vdirs,"
        " prefetches and requests with C{X-CAS-Background: 1} never extend it either).",
    ),
    Setting(
        "forms_public_private_choice",
        "bool",
        True,
        "Offer the public/private computer choice on the logon page; without it every session"
        " has the public limit.",
    ),
    Setting("forms_title", "str", "Mail", "The heading of the logon page."),
    Setting(
        "forms_logoff_paths",
        "strlist",
        ("logoff.owa",),
        "Paths under each forms vdir, besides C{_casd/logoff}, that log off (OWA's"
        " C{logoff.owa}).",
    ),
)


@implementer(IHTTPCredentialSource)
class FormsCredentials:
    """
    The C{forms} method of L{protocols.http.auth.HTTPAuthenticator}: one per node, one
    L{FormsLogon} per forms vdir.
    """

    method = "forms"
    stripHeaders = ()

    def __init__(self, cookies: _cookies.SessionCookies, authenticator, section) -> None:
        self.cookies = cookies
        self.authenticator = authenticator
        self.section = section
        self.background = _cookies.compileBackground(section.forms_background)
        self._logons: dict[str, FormsLogon] = {}

    def logonFor(self, vdir) -> FormsLogon:
        logon = self._logons.get(vdir.path)
        if logon is None:
            logon = self._logons[vdir.path] = FormsLogon(
                vdir.path,
                self.cookies,
                self.authenticator,
                lambda request: request.channel.client,
                background=self.background,
                title=self.section.forms_title,
                offerChoice=self.section.forms_public_private_choice,
                logoffAliases=self.section.forms_logoff_paths,
            )
        return logon

    def authenticate(self, request, vdir, client):
        logon = self.logonFor(vdir)
        if not logon.hasCredentials(request):
            logon._stripOwnCookies(request)
            return None
        d = logon.authenticate(request, longPoll=bool(vdir.longPollTimeout))

        def refused(failure):
            if failure.check(LogonRequired):
                request.casdFormsState = failure.value.state
                return failure
            if failure.check(CASFailure):
                return failure
            # The revocation set (a shared store) could not answer: a 503, never a logon page.
            FormsLogon.log.failure("checking a forms session failed", failure)
            raise DirectoryUnavailable("forms session check failed")

        return d.addErrback(refused)

    def challenge(self, request, vdir):
        return self.logonFor(vdir).challenge(request, getattr(request, "casdFormsState", "absent"))


class _LogonPage(Resource):
    isLeaf = True

    def __init__(self, logon: FormsLogon) -> None:
        super().__init__()
        self.logon = logon

    def render(self, request):
        if not self.logon.ownsPath(request.path):
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"Not found.\n"
        return self.logon.render(request)


def sessionCookies(context, section) -> _cookies.SessionCookies:
    """
    The node's L{protocols.http.cookies.SessionCookies} from the C{[http]} section.

    @raise ConfigError: when a key file is unusable (the message names the file, never a key).
    """
    try:
        keys = (
            _cookies.CookieKeys.fromFiles(section.forms_key_files)
            if section.forms_key_files
            else _cookies.CookieKeys.forNode()
        )
    except _cookies.CookieKeyError as e:
        raise ConfigError(context.config.path, "http.forms_key_files", str(e)) from None
    # The array's revocation set ([state]: in Redis, shared by every node), else this node's
    # (relayed to every worker under --workers N).
    state = getattr(context, "state", None)
    revocations = getattr(state, "revocations", None)
    if revocations is None:
        revocations = _cookies.MemoryRevocationSet(context.reactor)
    return _cookies.SessionCookies(
        keys,
        context.reactor,
        _cookies.nodeRevocations(revocations, shared=bool(getattr(state, "isShared", False))),
        publicTimeout=section.forms_public_timeout,
        privateTimeout=section.forms_private_timeout,
    )


def formsServices(context, section, site):
    """
    The local-service provider of forms login (in L{protocols.http.local.PROVIDERS}): registers
    the C{forms} method with the node's authenticator (once) and serves each forms vdir's logon
    and logoff pages.
    """
    vdirs = [v for v in site.vdirs.vdirs if "forms" in v.auth]
    if not vdirs:
        return
    for vdir in vdirs:
        if vdir.auth == ("forms",) and vdir.identity == "passthrough":
            # A browser signed on with a form sends no Authorization to pass through.
            raise ConfigError(
                context.config.path,
                f"http.vdir {vdir.name}",
                'forms login needs identity = "header" or "master" (the backend would not learn'
                " who the user is)",
            )
    source = site.authenticator.sources.get("forms")
    if not isinstance(source, FormsCredentials):
        try:
            _cookies.compileBackground(section.forms_background)
        except re.error as e:
            raise ConfigError(
                context.config.path, "http.forms_background", f"not a regular expression ({e})"
            ) from None
        source = FormsCredentials(sessionCookies(context, section), context.authenticator, section)
        site.authenticator.register(source)
    site.privateCookies = frozenset(site.privateCookies) | {
        source.cookies.name.encode("ascii"),
        b"__Host-casd-logon",
    }
    for vdir in vdirs:
        logon = source.logonFor(vdir)
        yield LocalService(
            tuple(sorted({logon.logonPath} | logon.logoffPaths)),
            _LogonPage(logon),
            caseInsensitive=True,
            maxBodySize=MAX_FORM,
            name=f"{vdir.name} logon",
        )
