"""
The backend side: the connector that opens sessions to mailbox servers (connect timeout, TLS
verified with service_identity, failover over a route's targets) and the base of every protocol's
backend login dialogue.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from zope.interface import implementer

from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from casd.failures import AuthenticationFailed, BackendUnavailable, CASFailure


class BackendTimeout(BackendUnavailable):
    """
    A backend did not answer in time.
    """


@implementer(IHandshakeListener)
class BackendDialogue(Protocol):
    """
    The base of a protocol's backend login dialogue: an explicit sequence of commands and
    replies (greeting, STARTTLS, client address, login) written as L{dialogue}, returning a
    L{Deferred} through L{loggedIn}.  It knows nothing of any protocol's syntax.

    Subclasses implement L{dialogue} with L{readLine}, L{sendLine} and L{startTLS}.

    @ivar loggedIn: fires with this protocol once the backend accepted the login, or fails with
        a L{casd.failures.CASFailure}.
    @ivar leftover: bytes the backend sent after the login reply; the relay passes them on.
    """

    log = Logger()
    relay = None
    #: Longest line accepted from a backend during the dialogue.
    maxLineLength = 65536

    def __init__(self, target, client, user, credentials, context) -> None:
        self.target = target
        self.client = client
        self.user = user
        self.credentials = credentials
        self.context = context
        self.clock = context.reactor
        settings = context.config.backend
        self.replyTimeout = settings.reply_timeout
        self.tlsTimeout = settings.tls_timeout
        self.loggedIn: defer.Deferred = defer.Deferred()
        self._buffer = b""
        self._lines: deque[bytes] = deque()
        self._waiting: defer.Deferred | None = None
        self._handshake: defer.Deferred | None = None
        self._timer = None
        self._done = False
        self.leftover = b""

    # -- the dialogue -------------------------------------------------------------------

    def dialogue(self):
        """
        The login dialogue; return a L{Deferred} that fires when the backend accepted the login.
        Failures are L{casd.failures.CASFailure}s.
        """
        raise NotImplementedError()

    def connectionMade(self) -> None:
        d = defer.maybeDeferred(self._run)
        d.addCallbacks(self._succeeded, self._failed)

    @defer.inlineCallbacks
    def _run(self):
        if self.target.tls == "implicit":
            yield self._awaitHandshake()
        yield self.dialogue()

    def _succeeded(self, _):
        if self._done:
            return
        self._done = True
        self._cancelTimer()
        self.leftover = self._buffer + b"".join(line + b"\r\n" for line in self._lines)
        self._buffer = b""
        self._lines.clear()
        # Drop the password now that the backend took the session.
        self.credentials = None
        self.loggedIn.callback(self)

    def _failed(self, failure):
        if self._done:
            return
        self._done = True
        self._cancelTimer()
        self.credentials = None
        if self.transport is not None:
            self.transport.abortConnection()
        if not failure.check(CASFailure):
            self.log.failure(
                "backend dialogue with {backend} failed", failure, backend=self.target.describe()
            )
            failure = BackendUnavailable(f"backend {self.target.describe()}: protocol error")
        self.loggedIn.errback(failure)

    # -- primitives ---------------------------------------------------------------------

    def sendLine(self, line: bytes) -> None:
        self.transport.write(line + b"\r\n")

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def readLine(self) -> defer.Deferred:
        """
        @return: a L{Deferred} firing with the next line (without its line ending) within the
            reply timeout, or failing with L{BackendTimeout}.
        """
        if self._lines:
            return defer.succeed(self._lines.popleft())
        self._waiting = defer.Deferred()
        self._arm(self.replyTimeout, "reply")
        return self._waiting

    def startTLS(self) -> defer.Deferred:
        """
        Start TLS towards the backend, verifying its certificate for the target's C{tlsName}.

        @return: a L{Deferred} firing when the handshake completed within C{tls_timeout}.
        """
        self._buffer = b""
        self._lines.clear()
        self.transport.startTLS(self.context.clientTLS.optionsFor(self.target.tlsName))
        return self._awaitHandshake()

    def _awaitHandshake(self) -> defer.Deferred:
        self._handshake = defer.Deferred()
        self._arm(self.tlsTimeout, "TLS handshake")
        return self._handshake

    def handshakeCompleted(self) -> None:
        d, self._handshake = self._handshake, None
        if d is not None:
            self._cancelTimer()
            d.callback(None)

    def fail(self, reason: str, authFailed: bool = False):
        """
        @return: the failure to raise from the dialogue: L{AuthenticationFailed} when the backend
            refused the user's own credentials, else L{BackendUnavailable}.
        """
        what = f"backend {self.target.describe()}: {reason}"
        return AuthenticationFailed(what) if authFailed else BackendUnavailable(what)

    # -- plumbing -----------------------------------------------------------------------

    def _arm(self, seconds: float, what: str) -> None:
        self._cancelTimer()
        self._timer = self.clock.callLater(seconds, self._timedOut, what)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self, what: str) -> None:
        self._timer = None
        self._fire(BackendTimeout(f"backend {self.target.describe()}: no {what} in time"))

    def _fire(self, exc: Exception) -> None:
        for attr in ("_waiting", "_handshake"):
            d = getattr(self, attr)
            if d is not None:
                setattr(self, attr, None)
                d.errback(exc)
                return
        if not self._done:
            self._failed(Failure(exc))

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            i = self._buffer.find(b"\n")
            if i < 0:
                if len(self._buffer) > self.maxLineLength:
                    self._buffer = b""
                    self._fire(BackendUnavailable(f"backend {self.target.describe()}: line too long"))
                return
            line = self._buffer[:i]
            self._buffer = self._buffer[i + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            d, self._waiting = self._waiting, None
            if d is not None:
                self._cancelTimer()
                d.callback(line)
            else:
                self._lines.append(line)
            if self._done:
                return

    def connectionLost(self, reason) -> None:
        self._cancelTimer()
        if self.relay is not None:
            self.relay.backendLost(reason)
            return
        if not self._done:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self._fire(BackendUnavailable(f"backend {self.target.describe()} closed the connection ({why})"))


class _DialogueFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self.build = build

    def buildProtocol(self, addr):
        return self.build()


class BackendConnector:
    """
    Opens backend sessions: tries a route's targets in order, each with a connect timeout and,
    when asked, TLS verified against the configured trust root.
    """

    log = Logger()

    def __init__(self, reactor, settings, clientTLS) -> None:
        self.reactor = reactor
        self.settings = settings
        self.clientTLS = clientTLS

    def endpointFor(self, target):
        timeout = self.settings.connect_timeout
        if target.isAddress:
            kind = TCP6ClientEndpoint if ":" in target.host else TCP4ClientEndpoint
            endpoint = kind(self.reactor, target.host, target.port, timeout=timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, target.host, target.port, timeout=timeout)
        if target.tls == "implicit":
            endpoint = wrapClientTLS(self.clientTLS.optionsFor(target.tlsName), endpoint)
        return endpoint

    @defer.inlineCallbacks
    def connect(self, route, makeDialogue: Callable):
        """
        Open a logged-in backend session.

        @param makeDialogue: C{callable(target) -> BackendDialogue}.
        @return: a L{Deferred} firing with the logged-in L{BackendDialogue}, failing with
            L{AuthenticationFailed} when a backend refused the user's credentials, or with
            L{BackendUnavailable} when no target took the session.
        """
        last = None
        for target in route.targets:
            try:
                dialogue = yield self.endpointFor(target).connect(
                    _DialogueFactory(lambda: makeDialogue(target))
                )
            except (error.ConnectError, error.TimeoutError, error.DNSLookupError, OSError) as e:
                last = BackendUnavailable(f"connect to {target.describe()} failed: {type(e).__name__}")
                self.log.warn("{reason}", reason=str(last))
                continue
            try:
                yield dialogue.loggedIn
            except AuthenticationFailed:
                raise
            except BackendUnavailable as e:
                last = e
                self.log.warn("{reason}", reason=str(e))
                continue
            return dialogue
        raise last or BackendUnavailable("no backend in the route")
