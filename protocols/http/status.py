"""
The shared failures (L{casd.failures}) in HTTP's words.

The rule that matters most: C{401} with C{WWW-Authenticate} only for missing or bad credentials.
A directory or backend in trouble is C{503} with C{Retry-After}, never C{401}: a 401 makes every
client prompt its user for the password again.
"""

from __future__ import annotations

from attrs import field, frozen

from twisted.internet.error import ConnectError, TimeoutError as TwistedTimeoutError
from twisted.web.client import ResponseNeverReceived

from casd.failures import (
    AuthenticationFailed,
    BackendUnavailable,
    CASFailure,
    DirectoryUnavailable,
    PolicyRefused,
    PrivacyRequired,
    ProtocolViolation,
    Throttled,
)

#: Seconds a client is asked to wait after a temporary failure.
RETRY_AFTER = 30


@frozen
class HTTPError:
    """
    A response casd answers itself.

    @ivar code: the status code.
    @ivar headers: C{(name, value)} byte pairs to send.
    @ivar body: the (short, plain-text) body.
    """

    code: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    reason: bytes = field(default=b"")


class BackendTimedOut(BackendUnavailable):
    """
    The backend accepted the request but did not answer within the vdir's timeout (504).
    """


class BadGateway(BackendUnavailable):
    """
    The backend broke the exchange: refused or reset the connection, or sent garbage (502).
    """


class PayloadTooLarge(ProtocolViolation):
    """
    The request body is over the vdir's C{max_body_size} (413).
    """


class NotFound(CASFailure):
    """
    No vdir or local service claims the path (404).
    """


class SiteRedirect(CASFailure):
    """
    The user's mailbox is in another site that this vdir redirects to.

    @ivar code: 302 (browsers) or 451 (ActiveSync).
    @ivar location: the other site's URL.
    """

    def __init__(self, code: int, location: str) -> None:
        super().__init__(f"redirected ({code}) to {location}")
        self.code = code
        self.location = location


class Unauthenticated(AuthenticationFailed):
    """
    Missing or refused credentials, with the answer the vdir's methods give (a Basic challenge,
    a redirect to the logon page, C{440} for an expired forms session).

    @ivar challenge: the L{HTTPError} to send.
    """

    def __init__(self, reason: str, challenge: HTTPError) -> None:
        super().__init__(reason)
        self.challenge = challenge


def _text(code: int, text: str, *headers) -> HTTPError:
    return HTTPError(
        code,
        ((b"Content-Type", b"text/plain; charset=utf-8"),) + tuple(headers),
        text.encode("utf-8") + b"\n",
    )


_RETRY = (b"Retry-After", str(RETRY_AFTER).encode("ascii"))


def httpError(exc: BaseException) -> HTTPError:
    """
    The response for a failure.  The body never carries the exception's text (it may name a
    server or a user); the log does.

    @param exc: a L{casd.failures.CASFailure} or any other exception (which is a 500).
    """
    if isinstance(exc, Unauthenticated):
        return exc.challenge
    if isinstance(exc, SiteRedirect):
        location = exc.location.encode("utf-8")
        if exc.code == 451:
            return HTTPError(451, ((b"X-MS-Location", location),), reason=b"Redirect")
        return HTTPError(
            302, ((b"Location", location), (b"Content-Type", b"text/plain; charset=utf-8")), b""
        )
    if isinstance(exc, AuthenticationFailed):
        # Without a challenge (should not happen: sources always give one) still a 401.
        return _text(401, "Authentication required.", (b"WWW-Authenticate", b'Basic realm="casd"'))
    if isinstance(exc, Throttled):
        return _text(429, "Too many requests, try again later.", _RETRY)
    if isinstance(exc, DirectoryUnavailable):
        return _text(503, "The directory is unavailable, try again later.", _RETRY)
    if isinstance(exc, BackendTimedOut):
        return _text(504, "The mailbox server did not answer in time.")
    if isinstance(exc, BadGateway):
        return _text(502, "The mailbox server failed to answer.")
    if isinstance(exc, BackendUnavailable):
        return _text(503, "The mailbox server is unavailable, try again later.", _RETRY)
    if isinstance(exc, PolicyRefused):
        return _text(403, "Access is not allowed.")
    if isinstance(exc, PrivacyRequired):
        return _text(403, "TLS is required.")
    if isinstance(exc, PayloadTooLarge):
        return _text(413, "The request body is too large.", (b"Connection", b"close"))
    if isinstance(exc, NotFound):
        return _text(404, "Not found.")
    if isinstance(exc, ProtocolViolation):
        return _text(400, "Bad request.", (b"Connection", b"close"))
    if isinstance(exc, (ConnectError, ResponseNeverReceived)):
        return _text(502, "The mailbox server failed to answer.")
    if isinstance(exc, TwistedTimeoutError):
        return _text(504, "The mailbox server did not answer in time.")
    return _text(500, "Internal error, try again later.")


def render(request, error: HTTPError) -> None:
    """
    Send C{error} as the response to C{request} (a L{twisted.web.http.Request}) and finish it.
    """
    if request.finished or getattr(request, "_disconnected", False):
        return
    request.setResponseCode(error.code, error.reason or None)
    for name, value in error.headers:
        request.responseHeaders.setRawHeaders(name, [value])
    if error.code in (204, 304) or request.method == b"HEAD":
        request.finish()
        return
    request.responseHeaders.setRawHeaders(b"Content-Length", [str(len(error.body)).encode("ascii")])
    if error.body:
        request.write(error.body)
    request.finish()
