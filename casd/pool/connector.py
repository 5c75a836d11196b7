# -*- test-case-name: tests.test_connector,tests.test_retry,tests.test_exhaustion -*-
"""
The backend pool: opens logged-in sessions to mailbox servers, each through the protocol's
L{casd.session.dialogue.BackendDialogue}.

The pool (L{BackendConnector}) keeps one L{casd.pool.health.Member} per backend member and protocol
(one C{host:port}): its health, its sessions.  A session's route lists members in preference
order; the pool skips those DOWN or draining, and fails over along the rest within a bounded
number of tries and a bounded total time, each try bounded by the connect, TLS, banner and
reply timeouts.  TLS towards backends is verified with service_identity.

A member that refuses the connection, or closes it before it said or was sent anything, is
probably restarting: once every candidate was tried, such members are tried again with a short
back-off for C{connect_retry_time} seconds, within C{failover_timeout}.  Nothing of a login is ever
sent twice: a connection on which the dialogue wrote a byte is never retried.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from twisted.internet import defer, error
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from twisted.logger import Logger

from casd.config import HEALTH_SETTINGS, Values
from casd.failures import AuthenticationFailed, BackendUnavailable, CASFailure
from casd.net import addressFamily, clientEndpoint
from casd.pool.health import UP, Member, isLocalExhaustion
from casd.pool.tcpclient import connectBackend
from casd.session.dialogue import BackendTimeout
from casd.timerwheel import wheelFor


class _Refused(BackendUnavailable):
    """
    A member refused the connection, or closed it before it said or was sent anything: it may
    be restarting, and trying it again cannot repeat any part of a login.
    """


#: The first pause before members that refused are tried again; each later one doubles, up to
#: L{_RETRY_MAX_DELAY}.
_RETRY_FIRST_DELAY = 0.05
_RETRY_MAX_DELAY = 1.0


def _closedUntouched(dialogue) -> bool:
    """
    Whether the backend closed C{dialogue}'s connection (not casd, not a TLS error) before
    the dialogue wrote anything.
    """
    closed = dialogue.closedBy
    return (
        not dialogue.bytesSent
        and closed is not None
        and closed.check(error.ConnectionDone, error.ConnectionLost) is not None
        and closed.check(error.ConnectionAborted) is None
    )


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
        #: The session timers' wheel (the connect timer, then the backend dialogue's).
        self.wheel = wheelFor(reactor)
        self.settings = settings
        self.clientTLS = clientTLS
        self.health = health if health is not None else _defaultHealth()
        self.members: dict[tuple[str, int], Member] = {}
        self.draining: frozenset[str] = frozenset()
        self._drainCloses: dict[str, list] = {}
        self._sessionCounter = 0
        #: id(target) -> (target, settings, timeoutsFor(target)), for these very settings.
        self._timeouts: dict[int, tuple] = {}

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
        self._timeouts = {}
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
        tls = self.clientTLS.optionsFor(target.tlsName) if target.tls == "implicit" else None
        return clientEndpoint(self.reactor, target.host, target.port, timeout, tls)

    def connect(self, route, makeDialogue: Callable) -> defer.Deferred:
        """
        Open a logged-in backend session along C{route}.

        Plain callbacks (no C{inlineCallbacks}): a login's path through the pool is a connect
        and a dialogue, with no generator or intermediate L{Deferred} around them.

        @param makeDialogue: C{callable(target) -> BackendDialogue}.
        @return: a L{Deferred} firing with the logged-in L{BackendDialogue}, failing with
            L{AuthenticationFailed} when a backend refused the user's credentials, or with
            L{BackendUnavailable} when no member took the session: all DOWN or draining (at
            once), or C{max_tries} tries or C{failover_timeout} seconds spent.  Cancelling it
            abandons the try under way (its connection closed) and tries no other member.
        """
        ways = []
        d = defer.Deferred(lambda d: ways[0].cancel() if ways else None)
        way = self.connectThen(route, makeDialogue, d.callback, d.errback)
        if way is not None:
            ways.append(way)
        return d

    def connectThen(self, route, makeDialogue: Callable, succeeded: Callable, failed: Callable):
        """
        L{connect} without a L{Deferred} (the login path's): the outcome goes to
        C{succeeded(dialogue)} or C{failed(failure)}, once, maybe before this returns.

        @return: the session's way along the route (its C{cancel()} abandons it, as cancelling
            L{connect}'s L{Deferred} does), or C{None} when no member is available (C{failed}
            was called).
        """
        candidates, skipped = [], []
        draining, members = self.draining, self.members
        for target in route.targets:
            member = members.get(target.key) or self.member(target)
            if target.server in draining:
                skipped.append(f"{target.describe()} draining")
            elif member.state != UP and not member.available():  # UP: available() says so
                skipped.append(f"{target.describe()} DOWN")
            else:
                candidates.append((target, member))
        if not candidates:
            what = route.group or "the route"
            failed(
                Failure(
                    BackendUnavailable(
                        f"no member of {what} available: " + (", ".join(skipped) or "no members")
                    )
                )
            )
            return None
        failover = _Failover(self, route, makeDialogue, candidates)
        failover.onSuccess, failover.onFailure = succeeded, failed
        failover._tryNext()
        return failover

    def _loggedIn(self, dialogue, member):
        if member._passiveBad or member.state != UP:  # else connectSucceeded() has nothing to do
            member.connectSucceeded()
        self._sessionCounter += 1
        dialogue.sessionNumber = self._sessionCounter
        sessions = member.sessions
        sessions.add(dialogue)
        dialogue.whenLost(partial(sessions.discard, dialogue))  # no Python frame at the end
        return dialogue


class _Attempt(ClientFactory):
    """
    One try of one member: the connection (bounded by the connect timeout, on any clock) and
    the backend dialogue's login.

    An IP address without implicit TLS is connected to directly (L{connectBackend}: this
    factory is the connection's); a name or implicit TLS goes through
    L{BackendConnector.endpointFor}.

    Its outcome goes to C{succeeded(dialogue)} or C{failed(failure, target, member)}, once, with
    no L{Deferred} between: the failure is L{_Refused} when the member refused the connection
    or closed it before anything was said or sent, else another L{CASFailure} (or an
    unexpected error).

    @ivar passive: whether a failure counts against the member's health; a session's retries
        of a member count once, with its first try.
    """

    noisy = False
    connector = None
    connecting = None
    dialogue = None
    finished = False

    def __init__(
        self, pool, route, target, member, makeDialogue, remaining, passive, succeeded, failed
    ) -> None:
        self.pool = pool
        self.route = route
        self.target = target
        self.member = member
        self.makeDialogue = makeDialogue
        self.passive = passive
        clock = pool.reactor
        self.deadline = clock.seconds() + remaining
        known = pool._timeouts.get(id(target))
        if known is None or known[0] is not target or known[1] is not pool.settings:
            known = pool._timeouts[id(target)] = (target, pool.settings, pool.timeoutsFor(target))
        connectTimeout, self.tlsTimeout, self.bannerTimeout, self.replyTimeout = known[2]
        self.connectTimeout = min(connectTimeout, remaining)
        self.succeeded = succeeded
        self.failed = failed

    def start(self) -> None:
        pool, target = self.pool, self.target
        clock = pool.reactor
        timeout = self.connectTimeout
        # Enforced here, so the bound holds whatever the endpoint (and on a test clock); on the
        # wheel (L{casd.timerwheel}), as it nearly always ends cancelled or handed on.
        self.timer = pool.wheel.callLater(timeout, self._timedOut)
        version = addressFamily(target.host)
        if version and target.tls != "implicit":
            # No endpoint, no wrapping protocol, no connector timer beside ours.
            self.connector = connectBackend(clock, target.host, target.port, self, version)
        else:
            self.connecting = pool.endpointFor(target, timeout).connect(self)
            self.connecting.addErrback(self._endpointFailed)

    def _timedOut(self) -> None:
        if self.connector is not None:
            self.connector.stopConnecting()  # a reactor's connector fails the attempt at once
            if self.dialogue is None:
                self._connectFailed(error.TimeoutError())
        elif self.connecting is not None:
            self.connecting.cancel()

    def cancel(self) -> None:
        """
        Abandon this try: its connection attempt stopped, or its connection closed; its outcome
        is never reported.
        """
        if self.finished:
            return
        self.finished = True
        if self.timer.active():
            self.timer.cancel()
        self.timer = _FIRED
        dialogue = self.dialogue
        if dialogue is not None:
            if dialogue.transport is not None:
                dialogue.transport.abortConnection()
        elif self.connector is not None:
            self.connector.stopConnecting()
        elif self.connecting is not None:
            self.connecting.cancel()

    def buildProtocol(self, addr):
        timer, self.timer = self.timer, _FIRED
        if self.finished:  # cancelled meanwhile
            if timer.active():
                timer.cancel()
            return None
        dialogue = self.dialogue = self.makeDialogue(self.target)
        if not (timer.called or timer.cancelled):  # active(), without a call
            # The connect timer goes on as the dialogue's one timer (its first step resets it;
            # usually both end at the failover deadline, so not even that): no cancel() and
            # callLater() pair per login.
            dialogue.adoptTimer(timer)
        dialogue.tlsTimeout = self.tlsTimeout
        dialogue.bannerTimeout = self.bannerTimeout
        dialogue.replyTimeout = self.replyTimeout
        dialogue.proxyTTL = self.route.proxyTTL
        # Each step's timer, never past the session's failover deadline.
        dialogue.deadline = self.deadline
        dialogue.whenDone(self._loggedIn, self._loginFailed)
        return dialogue

    def clientConnectionFailed(self, connector, reason) -> None:
        self._connectFailed(reason.value)

    def clientConnectionLost(self, connector, reason) -> None:
        pass

    def _endpointFailed(self, failure) -> None:
        if failure.check(*_CONNECT_ERRORS) is None:
            self._fail(failure)
        else:
            self._connectFailed(failure.value)

    def _connectFailed(self, e) -> None:
        timedOut = not self.timer.active()
        if not timedOut:
            self.timer.cancel()
        if self.finished:
            return
        target = self.target
        reason = "timed out" if timedOut else (str(e) or type(e).__name__)
        if isLocalExhaustion(e):
            # casd's own shortage says nothing of the member: it must not go DOWN for it.
            self._fail(
                BackendUnavailable(
                    f"connect to {target.describe()} not attempted: casd is out of file"
                    f" descriptors ({reason})"
                )
            )
            return
        if self.passive:
            self.member.connectFailed(f"connect {reason}")
        refused = isinstance(e, error.ConnectionRefusedError) and not timedOut
        kind = _Refused if refused else BackendUnavailable
        self._fail(kind(f"connect to {target.describe()} failed: {reason}"))

    def _loggedIn(self, dialogue) -> None:
        if self.finished:  # cancelled meanwhile
            if dialogue.transport is not None:
                dialogue.transport.loseConnection()
            return
        self.finished = True
        self.succeeded(self.pool._loggedIn(dialogue, self.member))

    def _loginFailed(self, failure) -> None:
        if self.finished:
            return
        e = failure.value
        if isinstance(e, CASFailure):
            dialogue = self.dialogue
            # Only a member that never spoke is unhealthy; a refusal after its greeting is
            # about this user, not the member.
            if dialogue.greeted:
                self.member.connectSucceeded()
            else:
                if self.passive:
                    self.member.connectFailed(str(e))
                if _closedUntouched(dialogue) and not isinstance(e, BackendTimeout):
                    self._fail(_Refused(str(e)))
                    return
        self._fail(failure)

    def _fail(self, reason) -> None:
        if not self.finished:
            self.finished = True
            self.failed(reason if isinstance(reason, Failure) else Failure(reason), self.target, self.member)


class _Fired:
    """
    A stand-in for a timer that has run.
    """

    called = True
    cancelled = False

    @staticmethod
    def active() -> bool:
        return False


_FIRED = _Fired()


class _Failover:
    """
    One session's way along its route: each available member in turn, within C{max_tries}
    and C{failover_timeout}; then, for C{connect_retry_time}, the members that refused, again,
    with a doubling pause.

    @ivar onSuccess: called with the logged-in dialogue, or C{onFailure} with the failure: one
        of them, once (L{BackendConnector.connect}'s L{Deferred}, or L{connectThen}'s callbacks).
    @ivar ended: whether the outcome was reported, or the session's way abandoned (L{cancel}).
    """

    def __init__(self, pool, route, makeDialogue, candidates) -> None:
        self.pool = pool
        self.route = route
        self.makeDialogue = makeDialogue
        self.candidates = candidates
        clock = self.clock = pool.reactor
        self.deadline = clock.seconds() + pool.settings.failover_timeout
        self.last = None
        self.tries = 0
        self.next = 0
        self.refused: list = []
        self.retries = 0
        self.current = None
        self.pause = None
        self.ended = False

    def cancel(self, done=None) -> None:
        """
        Abandon the session's way (the L{Deferred}'s canceller): the try under way is
        cancelled, no other member tried, nothing reported.
        """
        self.ended = True
        if self.pause is not None and self.pause.active():
            self.pause.cancel()
        current, self.current = self.current, None
        if current is not None:
            current.cancel()

    def _try(self, target, member, remaining: float, passive: bool, failed) -> None:
        attempt = _Attempt(
            self.pool, self.route, target, member, self.makeDialogue, remaining, passive,
            self._succeeded, failed,
        )
        self.current = attempt  # before it starts: it may fail at once
        attempt.start()

    def _succeeded(self, dialogue) -> None:
        self.current = None
        if self.ended:  # cancelled: the try closed what it had
            return
        self.ended = True
        if self.retries:
            self.pool.log.info(
                "backend {backend} took the session after {retries} retries",
                backend=dialogue.target.describe(),
                retries=self.retries,
            )
        self.onSuccess(dialogue)

    def _stop(self, failure) -> bool:
        """
        Whether C{failure} ends the session here: the user's credentials were refused, or it is
        not a member's unavailability.
        """
        self.current = None
        if self.ended:  # cancelled
            return True
        if failure.check(AuthenticationFailed) or not failure.check(BackendUnavailable):
            self.ended = True
            self.onFailure(failure)
            return True
        self.last = failure.value
        return False

    # -- each available member once ---------------------------------------------------------

    def _tryNext(self) -> None:
        pool, clock = self.pool, self.clock
        if self.next < len(self.candidates):
            remaining = self.deadline - clock.seconds()
            if self.tries < pool.settings.max_tries and remaining > 0:
                target, member = self.candidates[self.next]
                self.next += 1
                self.tries += 1
                # _try(), inline: the first try of every login.
                attempt = _Attempt(
                    pool, self.route, target, member, self.makeDialogue, remaining, True,
                    self._succeeded, self._failed,
                )
                self.current = attempt  # before it starts: it may fail at once
                attempt.start()
                return
        self._startRetries()

    def _failed(self, failure, target, member) -> None:
        if self._stop(failure):
            return
        if failure.check(_Refused):
            self.refused.append((target, member))
        self.pool.log.warn("{reason}", reason=str(failure.value))
        self._tryNext()

    # -- the members that refused, again ----------------------------------------------------

    def _startRetries(self) -> None:
        if not self.refused:
            self._giveUp()
            return
        clock = self.clock
        self.retryUntil = min(
            self.deadline, clock.seconds() + self.pool.settings.connect_retry_time
        )
        self.delay = _RETRY_FIRST_DELAY
        self._pauseOrGiveUp()

    def _pauseOrGiveUp(self) -> None:
        if self.refused and self.clock.seconds() + self.delay < self.retryUntil:
            self.pause = self.clock.callLater(self.delay, self._retryRound)
            self.delay = min(2 * self.delay, _RETRY_MAX_DELAY)
        else:
            self._giveUp()

    def _retryRound(self) -> None:
        self.pause = None
        self.queue = list(self.refused)
        self._retryNext()

    def _retryNext(self) -> None:
        pool = self.pool
        while self.queue:
            target, member = self.queue.pop(0)
            remaining = self.deadline - self.clock.seconds()
            if remaining <= 0 or target.server in pool.draining:
                self.refused.remove((target, member))
                continue
            self.retries += 1
            self._try(target, member, remaining, False, self._retryFailed)
            return
        self._pauseOrGiveUp()

    def _retryFailed(self, failure, target, member) -> None:
        if self._stop(failure):
            return
        if not failure.check(_Refused):
            self.refused.remove((target, member))
        self._retryNext()

    def _giveUp(self) -> None:
        if self.ended:
            return
        self.ended = True
        again = f", {self.retries} retries of members that refused" if self.retries else ""
        what = (
            f"{self.route.group or 'route'}: {self.tries} of {len(self.candidates)} available"
            f" members tried{again} within the failover limits, last:"
            f" {self.last or 'failover time spent'}"
        )
        self.onFailure(Failure(BackendUnavailable(what)))
