"""
The base of every client-side protocol: the limits, timers, TLS, the shared login path and the
hand-off to the relay live here once (nginx's C{ngx_mail_read_command}, Dovecot's
C{login-common}); a protocol module adds only its grammar and its wording.
"""

from __future__ import annotations

from zope.interface import implementer

from twisted.internet import defer
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from casd.session.clientinfo import ClientInfo
from casd.failures import CASFailure, ProtocolViolation
from casd.session.relay import Relay, writeThrough
from casd.auth.sasl import MECHANISMS, SASLCancelled, SASLExchange, SASLRefusal, encodeBase64

#: Unprocessed bytes held while a command is in progress before reading from the client pauses.
PAUSE_BUFFER = 65536


def renderFailure(table, exc: BaseException, fallback: bytes) -> bytes:
    """
    Word a failure of the shared vocabulary in a protocol's terms.

    @param table: C{(exception class, words)} pairs; the first match wins, so list a subclass
        before its base.
    @param fallback: the words for anything the table does not name (an internal error).
    """
    for kind, words in table:
        if isinstance(exc, kind):
            return words
    return fallback


@implementer(IHalfCloseableProtocol)
class FrontendProtocol(Protocol):
    """
    One client connection, from the greeting to the end of the relayed session.

    Subclasses implement L{greet}, L{lineReceived} (and L{rawReceived} when they use
    L{setRawMode}), L{lineTooLong}, L{timedOut} and L{makeDialogue}; to log in they call
    L{login} (or L{startSASL}) and implement L{loginSucceeded}, L{loginFailed} (and
    L{saslChallenge}, L{saslFailed}).  L{failures} words the shared failures.

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
    #: The proxy TTL a trusted client announced (IMAP ID C{x-proxy-ttl}), else C{None}: the
    #: router refuses a session whose TTL is spent, so proxies that loop stop.
    proxyTTL: int | None = None

    #: The protocol's words for the shared failures: C{(exception class, bytes)} pairs for
    #: L{renderFailure}, first match wins (e.g. IMAP's C{NO [UNAVAILABLE] ...}).
    failures: tuple = ()
    #: The words for a failure that L{failures} does not name.
    internalFailure = b"Internal error, try again later."

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
        self._sasl: SASLExchange | None = None
        self._saslToken = None

    # -- hooks ------------------------------------------------------------------------------

    def greet(self) -> None:
        raise NotImplementedError()

    def lineReceived(self, line: bytes) -> None:
        raise NotImplementedError()

    def rawReceived(self, data: bytes) -> None:
        raise NotImplementedError()

    def lineTooLong(self) -> None:
        """
        A line exceeded C{max_line_length}: say so in the protocol's words and call L{close}.
        """
        raise NotImplementedError()

    def timedOut(self) -> None:
        """
        The pre-authentication timeout expired: say so and call L{close}.
        """
        raise NotImplementedError()

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
        The login failed: send the client L{renderFailure} of C{failure}, in the protocol's
        framing.  C{self.result} already names the failure for the session log.
        """
        raise NotImplementedError()

    def saslChallenge(self, token, challenge: bytes) -> None:
        """
        Send a SASL challenge, already base64-encoded, in the protocol's framing (C{+ ...} in
        IMAP and POP3, a string in ManageSieve).  The client's answer goes to L{saslResponse}.
        """
        raise NotImplementedError()

    def saslFailed(self, token, refusal: SASLRefusal) -> None:
        """
        A SASL exchange ended without credentials; say why in the protocol's words.
        """
        raise NotImplementedError()

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
        self._preauth = self.clock.callLater(self.section.preauth_timeout, self._preauthExpired)
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
            self._preauth = self.clock.callLater(seconds, self._preauthExpired)

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
        @return: the protocol's words for C{exc}, from L{failures}.
        """
        return renderFailure(self.failures, exc, self.internalFailure)

    def badCommand(self) -> bool:
        """
        Count an invalid command.

        @return: C{True} when the limit is reached: the protocol says goodbye and closes.
        """
        self._badCommands += 1
        return self._badCommands >= self.section.max_bad_commands

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
        self._process()

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
            self._busy = False
            if self._paused and not self._closing and self.relay is None:
                self._paused = False
                self.transport.resumeProducing()
            if self.relay is None and self.connected:
                self._process()
            return result

        return d.addBoth(release)

    # -- TLS --------------------------------------------------------------------------------

    def startTLS(self) -> None:
        """
        Switch to TLS after the protocol's "go ahead" reply was written.  Bytes the client
        pipelined behind the STARTTLS command are discarded, never executed after the handshake.
        """
        self._buffer = b""
        self._raw = 0
        self._sasl = self._saslToken = None
        self.transport.startTLS(self.context.serverTLS.options)
        self.client = self.client.withTLS()

    # -- SASL: one driver for every protocol; each frames challenges and responses its way ----

    @property
    def saslInProgress(self) -> bool:
        """
        Whether a SASL exchange waits for the client's next response (see L{saslResponse}).
        """
        return self._sasl is not None

    def startSASL(self, token, mechanism, initial: bytes | None = None) -> None:
        """
        Begin a SASL exchange (IMAP C{AUTHENTICATE}, POP3 and SMTP C{AUTH}, ...).  It ends in
        L{login} with the credentials, or in L{saslFailed}; in between, L{saslChallenge} sends
        each challenge and the protocol hands each client response to L{saslResponse}.

        @param token: passed back to the hooks (e.g. the IMAP tag).
        @param mechanism: the mechanism name the client asked for (C{str} or C{bytes}).
        @param initial: the initial response as the client sent it (base64, C{=} for an empty
            one), or C{None}.
        """
        if isinstance(mechanism, bytes):
            mechanism = mechanism.decode("ascii", "replace")
        mechanism = mechanism.upper()
        if mechanism not in MECHANISMS:
            self.saslFailed(token, SASLRefusal.UNSUPPORTED)
            return
        if not self.client.plaintextAllowed:
            # PLAIN and LOGIN carry the password itself: only over TLS or from trusted clients.
            self.saslFailed(token, SASLRefusal.PRIVACY_REQUIRED)
            return
        exchange = SASLExchange(mechanism)
        try:
            decoded = SASLExchange.decodeInitial(initial) if initial is not None else None
        except ProtocolViolation:
            self.saslFailed(token, SASLRefusal.BAD_INITIAL)
            return
        self._saslStep(token, exchange, exchange.start, decoded)

    def saslResponse(self, response: bytes) -> None:
        """
        The client's response to the last challenge, unframed (the base64 text, or C{*}).
        """
        exchange, token = self._sasl, self._saslToken
        self._sasl = self._saslToken = None
        try:
            decoded = exchange.decode(response)
        except SASLCancelled:
            self.saslFailed(token, SASLRefusal.CANCELLED)
            return
        except ProtocolViolation:
            self.saslFailed(token, SASLRefusal.BAD_RESPONSE)
            return
        self._saslStep(token, exchange, exchange.respond, decoded)

    def abortSASL(self, refusal: SASLRefusal) -> None:
        """
        End the exchange in progress with L{saslFailed} (e.g. the client's response did not
        parse in the protocol's framing).
        """
        token = self._saslToken
        self._sasl = self._saslToken = None
        self.saslFailed(token, refusal)

    def _saslStep(self, token, exchange, step, data) -> None:
        try:
            result = step(data)
        except ProtocolViolation:
            self.saslFailed(token, SASLRefusal.MALFORMED)
            return
        if isinstance(result, bytes):
            self._sasl, self._saslToken = exchange, token
            self.saslChallenge(token, encodeBase64(result))
        else:
            self.login(token, result)

    # -- login and relay --------------------------------------------------------------------

    def login(self, token, credentials) -> defer.Deferred:
        """
        Log in with C{credentials} (L{proxyLogin}), holding further commands until it is done;
        then L{loginSucceeded} and the relay, or L{loginFailed}.

        @param token: passed back to the hooks (e.g. the IMAP tag).
        """
        d = self.proxyLogin(credentials)
        d.addCallbacks(
            self._loginSucceeded, self._loginFailed, callbackArgs=(token,), errbackArgs=(token,)
        )
        return self.wait(d)

    def _loginSucceeded(self, dialogue, token) -> None:
        self.loginSucceeded(token, dialogue)
        self.startRelay(dialogue)

    def _loginFailed(self, failure, token) -> None:
        if failure.check(_ClientGone) or self._closing:
            return
        if not failure.check(CASFailure):
            self.log.failure("login failed unexpectedly", failure)
        self.result = type(failure.value).__name__
        self.loginFailed(token, failure.value)

    def proxyLogin(self, credentials):
        """
        The shared path: authenticate, locate the mailbox, open and log in a backend session.

        @return: a L{Deferred} firing with the logged-in L{casd.session.dialogue.BackendDialogue}, or
            failing with a L{casd.failures.CASFailure} for the protocol to render.
        """
        # Plain callbacks rather than inlineCallbacks: this runs for every login.
        d = self.context.authenticator.login(credentials, self.client)
        d.addCallback(self._authenticated, credentials)
        return d

    def _authenticated(self, user, credentials):
        self.user = user
        context = self.context
        d = context.router.locate(user, self.descriptor, ttl=self.proxyTTL)
        d.addCallback(
            lambda route: context.connector.connect(
                route, lambda target: self.makeDialogue(target, user, credentials)
            )
        )
        d.addCallback(self._connected)
        return d

    def _connected(self, dialogue):
        if not self.connected or self._closing:
            dialogue.transport.loseConnection()
            raise _ClientGone()
        self.backend = dialogue.target.describe()
        return dialogue

    def startRelay(self, dialogue) -> None:
        """
        Detach to the dumb relay: from here on, bytes only.
        """
        if self._preauth is not None and self._preauth.active():
            self._preauth.cancel()
        self._preauth = None
        self.result = "proxy"
        leftover, self._buffer = self._buffer, b""
        relay = Relay(self, dialogue, self.clock, self.section.idle_timeout, self._relayEnded)
        relay.start(fromClient=leftover, fromBackend=dialogue.leftover)
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
        if self._preauth is not None and self._preauth.active():
            self._preauth.cancel()
        self._preauth = None
        if self.relay is not None:
            self.relay.clientLost(reason)
        self._logSession()
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


class _ClientGone(Exception):
    """
    The client left while its backend session was being opened.
    """


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

    def buildProtocol(self, addr):
        p = self.protocolClass(self.context, self.section, self.listener, self.descriptor)
        p.factory = self
        return p
