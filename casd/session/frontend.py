# -*- test-case-name: tests.test_imap,tests.test_pop3,tests.test_managesieve,tests.test_plugin -*-
"""
The base of every client-side protocol: the limits, timers, TLS, the shared login path and the
hand-off to the relay live here once (nginx's C{ngx_mail_read_command}, Dovecot's
C{login-common}); a protocol module adds only its grammar and its wording.
"""

from __future__ import annotations

from attrs import frozen
from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from casd.auth.sasl import makeCredentials
from casd.failures import AuthenticationFailed, CASFailure, PrivacyRequired, ProtocolViolation
from casd.session.clientinfo import ClientInfo
from casd.session.loginpath import LoginPath
from casd.session.relay import Relay, writeThrough
from casd.session.sasldriver import SASLDriver
from casd.session.steps import SessionSteps
from casd.tls import clientCAFileOf
from casd.timerwheel import WHEEL_ATTRIBUTE, wheelFor
from casd.tlslayer import startTLS

#: Unprocessed bytes held while a command is in progress before reading from the client pauses.
PAUSE_BUFFER = 65536


@frozen
class Wording:
    """
    A protocol's words for what the core says in its name, without framing (the protocol's
    L{FrontendProtocol.replyOk}, C{replyNo}, C{replyBad} and C{replyBye} frame them).  The
    defaults are Dovecot's; a protocol names only those it words differently, e.g.
    C{Wording(tooManyErrors=b"Too many invalid IMAP commands.")}.
    """

    unknownCommand: bytes = b"Unknown command."
    unexpectedArguments: bytes = b"Unexpected arguments."
    tooManyErrors: bytes = b"Too many invalid commands."
    lineTooLong: bytes = b"Line too long."
    timedOut: bytes = b"Disconnected for inactivity."
    tlsActive: bytes = b"TLS is already active."
    tlsUnavailable: bytes = b"TLS support isn't enabled."
    tlsGoAhead: bytes = b"Begin TLS negotiation now."
    saslUnsupported: bytes = b"Unsupported authentication mechanism."
    saslBadInitial: bytes = b"Invalid base64 data in initial response."
    saslBadResponse: bytes = b"Invalid base64 data in continued response."
    saslCancelled: bytes = b"Authentication aborted by client."


@implementer(IHalfCloseableProtocol)
class FrontendProtocol(SASLDriver, SessionSteps, LoginPath, Protocol):
    """
    One client connection, from the greeting to the end of the relayed session.

    A protocol implements L{greet}, L{lineReceived} (and L{rawReceived} when it uses
    L{setRawMode}), L{makeDialogue}, L{loginSucceeded}, L{saslChallenge} when it offers SASL,
    and its framing of replies: L{replyOk}, L{replyNo}, L{replyBad}, L{replyBye}.  It hands each
    command to L{dispatch}, which runs its C{<state>_<NAME>} method; those call L{login},
    L{passwordLogin} or L{startSASL}, L{startTLSCommand} and L{invalidCommand}.  The core says
    the rest (bad commands, long lines, time-outs, SASL refusals, login failures) in the
    protocol's L{wording} and L{failures}.

    @ivar context: the shared L{casd.service.context.CASContext}.
    @ivar section: this protocol's L{casd.config.ProtocolSection} (limits, timeouts, own keys).
    @ivar listener: the L{casd.config.ListenerConfig} the client came in through.
    @ivar descriptor: the protocol's L{casd.interfaces.ICASProtocol}.
    @ivar client: the L{ClientInfo}.
    @ivar user: the authenticated L{casd.interfaces.IMailboxUser}, once known.
    @ivar result: what became of the session, for the protocol log.
    """

    log = Logger()
    relay = None
    user = None
    backend = None
    result = "disconnected"
    #: The per-user session slot this session holds (C{max_sessions_per_user}), else C{None}.
    _slot = None
    #: The proxy TTL a trusted client announced (IMAP ID C{x-proxy-ttl}), else C{None}: the
    #: router refuses a session whose TTL is spent, so proxies that loop stop.
    proxyTTL: int | None = None

    #: The protocol's words for the shared failures: C{(exception class, bytes)} pairs, first
    #: match wins (e.g. IMAP's C{NO [UNAVAILABLE] ...}); see L{renderFailure}.
    failures: tuple = ()
    #: The words for a failure that L{failures} does not name.
    internalFailure = b"Internal error, try again later."
    #: The protocol's words for what the core says itself (L{Wording}).
    wording = Wording()
    #: The state whose commands L{dispatch} runs: command C{NAME} is method C{<state>_<NAME>}.
    state = "unauth"

    def __init__(self, context, section, listener, descriptor) -> None:
        self.context = context
        self.section = section
        self.listener = listener
        self.descriptor = descriptor
        self.clock = context.reactor
        self.maxLineLength = section.max_line_length
        self._buffer = b""
        self._raw = 0
        self._busy = False
        self._processing = False
        self._paused = False
        self._closing = False
        self._logged = False
        self._badCommands = 0
        self._preauth = None

    # -- hooks ------------------------------------------------------------------------------

    def greet(self) -> None:
        raise NotImplementedError()

    def lineReceived(self, line: bytes) -> None:
        raise NotImplementedError()

    def rawReceived(self, data: bytes) -> None:
        raise NotImplementedError()

    def replyOk(self, token, text: bytes) -> None:
        """
        Send a success reply with C{text} (IMAP C{tag OK text}, POP3 C{+OK text}).

        @param token: what the protocol passed to L{dispatch} (e.g. the IMAP tag).
        """
        raise NotImplementedError()

    def replyNo(self, token, text: bytes) -> None:
        """
        Send a refusal of a well-formed command (IMAP C{NO}, POP3 C{-ERR}).
        """
        raise NotImplementedError()

    def replyBad(self, token, text: bytes) -> None:
        """
        Send the reply to a command that is wrong here (IMAP C{BAD}); L{invalidCommand} counts
        them.  By default, L{replyNo}.
        """
        self.replyNo(token, text)

    def replyBye(self, text: bytes) -> None:
        """
        Send the last words before the core closes the connection (IMAP C{* BYE}).  By default,
        L{replyNo}.
        """
        self.replyNo(None, text)

    def replyFailure(self, token, words: bytes) -> None:
        """
        Send a rendered failure (a line of L{failures}); IMAP puts the tag before it.
        """
        self.send(words + b"\r\n")

    def lineTooLong(self) -> None:
        """
        A line exceeded C{max_line_length}: say so and close.
        """
        self.replyBye(self.wording.lineTooLong)
        self.close()

    def timedOut(self) -> None:
        """
        The pre-authentication timeout expired: say so and close.
        """
        self.replyBye(self.wording.timedOut)
        self.close()

    def makeDialogue(self, target, user, credentials):
        """
        @return: the protocol's L{casd.session.dialogue.BackendDialogue} for C{target}.
        """
        raise NotImplementedError()

    def loginSucceeded(self, token, dialogue) -> None:
        """
        The backend accepted the session: send the client its success reply.  The relay starts
        right after this returns.

        @param token: what the protocol passed to L{login} (e.g. the IMAP tag).
        @param dialogue: the logged-in L{casd.session.dialogue.BackendDialogue}.
        """
        raise NotImplementedError()

    def loginFailed(self, token, failure: CASFailure) -> None:
        """
        The login failed: send the client L{renderFailure} of C{failure} (L{replyFailure}).
        After L{login}, C{self.result} already names the failure for the session log.
        """
        self.replyFailure(token, self.renderFailure(failure))

    # -- connection -------------------------------------------------------------------------

    def connectionMade(self) -> None:
        # Replies go out with one send() each, not queued for the next reactor iteration.
        writeThrough(self.transport)
        self.startedAt = self.clock.seconds()
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.sessions.add(self)
        self.client = ClientInfo.fromTransport(
            self.transport,
            self.descriptor.name,
            self.listener,
            self.context.config.server.trusted_networks,
            tls=self.listener.tls == "implicit",
        )
        # On the wheel (L{casd.timerwheel}): it ends cancelled, or as the relay's first idle check.
        wheel = getattr(self.clock, WHEEL_ATTRIBUTE, None) or wheelFor(self.clock)
        self._preauth = wheel.callLater(self.section.preauth_timeout, self._timerFired)
        self.greet()

    @property
    def tlsAvailable(self) -> bool:
        """
        Whether STARTTLS may be offered now.
        """
        return (
            not self.client.tls
            and self.listener.tls == "starttls"
            and self.context.serverTLS.enabled
        )

    def resetTimeout(self, seconds: float) -> None:
        """
        Re-arm the timer that L{connectionMade} armed with C{preauth_timeout}: L{timedOut} is
        called after C{seconds} unless it is reset again.  For protocols that keep parsing for
        the whole session and never detach to the relay (SMTP bounds each wait for a command).
        """
        if self._closing:
            return
        if self._preauth is not None and self._preauth.active():
            self._preauth.reset(seconds)
        else:
            self._preauth = wheelFor(self.clock).callLater(seconds, self._timerFired)

    def _timerFired(self) -> None:
        """
        The session's timer: before the relay, the time allowed without login (or
        L{resetTimeout}'s); the relay takes it over for its first idle check (L{Relay.start}).
        """
        relay = self.relay
        if relay is not None:
            relay.checkIdle()
        else:
            self._preauthExpired()

    def _preauthExpired(self) -> None:
        self._preauth = None
        self.result = "timeout"
        self.timedOut()

    def send(self, data: bytes) -> None:
        if not self._closing:
            self.transport.write(data)

    def close(self, result: str | None = None) -> None:
        """
        End the connection after what was sent is flushed; nothing further is read.
        """
        if result is not None:
            self.result = result
        self._closing = True
        self._buffer = b""
        self.transport.loseConnection()

    def renderFailure(self, exc: BaseException) -> bytes:
        """
        @return: the protocol's words for C{exc}: the first entry of L{failures} whose class it
            is an instance of (list a subclass before its base), else L{internalFailure}.
        """
        for kind, words in self.failures:
            if isinstance(exc, kind):
                return words
        return self.internalFailure

    def badCommand(self) -> bool:
        """
        Count an invalid command.

        @return: C{True} when the limit is reached: the protocol says goodbye and closes.
        """
        self._badCommands += 1
        return self._badCommands >= self.section.max_bad_commands

    # -- commands ---------------------------------------------------------------------------

    def dispatch(self, name, *args, token=None) -> None:
        """
        Run command C{name} (C{str} or C{bytes}, any case) in the current L{state}: the method
        C{<state>_<NAME>}, called with C{args}.  A name that is not one of them goes to
        L{unknownCommand}.

        @param token: what L{unknownCommand} replies to (e.g. the IMAP tag).
        """
        if isinstance(name, bytes):
            name = name.decode("ascii", "replace")
        name = name.upper()
        handler = None
        if name.isascii() and name.isalpha():
            handler = getattr(self, self.state + "_" + name, None)
        if handler is None:
            self.unknownCommand(token, name)
        else:
            handler(*args)

    def unknownCommand(self, token, name: str) -> None:
        """
        A command the current state does not know: an invalid command.
        """
        self.invalidCommand(token, self.wording.unknownCommand)

    def invalidCommand(self, token, text: bytes) -> None:
        """
        Refuse an invalid command with L{replyBad} and count it: at C{max_bad_commands}, say
        C{tooManyErrors} with L{replyBye} and close instead.
        """
        if self.badCommand():
            self.replyBye(self.wording.tooManyErrors)
            self.close("too many errors")
        else:
            self.replyBad(token, text)

    def noArguments(self, token, args) -> bool:
        """
        @return: whether C{args} is empty; if not, the command is invalid and was refused.
        """
        if args:
            self.invalidCommand(token, self.wording.unexpectedArguments)
            return False
        return True

    def startTLSCommand(self, token) -> bool:
        """
        STARTTLS (POP3 C{STLS}): refuse it with L{replyBad} when TLS is on already or not
        offered on this listener; else say go ahead (L{replyOk}) and L{startTLS}.

        @return: whether TLS started (the protocol forgets what it learnt in clear).
        """
        if self.client.tls:
            self.replyBad(token, self.wording.tlsActive)
            return False
        if not self.tlsAvailable:
            self.replyBad(token, self.wording.tlsUnavailable)
            return False
        self.replyOk(token, self.wording.tlsGoAhead)
        self.startTLS()
        return True

    def privacyRequired(self, token) -> bool:
        """
        @return: whether a plaintext login must be refused here (before TLS, from an untrusted
            client); if so, the client was told (L{PrivacyRequired}, through L{loginFailed}).
        """
        client = self.client
        if client.tls or client.trusted:  # plaintextAllowed, without a property call
            return False
        self.loginFailed(token, PrivacyRequired())
        return True

    def passwordLogin(self, token, user: bytes, password: bytes) -> None:
        """
        A plaintext login (IMAP C{LOGIN}, POP3 C{USER}/C{PASS}): refused before TLS unless
        allowed (L{privacyRequired}), refused as a failed login when the name or password
        cannot be credentials (L{casd.auth.sasl.makeCredentials}), else L{login}.
        """
        client = self.client
        if not (client.tls or client.trusted) and self.privacyRequired(token):
            return
        try:
            credentials = makeCredentials(user, password)
        except ProtocolViolation:
            self.loginFailed(token, AuthenticationFailed())
            return
        self.login(token, credentials)

    # -- reading ----------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        if self._busy:
            if len(self._buffer) > PAUSE_BUFFER and not self._paused:
                self._paused = True
                self.transport.pauseProducing()
            return
        if self._processing:
            return  # a command finished synchronously inside the loop: it goes on
        # _process(), inline: one call less per read.
        self._processing = True
        try:
            self._processLoop()
        finally:
            self._processing = False

    def setRawMode(self, length: int) -> None:
        """
        Deliver the next C{length} bytes whole to L{rawReceived} (a literal).
        """
        self._raw = length

    #: The receiver of stream mode (see L{setStreamMode}), or C{None} in line mode.
    _stream = None

    def setStreamMode(self, receiver) -> None:
        """
        Deliver every byte read from now on, those already buffered first, to C{receiver(data)}
        in the chunks they come in, without looking for lines or limiting their length: a body
        streamed through while the protocol still parses (SMTP C{DATA}).  C{receiver} returns
        C{None} while the body goes on, or the bytes after its end (maybe C{b""}), which line
        mode then reads as commands.  It may call L{wait} to hold them.
        """
        self._stream = receiver

    def _process(self) -> None:
        if self._processing:
            return  # a command finished synchronously inside the loop below: it goes on
        self._processing = True
        try:
            self._processLoop()
        finally:
            self._processing = False

    def _processLoop(self) -> None:
        while self._buffer and not self._busy and not self._closing:
            if self._stream is not None:
                data, self._buffer = self._buffer, b""
                rest = self._stream(data)
                if rest is not None:
                    self._stream = None
                    self._buffer = rest + self._buffer
                continue
            if self._raw:
                if len(self._buffer) < self._raw:
                    return
                data, self._buffer = self._buffer[: self._raw], self._buffer[self._raw :]
                self._raw = 0
                self.rawReceived(data)
                continue
            i = self._buffer.find(b"\n", 0, self.maxLineLength + 2)
            if i < 0:
                if len(self._buffer) > self.maxLineLength + 1:
                    self.result = "line too long"
                    self.lineTooLong()
                return
            line, self._buffer = self._buffer[:i], self._buffer[i + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            if len(line) > self.maxLineLength:
                self.result = "line too long"
                self.lineTooLong()
                return
            self.lineReceived(line)

    def wait(self, d: defer.Deferred) -> defer.Deferred:
        """
        Hold further commands (pipelined ones stay buffered, in order) until C{d} fires.  Attach
        the command's own callbacks to C{d} before passing it here, so its reply is written
        before the next command runs.
        """
        self._busy = True

        def release(result):
            self._release()
            return result

        return d.addBoth(release)

    def _release(self) -> None:
        """
        The command L{wait} held for is done: further commands run.
        """
        self._busy = False
        if self._paused and not self._closing and self.relay is None:
            self._paused = False
            self.transport.resumeProducing()
        if self.relay is None and self.connected:
            self._process()

    # -- TLS --------------------------------------------------------------------------------

    def startTLS(self) -> None:
        """
        Switch to TLS after the protocol's "go ahead" reply was written.  Bytes the client
        pipelined behind the STARTTLS command are discarded, never executed after the handshake.
        """
        self._buffer = b""
        self._raw = 0
        self._sasl = self._saslToken = None
        startTLS(
            self.transport,
            self.context.serverTLS.optionsFor(self.descriptor, clientCAFileOf(self.descriptor, self.section)),
        )
        writeThrough(self.transport)  # the new TLS layer's writes: whole, at once
        self.client = self.client.withTLS()

    # -- login and relay --------------------------------------------------------------------

    def startRelay(self, dialogue) -> None:
        """
        Detach to the dumb relay: from here on, bytes only.
        """
        timer, self._preauth = self._preauth, None
        if timer is not None and (timer.called or timer.cancelled):  # a WheelCall's active()
            timer = None
        self.result = "proxy"
        leftover, self._buffer = self._buffer, b""
        relay = Relay(self, dialogue, self.clock, self.section.idle_timeout, self._relayEnded)
        # The session's timer goes on as the relay's first idle check (L{_timerFired}).
        relay.start(fromClient=leftover, fromBackend=dialogue.leftover, timer=timer)
        dialogue.leftover = b""
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _relayEnded(self, why: str) -> None:
        self.result = f"proxy({why})"
        self._logSession()

    def readConnectionLost(self) -> None:
        if self.relay is not None:
            self.relay.clientReadClosed()
        else:
            self.close()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason) -> None:
        self._closing = True
        timer = self._preauth
        if timer is not None:
            self._preauth = None
            if not (timer.called or timer.cancelled):  # a WheelCall's active()
                timer.cancel()
        if self.relay is not None:
            self.relay.clientLost(reason)
        if not self._logged:
            self._logSession()
        if self._slot is not None:
            self._releaseSlot()
        factory = getattr(self, "factory", None)
        if factory is not None:
            factory.sessions.discard(self)

    def _logSession(self) -> None:
        if self._logged:
            return
        self._logged = True
        relay = self.relay
        self.context.sessionLog.record(
            self.client,
            self.user.login if self.user is not None else "",
            self.backend,
            self.result,
            relay.bytesIn if relay else 0,
            relay.bytesOut if relay else 0,
            self.clock.seconds() - self.startedAt,
        )


class FrontendFactory(Factory):
    """
    Builds one protocol class for one listener.
    """

    noisy = False

    def __init__(self, protocolClass, context, section, listener, descriptor) -> None:
        self.protocolClass = protocolClass
        self.context = context
        self.section = section
        self.listener = listener
        self.descriptor = descriptor

        self.sessions: set = set()

    def startFactory(self) -> None:
        # While the listener is up, the session timers' wheel keeps its tick between sessions.
        wheelFor(self.context.reactor).hold()

    def stopFactory(self) -> None:
        wheelFor(self.context.reactor).release()

    def buildProtocol(self, addr):
        p = self.protocolClass(self.context, self.section, self.listener, self.descriptor)
        p.factory = self
        return p
