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

from casd.clientinfo import ClientInfo
from casd.relay import Relay

#: Unprocessed bytes held while a command is in progress before reading from the client pauses.
PAUSE_BUFFER = 65536


@implementer(IHalfCloseableProtocol)
class FrontendProtocol(Protocol):
    """
    One client connection, from the greeting to the end of the relayed session.

    Subclasses implement L{greet}, L{lineReceived} (and L{rawReceived} when they use
    L{setRawMode}), L{lineTooLong}, L{timedOut} and L{makeDialogue}.

    @ivar client: the L{ClientInfo}.
    @ivar user: the authenticated L{casd.interfaces.IMailboxUser}, once known.
    @ivar result: what became of the session, for the protocol log.
    """

    log = Logger()
    relay = None
    user = None
    backend = None
    result = "disconnected"

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
        @return: the protocol's L{casd.backend.BackendDialogue} for C{target}.
        """
        raise NotImplementedError()

    # -- connection -------------------------------------------------------------------------

    def connectionMade(self) -> None:
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
        self.transport.startTLS(self.context.serverTLS.options)
        self.client = self.client.withTLS()

    # -- login and relay --------------------------------------------------------------------

    @defer.inlineCallbacks
    def proxyLogin(self, credentials):
        """
        The shared path: authenticate, locate the mailbox, open and log in a backend session.

        @return: a L{Deferred} firing with the logged-in L{casd.backend.BackendDialogue}, or
            failing with a L{casd.failures.CASFailure} for the protocol to render.
        """
        context = self.context
        user = yield context.authenticator.login(credentials, self.client)
        self.user = user
        route = yield context.router.locate(user, self.descriptor)
        dialogue = yield context.connector.connect(
            route, lambda target: self.makeDialogue(target, user, credentials)
        )
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
