# -*- test-case-name: tests.test_health,tests.test_serves,tests.test_exhaustion -*-
"""
Backend health: the state of each member (one backend server as one protocol reaches it), kept
by HAProxy's rules, and the service that checks members actively at the protocol level.

A member is UP or DOWN.  Active checks (a connection that must greet with the protocol's
L{HealthProbe}) take an UP member DOWN after C{fall} consecutive failures and bring a DOWN
member back after C{rise} consecutive successes.  Real sessions check passively: C{passive_fall}
consecutive connection failures take a member DOWN at once, without waiting for the next active
check (circuit breaking).  A member nobody checks actively is tried again C{passive_recovery}
seconds after it went DOWN (half-open): one good connection brings it back, one more failure
starts the wait again.  Every change of state is logged once.
"""

from __future__ import annotations

import errno

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from casd.interfaces import HealthProbe
from casd.routing.router import targetFor

UP = "UP"
DOWN = "DOWN"

#: What L{probeMember} fires with when casd itself could not try (out of descriptors): no
#: verdict on the member.
NOT_CHECKED = "not checked: casd is out of file descriptors"

_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def isLocalExhaustion(exc) -> bool:
    """
    Whether a failed connection attempt failed on this host, for want of descriptors or memory
    (C{EMFILE}, C{ENFILE}, C{ENOBUFS}, C{ENOMEM}), before reaching the member: no evidence about
    the member's health.
    """
    number = exc.osError if isinstance(exc, error.ConnectError) else getattr(exc, "errno", None)
    return number in _LOCAL_ERRNOS


class Member:
    """
    The health of one backend member (one C{host:port}): its UP/DOWN state, the counters that
    move it, and the relayed sessions it carries (so that a drain can close them).

    @ivar target: the latest L{casd.routing.router.BackendTarget} that reached this member.
    @ivar settings: the C{[health]} settings (replaced on reload).
    @ivar activelyChecked: whether a L{HealthChecker} checks this member; if not, a passive DOWN
        ends after C{passive_recovery} seconds.
    @ivar sessions: the logged-in L{casd.session.dialogue.BackendDialogue}s on this member.
    """

    log = Logger()

    def __init__(self, target, clock, settings) -> None:
        self.target = target
        self.clock = clock
        self.settings = settings
        self.state = UP
        self.reason = ""
        self.activelyChecked = False
        self.sessions: set = set()
        self._good = 0
        self._bad = 0
        self._passiveBad = 0
        self._downSince: float | None = None
        #: C{(when, ok, reason)} of the latest active check, or C{None}: for the dashboard.
        self.lastCheck: tuple[float, bool, str] | None = None

    @property
    def name(self) -> str:
        return self.target.describe()

    @property
    def up(self) -> bool:
        return self.state == UP

    def available(self) -> bool:
        """
        Whether a new session may be sent here: UP, or DOWN long enough for a half-open try
        when no active check will bring it back.
        """
        if self.state == UP:
            return True
        if self.activelyChecked or self._downSince is None:
            return False
        return self.clock.seconds() - self._downSince >= self.settings.passive_recovery

    # -- active checks --------------------------------------------------------------------

    def checked(self, ok: bool, reason: str = "") -> None:
        """
        Record the result of an active check.
        """
        self.lastCheck = (self.clock.seconds(), ok, reason)
        if ok:
            self._bad = 0
            if self.state == DOWN:
                self._good += 1
                if self._good >= self.settings.rise:
                    self._goUp(f"{self._good} good checks")
        else:
            self._good = 0
            if self.state == UP:
                self._bad += 1
                if self._bad >= self.settings.fall:
                    self._goDown(f"{self._bad} failed checks, last: {reason}")

    # -- passive checks -------------------------------------------------------------------

    def connectFailed(self, reason: str) -> None:
        """
        A real session could not reach the member (refused, timed out, no greeting).
        """
        self._passiveBad += 1
        if self.state == UP:
            if self._passiveBad >= self.settings.passive_fall:
                self._goDown(f"{self._passiveBad} failed connections, last: {reason}")
        else:
            # A failed half-open try: wait a whole recovery period again.
            self._downSince = self.clock.seconds()

    def connectSucceeded(self) -> None:
        """
        A real session reached the member.
        """
        self._passiveBad = 0
        if self.state == DOWN and not self.activelyChecked:
            self._goUp("a session got through")

    # -- transitions ----------------------------------------------------------------------

    def _goDown(self, reason: str) -> None:
        self.state = DOWN
        self.reason = reason
        self._good = 0
        self._downSince = self.clock.seconds()
        self.log.warn("backend {member} is DOWN: {reason}", member=self.name, reason=reason)

    def _goUp(self, reason: str) -> None:
        self.state = UP
        self.reason = reason
        self._bad = 0
        self._passiveBad = 0
        self._downSince = None
        self.log.info("backend {member} is UP: {reason}", member=self.name, reason=reason)


class _ProbeProtocol(Protocol):
    """
    Reads the first line and judges it against the probe.
    """

    maxLine = 4096

    def __init__(self, probe: HealthProbe | None, done) -> None:
        self.probe = probe
        self.done = done
        self.buffer = b""

    def connectionMade(self) -> None:
        if self.probe is None:
            self._finish(None)
            return
        if self.probe.send:
            self.transport.write(self.probe.send)

    def dataReceived(self, data: bytes) -> None:
        if self.done is None:
            return
        self.buffer += data
        if b"\n" not in self.buffer and len(self.buffer) < self.maxLine:
            return
        line = self.buffer.split(b"\n", 1)[0].rstrip(b"\r")
        if line[: len(self.probe.expect)].upper() == self.probe.expect.upper():
            if self.probe.quit:
                self.transport.write(self.probe.quit)
            self._finish(None)
        else:
            self._finish(f"unexpected greeting {line[:60]!r}")

    def _finish(self, reason: str | None) -> None:
        done, self.done = self.done, None
        if done is not None:
            self.transport.loseConnection()
            done(reason)

    def connectionLost(self, reason) -> None:
        done, self.done = self.done, None
        if done is not None:
            done(f"closed before greeting ({reason.getErrorMessage()})")


def probeMember(clock, endpoint, probe: HealthProbe | None, timeout: float) -> defer.Deferred:
    """
    Check one member once.

    @param endpoint: how to reach it (TLS included for implicit-TLS members).
    @param probe: the protocol's L{HealthProbe}, or C{None} to check only that it accepts.
    @return: a L{Deferred} firing with C{None} when healthy, else with a short reason
        (L{NOT_CHECKED} when casd could not even try), always within C{timeout} seconds;
        cancelling it abandons the check, connection included.
    """
    state: dict = {"protocol": None, "connecting": None}

    def abandon():
        if timer.active():
            timer.cancel()
        protocol = state["protocol"]
        if protocol is not None and protocol.transport is not None:
            protocol.done = None
            protocol.transport.abortConnection()
        elif state["connecting"] is not None:
            state["connecting"].cancel()

    result: defer.Deferred = defer.Deferred(lambda d: abandon())

    def done(reason):
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(reason)

    def timedOut():
        abandon()
        if not result.called:
            result.callback(f"no answer within {timeout:g}s")

    def build(addr):
        state["protocol"] = _ProbeProtocol(probe, done)
        return state["protocol"]

    def connectFailed(failure):
        if failure.check(error.ConnectingCancelledError, defer.CancelledError):
            return None  # our own timeout, already reported
        if isLocalExhaustion(failure.value):
            return done(NOT_CHECKED)
        done(f"connect failed: {failure.getErrorMessage() or failure.type.__name__}")

    timer = clock.callLater(timeout, timedOut)
    factory = Factory()
    factory.noisy = False
    factory.buildProtocol = build
    state["connecting"] = endpoint.connect(factory).addErrback(connectFailed)
    return result


class HealthChecker(service.Service):
    """
    Checks every configured backend server, for each enabled protocol it serves (its
    C{protocols}), every C{interval} seconds with the protocol's L{HealthProbe} (from its
    L{casd.interfaces.ICASProtocol} descriptor), and feeds the results to the connector's
    L{Member}s.

    Each member has its own timer, re-armed when its check ends, so a slow member never makes
    checks overlap; first checks are spread over the first interval so a large pool does not
    probe every member in the same instant.
    """

    name = "health"
    log = Logger()

    def __init__(self, reactor, connector, config, protocols) -> None:
        """
        @param connector: the L{casd.pool.connector.BackendConnector} whose members are checked.
        @param protocols: name -> L{casd.interfaces.ICASProtocol}.
        """
        self.reactor = reactor
        self.connector = connector
        self.config = config
        self.protocols = dict(protocols)
        self._checks: dict = {}
        self._timers: dict = {}
        self._inflight: dict = {}

    def plannedChecks(self, config) -> dict:
        """
        @return: member key -> C{(target, probe)} for every member this configuration checks.
        """
        planned = {}
        if not config.health.enabled:
            return planned
        for server in config.backends.values():
            if not server.healthCheck:
                continue
            for name, section in config.protocols.items():
                descriptor = self.protocols.get(name)
                if not section.enabled or descriptor is None or not server.servesProtocol(name):
                    continue
                target = targetFor(server, descriptor)
                planned[target.key] = (target, getattr(descriptor, "healthProbe", None))
        return planned

    def reconfigure(self, config) -> None:
        """
        Check what C{config} lists from now on: new members are scheduled, removed ones
        forgotten, the others keep their state and timers.
        """
        self.config = config
        planned = self.plannedChecks(config)
        for key in set(self._checks) - set(planned):
            self._forget(key)
        new = [key for key in planned if key not in self._checks]
        self._checks = planned
        for key, (target, _) in planned.items():
            self.connector.member(target).activelyChecked = True
        if self.running:
            self._schedule(new, spread=True)

    def startService(self) -> None:
        super().startService()
        self.reconfigure(self.config)
        self._schedule(list(self._checks), spread=True)

    def stopService(self) -> None:
        super().stopService()
        for key in list(self._timers):
            timer = self._timers.pop(key)
            if timer.active():
                timer.cancel()
        inflight, self._inflight = self._inflight, {}
        for d in inflight.values():
            d.cancel()  # no probe outlives the service: a stopped node leaves nothing behind

    def _forget(self, key) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()
        d = self._inflight.pop(key, None)
        if d is not None:
            d.cancel()
        target, _ = self._checks[key]
        self.connector.member(target).activelyChecked = False

    def _schedule(self, keys, spread: bool = False) -> None:
        interval = self.config.health.interval
        for i, key in enumerate(sorted(keys)):
            if key in self._timers or key in self._inflight:
                continue
            # Spread over the first interval, none at once: members start UP, sessions check
            # them passively meanwhile, and a node starting does not probe everything at once.
            delay = interval * (i + 1) / len(keys) if spread else interval
            self._timers[key] = self.reactor.callLater(delay, self._check, key)

    def _check(self, key) -> None:
        self._timers.pop(key, None)
        if key not in self._checks or not self.running:
            return
        target, probe = self._checks[key]
        timeout = self.config.health.timeout
        d = probeMember(self.reactor, self.connector.endpointFor(target, timeout), probe, timeout)
        self._inflight[key] = d
        d.addCallbacks(self._checked, lambda f: f.trap(defer.CancelledError), callbackArgs=(key, d))

    def _checked(self, reason, key, d) -> None:
        if self._inflight.get(key) is not d:
            return  # forgotten or stopped meanwhile
        del self._inflight[key]
        target, _ = self._checks[key]
        if reason != NOT_CHECKED:
            self.connector.member(target).checked(reason is None, reason or "")
        if self.running:
            self._schedule([key])
