# -*- test-case-name: tests.test_dialogue,tests.test_connector,tests.test_imap,tests.test_pop3,tests.test_managesieve -*-
"""
The base of every protocol's backend login dialogue: an explicit sequence of commands and
replies (greeting, STARTTLS, client address, login) over one backend connection, returning a
L{Deferred}.  It knows nothing of any protocol's syntax; the pool (L{casd.pool.connector})
opens the connection and sets the timeouts.
"""

from __future__ import annotations

from collections import deque
from functools import lru_cache
from typing import Callable

from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from casd.failures import AuthenticationFailed, BackendUnavailable, CASFailure
from casd.net import parseAddress
from casd.session.relay import writeThrough
from casd.tlslayer import startTLS


class BackendTimeout(BackendUnavailable):
    """
    A backend did not answer in time.
    """


@lru_cache(maxsize=4096)
def _xclientAddress(host: str) -> bytes | None:
    """
    C{ADDR=} and the client's address for L{BackendDialogue.xclientCommand}, or C{None} when
    C{host} is no address; remembered per address (parsing one costs about 30 calls, and a login
    storm comes from few addresses).
    """
    ip = parseAddress(host)
    return None if ip is None else b"ADDR=" + ip.compressed.encode("ascii")


@implementer(IHandshakeListener)
class BackendDialogue(Protocol):
    """
    The base of a protocol's backend login dialogue, driven by lines: each step is a method
    that gets the next line from the backend (no L{Deferred} or generator per reply: this is
    the hot path of every login).  L{dialogue} starts it, usually with
    C{self.expectLine(self.greeting)}; a step sends the next command with L{command}, fails by
    raising L{fail}'s exception, starts TLS with L{startTLS} and ends the dialogue with
    L{succeed}.

    @ivar loggedIn: fires with this protocol once the backend accepted the login, or fails with
        a L{casd.failures.CASFailure}: a L{Deferred} made when asked for (the pool is told
        through L{whenDone} instead, with no L{Deferred} per login).
    @ivar leftover: bytes the backend sent after the login reply; the relay passes them on.
    @ivar greeted: whether the backend sent a line (it is alive at the protocol level); a
        failure before that counts against the member's health.
    @ivar proxyTTL: the proxy TTL to announce to the backend (IMAP ID C{x-proxy-ttl}), 0 for none.
    @ivar tlsTimeout: seconds for a TLS handshake; L{bannerTimeout} for the first line,
        L{replyTimeout} for each later one.  The pool sets all three, and L{deadline}, from the
        target's settings before it connects
        (L{casd.pool.connector.BackendConnector.timeoutsFor}).
    """

    log = Logger()
    relay = None
    greeted = False
    proxyTTL = 0
    tlsTimeout = bannerTimeout = replyTimeout = 30.0
    #: Absolute time by which the whole dialogue must be done (the pool's failover budget); no
    #: step's timer is armed past it.
    deadline = float("inf")
    #: Order of the session in its pool, once logged in (the oldest is closed first on drain).
    sessionNumber = 0
    #: Longest line accepted from a backend during the dialogue.
    maxLineLength = 65536
    #: Bytes the dialogue wrote (L{send}, L{sendLine}): the pool retries a connection only
    #: while it is 0, so no byte of a login is ever sent twice.
    bytesSent = 0
    #: Why the connection closed (a L{Failure}), once it did.
    closedBy = None
    #: The step that gets the next line (see L{expectLine}); C{None} while none waits for one.
    lineHandler = None

    def __init__(self, target, client, user, credentials, context) -> None:
        self.target = target
        self.client = client
        self.user = user
        self.credentials = credentials
        self.context = context
        self.clock = context.reactor
        self._lost: list[Callable[[], None]] = []
        self._loggedInDeferred: defer.Deferred | None = None
        #: C{(succeeded, failed)} of L{whenDone}.
        self._outcomeTo = None
        #: The dialogue's outcome once it is known: C{True} (logged in), or a L{Failure}.
        self._outcome = None
        self._buffer = b""
        self._lines: deque[bytes] = deque()
        self._handshake: defer.Deferred | None = None
        self._timer = None
        #: When L{_timer} is due (absolute, the clock's time).
        self._timerAt = 0.0
        self._timerWhat = ""
        #: Inside L{dataReceived}: a step's L{expectLine} arms the timer once the read's lines
        #: are all handled (L{_armPending}), not once per line.
        self._reading = False
        self._armPending = False
        self._done = False
        self.leftover = b""

    @property
    def loggedIn(self) -> defer.Deferred:
        d = self._loggedInDeferred
        if d is None:
            d = self._loggedInDeferred = defer.Deferred()
            outcome = self._outcome
            if outcome is not None:
                # Known already: as a Deferred fired then would hold it.
                if isinstance(outcome, Failure):
                    d.errback(outcome)
                else:
                    d.callback(self)
        return d

    def whenDone(self, succeeded: Callable, failed: Callable) -> None:
        """
        Report the outcome to C{succeeded(self)} or C{failed(failure)}, once, as L{loggedIn}'s
        callbacks would get it, with no L{Deferred} between.  Call it before the dialogue
        starts (the pool does, when it builds the dialogue).
        """
        self._outcomeTo = (succeeded, failed)

    def _report(self, outcome) -> None:
        failed = isinstance(outcome, Failure)
        # Not C{self} (a cycle that only the garbage collector would free): L{loggedIn} knows.
        self._outcome = outcome if failed else True
        to = self._outcomeTo
        self._outcomeTo = None
        if to is not None:
            try:
                to[1](outcome) if failed else to[0](outcome)
            except Exception:
                # As a Deferred's callback failing would be: logged, not raised into the read.
                self.log.failure("reporting the login with {backend}", backend=self.target.describe())
        d = self._loggedInDeferred
        if d is not None:
            d.errback(outcome) if failed else d.callback(outcome)

    # -- the dialogue -------------------------------------------------------------------

    def dialogue(self):
        """
        Start the login dialogue, once connected (and after the handshake, for implicit TLS):
        usually C{self.expectLine(self.greeting)}.
        """
        raise NotImplementedError()

    def connectionMade(self) -> None:
        # Commands go out with one send() each, not queued for the next reactor iteration.
        writeThrough(self.transport)
        if self.target.tls == "implicit":
            d = self._awaitHandshake()
            d.addCallback(lambda _: self._start())
            d.addErrback(self._failed)
        else:
            self._start()

    def _start(self) -> None:
        try:
            self.dialogue()
        except Exception:
            self._failed(Failure())

    def succeed(self) -> None:
        """
        The backend accepted the login: L{loggedIn} fires, the relay takes over.
        """
        self._succeeded(None)

    def _succeeded(self, _):
        if self._done:
            return
        self._done = True
        self.lineHandler = None
        self._cancelTimer()
        # The failover deadline bounds the login only: a protocol that keeps reading after it
        # (SMTP's transactions) is bound by its per-phase timeouts alone.
        self.deadline = float("inf")
        self.leftover = self._buffer
        if self._lines:
            self.leftover = b"".join(line + b"\r\n" for line in self._lines) + self._buffer
            self._lines.clear()
        self._buffer = b""
        # Drop the password now that the backend took the session.
        self.credentials = None
        self._report(self)

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
        self._report(failure if isinstance(failure, Failure) else Failure(failure))

    # -- primitives ---------------------------------------------------------------------

    def sendLine(self, line: bytes) -> None:
        self.bytesSent += len(line) + 2
        self.transport.write(line + b"\r\n")

    def send(self, data: bytes) -> None:
        self.bytesSent += len(data)
        self.transport.write(data)

    def command(self, line: bytes, handler) -> None:
        """
        Send C{line} and give the reply's first line to C{handler} (L{expectLine}).
        """
        self.sendLine(line)
        self.expectLine(handler)

    def expectLine(self, handler=None) -> None:
        """
        The next line goes to C{handler} (or again to the current L{lineHandler}) within the
        reply timeout (the banner timeout before the first line).  An exception the handler
        raises fails the dialogue (a L{casd.failures.CASFailure} as it is, anything else as a
        protocol error).
        """
        if handler is not None:
            self.lineHandler = handler
        if self._reading:
            # Armed once dataReceived handled every line it has (the same deadline: no time
            # passes in between).
            self._armPending = True
        else:
            self._armForLine()
        while self._lines and self.lineHandler is not None and not self._done:
            self._deliver(self.lineHandler, self._lines.popleft())

    def _armForLine(self) -> None:
        if self.greeted:
            self._arm(self.replyTimeout, "reply")
        else:
            self._arm(self.bannerTimeout, "greeting")

    def _deliver(self, handler, line: bytes) -> None:
        try:
            handler(line)
        except Exception:
            self.lineHandler = None
            self._fire(None, Failure())

    def startTLS(self, then: Callable[[], None]) -> None:
        """
        Start TLS towards the backend, verifying its certificate for the target's C{tlsName},
        within C{tlsTimeout}; lines read before are forgotten.

        @param then: the step to run once the handshake completed (its exceptions fail the
            dialogue, as a step's do).
        """
        self.lineHandler = None
        self._buffer = b""
        self._lines.clear()
        startTLS(self.transport, self.context.clientTLS.optionsFor(self.target.tlsName))
        d = self._awaitHandshake()
        d.addCallback(lambda _: then())
        d.addErrback(self._failed)

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
        session = c.sessionId.encode("ascii")
        ttl = b" TTL=%d" % (self.proxyTTL,) if self.proxyTTL else b""
        address = _xclientAddress(c.peerHost)
        if address is None:
            # Only an address: a UNIX socket's name could carry spaces or line breaks.
            return b"XCLIENT SESSION=%s%s" % (session, ttl)
        return b"XCLIENT %s PORT=%d SESSION=%s%s" % (address, c.peerPort, session, ttl)

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
        # a later time is arithmetic, where cancel() and callLater() each touch the reactor's heap;
        # a step whose time is the one already set (the failover deadline, usually) leaves it.
        self._armPending = False
        now = self.clock.seconds()
        at = now + seconds
        if at > self.deadline:
            at, what = self.deadline, "failover time spent: " + what
        self._timerWhat = what
        timer = self._timer
        if timer is not None and at == self._timerAt:
            return
        self._timerAt = at
        delay = at - now if at > now else 0.0
        if timer is not None:
            timer.reset(delay)
        else:
            self._timer = self.clock.callLater(delay, self._timedOut)

    def adoptTimer(self, timer) -> None:
        """
        Take over a pending timer of the caller's (the pool's connect timer) as this dialogue's
        one timer: its first step resets it (L{_arm}) instead of arming a new one, and it calls
        L{_timedOut} from now on.

        @param timer: an active L{DelayedCall}.
        """
        timer.func, timer.args, timer.kw = self._timedOut, (), {}
        self._timer = timer
        self._timerAt = timer.getTime()
        self._timerWhat = "greeting"

    def _cancelTimer(self) -> None:
        # _timer is None once it ran (_timedOut) or was cancelled here.
        if self._timer is not None:
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
        d, self._handshake = self._handshake, None
        if d is not None:
            d.errback(failure)  # to _failed, through startTLS's or connectionMade's errback
        elif not self._done:
            self._failed(failure)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        self._reading = True
        try:
            while True:
                buffer = self._buffer
                i = buffer.find(b"\n")
                if i < 0:
                    if buffer and len(buffer) > self.maxLineLength:
                        self._buffer = b""
                        self._fire(BackendUnavailable(f"backend {self.target.describe()}: line too long"))
                    break
                line = buffer[:i]
                self._buffer = buffer[i + 1 :]
                self.greeted = True
                if line[-1:] == b"\r":
                    line = line[:-1]
                handler = self.lineHandler
                if handler is None:
                    self._lines.append(line)
                else:
                    # (_deliver, inline: this runs for every line of every login.)
                    try:
                        handler(line)
                    except Exception:
                        self.lineHandler = None
                        self._fire(None, Failure())
                if self._done:
                    return
        finally:
            self._reading = False
        if self._armPending and not self._done:
            # The steps' expectLine() calls of this read, as one timer update (a line came, so
            # the reply timeout).
            self._arm(self.replyTimeout, "reply")

    def connectionLost(self, reason) -> None:
        self.closedBy = reason
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
