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

from typing import Callable

from twisted.internet import defer, error, task
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from casd.config import HEALTH_SETTINGS, Values
from casd.failures import AuthenticationFailed, BackendUnavailable, CASFailure
from casd.net import clientEndpoint
from casd.pool.health import Member, isLocalExhaustion
from casd.session.dialogue import BackendTimeout


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
        tls = self.clientTLS.optionsFor(target.tlsName) if target.tls == "implicit" else None
        return clientEndpoint(self.reactor, target.host, target.port, timeout, tls)

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
        last, tries, refused = None, 0, []
        for target, member in candidates:
            remaining = deadline - clock.seconds()
            if tries >= self.settings.max_tries or remaining <= 0:
                break
            tries += 1
            try:
                dialogue = yield self._attempt(route, target, member, makeDialogue, remaining)
            except AuthenticationFailed:
                raise
            except _Refused as e:
                last = e
                refused.append((target, member))
                self.log.warn("{reason}", reason=str(e))
                continue
            except BackendUnavailable as e:
                last = e
                self.log.warn("{reason}", reason=str(e))
                continue
            return dialogue
        retries = 0
        if refused:
            retryUntil = min(deadline, clock.seconds() + self.settings.connect_retry_time)
            delay = _RETRY_FIRST_DELAY
            while refused and clock.seconds() + delay < retryUntil:
                yield task.deferLater(clock, delay)
                delay = min(2 * delay, _RETRY_MAX_DELAY)
                for target, member in list(refused):
                    remaining = deadline - clock.seconds()
                    if remaining <= 0 or target.server in self.draining:
                        refused.remove((target, member))
                        continue
                    retries += 1
                    try:
                        dialogue = yield self._attempt(
                            route, target, member, makeDialogue, remaining, passive=False
                        )
                    except AuthenticationFailed:
                        raise
                    except _Refused as e:
                        last = e
                        continue
                    except BackendUnavailable as e:
                        last = e
                        refused.remove((target, member))
                        continue
                    self.log.info(
                        "backend {backend} took the session after {retries} retries",
                        backend=target.describe(),
                        retries=retries,
                    )
                    return dialogue
        again = f", {retries} retries of members that refused" if retries else ""
        raise BackendUnavailable(
            f"{route.group or 'route'}: {tries} of {len(candidates)} available members tried{again}"
            f" within the failover limits, last: {last or 'failover time spent'}"
        )

    @defer.inlineCallbacks
    def _attempt(self, route, target, member, makeDialogue, remaining: float, passive=True):
        """
        One try of one member.

        @param passive: whether a failure counts against the member's health; a session's
            retries of a member count once, with its first try.
        @raise _Refused: when the member refused the connection or closed it before anything
            was said or sent.
        """
        clock = self.reactor
        failed = member.connectFailed if passive else (lambda reason: None)
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
            timedOut = not timer.active()
            reason = "timed out" if timedOut else (str(e) or type(e).__name__)
            if isLocalExhaustion(e):
                # casd's own shortage says nothing of the member: it must not go DOWN for it.
                raise BackendUnavailable(
                    f"connect to {target.describe()} not attempted: casd is out of file"
                    f" descriptors ({reason})"
                ) from None
            failed(f"connect {reason}")
            refused = isinstance(e, error.ConnectionRefusedError) and not timedOut
            kind = _Refused if refused else BackendUnavailable
            raise kind(f"connect to {target.describe()} failed: {reason}") from None
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
                failed(str(e))
                if _closedUntouched(dialogue) and not isinstance(e, BackendTimeout):
                    raise _Refused(str(e)) from None
            raise
        member.connectSucceeded()
        self._sessionCounter += 1
        dialogue.sessionNumber = self._sessionCounter
        member.sessions.add(dialogue)
        dialogue.whenLost(lambda: member.sessions.discard(dialogue))
        return dialogue
