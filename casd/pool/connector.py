"""
The backend side: the pool that opens sessions to mailbox servers and the base of every
protocol's backend login dialogue.

The pool (L{BackendConnector}) keeps one L{casd.pool.health.Member} per backend member and protocol
(one C{host:port}): its health, its sessions.  A session's route lists members in preference
order; the pool skips those DOWN or draining, and fails over along the rest within a bounded
number of tries and a bounded total time, each try bounded by the connect, TLS, banner and
reply timeouts.  TLS towards backends is verified with service_identity.
"""

from __future__ import annotations

import ipaddress
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

from casd.config import HEALTH_SETTINGS, Values
from casd.failures import AuthenticationFailed, BackendUnavailable, CASFailure
from casd.pool.health import Member
from casd.session.relay import writeThrough


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
    @ivar greeted: whether the backend sent a line (it is alive at the protocol level); a
        failure before that counts against the member's health.
    @ivar proxyTTL: the proxy TTL to announce to the backend (IMAP ID C{x-proxy-ttl}), 0 for none.
    @ivar bannerTimeout: seconds for the first line; L{replyTimeout} for each later one.
    """

    log = Logger()
    relay = None
    greeted = False
    proxyTTL = 0
    #: Order of the session in its pool, once logged in (the oldest is closed first on drain).
    sessionNumber = 0
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
        self.bannerTimeout = getattr(settings, "banner_timeout", 0) or self.replyTimeout
        self._lost: list[Callable[[], None]] = []
        self.loggedIn: defer.Deferred = defer.Deferred()
        self._buffer = b""
        self._lines: deque[bytes] = deque()
        self._waiting: defer.Deferred | None = None
        self._handshake: defer.Deferred | None = None
        self._timer = None
        self._timerWhat = ""
        #: Absolute time by which the whole dialogue must be done (the pool's failover budget);
        #: no step's timer is armed past it.
        self.deadline = float("inf")
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
        # Commands go out with one send() each, not queued for the next reactor iteration.
        writeThrough(self.transport)
        if self.target.tls == "implicit":
            d = self._awaitHandshake()
            d.addCallback(lambda _: self.dialogue())
        else:
            try:
                d = self.dialogue()
            except Exception:
                d = defer.fail()
        d.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, _):
        if self._done:
            return
        self._done = True
        self.lineHandler = None
        self._cancelTimer()
        # The failover deadline bounds the login only: a protocol that keeps reading after it
        # (SMTP's transactions) is bound by its per-phase timeouts alone.
        self.deadline = float("inf")
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
        self.lineHandler = None
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

    #: When set, each line from the backend goes to this callable (a line-driven dialogue, no
    #: Deferred per reply) instead of to L{readLine}; an exception it raises fails the dialogue.
    lineHandler = None

    def expectLine(self, handler=None) -> None:
        """
        For a line-driven dialogue: the next line goes to C{handler} (or the current
        L{lineHandler}) within the reply timeout (the greeting's before the first line).
        """
        if handler is not None:
            self.lineHandler = handler
        if self.greeted:
            self._arm(self.replyTimeout, "reply")
        else:
            self._arm(self.bannerTimeout, "greeting")
        while self._lines and self.lineHandler is not None and not self._done:
            self._deliver(self.lineHandler, self._lines.popleft())

    def _deliver(self, handler, line: bytes) -> None:
        try:
            handler(line)
        except Exception:
            self.lineHandler = None
            self._fire(None, Failure())

    def readLine(self) -> defer.Deferred:
        """
        @return: a L{Deferred} firing with the next line (without its line ending) within the
            reply timeout, or failing with L{BackendTimeout}.
        """
        if self._lines:
            return defer.succeed(self._lines.popleft())
        self._waiting = defer.Deferred()
        if self.greeted:
            self._arm(self.replyTimeout, "reply")
        else:
            self._arm(self.bannerTimeout, "greeting")
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
            d.callback(None)

    def loginIdentity(self) -> tuple[str, bytes, str]:
        """
        Who logs in to the backend.

        @return: C{(authcid, password, authzid)}: the target's master user with the user as
            authorisation identity when the route names one, else the user's own backend login
            and password with no authorisation identity.
        """
        if self.target.masterUser:
            return self.target.masterUser, self.target.masterPassword, self.user.loginForBackend
        return self.user.loginForBackend, self.credentials.password, ""

    def xclientCommand(self) -> bytes:
        """
        Dovecot's C{XCLIENT} command, which its POP3 and ManageSieve login services accept from
        the proxies in their C{login_trusted_networks} (they announce it as C{[XCLIENT]} in the
        POP3 greeting and an C{"XCLIENT"} capability): the client's address and port, casd's
        session id, which Dovecot then logs as its own, and the proxy TTL when there is one.
        """
        c = self.client
        fields = []
        try:
            # Only an address: a UNIX socket's name could carry spaces or line breaks.
            fields.append(b"ADDR=" + ipaddress.ip_address(c.peerHost).compressed.encode("ascii"))
            fields.append(b"PORT=%d" % (c.peerPort,))
        except ValueError:
            pass
        fields.append(b"SESSION=" + c.sessionId.encode("ascii"))
        if self.proxyTTL:
            fields.append(b"TTL=%d" % (self.proxyTTL,))
        return b"XCLIENT " + b" ".join(fields)

    def abort(self, reason: str) -> None:
        """
        Give up the dialogue now (the session's failover time is spent): it fails with
        L{BackendTimeout} and the connection is aborted.
        """
        if not self._done:
            self._cancelTimer()
            self._fire(BackendTimeout(f"backend {self.target.describe()}: {reason}"))

    def whenLost(self, f: Callable[[], None]) -> None:
        """
        Call C{f} when the backend connection is gone (the pool's session count).
        """
        self._lost.append(f)

    def fail(self, reason: str, authFailed: bool = False):
        """
        @return: the failure to raise from the dialogue: L{AuthenticationFailed} when the backend
            refused the user's own credentials, else L{BackendUnavailable}.
        """
        what = f"backend {self.target.describe()}: {reason}"
        return AuthenticationFailed(what) if authFailed else BackendUnavailable(what)

    # -- plumbing -----------------------------------------------------------------------

    def _arm(self, seconds: float, what: str) -> None:
        # One timer for the whole dialogue, pushed forward for each step: DelayedCall.reset() to
        # a later time is arithmetic, where cancel() and callLater() each touch the reactor's heap.
        remaining = self.deadline - self.clock.seconds()
        if remaining < seconds:
            seconds, what = max(0.0, remaining), "failover time spent: " + what
        self._timerWhat = what
        timer = self._timer
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            self._timer = self.clock.callLater(seconds, self._timedOut)

    def _cancelTimer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timedOut(self) -> None:
        self._timer = None
        what = self._timerWhat
        if what.startswith("failover time spent"):
            reason = what
        else:
            reason = f"no {what} in time"
        self._fire(BackendTimeout(f"backend {self.target.describe()}: {reason}"))

    def _fire(self, exc: Exception | None, failure: Failure | None = None) -> None:
        failure = failure or Failure(exc)
        for attr in ("_waiting", "_handshake"):
            d = getattr(self, attr)
            if d is not None:
                setattr(self, attr, None)
                d.errback(failure)
                return
        if not self._done:
            self._failed(failure)

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
            self.greeted = True
            if line.endswith(b"\r"):
                line = line[:-1]
            handler = self.lineHandler
            if handler is not None:
                self._deliver(handler, line)
            else:
                d, self._waiting = self._waiting, None
                if d is not None:
                    d.callback(line)
                else:
                    self._lines.append(line)
            if self._done:
                return

    def connectionLost(self, reason) -> None:
        self._cancelTimer()
        lost, self._lost = self._lost, []
        for f in lost:
            f()
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



#: Exceptions of a connection attempt that never reached the backend.
_CONNECT_ERRORS = (
    error.ConnectError,
    error.TimeoutError,
    error.DNSLookupError,
    error.ConnectingCancelledError,
    defer.CancelledError,
    OSError,
)


def _defaultHealth() -> Values:
    return Values({s.key: s.default for s in HEALTH_SETTINGS})


class BackendConnector:
    """
    The pool of backend members: opens logged-in backend sessions along a route, skipping
    members that are DOWN or draining, with failover bounded by C{max_tries} and
    C{failover_timeout}; keeps each member's health (passive checks here, active ones from
    L{casd.pool.health.HealthChecker}) and its sessions, so a drain can close them.

    @ivar settings: the C{[backend]} settings.
    @ivar health: the C{[health]} settings.
    @ivar members: member key (C{host, port}) -> L{Member}.
    @ivar draining: names of the servers in drain.
    """

    log = Logger()

    def __init__(self, reactor, settings, clientTLS, health: Values | None = None) -> None:
        self.reactor = reactor
        self.settings = settings
        self.clientTLS = clientTLS
        self.health = health if health is not None else _defaultHealth()
        self.members: dict[tuple[str, int], Member] = {}
        self.draining: frozenset[str] = frozenset()
        self._drainCloses: dict[str, list] = {}
        self._sessionCounter = 0

    @classmethod
    def fromConfig(cls, reactor, config, clientTLS) -> BackendConnector:
        """
        A pool for C{config}: its C{[backend]} and C{[health]} settings and its drained servers.
        """
        connector = cls(reactor, config.backend, clientTLS, config.health)
        connector.setDraining({s.name for s in config.backends.values() if s.drain})
        return connector

    def reconfigure(self, config) -> None:
        """
        Apply a reloaded configuration: settings, health thresholds, drains (closing the
        sessions of newly drained servers over C{drain_close_period}).  Members keep their state.
        """
        self.settings = config.backend
        self.health = config.health
        for member in self.members.values():
            member.settings = config.health
        self.setDraining(
            {s.name for s in config.backends.values() if s.drain}, config.backend.drain_close_period
        )

    # -- members ----------------------------------------------------------------------------

    def member(self, target) -> Member:
        """
        The member C{target} reaches, created UP on first use.
        """
        member = self.members.get(target.key)
        if member is None:
            member = self.members[target.key] = Member(target, self.reactor, self.health)
        else:
            member.target = target
        return member

    def state(self, target) -> str:
        """
        C{"UP"}, C{"DOWN (reason)"} or C{"draining"}, for C{casd locate} and the logs.
        """
        if target.server in self.draining:
            return "draining"
        member = self.members.get(target.key)
        if member is None or member.up:
            return "UP"
        return f"DOWN ({member.reason})"

    # -- drain ------------------------------------------------------------------------------

    def setDraining(self, names, closePeriod: float = 0.0) -> None:
        """
        Put exactly the servers called C{names} in drain: they get no new sessions.

        @param closePeriod: when positive, the existing sessions of newly drained servers are
            closed one by one, evenly spread over this many seconds, so that their clients do not
            all come back in the same instant.
        """
        names = frozenset(names)
        added, removed = names - self.draining, self.draining - names
        self.draining = names
        for name in sorted(removed):
            for call in self._drainCloses.pop(name, []):
                if call.active():
                    call.cancel()
            self.log.info("backend server {server} is no longer draining", server=name)
        for name in sorted(added):
            sessions = self.sessionsOf(name)
            self.log.info(
                "backend server {server} is draining: no new sessions, {count} open",
                server=name,
                count=len(sessions),
            )
            if closePeriod > 0 and sessions:
                step = closePeriod / len(sessions)
                self._drainCloses[name] = [
                    self.reactor.callLater(step * (i + 1), self._closeDrained, dialogue)
                    for i, dialogue in enumerate(sessions)
                ]

    def sessionsOf(self, server: str) -> list:
        """
        The open sessions on server C{server}, oldest first.
        """
        sessions = [
            d for m in self.members.values() if m.target.server == server for d in m.sessions
        ]
        return sorted(sessions, key=lambda d: d.sessionNumber)

    def _closeDrained(self, dialogue) -> None:
        if dialogue.transport is not None:
            # The relay sees the backend go and closes the client: it reconnects elsewhere.
            dialogue.transport.loseConnection()

    def available(self, route) -> bool:
        """
        Whether L{connect} would try a member of C{route} now: one that is neither DOWN (as the
        health checks and past connects know it) nor draining.  Opens no connection.
        """
        for target in route.targets:
            member = self.members.get(target.key)
            if target.server not in self.draining and (member is None or member.available()):
                return True
        return False

    # -- connecting -------------------------------------------------------------------------

    def timeoutsFor(self, target) -> tuple[float, float, float, float]:
        """
        @return: the connect, TLS, banner and reply timeouts for C{target}: its server's own, or
            the C{[backend]} ones.
        """
        own = dict(target.timeouts)
        s = self.settings
        reply = own.get("reply_timeout") or s.reply_timeout
        return (
            own.get("connect_timeout") or s.connect_timeout,
            own.get("tls_timeout") or s.tls_timeout,
            own.get("banner_timeout") or s.banner_timeout or reply,
            reply,
        )

    def endpointFor(self, target, timeout: float | None = None):
        """
        The client endpoint of C{target}, TLS-wrapped when its mode is C{implicit}.
        """
        if timeout is None:
            timeout = self.timeoutsFor(target)[0]
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
        Open a logged-in backend session along C{route}.

        @param makeDialogue: C{callable(target) -> BackendDialogue}.
        @return: a L{Deferred} firing with the logged-in L{BackendDialogue}, failing with
            L{AuthenticationFailed} when a backend refused the user's credentials, or with
            L{BackendUnavailable} when no member took the session: all DOWN or draining (at
            once), or C{max_tries} tries or C{failover_timeout} seconds spent.
        """
        clock = self.reactor
        deadline = clock.seconds() + self.settings.failover_timeout
        candidates, skipped = [], []
        for target in route.targets:
            member = self.member(target)
            if target.server in self.draining:
                skipped.append(f"{target.describe()} draining")
            elif not member.available():
                skipped.append(f"{target.describe()} DOWN")
            else:
                candidates.append((target, member))
        if not candidates:
            what = route.group or "the route"
            raise BackendUnavailable(
                f"no member of {what} available: " + (", ".join(skipped) or "no members")
            )
        last, tries = None, 0
        for target, member in candidates:
            remaining = deadline - clock.seconds()
            if tries >= self.settings.max_tries or remaining <= 0:
                break
            tries += 1
            try:
                dialogue = yield self._attempt(route, target, member, makeDialogue, remaining)
            except AuthenticationFailed:
                raise
            except BackendUnavailable as e:
                last = e
                self.log.warn("{reason}", reason=str(e))
                continue
            return dialogue
        raise BackendUnavailable(
            f"{route.group or 'route'}: {tries} of {len(candidates)} available members tried"
            f" within the failover limits, last: {last or 'failover time spent'}"
        )

    @defer.inlineCallbacks
    def _attempt(self, route, target, member, makeDialogue, remaining: float):
        clock = self.reactor
        deadline = clock.seconds() + remaining
        connectTimeout, tlsTimeout, bannerTimeout, replyTimeout = self.timeoutsFor(target)
        connectTimeout = min(connectTimeout, remaining)

        def build():
            dialogue = makeDialogue(target)
            dialogue.tlsTimeout = tlsTimeout
            dialogue.bannerTimeout = bannerTimeout
            dialogue.replyTimeout = replyTimeout
            dialogue.proxyTTL = route.proxyTTL
            # Each step's timer, never past the session's failover deadline.
            dialogue.deadline = deadline
            return dialogue

        connecting = self.endpointFor(target, connectTimeout).connect(_DialogueFactory(build))
        # Enforced here too, so the bound holds whatever the endpoint (and on a test clock).
        timer = clock.callLater(connectTimeout, connecting.cancel)
        try:
            dialogue = yield connecting
        except _CONNECT_ERRORS as e:
            reason = "timed out" if not timer.active() else (str(e) or type(e).__name__)
            member.connectFailed(f"connect {reason}")
            raise BackendUnavailable(f"connect to {target.describe()} failed: {reason}") from None
        finally:
            if timer.active():
                timer.cancel()
        try:
            yield dialogue.loggedIn
        except CASFailure as e:
            # Only a member that never spoke is unhealthy; a refusal after its greeting is
            # about this user, not the member.
            if dialogue.greeted:
                member.connectSucceeded()
            else:
                member.connectFailed(str(e))
            raise
        member.connectSucceeded()
        self._sessionCounter += 1
        dialogue.sessionNumber = self._sessionCounter
        member.sessions.add(dialogue)
        dialogue.whenLost(lambda: member.sessions.discard(dialogue))
        return dialogue
