# -*- test-case-name: tests.test_plugin -*-
"""
Public fakes for testing casd and protocol plugins without a network, a directory or a mailbox
server (in the spirit of C{treq.testing} and C{ldaptor.testutil}).

    reactor = MemoryReactorClock()
    context = makeContext(reactor, users={"alice": "secret"}, config=CONFIG)
    server, transport = connectFrontend(descriptor, context)
    server.dataReceived(b"a LOGIN alice secret\\r\\n")
    backend = ScriptedBackend(reactor, [
        (b"", b"* OK ready\\r\\n"),
        (re.compile(rb"I ID .*\\r\\nA AUTHENTICATE PLAIN .*\\r\\n"), b"I OK\\r\\nA OK [CAPABILITY IMAP4rev1] hi\\r\\n"),
    ]).run()

The stable API for protocol plugins: L{makeContext}, L{MemoryDirectory}, L{connectFrontend},
L{acceptBackend}, L{failBackend}, L{ScriptedBackend} (with L{CLOSE} and L{ScriptMismatch}),
L{TLSStringTransport} and L{TranscriptMixin}; for tests against real servers, L{writeSecret}
(a password file, e.g. a backend's C{master_password_file}) and L{clientTLSContext}.
"""

from __future__ import annotations

import os
import re
import ssl

from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport

from casd.auth import UserRecord
from casd.auth.authenticator import Authenticator, MailboxRealm
from casd.auth.penalty import LoginPenalty
from casd.state.service import StateService
from casd.pool.connector import BackendConnector
from casd.config import parseConfig
from casd.service.context import CASContext
from casd.interfaces import IUserDirectory, IUserRecordChecker
from casd.session.protolog import SessionLog
from casd.routing.router import defaultRouter
from casd.tls import ClientTLS, ServerTLS

#: A minimal configuration: one backend at 127.0.0.1 reached without TLS.
DEFAULT_CONFIG = """
[routing]
default_backend = "mbx"

[backends.mbx]
host = "127.0.0.1"
"""


@implementer(ICredentialsChecker, IUserRecordChecker, IUserDirectory)
class MemoryDirectory:
    """
    An in-memory directory: login -> (password, L{UserRecord}).  Answers synchronously unless
    C{error} is set, in which case every check fails with it (a directory that is down).

    @ivar checks: how many checks were made (for cache and storm tests).
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users=None) -> None:
        self.users: dict[str, tuple[bytes, UserRecord]] = {}
        self.error: Exception | None = None
        self.checks = 0
        for login, value in (users or {}).items():
            if isinstance(value, tuple):
                password, record = value
            else:
                password, record = value, UserRecord(login=login)
            self.add(login, password, record)

    def add(self, login: str, password, record: UserRecord | None = None) -> None:
        if isinstance(password, str):
            password = password.encode("utf-8")
        self.users[login.lower()] = (password, record or UserRecord(login=login))

    def lookup(self, name: str):
        """
        L{IUserDirectory}: by login or by address.
        """
        if self.error is not None:
            return defer.fail(self.error)
        entry = self.users.get(name.lower())
        if entry is None:
            for _, record in self.users.values():
                if record.address and record.address.lower() == name.lower():
                    return defer.succeed(record)
            return defer.succeed(None)
        return defer.succeed(entry[1])

    def requestAvatarId(self, credentials):
        self.checks += 1
        if self.error is not None:
            return defer.fail(self.error)
        entry = self.users.get(credentials.username.lower())
        if entry is None or not credentials.checkPassword(entry[0]):
            return defer.fail(UnauthorizedLogin("wrong credentials"))
        return defer.succeed(entry[1])


class TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that records C{startTLS()} instead of doing a handshake.

    @ivar tlsStarted: the context factory passed to C{startTLS}, or C{None}.
    @ivar writtenBeforeTLS: what was written before C{startTLS}.
    """

    tlsStarted = None
    writtenBeforeTLS = b""
    readClosed = False
    writeClosed = False

    def startTLS(self, contextFactory) -> None:
        self.tlsStarted = contextFactory
        self.writtenBeforeTLS = self.value()

    def loseWriteConnection(self) -> None:
        self.writeClosed = True


def makeContext(reactor, users=None, config: str = DEFAULT_CONFIG, protocols=None, directory=None):
    """
    Build a L{CASContext} on a fake reactor with an in-memory directory.

    @param config: the configuration: TOML text, or an already parsed L{casd.config.CASConfig}
        (to build many contexts from one, as the fuzz targets do).
    @param protocols: the descriptors the configuration may use; by default casd's own.
    @return: the context; its directory is at C{context.directory}.
    """
    if protocols is None:
        from casd.service.discovery import discoverProtocols

        protocols = discoverProtocols()
    elif not isinstance(protocols, dict):
        protocols = {p.name: p for p in protocols}
    cfg = parseConfig(config, "test.toml", protocols.values()) if isinstance(config, str) else config
    directory = directory if directory is not None else MemoryDirectory(users)
    portal = Portal(MailboxRealm(), [directory])
    clientTLS = ClientTLS(cfg.backend.ca_file) if cfg.backend.ca_file else _NoClientTLS()
    context = CASContext(
        reactor=reactor,
        config=cfg,
        authenticator=Authenticator(portal, reactor, penalty=LoginPenalty.fromConfig(reactor, cfg.auth)),
        router=defaultRouter(cfg),
        connector=BackendConnector.fromConfig(reactor, cfg, clientTLS),
        serverTLS=ServerTLS(cfg.tls, cfg.path),
        clientTLS=clientTLS,
        sessionLog=SessionLog(),
        protocols=protocols,
        directory=directory,
        state=StateService(cfg, reactor) if cfg.state.backend == "local" else None,
    )
    return context


class _NoClientTLS:
    """
    Client TLS options for tests that never verify a real certificate.
    """

    def optionsFor(self, name):
        return ("client-tls", name)


def connectFrontend(descriptor, context, listener=0, peer=("127.0.0.1", 50000), section=None):
    """
    Connect a new client-side protocol to a L{TLSStringTransport}.

    @param listener: index of the listener in the protocol's section, or a
        L{casd.config.ListenerConfig}.
    @return: C{(protocol, transport)}.
    """
    section = section or context.config.protocols[descriptor.name]
    if isinstance(listener, int):
        listener = section.listeners[listener]
    factory = descriptor.buildFactory(context, section, listener)
    protocol = factory.buildProtocol(IPv4Address("TCP", *peer))
    transport = TLSStringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 143), peerAddress=IPv4Address("TCP", *peer)
    )
    protocol.makeConnection(transport)
    return protocol, transport


def acceptBackend(reactor, index: int = -1):
    """
    Complete the backend connection the connector asked a L{MemoryReactor} for.

    @return: C{(protocol, transport)}: the backend dialogue and its L{TLSStringTransport}.
    """
    host, port, factory = reactor.tcpClients[index][:3]
    protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
    transport = TLSStringTransport(peerAddress=IPv4Address("TCP", host, port))
    protocol.makeConnection(transport)
    # Endpoints wrap the protocol; hand back the dialogue itself.
    return getattr(protocol, "_wrappedProtocol", protocol), transport


def failBackend(reactor, reason=None, index: int = -1) -> None:
    """
    Make the connector's pending connection attempt fail (connection refused by default).
    """
    from twisted.internet.error import ConnectionRefusedError

    connector = reactor.connectors[index] if reactor.connectors else None
    factory = reactor.tcpClients[index][2]
    factory.clientConnectionFailed(connector, _failure(reason or ConnectionRefusedError()))


def _failure(exc):
    from twisted.python.failure import Failure

    return Failure(exc)


#: A L{ScriptedBackend} reply that closes the connection instead of answering.
CLOSE = object()


class ScriptMismatch(AssertionError):
    """
    casd sent the backend something other than what the script expected.
    """


class ScriptedBackend:
    """
    A mailbox server speaking a scripted dialogue on the backend connection that a protocol asked
    a L{MemoryReactor} for: a stub backend for testing a protocol's L{casd.session.dialogue.BackendDialogue}.

    The script is a sequence of C{(expected, reply)} steps.  C{expected} is everything casd must
    have sent since the previous step: C{bytes} (C{b""} for nothing, as before the greeting) or a
    compiled C{re} pattern of bytes that must match it whole (for a random session id).
    C{reply} is what the server then sends (C{bytes}), or L{CLOSE}.  When a reply makes the
    dialogue start TLS, the handshake completes at once, so the next step sees what casd sends
    over TLS.  Implicit TLS cannot be scripted (the bytes would be encrypted).

        backend = ScriptedBackend(reactor, [
            (b"", b"+OK ready\\r\\n"),
            (b"USER alice\\r\\n", b"+OK\\r\\n"),
            (b"PASS secret\\r\\n", b"+OK Logged in.\\r\\n"),
        ]).run()
        backend.received()  # what the relay passed on since

    @ivar dialogue: the protocol's backend dialogue.
    @ivar transport: its L{TLSStringTransport}.
    @ivar steps: how many steps have run.
    """

    def __init__(self, reactor, script=(), index: int = -1) -> None:
        self.dialogue, self.transport = acceptBackend(reactor, index)
        self.script = list(script)
        self.steps = 0
        self._tls = None

    def run(self) -> ScriptedBackend:
        """
        Play every step of the script.

        @raise ScriptMismatch: when casd sent something unexpected.
        """
        for expected, reply in self.script[self.steps :]:
            self.step(expected, reply)
        return self

    def step(self, expected, reply) -> None:
        """
        Check what casd sent since the previous step, then answer.
        """
        said = self.received()
        if isinstance(expected, re.Pattern):
            matched = expected.fullmatch(said) is not None
        else:
            matched = said == expected
        if not matched:
            pattern = expected.pattern if isinstance(expected, re.Pattern) else expected
            raise ScriptMismatch(
                f"step {self.steps + 1}: expected {pattern!r}, casd sent {said!r}"
            )
        self.steps += 1
        if reply is CLOSE:
            from twisted.internet.error import ConnectionDone

            self.dialogue.connectionLost(_failure(ConnectionDone()))
            return
        if reply:
            self.send(reply)

    def send(self, data: bytes) -> None:
        """
        Send C{data} from the server, completing a TLS handshake it started.
        """
        self.dialogue.dataReceived(data)
        started = self.transport.tlsStarted
        if started is not None and started is not self._tls:
            self._tls = started
            self.dialogue.handshakeCompleted()

    def received(self) -> bytes:
        """
        @return: what casd sent the server since the last call (and forget it).
        """
        said = self.transport.value()
        self.transport.clear()
        return said


class TranscriptMixin:
    """
    A mixin for C{SynchronousTestCase}s that drive one protocol through its transcript: a fresh
    L{MemoryReactorClock}, a context with an in-memory directory, a client connection and a
    C{send()} that returns what the client read back.

    Set C{descriptor} (the protocol's L{casd.interfaces.ICASProtocol}), C{config} (TOML text),
    C{users} (as L{MemoryDirectory} takes them) and C{listener} (the default listener's index).

    @ivar server: the client-side protocol, after L{connect}.
    @ivar transport: its L{TLSStringTransport}.
    @ivar greeting: what the client read when it connected.
    """

    descriptor = None
    config = DEFAULT_CONFIG
    users: dict = {}
    listener = 0

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, users=self.users, config=self.config)

    def connect(self, listener=None, peer=("198.51.100.7", 40000)):
        """
        Connect a client through the listener of index C{listener} (default: C{self.listener}).
        """
        if listener is None:
            listener = self.listener
        self.server, self.transport = connectFrontend(self.descriptor, self.context, listener, peer)
        self.greeting = self.transport.value()
        self.transport.clear()
        return self.server

    def send(self, data: bytes) -> bytes:
        """
        Feed C{data} to the server; return what it wrote back.
        """
        self.transport.clear()
        self.server.dataReceived(data)
        return self.transport.value()


def writeSecret(directory: str, name: str, secret: str | bytes) -> str:
    """
    Write a password file as casd reads them (C{master_password_file}, LDAP's
    C{bind_password_file}): the secret on one line, readable by its owner only.

    @return: the file's path.
    """
    if isinstance(secret, str):
        secret = secret.encode("utf-8")
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret + b"\n")
    return path


def clientTLSContext(caPath: str) -> ssl.SSLContext:
    """
    A TLS context for a test's client (C{imaplib}, C{poplib}, a socket) that verifies casd's
    certificate against the CA in C{caPath}, as a real client does.
    """
    return ssl.create_default_context(cafile=caPath)
