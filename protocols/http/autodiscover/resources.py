# -*- test-case-name: tests.test_autodiscover,tests.test_autodiscover_web -*-
"""
The Autodiscover endpoints as C{twisted.web} resources, answered locally (never proxied):

    POST /autodiscover/autodiscover.xml   Outlook POX and ActiveSync mobilesync (authenticated)
    POST /autodiscover/autodiscover.svc   SOAP GetUserSettings / GetDomainSettings (authenticated)
    GET  /mail/config-v1.1.xml            Thunderbird (anonymous; also under /.well-known/autoconfig)
    GET  /mobileconfig?emailaddress=...   Apple profile, signed (authenticated)

Every answer is the protocol's own: a failure of the shared vocabulary becomes 401 (with
C{WWW-Authenticate: Basic}), 429 or 503; anything unexpected is logged by type and answered
with the protocol's error, never a traceback and never an HTTP 500.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import NoResource, Resource
from twisted.web.server import NOT_DONE_YET

from casd.failures import AuthenticationFailed, CASFailure, DirectoryUnavailable, PrivacyRequired, Throttled
from protocols.http.autodiscover import autoconfig, mobileconfig, mobilesync, pox, soap
from protocols.http.autodiscover.common import (
    MAX_BODY,
    NotAllowed,
    RedirectAddress,
    RedirectURL,
    Settings,
    decide,
    displayName,
    domainOf,
)

XML = b"text/xml; charset=utf-8"


class Unauthenticated(Exception):
    """
    Raised inside a handler to answer 401 (the request carried no credentials).
    """


def clientHost(request) -> str:
    """
    The client's address: the HTTP site's L{ClientInfo} (the real client behind a PROXY-protocol
    load balancer or a trusted casd in front), else the connection's peer.
    """
    client = getattr(getattr(request, "channel", None), "client", None)
    host = getattr(client, "peerHost", "")
    if host:
        return host
    return getattr(request.getClientAddress(), "host", "") or ""


def readBody(request) -> bytes | None:
    """
    The request body, or C{None} when it is longer than L{MAX_BODY}.
    """
    length = request.getHeader(b"content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        return None
    request.content.seek(0)
    body = request.content.read(MAX_BODY + 1)
    return None if len(body) > MAX_BODY else body


class AutodiscoverService:
    """
    What the endpoints share: the client-settings derivation, how to authenticate a request, and
    the profile signer.

    @ivar authenticate: C{callable(request) -> Deferred} firing with the L{IMailboxUser}, or
        failing with L{AuthenticationFailed} (no or bad credentials), L{Throttled} or
        L{DirectoryUnavailable}.
    @ivar signer: a L{mobileconfig.ProfileSigner}, or C{None} to serve profiles unsigned.
    """

    log = Logger()

    def __init__(self, clientSettings, authenticate: Callable, signer=None, hostname: str = "casd") -> None:
        self.clientSettings = clientSettings
        self.authenticate = authenticate
        self.signer = signer
        self.hostname = hostname
        self.realm = "casd"

    def views(self, request, domain: str):
        """
        (the client's network's, internal, external) settings of a domain.
        """
        internal = self.clientSettings.forDomain(domain, internal=True)
        external = self.clientSettings.forDomain(domain, internal=False)
        mine = internal if self.clientSettings.isInternal(clientHost(request)) else external
        return mine, internal, external

    def run(self, request, handler, onError) -> object:
        """
        Authenticate C{request}, then C{handler(request, user)} -> (status, content type, body);
        C{onError(request)} renders an unexpected failure in the protocol's words.
        """
        d = defer.maybeDeferred(self.authenticate, request)
        d.addCallback(lambda user: handler(request, user))
        d.addCallback(lambda answer: self.write(request, *answer))
        d.addErrback(self._failed, request, onError)
        return NOT_DONE_YET

    def _failed(self, failure, request, onError) -> None:
        if failure.check(AuthenticationFailed, Unauthenticated):
            self.write(request, 401, b"text/plain; charset=utf-8", b"Authentication required\n",
                       challenge=True)
        elif failure.check(PrivacyRequired):
            self.write(request, 403, b"text/plain; charset=utf-8", b"TLS required\n")
        elif failure.check(Throttled):
            self.write(request, 429, b"text/plain; charset=utf-8", b"Too many failed logins\n",
                       retryAfter=60)
        elif failure.check(DirectoryUnavailable, CASFailure):
            self.write(request, 503, b"text/plain; charset=utf-8", b"Temporarily unavailable\n",
                       retryAfter=30)
        else:
            self.log.error(
                "autodiscover {path} failed: {error}",
                path=request.path.decode("latin-1")[:100],
                error=type(failure.value).__name__,
            )
            self.write(request, *onError(request))

    def write(self, request, status: int, contentType: bytes, body: bytes, challenge=False,
              retryAfter=0) -> None:
        if getattr(request, "_disconnected", False) or request.finished:
            return
        request.setResponseCode(status)
        request.setHeader(b"content-type", contentType)
        request.setHeader(b"cache-control", b"no-store")
        if challenge:
            request.setHeader(b"www-authenticate", f'Basic realm="{self.realm}"'.encode("ascii"))
        if retryAfter:
            request.setHeader(b"retry-after", str(retryAfter).encode("ascii"))
        request.setHeader(b"content-length", str(len(body)).encode("ascii"))
        request.write(body)
        request.finish()


class PoxResource(Resource):
    """
    C{/autodiscover/autodiscover.xml}: Outlook and ActiveSync devices.
    """

    isLeaf = True

    def __init__(self, service: AutodiscoverService) -> None:
        super().__init__()
        self.service = service

    def render_POST(self, request):
        return self.service.run(request, self._answer, self._internalError)

    def render_GET(self, request):
        # Exchange answers a GET with an invalid-request error, after authentication.
        return self.service.run(request, lambda r, u: self._error("outlook", *pox.INVALID_REQUEST),
                                self._internalError)

    def _internalError(self, request):
        return self._error("outlook", 600, "Invalid Request")

    def _error(self, flavour: str, code: int, message: str):
        hostname = self.service.hostname
        if flavour == "mobilesync":
            return 200, XML, mobilesync.mobileSyncError(code, message, hostname)
        return 200, XML, pox.outlookError(code, message, hostname)

    def _answer(self, request, user):
        body = readBody(request)
        try:
            if body is None:
                raise pox.PoxError("outlook", *pox.INVALID_REQUEST, reason="body too large")
            parsed = pox.parseRequest(body)
        except pox.PoxError as e:
            self.service.log.info(
                "autodiscover: {code} for {user!r}: {reason}", code=e.code, user=user.login, reason=e.reason
            )
            return self._error(e.flavour, e.code, e.message)
        answer = decide(user, parsed.email, self.service.clientSettings, parsed.legacyDN)
        mobile = parsed.flavour == "mobilesync"
        if isinstance(answer, Settings):
            views = self.service.views(request, domainOf(answer.address))
            name = displayName(user)
            if mobile:
                if not views[0].activeSyncUrl:
                    body = mobilesync.mobileSyncActionError(answer.address, "ActiveSync is not offered")
                else:
                    body = mobilesync.mobileSyncSettings(views[0].activeSyncUrl, answer.address, name)
                return 200, XML, body
            return 200, XML, pox.outlookSettings(views, answer.address, name, user.loginForBackend)
        if isinstance(answer, RedirectAddress):
            body = (mobilesync.mobileSyncRedirect if mobile else pox.outlookRedirectAddress)(answer.address)
            return 200, XML, body
        if isinstance(answer, RedirectURL):
            if mobile:
                # mobilesync has no URL redirect element: an HTTP redirect (MS-ASCMD 3.1.5.2.2).
                request.setHeader(b"location", answer.url.encode("ascii", "replace"))
                return 302, b"text/plain; charset=utf-8", b""
            return 200, XML, pox.outlookRedirectURL(answer.url)
        assert isinstance(answer, NotAllowed)
        self.service.log.info("autodiscover: {user!r} may not query another address", user=user.login)
        if mobile:
            return 200, XML, mobilesync.mobileSyncActionError(parsed.email, pox.ADDRESS_NOT_FOUND[1])
        return self._error("outlook", *pox.ADDRESS_NOT_FOUND)


class SoapResource(Resource):
    """
    C{/autodiscover/autodiscover.svc}.
    """

    isLeaf = True

    def __init__(self, service: AutodiscoverService) -> None:
        super().__init__()
        self.service = service

    def render_POST(self, request):
        return self.service.run(request, self._answer, self._internalError)

    def render_GET(self, request):
        return self.service.run(
            request, lambda r, u: (400, XML, soap.fault("POST a SOAP request")), self._internalError
        )

    def _internalError(self, request):
        return 400, XML, soap.fault("The request could not be processed")

    def _answer(self, request, user):
        body = readBody(request)
        try:
            if body is None:
                raise soap.SoapFault("body too large")
            parsed = soap.parseRequest(body)
        except soap.SoapFault as e:
            return 400, XML, soap.fault(str(e))
        except soap.InvalidRequest as e:
            return 200, XML, soap.invalidRequestResponse(e.operation, str(e))
        if parsed.operation == "GetDomainSettings":
            return 200, XML, self._domains(request, user, parsed)
        answers = []
        view = None
        for mailbox in parsed.subjects:
            answer = decide(user, mailbox, self.service.clientSettings)
            if isinstance(answer, Settings):
                _, internal, external = self.service.views(request, domainOf(answer.address))
                view = external
                values = soap.userSettingValues(
                    (internal, external), answer.address, displayName(user), user.loginForBackend
                )
                answers.append(soap.UserAnswer("NoError", values=values))
            elif isinstance(answer, RedirectAddress):
                answers.append(soap.UserAnswer("RedirectAddress", "Redirection address.", answer.address))
            elif isinstance(answer, RedirectURL):
                answers.append(soap.UserAnswer("RedirectUrl", "Redirection URL.", answer.url))
            else:
                answers.append(soap.UserAnswer("InvalidUser", f"Invalid user: '{mailbox[:320]}'"))
        return 200, XML, soap.userSettingsResponse(answers, parsed.settings, view)

    def _domains(self, request, user, parsed) -> bytes:
        answers = []
        view = None
        settings = self.service.clientSettings
        for domain in parsed.subjects:
            domain = domain.lower()
            config = settings.domainConfig(domain)
            if config is not None and config.values.redirect_url:
                answers.append(soap.UserAnswer("RedirectUrl", "Redirection URL.", config.values.redirect_url))
            elif settings.servesDomain(domain) and autoconfig.validDomain(domain):
                view = settings.forDomain(domain)
                answers.append(soap.UserAnswer("NoError", values=soap.domainSettingValues(view)))
            else:
                answers.append(soap.UserAnswer("InvalidDomain", "Invalid domain."))
        return soap.domainSettingsResponse(answers, parsed.settings, view)


class AutoconfigResource(Resource):
    """
    Thunderbird's C{config-v1.1.xml}: anonymous, the same answer for every address of a domain.
    """

    isLeaf = True

    def __init__(self, service: AutodiscoverService) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request):
        address = (request.args.get(b"emailaddress") or [b""])[0].decode("utf-8", "replace")
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        domain = autoconfig.domainFromQuery(address, host)
        settings = self.service.clientSettings
        if not domain or not settings.servesDomain(domain):
            return self._plain(request, 404, b"No configuration for this domain\n")
        view = self.service.views(request, domain)[0]
        if not view.servers:
            return self._plain(request, 404, b"No mail service is advertised\n")
        body = autoconfig.clientConfig(view)
        request.setHeader(b"content-type", XML)
        request.setHeader(b"cache-control", b"public, max-age=3600")
        return body

    def _plain(self, request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return body


class MobileconfigResource(Resource):
    """
    C{/mobileconfig?emailaddress=...}: the user's signed Apple profile.
    """

    isLeaf = True

    def __init__(self, service: AutodiscoverService) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request):
        return self.service.run(request, self._answer, self._internalError)

    def _internalError(self, request):
        return 400, b"text/plain; charset=utf-8", b"The request could not be processed\n"

    def _answer(self, request, user):
        raw = (request.args.get(b"emailaddress") or [b""])[0].decode("utf-8", "replace")
        address = raw or user.address
        answer = decide(user, address, self.service.clientSettings)
        if isinstance(answer, RedirectAddress):
            answer = Settings(answer.address)
        if not isinstance(answer, Settings):
            return 403, b"text/plain; charset=utf-8", b"No profile for this address\n"
        view = self.service.views(request, domainOf(answer.address))[0]
        body = mobileconfig.render(view, answer.address, displayName(user), user.loginForBackend)
        if self.service.signer is not None:
            body = self.service.signer.sign(body)
        request.setHeader(
            b"content-disposition",
            f'attachment; filename="{view.domain}.mobileconfig"'.encode("ascii", "replace"),
        )
        return 200, mobileconfig.CONTENT_TYPE, body


class AutodiscoverRoot(Resource):
    """
    A root resource answering only the Autodiscover paths (ignoring case), for a site of its own.
    """

    def __init__(self, service: AutodiscoverService) -> None:
        super().__init__()
        self.paths = autodiscoverResources(service)

    def getChildWithDefault(self, name, request):
        found = self.paths.get(request.path.lower())
        if found is None:
            return NoResource()
        request.postpath = []
        return found

    def render(self, request):
        return NoResource().render(request)


def autodiscoverResources(service: AutodiscoverService) -> dict[bytes, Resource]:
    """
    Path -> resource of every endpoint, for mounting as local services.  Paths are matched
    without regard to case by the caller (Outlook sends C{/Autodiscover/Autodiscover.xml}).
    """
    poxResource = PoxResource(service)
    config = AutoconfigResource(service)
    return {
        b"/autodiscover/autodiscover.xml": poxResource,
        b"/autodiscover/autodiscover.svc": SoapResource(service),
        b"/mail/config-v1.1.xml": config,
        b"/.well-known/autoconfig/mail/config-v1.1.xml": config,
        b"/mobileconfig": MobileconfigResource(service),
    }
