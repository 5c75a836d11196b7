# -*- test-case-name: tests.test_ldap -*-
"""
casd's LDAP client: a pool of persistent connections to a list of LDAP servers, built on ldaptor's
L{LDAPClient} (the replies of a login decoded by L{casd.auth.ldapwire}) and hidden behind
L{IDirectoryClient}, so the checker above it never sees the library.

ldaptor 21.2 has sharp edges this module files off:
  - its C{startTLS()} without arguments does not verify the server's certificate: StartTLS here is
    sent by hand and always given C{optionsForClientTLS} with the configured trust root;
  - it has no timeouts: every operation here (connect, StartTLS, bind, search) has one, and a
    connection whose operation timed out is dropped, since a late answer could not be matched;
  - binds pipelined on one connection can hang: user binds go one at a time over a small pool of
    bind connections, beside one shared (pipelined) search connection bound as the service account;
  - a malformed or unexpected reply makes it raise inside C{dataReceived}: here that drops the
    connection and the operations on it fail as L{DirectoryUnavailable}.

Servers are tried in the configured order; one that failed within C{downRetry} seconds is tried
last, so a dead primary costs one connection attempt, not one per login.  A connection that the
server closed while idle is replaced transparently: an operation that fails because a reused
connection was found dropped is tried once more on a fresh one.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable, Mapping

from attrs import field, frozen
from zope.interface import Interface, implementer

from ldaptor.protocols import pureber, pureldap
from ldaptor.protocols.ldap import ldaperrors
from ldaptor.protocols.ldap.ldapclient import LDAPClient, LDAPClientConnectionLostException
from twisted.internet import defer
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from casd.auth import ldapwire
from casd.failures import DirectoryUnavailable
from casd.net import clientEndpoint

SCOPES = {
    "base": pureldap.LDAP_SCOPE_baseObject,
    "one": pureldap.LDAP_SCOPE_singleLevel,
    "sub": pureldap.LDAP_SCOPE_wholeSubtree,
}

#: Largest reply buffered (bytes): an entry of casd's few attributes is far smaller.
MAX_MESSAGE = 4 * 1024 * 1024

#: LDAP result codes.
SUCCESS = 0
INVALID_CREDENTIALS = 49


class IDirectoryClient(Interface):
    """
    What casd's LDAP checker needs from an LDAP library.  Every method fails with
    L{DirectoryUnavailable} when the directory cannot answer (down, slow, garbage).
    """

    def search(base, scope, filter, attributes, sizeLimit=0):
        """
        Search as the service account.

        @param scope: one of L{SCOPES}' values.
        @param filter: an encoded filter (L{casd.auth.ldapfilter.FilterTemplate.wire}) or a
            filter object (L{casd.auth.ldapfilter.FilterTemplate.build}).
        @return: a L{Deferred} firing with a C{list} of L{DirectoryEntry}.
        """

    def bind(dn, password):
        """
        Check a password with a simple bind as C{dn}.

        @return: a L{Deferred} firing with C{(resultCode, diagnosticMessage)}.
        """

    def bindAndRead(dn, password, attributes):
        """
        Bind as C{dn}; when that succeeds, read C{dn}'s own entry with its rights.

        @return: a L{Deferred} firing with C{(resultCode, diagnosticMessage, entry or None)}.
        """

    def close():
        """
        Close every connection.

        @return: a L{Deferred} firing when they are closed.
        """


@frozen
class DirectoryEntry:
    """
    One entry as read from the directory.

    @ivar attributes: lower-cased attribute name -> values.
    """

    dn: str
    attributes: Mapping[str, tuple[str, ...]] = field(factory=dict)

    def first(self, name: str) -> str:
        """
        @return: the first value of attribute C{name} (any case), or C{''}.
        """
        values = self.attributes.get(name.lower()) if name else None
        return values[0] if values else ""

    def values(self, name: str) -> tuple[str, ...]:
        return self.attributes.get(name.lower(), ()) if name else ()


@frozen
class LDAPURL:
    """
    An LDAP server: C{ldap://HOST[:PORT]/} or C{ldaps://HOST[:PORT]/}.
    """

    scheme: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> LDAPURL:
        """
        @raise ValueError: when C{text} is not such a URL.
        """
        scheme, sep, rest = text.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in ("ldap", "ldaps"):
            raise ValueError(f"expected ldap://HOST[:PORT]/ or ldaps://HOST[:PORT]/, got {text!r}")
        hostport = rest.split("/", 1)[0]
        if rest.split("/", 1)[1:] not in ([], [""]):
            raise ValueError(f"expected no DN or options in the URL, got {text!r}")
        if hostport.startswith("["):
            host, _, tail = hostport[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else ""
            if tail and not tail.startswith(":"):
                raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
        else:
            host, _, port = hostport.partition(":")
        if not host:
            raise ValueError(f"expected a host name in {text!r}")
        if port:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"expected a port number in {text!r}")
            number = int(port)
        else:
            number = 636 if scheme == "ldaps" else 389
        return cls(scheme, host, number)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"


@frozen
class PoolSettings:
    """
    How to reach the directory.

    @ivar tlsOptions: C{callable(hostName) -> IOpenSSLClientConnectionCreator}: verified TLS
        options (L{casd.tls.ClientTLS.optionsFor}).
    @ivar bindPassword: the service account's password; never logged, never in C{repr}.
    """

    urls: tuple[LDAPURL, ...]
    tlsOptions: Callable = field(repr=False)
    startTLS: bool = True
    connectTimeout: float = 3.0
    timeout: float = 5.0
    bindDN: str = ""
    bindPassword: bytes = field(default=b"", repr=False)
    poolSize: int = 4
    downRetry: float = 30.0


class _Dropped(DirectoryUnavailable):
    """
    The connection was lost under an operation (it may be retried on a fresh connection).
    """


class _TimedOut(DirectoryUnavailable):
    """
    An operation got no answer in time (its connection was dropped).
    """


def _describe(failure) -> str:
    """
    A short, secret-free description of why something failed.
    """
    value = failure.value if hasattr(failure, "value") else failure
    text = str(value).strip().splitlines()[0] if str(value).strip() else ""
    return f"{type(value).__name__}: {text[:160]}" if text else type(value).__name__


class _Client(LDAPClient):
    """
    ldaptor's client, hardened: anything it cannot digest drops the connection instead of raising
    into the reactor; C{lost} fires when the connection is gone.
    """

    log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self.lost = defer.Deferred()
        self.onLost: Callable | None = None

    def connectionMade(self) -> None:
        super().connectionMade()
        # Requests are small and pipelined on the search connection: without this, Nagle's
        # algorithm holds each one until the previous one is acknowledged (up to 40 ms).
        setNoDelay = getattr(self.transport, "setTcpNoDelay", None)
        if setNoDelay is not None:
            try:
                setNoDelay(True)
            except OSError:
                pass

    def dataReceived(self, data: bytes) -> None:
        # ldaptor's own loop prints and skips elements it does not know, and raises on others;
        # here anything but a well-formed LDAPMessage ends the connection.
        # The replies of a login are decoded by ldapwire; others by ldaptor.
        self.buffer += data
        try:
            while self.buffer:
                size = ldapwire.messageSize(self.buffer)
                if size is not None and size > MAX_MESSAGE:
                    raise ValueError("message too large")
                if size is None or size > len(self.buffer):
                    return
                raw, self.buffer = self.buffer[:size], self.buffer[size:]
                message = ldapwire.decodeResponse(raw)
                if message is None:
                    message, used = pureber.berDecodeObject(self.berdecoder, raw)
                    if used != size:
                        raise ValueError("not one LDAPMessage")
                self.handle(message)
        except Exception as e:
            self.log.warn(
                "malformed or unexpected LDAP reply ({error}): dropping the connection",
                error=type(e).__name__,
            )
            self.buffer = b""
            self.transport.abortConnection()

    def connectionLost(self, reason) -> None:
        # The owner learns of the loss before the operations in flight fail, so none of their
        # errbacks sees the connection as usable.
        if self.onLost is not None:
            self.onLost(reason)
        super().connectionLost(reason)
        if not self.lost.called:
            self.lost.callback(None)


class _Connection:
    """
    One connection to one server.

    @ivar served: how many callers the pool handed it to (a connection with C{served > 0} is
        "reused": its failure by loss may be retried on a fresh one).
    """

    def __init__(self, client: _Client, url: LDAPURL, clock, timeout: float, onLost) -> None:
        self.client = client
        self.url = url
        self.clock = clock
        self.timeout = timeout
        self.alive = True
        self.served = 0
        self._onLost = onLost
        client.onLost = self._lost

    def _lost(self, reason) -> None:
        self.alive = False
        self._onLost(self)

    def abort(self) -> None:
        if self.alive:
            self.alive = False
            self.client.transport.abortConnection()

    def close(self) -> defer.Deferred:
        if self.alive:
            self.alive = False
            try:
                self.client.send_noResponse(pureldap.LDAPUnbindRequest())
            except Exception:
                pass
            self.client.transport.loseConnection()
        return self.client.lost

    def _op(self, what: str, start: Callable[[], defer.Deferred]) -> defer.Deferred:
        if not self.alive:
            return defer.fail(_Dropped(f"LDAP connection to {self.url} lost before {what}"))
        try:
            d = start()
        except LDAPClientConnectionLostException:
            self.alive = False
            return defer.fail(_Dropped(f"LDAP connection to {self.url} lost before {what}"))
        d.addTimeout(self.timeout, self.clock)

        def failed(f):
            if f.check(defer.TimeoutError):
                self.abort()
                raise _TimedOut(f"LDAP {what} timed out after {self.timeout:g} s on {self.url}")
            if f.check(ldaperrors.LDAPException) and self.alive:
                return f
            self.abort()
            raise _Dropped(f"LDAP connection to {self.url} lost during {what} ({_describe(f)})")

        return d.addErrback(failed)

    def startTLS(self, options) -> defer.Deferred:
        def started(msg):
            if not isinstance(msg, pureldap.LDAPExtendedResponse):
                self.abort()
                raise DirectoryUnavailable(f"unexpected reply to StartTLS from {self.url}")
            if msg.resultCode != SUCCESS:
                self.abort()
                raise DirectoryUnavailable(
                    f"{self.url} refused StartTLS (result {msg.resultCode})"
                )
            if self.client.buffer:
                # Bytes behind the answer arrived in clear yet would be read as if protected:
                # someone in the middle is injecting (the STARTTLS injection of CVE-2011-0411).
                self.abort()
                raise DirectoryUnavailable(f"{self.url} sent data behind its StartTLS answer")
            # From here on every byte (a password first of all) goes through verified TLS.
            self.client.transport.startTLS(options)

        return self._op("StartTLS", lambda: self.client.send(pureldap.LDAPStartTLSRequest())).addCallback(
            started
        )

    def bind(self, dn: str, password: bytes) -> defer.Deferred:
        request = ldapwire.bindRequest(dn, password)

        def answered(msg):
            if not isinstance(msg, pureldap.LDAPBindResponse):
                self.abort()
                raise DirectoryUnavailable(f"unexpected reply to a bind from {self.url}")
            message = msg.errorMessage or b""
            if isinstance(message, bytes):
                message = message.decode("utf-8", "replace")
            return msg.resultCode, message[:200]

        return self._op("bind", lambda: self.client.send(request)).addCallback(answered)

    def search(self, base: str, scope: int, filter, attributes, sizeLimit: int = 0) -> defer.Deferred:
        def start():
            timeLimit = max(1, math.ceil(self.timeout))
            request = ldapwire.searchRequest(base, scope, sizeLimit, timeLimit, filter, attributes or ["1.1"])
            return ldapwire.search(self.client, request)

        def found(results):
            return [_entry(r) for r in results]

        def refused(f):
            f.trap(ldaperrors.LDAPException)
            code = getattr(f.value, "resultCode", "?")
            raise DirectoryUnavailable(
                f"LDAP search under {base!r} failed on {self.url}: {type(f.value).__name__}"
                f" (result {code})"
            )

        return self._op("search", start).addCallbacks(found, refused)


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _entry(result) -> DirectoryEntry:
    attributes = {}
    for key, values in result.attributes:
        name = _text(key).lower()
        attributes[name] = attributes.get(name, ()) + tuple(_text(v) for v in values)
    return DirectoryEntry(_text(result.objectName), attributes)


@implementer(IDirectoryClient)
class LDAPConnectionPool:
    """
    The connections to the directory: one shared search connection (bound as the service
    account, operations pipelined) and up to C{poolSize} bind connections (one user bind at a
    time each).

    @ivar stats: counters for monitoring and tests: C{connects}, C{connectFailures}, C{binds},
        C{searches}, C{timeouts}, C{retries}.
    """

    log = Logger()

    def __init__(self, clock, settings: PoolSettings, endpointFor: Callable | None = None) -> None:
        """
        @param clock: the reactor (time, TCP and name resolution).
        @param endpointFor: C{callable(LDAPURL) -> IStreamClientEndpoint}; by default TCP (with
            TLS for C{ldaps://}) on C{clock}.
        """
        if not settings.urls:
            raise ValueError("at least one LDAP URL is required")
        self.clock = clock
        self.settings = settings
        self._endpointFor = endpointFor or self._defaultEndpoint
        self._search: _Connection | None = None
        self._searchWaiters: list | None = None
        self._bindConnections: set[_Connection] = set()
        self._idle: list[_Connection] = []
        self._connecting = 0
        self._waiters: deque = deque()
        self._downUntil: dict[LDAPURL, float] = {}
        self._closed = False
        self.stats = dict.fromkeys(
            ("connects", "connectFailures", "binds", "searches", "timeouts", "retries"), 0
        )

    # -- connecting -------------------------------------------------------------------------

    def _defaultEndpoint(self, url: LDAPURL):
        tls = self.settings.tlsOptions(url.host) if url.scheme == "ldaps" else None
        return clientEndpoint(self.clock, url.host, url.port, self.settings.connectTimeout, tls)

    def _order(self) -> list[LDAPURL]:
        now = self.clock.seconds()
        urls = self.settings.urls
        up = [u for u in urls if self._downUntil.get(u, 0) <= now]
        return up + [u for u in urls if u not in up]

    @defer.inlineCallbacks
    def _open(self, serviceBind: bool):
        """
        Open a connection to the first server that answers.

        @return: a L{Deferred} firing with a L{_Connection}.
        """
        errors = []
        for url in self._order():
            try:
                connection = yield self._openOne(url, serviceBind)
            except DirectoryUnavailable as e:
                self.stats["connectFailures"] += 1
                self._downUntil[url] = self.clock.seconds() + self.settings.downRetry
                self.log.warn("LDAP server {url} unusable: {reason}", url=str(url), reason=str(e))
                errors.append(str(e))
                continue
            self._downUntil.pop(url, None)
            self.stats["connects"] += 1
            if self._closed:
                connection.close()
                raise DirectoryUnavailable("LDAP client closed")
            return connection
        raise DirectoryUnavailable("no LDAP server usable: " + "; ".join(errors))

    @defer.inlineCallbacks
    def _openOne(self, url: LDAPURL, serviceBind: bool):
        settings = self.settings
        d = self._endpointFor(url).connect(Factory.forProtocol(_Client))

        def timedOut(result, timeout):
            return Failure(
                _TimedOut(f"cannot connect to {url}: no answer within {timeout:g} s")
            )

        # The endpoint bounds the TCP connect; this also bounds name resolution.
        d.addTimeout(settings.connectTimeout, self.clock, onTimeoutCancel=timedOut)
        try:
            client = yield d
        except DirectoryUnavailable:
            raise
        except Exception as e:
            raise DirectoryUnavailable(f"cannot connect to {url}: {_describe(e)}") from None
        connection = _Connection(client, url, self.clock, settings.timeout, self._connectionLost)
        try:
            if url.scheme == "ldap" and settings.startTLS:
                yield connection.startTLS(settings.tlsOptions(url.host))
            if serviceBind and settings.bindDN:
                code, message = yield connection.bind(settings.bindDN, settings.bindPassword)
                if code != SUCCESS:
                    raise DirectoryUnavailable(
                        f"{url} refused the service account's bind (result {code}: {message})"
                    )
            else:
                # An anonymous bind, whatever its result, proves that the TLS handshake (its
                # certificate check included) completed and an LDAP server answers, so a bad
                # server fails over here rather than under a user's bind.
                yield connection.bind("", b"")
        except defer.TimeoutError:
            connection.abort()
            raise DirectoryUnavailable(f"{url} timed out") from None
        except DirectoryUnavailable:
            connection.abort()
            raise
        return connection

    def _connectionLost(self, connection: _Connection) -> None:
        if connection is self._search:
            self._search = None
        self._bindConnections.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        self._dispatch()

    # -- the search connection --------------------------------------------------------------

    def _searchConnection(self) -> defer.Deferred:
        if self._closed:
            return defer.fail(DirectoryUnavailable("LDAP client closed"))
        if self._search is not None and self._search.alive:
            return defer.succeed(self._search)
        waiter = defer.Deferred()
        if self._searchWaiters is not None:
            self._searchWaiters.append(waiter)
            return waiter
        self._searchWaiters = [waiter]

        def done(result):
            waiters, self._searchWaiters = self._searchWaiters, None
            if isinstance(result, _Connection):
                self._search = result
            for w in waiters:
                if isinstance(result, _Connection):
                    w.callback(result)
                else:
                    w.errback(result)

        self._open(serviceBind=True).addBoth(done)
        return waiter

    def search(self, base, scope, filter, attributes, sizeLimit=0):
        def operation(connection):
            connection.served += 1
            self.stats["searches"] += 1
            return connection.search(base, scope, filter, attributes, sizeLimit)

        return self._retrying(self._searchConnection, operation)

    def _retrying(self, acquire, operation, release=None, attempt=0) -> defer.Deferred:
        """
        Run C{operation(connection)} on a connection from C{acquire()} (given back to C{release}
        after); when a reused connection is found dropped, once more on a fresh one.  (Callbacks,
        not C{inlineCallbacks}: a login runs two of these.)
        """

        def run(connection):
            reused = connection.served > 0
            try:
                d = operation(connection)
            except Exception:
                d = defer.fail()
            if release is not None:
                d.addBoth(lambda result: (release(connection), result)[1])

            def failed(f):
                if f.check(_Dropped) and reused and attempt == 0:
                    self.stats["retries"] += 1
                    return self._retrying(acquire, operation, release, 1)
                if f.check(_TimedOut):
                    self.stats["timeouts"] += 1
                return f

            return d.addErrback(failed)

        return acquire().addCallback(run)

    # -- the bind connections ---------------------------------------------------------------

    def _capacity(self) -> bool:
        return len(self._bindConnections) + self._connecting < self.settings.poolSize

    def _grow(self) -> defer.Deferred:
        self._connecting += 1

        def opened(connection):
            self._connecting -= 1
            if connection.alive:
                self._bindConnections.add(connection)
            return connection

        def failed(f):
            self._connecting -= 1
            self._dispatch()
            return f

        return self._open(serviceBind=False).addCallbacks(opened, failed)

    def _acquire(self) -> defer.Deferred:
        if self._closed:
            return defer.fail(DirectoryUnavailable("LDAP client closed"))
        while self._idle:
            connection = self._idle.pop()
            if connection.alive:
                return defer.succeed(connection)
        if self._capacity():
            return self._grow()
        waiter = defer.Deferred()
        self._waiters.append(waiter)
        waiter.addTimeout(self.settings.timeout, self.clock)

        def timedOut(f):
            f.trap(defer.TimeoutError)
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise DirectoryUnavailable(
                f"all {self.settings.poolSize} LDAP bind connections busy for"
                f" {self.settings.timeout:g} s"
            )

        return waiter.addErrback(timedOut)

    def _handTo(self, waiter: defer.Deferred, connection: _Connection) -> None:
        if waiter.called:
            self._release(connection)
        else:
            waiter.callback(connection)

    def _dispatch(self) -> None:
        """
        Serve queued callers from idle connections, or from capacity a lost one freed.
        """
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.called:
                self._waiters.popleft()
                continue
            if self._idle:
                connection = self._idle.pop()
                if not connection.alive:
                    continue
                self._waiters.popleft()
                self._handTo(waiter, connection)
                continue
            if self._capacity() and not self._closed:
                self._waiters.popleft()
                self._grow().addCallbacks(
                    lambda c, w=waiter: self._handTo(w, c),
                    lambda f, w=waiter: None if w.called else w.errback(f),
                )
                continue
            return

    def _release(self, connection: _Connection) -> None:
        connection.served += 1
        if connection.alive and not self._closed:
            self._idle.append(connection)
        elif connection.alive:
            connection.close()
        self._dispatch()

    def _withBindConnection(self, operation):
        return self._retrying(self._acquire, operation, self._release)

    def bind(self, dn, password):
        self.stats["binds"] += 1
        return self._withBindConnection(lambda c: c.bind(dn, password))

    def bindAndRead(self, dn, password, attributes):
        self.stats["binds"] += 1

        @defer.inlineCallbacks
        def operation(connection):
            code, message = yield connection.bind(dn, password)
            if code != SUCCESS:
                return code, message, None
            entries = yield connection.search(
                dn, SCOPES["base"], pureldap.LDAPFilter_present("objectClass"), attributes
            )
            return code, message, (entries[0] if entries else None)

        return self._withBindConnection(operation)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> defer.Deferred:
        self._closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                waiter.errback(DirectoryUnavailable("LDAP client closed"))
        connections = set(self._bindConnections)
        if self._search is not None:
            connections.add(self._search)
        self._idle = []
        return defer.DeferredList([c.close() for c in connections], consumeErrors=True)
