# -*- test-case-name: tests.test_tlslayer -*-
"""
The TLS layer of casd's connections: Twisted's L{BufferingTLSTransport}, with less Python per
connection and per record.

  - Interface declarations made once.  When a L{TLSMemoryBIOProtocol} is connected, its
    C{makeConnection} declares the interfaces of the transport below as its own with
    C{directlyProvides(self, interface)}, once per interface (a TCP transport has nine), each
    call replacing the last.  zope.interface shares such declarations only while an object
    holding one is alive (a weak cache), so on a server whose connections come and go each of
    the nine is built again, resolution order and all: about 200 Python calls per TLS
    connection.  L{TLSProtocol} ends in the same declaration (the last interface for a STARTTLS
    layer; all of the transport's, through L{ProtocolWrapper.makeConnection}, for a layer that
    connects its protocol) but takes it from a table built once per kind of transport
    (L{_declarationsFor}).
  - OpenSSL's memory BIOs read without the failing calls that end each of Twisted's loops, and
    the records of one network read delivered in one C{dataReceived} (L{TLSProtocol}).
  - After the handshake, C{SSL_read} and C{BIO_write} called directly rather than through
    pyOpenSSL's C{recv} and C{bio_write} (their Python checks cost several calls per record),
    the records of one read decrypted one after the other into one buffer, copied out once;
    failures go through pyOpenSSL's own error handling, so they raise what it would.

L{TLSProtocol} is used by casd's TLS listeners (L{TLSFactory}), STARTTLS on a TCP transport
(L{startTLS}, Twisted's own C{startTLS} with this protocol) and implicit TLS towards backends
(L{wrapClientTLS}).  Its methods repeat or replace Twisted's; L{changedInTwisted} compares the
hashes of Twisted's sources with those they were written against (L{COPIED}), and the tests fail
on a Twisted where they changed, so that the copies are looked at again.
"""

from __future__ import annotations

from OpenSSL import SSL as _pyOpenSSL
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from OpenSSL._util import ffi as _ffi, lib as _lib
from zope.interface import implementer, providedBy
from zope.interface.declarations import Provides

from twisted.internet import _newtls
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import (
    BufferingTLSTransport,
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
    _AggregateSmallWrites,
    _NullAggregator,
)
from twisted.python.failure import Failure

from casd.pinned import sourceSha256

#: SHA-256 of the sources, in Twisted 26.10.0, of what L{TLSProtocol} and L{startTLS} repeat or
#: replace.
COPIED = {
    (TLSMemoryBIOProtocol, "makeConnection"): (
        "c83b193e6cb07f9f9cef7fd04be06e64ede1cfcc17431f51da8cdcead4723ac1"
    ),
    (ProtocolWrapper, "makeConnection"): (
        "1954239c5d3014a3d397228da181c3ac39e06caf17d150003d4220527e05b03f"
    ),
    (_newtls, "startTLS"): "da00d9cb1d682795edba5a67f67994cfe89507ebf14bc4b052bdcaa447ac0e5e",
    (TLSMemoryBIOProtocol, "_flushReceiveBIO"): (
        "b45e129f60c448628c0950f8800c0a8aa8fd04df848043d08627b3b01a98ed27"
    ),
    (TLSMemoryBIOProtocol, "_flushSendBIO"): (
        "c034168e4f0faf2cf4d45d7aa671c0b8b16733067b9f600d5cae8c0c8a743b86"
    ),
    (TLSMemoryBIOProtocol, "dataReceived"): (
        "0c9326eac628dc892f23a20f2d0bf02d93bd3a8e5caccfa70bfeb096a3ca8758"
    ),
    (TLSMemoryBIOProtocol, "_shutdownTLS"): (
        "f72004ba90a03215335f0315a12a2a4a769e931048f58a673cc1222cd666637a"
    ),
    # TLSProtocol's aggregator, made on its first write: what uses BufferingTLSTransport's.
    (BufferingTLSTransport, "__init__"): (
        "2d7152b65488afb968307b1f2ed746a2b3e7fc0a4e36741f0df11394d3e05f75"
    ),
    (BufferingTLSTransport, "writeSequence"): (
        "ec75e8b6dcd824134a38cbddcbf4497e1a880f8e826bf6d45cdbd8120a2e6098"
    ),
    (BufferingTLSTransport, "loseConnection"): (
        "3b78ec1fa7972cf796d625a87b165bc4d53681ba6252ab359b7c03c34efb1f3d"
    ),
    (BufferingTLSTransport, "connectionLost"): (
        "7e3899252d6d64856d8376355dcbad6f4ea2ed9bf0ec60533c9c2ddc72d9c103"
    ),
    # casd.session.tlsrelay's whole-chunk writes: write and _write in one, kept writes flushed.
    (TLSMemoryBIOProtocol, "write"): (
        "e029bcaebbb754c2b86823eb836767552d26e1d38df20ae8d83f005ed890a30e"
    ),
    (TLSMemoryBIOProtocol, "_unbufferPendingWrites"): (
        "c2b342c0a2c729782c7b4dd0d8ac97fa570744e8da078698a9389a714bfa8242"
    ),
    (TLSMemoryBIOProtocol, "_checkHandshakeStatus"): (
        "3902da2549f56145492bb3e49c7b933bca242e0e888d13d2d192f3e3fc15e57b"
    ),
}

#: SHA-256 of the sources, in pyOpenSSL 26.4.0, of what L{handshake} repeats: its checks of the
#: context's callback helpers and of C{SSL_get_error} (C{_raise_ssl_error}), the call it
#: replaces (C{do_handshake}), and the helpers' C{_problems} (C{raise_if_problem}).
COPIED_PYOPENSSL = {
    (_pyOpenSSL.Connection, "do_handshake"): (
        "fcfb0befeab35810f9401987e7b062c956a073d9e04a1ce572f8923fdb0da186"
    ),
    (_pyOpenSSL.Connection, "_raise_ssl_error"): (
        "04b0d7964c73ea9eb7948883b2bd1c1d7d188ca9b5826f73f339de781868b18f"
    ),
    (_pyOpenSSL._CallbackExceptionHelper, "raise_if_problem"): (
        "b88aff40bdb7525f9ad5cde1faf7f66cd0a6be149963a43f69d7688b77bbb2c2"
    ),
}

#: (protocol class, transport's declaration) -> (the declaration of the last interface only,
#: the declaration of all of them).  Holding them here keeps zope.interface's weak cache of
#: them alive too.  A handful of entries: one per kind of transport.
_DECLARATIONS: dict = {}


def _sourceHash(function) -> str:
    return sourceSha256(lambda: (function,)) or ""


def _changed(copied: dict) -> list[str]:
    return [
        f"{getattr(owner, '__name__', owner)}.{name}"
        for (owner, name), digest in copied.items()
        if _sourceHash(getattr(owner, name)) != digest
    ]


def changedInTwisted() -> list[str]:
    """
    @return: the names of the Twisted functions L{TLSProtocol} and L{startTLS} repeat or replace
        whose source is not the one they were written against (L{COPIED}); empty when all are.
    """
    return _changed(COPIED)


def changedInPyOpenSSL() -> list[str]:
    """
    @return: the names of the pyOpenSSL functions L{handshake} repeats whose source is not the
        one it was written against (L{COPIED_PYOPENSSL}); empty when all are.
    """
    return _changed(COPIED_PYOPENSSL)


def _declarationsFor(cls, transport):
    """
    @return: for a C{cls} instance over C{transport}, the declaration Twisted's loop of
        C{directlyProvides} leaves (the transport's last interface) and the one
        L{ProtocolWrapper.makeConnection} makes (all of them).
    """
    spec = providedBy(transport)
    key = (cls, spec)
    found = _DECLARATIONS.get(key)
    if found is None:
        if len(_DECLARATIONS) >= 256:
            _DECLARATIONS.clear()
        interfaces = list(spec)
        last = Provides(cls, interfaces[-1]) if interfaces else None
        found = _DECLARATIONS[key] = (last, Provides(cls, spec))
    return found


#: The bytes a memory BIO holds (C{BIO_get_mem_data} with no pointer: C{BIO_CTRL_INFO}).
_held = _lib.BIO_get_mem_data
_NULL = _ffi.NULL
_buffer = _ffi.buffer
_sslPending = _lib.SSL_pending


_BIO_read = _lib.BIO_read
_allocate = _ffi.new_allocator(should_clear_after_alloc=False)


def drain(connection) -> bytes:
    """
    @return: every byte OpenSSL has for the peer (its outgoing memory BIO emptied), C{b""} when
        there is none: pyOpenSSL's C{bio_read} of exactly what the BIO holds, without its Python
        checks and without the C{WantReadError} it raises for an empty BIO.
    """
    bio = connection._from_ssl
    size = _held(bio, _NULL)
    if size <= 0:
        return b""
    out = _allocate("char[]", size)
    got = _BIO_read(bio, out, size)
    return _buffer(out, got)[:] if got > 0 else b""


_SSL_do_handshake = _lib.SSL_do_handshake
_SSL_get_error = _lib.SSL_get_error
_WANT_READ = _lib.SSL_ERROR_WANT_READ


def handshake(connection) -> bool:
    """
    One step of a TLS handshake: pyOpenSSL's C{do_handshake}, without the C{WantReadError} it
    raises (through several Python calls) each time OpenSSL waits for the peer's next flight,
    twice per server handshake.

    As C{_raise_ssl_error} does, a problem a callback of the context left (its verify, ALPN or
    OCSP helper) comes first; anything but success or "want read" goes through
    C{_raise_ssl_error} itself, so it raises what C{do_handshake} would.

    @param connection: a pyOpenSSL C{Connection}.
    @return: C{True} when the handshake is done, C{False} when OpenSSL waits for bytes.
    @raise Error: what C{do_handshake} raises otherwise.
    """
    ssl = connection._ssl
    result = _SSL_do_handshake(ssl)
    context = connection._context
    verify, alpn, ocsp = context._verify_helper, context._alpn_select_helper, context._ocsp_helper
    if (
        (verify is None or not verify._problems)
        and (alpn is None or not alpn._problems)
        and (ocsp is None or not ocsp._problems)
    ):
        if result == 1:
            return True
        if _SSL_get_error(ssl, result) == _WANT_READ:
            return False
    connection._raise_ssl_error(ssl, result)
    # What do_handshake does when that does not raise: return, the handshake done.
    return True


_SSL_read = _lib.SSL_read
_BIO_write = _lib.BIO_write
_fromBuffer = _ffi.from_buffer
_memmove = _ffi.memmove
#: What L{TLSProtocol} decrypts into, record after record, before one copy out to the
#: protocol: room for the records of a 256 KiB read and one more.  One for the process: only
#: the reactor's thread reads TLS, and the bytes are copied out before the protocol runs.
_READ_SIZE = 2**18 + 2**15
_READ = _ffi.new("char[]", _READ_SIZE)


class TLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS protocol (L{BufferingTLSTransport}), its interface declarations made once, its
    reads of OpenSSL's memory BIOs without the failing calls that end each of Twisted's loops:

      - L{_flushSendBIO} reads the outgoing BIO only when it holds bytes, all of them at once
        (Twisted reads up to 32 KiB, and an empty BIO raises C{WantReadError} through several
        Python calls: eight times per TLS login);
      - L{_flushReceiveBIO} stops when the incoming BIO is empty and OpenSSL holds no plaintext
        (rather than on C{WantReadError}), and gives the protocol what one read from the
        network decrypted in one C{dataReceived} (the records of a 256 KiB read: sixteen calls
        through the relay and as many socket writes, one each in Twisted's loop).

    Once the handshake is done, records are decrypted with C{SSL_read} directly, into L{_READ}.
    This uses pyOpenSSL's private C{_tlsConnection._into_ssl}, C{_from_ssl}, C{_ssl} and
    C{_raise_ssl_error} (the tests check them).  OpenSSL does not read ahead here (pyOpenSSL,
    Twisted and casd leave C{SSL_CTX_set_read_ahead} off), so once the incoming BIO is empty and
    C{SSL_pending} is 0 there is nothing more to read until more bytes arrive.
    """

    #: No aggregator until a write needs one (L{write}); until then this shared one, which
    #: holds nothing, is what C{loseConnection} flushes and C{connectionLost} closes.
    _aggregator = _NullAggregator()

    def __init__(self, factory, wrappedProtocol, _connectWrapped=True):
        """
        L{BufferingTLSTransport}'s, without making its aggregator: a layer switched to
        whole-chunk writes before its first write (every casd session's, at connectionMade)
        never needs one.
        """
        TLSMemoryBIOProtocol.__init__(self, factory, wrappedProtocol, _connectWrapped)

    def write(self, data):
        """
        The first write of a layer not switched to whole-chunk writes: from now on,
        L{BufferingTLSTransport}'s aggregated writes, as it would have had them from the start.
        """
        aggregator = self._aggregator = _AggregateSmallWrites(
            TLSMemoryBIOProtocol.write.__get__(self), self.factory._clock
        )
        self.write = aggregator.write
        aggregator.write(data)

    def writeSequence(self, sequence):
        """
        L{BufferingTLSTransport.writeSequence}: one aggregated write (made if need be).
        """
        self.write(b"".join(sequence))

    def makeConnection(self, transport):
        """
        C{TLSMemoryBIOProtocol.makeConnection}, with the declarations of L{_declarationsFor}.
        """
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []

        last, every = _declarationsFor(self.__class__, transport)
        if last is not None:
            self.__provides__ = last

        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        if self._connectWrapped:
            # ProtocolWrapper.makeConnection, its declaration (all of the transport's) at hand;
            # not its Protocol.makeConnection and registerProtocol again (done just above:
            # the same attributes set, the same no-op connectionMade, the same entry).
            self.__provides__ = every
            self.wrappedProtocol.makeConnection(self)

        self._checkHandshakeStatus()

    def _checkHandshakeStatus(self):
        """
        C{TLSMemoryBIOProtocol._checkHandshakeStatus}, each step through L{handshake}: no
        exception while OpenSSL waits for the peer.
        """
        if self._aborted:
            return
        try:
            done = handshake(self._tlsConnection)
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        if not done:
            self._flushSendBIO()
            return
        self._handshakeDone = True
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def dataReceived(self, data):
        """
        C{TLSMemoryBIOProtocol.dataReceived}, the bytes handed to OpenSSL with C{BIO_write}
        directly (pyOpenSSL's C{bio_write}, without its Python checks, which still handles what
        that cannot take: nothing to write).
        """
        connection = self._tlsConnection
        if _BIO_write(connection._into_ssl, _fromBuffer(data), len(data)) <= 0:
            connection.bio_write(data)

        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return

        if self._appSendBuffer:
            self._unbufferPendingWrites()

        self._flushReceiveBIO()

    def _flushSendBIO(self):
        """
        Write whatever OpenSSL has to send, if anything, in one transport write.
        """
        records = drain(self._tlsConnection)
        if records:
            self.transport.write(records)

    def _flushReceiveBIO(self):
        """
        C{TLSMemoryBIOProtocol._flushReceiveBIO}: deliver every record OpenSSL can decrypt now,
        in one C{dataReceived}; handle the end of TLS (after delivering what came before it).

        Once the handshake is done, records are decrypted with C{SSL_read} directly, one after
        the other into L{_READ}; before (when the connection is lost during the handshake),
        through pyOpenSSL's C{recv}.
        """
        connection = self._tlsConnection
        ssl = connection._ssl
        direct = self._handshakeDone
        got = 0
        while not self._lostTLSConnection:
            if got > _READ_SIZE - 2**15:
                got = self._deliver(got)
            try:
                if direct:
                    result = _SSL_read(ssl, _READ + got, 2**15)
                    if result <= 0:
                        # pyOpenSSL's own error handling: what its recv would raise.
                        connection._raise_ssl_error(ssl, result)
                        raise Error([("SSL routines", "", "SSL_read failed")])
                else:
                    data = connection.recv(2**15)
                    result = len(data)
                    _memmove(_READ + got, data, result)
            except WantReadError:
                break
            except ZeroReturnError:
                got = self._deliver(got)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                got = self._deliver(got)
                self._tlsShutdownFinished(Failure())
            else:
                got += result
                if not _held(connection._into_ssl, _NULL) and not _sslPending(ssl):
                    break
        if got and not self._aborted:
            # _deliver and _flushSendBIO inline: this runs once per read.
            self.wrappedProtocol.dataReceived(_buffer(_READ, got)[:])
        if _held(connection._from_ssl, _NULL) > 0:
            self.transport.write(drain(connection))

    def _shutdownTLS(self):
        """
        C{TLSMemoryBIOProtocol._shutdownTLS}, which, when this side ends TLS (C{loseConnection}
        after the handshake), closes the connection once its close_notify is written, without
        waiting for the peer's: as nginx, Dovecot and Postfix do, and as TLS allows (RFC 8446
        6.1, RFC 5246 7.2.1: the side that closes need not wait for the answering close_notify).
        Twisted waited, reading until the peer's close_notify (or its end of stream) came: one
        more read and reactor iteration per session, and a session kept open by a client that
        never answers.  The peer's answer, if it comes, is not read: TLS ended cleanly on this
        side, and the protocol's C{connectionLost} gets the transport's reason, as after an
        answered close_notify.  A shutdown that completes (the peer's close_notify read) closes
        the connection as Twisted does; an aborted connection or an unfinished handshake goes
        Twisted's way.
        """
        try:
            shutdownSuccess = self._tlsConnection.shutdown()
        except Error:
            # Mid-handshake: SSL_ERROR_WANT_READ, which pyOpenSSL raises as an Error.
            shutdownSuccess = False
        self._flushSendBIO()
        if shutdownSuccess:
            self.transport.loseConnection()
        elif self.disconnecting and self._handshakeDone and not self._aborted:
            self._lostTLSConnection = True
            self.transport.loseConnection()

    def _deliver(self, got: int) -> int:
        """
        Give the protocol the first C{got} bytes of L{_READ} (copied out first).

        @return: 0, the new fill of L{_READ}.
        """
        if got and not self._aborted:
            self.wrappedProtocol.dataReceived(_buffer(_READ, got)[:])
        return 0


class TLSFactory(TLSMemoryBIOFactory):
    """
    L{TLSMemoryBIOFactory} making L{TLSProtocol}s: for listeners and backend connections.
    """

    protocol = TLSProtocol


#: The STARTTLS factories of each connection creator (one per listener's protocol and per
#: backend name, both built once): (options, client) -> L{TLSFactory}.
_STARTTLS_FACTORIES: dict = {}


def _startTLSFactory(options, client: bool) -> TLSFactory:
    key = (id(options), client)
    found = _STARTTLS_FACTORIES.get(key)
    if found is None or found[0] is not options:
        if len(_STARTTLS_FACTORIES) >= 256:
            # Options made per connection (not casd's): no table growing without end.
            _STARTTLS_FACTORIES.clear()
        found = _STARTTLS_FACTORIES[key] = (options, TLSFactory(options, client, None))
    return found[1]


def startTLS(transport, options) -> None:
    """
    Start TLS on C{transport} with C{options}, as C{transport.startTLS(options)} does: for
    Twisted's TCP transports (or a wrapper whose C{startTLS} is theirs), with a L{TLSProtocol};
    anything else (a test's transport) is asked to C{startTLS} itself.
    """
    method = transport.startTLS
    # A wrapper that forwards startTLS (the PROXY protocol's) starts it on the TCP transport.
    owner = getattr(method, "__self__", None)
    if not isinstance(owner, _newtls.ConnectionMixin) or type(owner).startTLS is not (
        _newtls.ConnectionMixin.startTLS
    ):
        method(options)
        return
    transport = owner
    # twisted.internet._newtls.startTLS with normal=True, bypass=FileDescriptor.
    client = transport._tlsClientDefault
    producer, streaming = None, None
    if transport.producer is not None:
        producer, streaming = transport.producer, transport.streamingProducer
        transport.unregisterProducer()
    tlsFactory = _startTLSFactory(options, client)
    tlsProtocol = tlsFactory.protocol(tlsFactory, transport.protocol, False)
    transport.protocol = tlsProtocol
    transport.getHandle = tlsProtocol.getHandle
    transport.getPeerCertificate = tlsProtocol.getPeerCertificate
    transport.__provides__ = _secureDeclaration(type(transport))
    transport.TLS = True
    tlsProtocol.makeConnection(_newtls._BypassTLS(_newtls.FileDescriptor, transport))
    if producer:
        transport.registerProducer(producer, streaming)


_SECURE: dict = {}


def _secureDeclaration(cls):
    """
    @return: C{directlyProvides(transport, ISSLTransport)}'s declaration for a C{cls} transport.
    """
    found = _SECURE.get(cls)
    if found is None:
        found = _SECURE[cls] = Provides(cls, ISSLTransport)
    return found


@implementer(IStreamClientEndpoint)
class _TLSClientEndpoint:
    """
    C{twisted.internet.endpoints.wrapClientTLS}'s endpoint, with a L{TLSFactory}.
    """

    def __init__(self, options, endpoint) -> None:
        self._options = options
        self._endpoint = endpoint

    def connect(self, protocolFactory):
        d = self._endpoint.connect(TLSFactory(self._options, True, protocolFactory))
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


def wrapClientTLS(options, endpoint):
    """
    @return: C{endpoint} with TLS from the first byte, as Twisted's C{wrapClientTLS}, with
        L{TLSProtocol}.
    """
    return _TLSClientEndpoint(options, endpoint)
