# -*- test-case-name: tests.test_tlsrelay -*-
"""
The TLS side of the relay: whole chunks through OpenSSL.

Twisted's L{TLSMemoryBIOProtocol} hands OpenSSL a relay chunk in 16 KiB slices, a copy each, and
after each slice reads the records back from the memory BIO and writes them to the transport:
for a 256 KiB chunk, sixteen rounds of several Python calls.  Its L{BufferingTLSTransport} (what
every TLS connection is, implicit or STARTTLS) first copies each write into a buffer, and holds
writes smaller than 64 KB for the next reactor iteration (a timer each).

Once a session relays, L{wholeChunks} switches its TLS layer to L{_WholeChunkWrites}: a write is
one C{SSL_write} of the whole chunk (OpenSSL cuts the records) and one read of every record it
made, written to the transport at once; nothing is held for later.  pyOpenSSL's contexts let
C{SSL_write} stop after one record (C{SSL_MODE_ENABLE_PARTIAL_WRITE}); the first time it does,
the mode is cleared for that connection, so that later chunks take one C{SSL_write} each, not
one per 16 KiB record.  C{SSL_write} is called directly rather than through pyOpenSSL's C{send}
(the same call, without its Python checks; a failure goes through pyOpenSSL's own
C{_raise_ssl_error}, so it raises what C{send} would); before the handshake is done, a write is
kept for after it at once (where C{send} would raise C{WantReadError}: a greeting written as a
TLS client connects, before its first flight has arrived).  Reads are casd's TLS
layer's (L{casd.tlslayer.TLSProtocol}).

This relies on L{TLSMemoryBIOProtocol}'s private state (C{_tlsConnection},
C{_lostTLSConnection}, C{_bufferedWrite}, C{_tlsShutdownFinished}, C{_aggregator}); the tests
check each of them, so that a Twisted upgrade that changes them fails loudly.
"""

from __future__ import annotations

from OpenSSL._util import ffi as _ffi, lib as _lib
from OpenSSL.SSL import Error, WantReadError

from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.python.failure import Failure

from casd.tlslayer import _BIO_read, _NULL, TLSProtocol, _allocate, _buffer, _held, drain


_PARTIAL_WRITE = _lib.SSL_MODE_ENABLE_PARTIAL_WRITE
_SSL_write = _lib.SSL_write
_fromBuffer = _ffi.from_buffer


def tlsLayer(transport):
    """
    @return: the L{TLSMemoryBIOProtocol} under which C{transport}'s bytes are encrypted (the
        transport itself when TLS wraps it, its C{protocol} after C{startTLS()}), or C{None}.
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        return transport
    if getattr(transport, "TLS", False):
        layer = getattr(transport, "protocol", None)
        if isinstance(layer, TLSMemoryBIOProtocol):
            return layer
    return None


class _WholeChunkWrites:
    """
    The write path of L{TLSMemoryBIOProtocol}, a whole chunk at a time.
    """

    #: True while the writes kept for after the handshake go out (L{_unbufferPendingWrites}):
    #: those are written even after C{loseConnection()}, as Twisted's C{_write} has them.
    _flushingKept = False

    def write(self, data: bytes) -> None:
        """
        C{TLSMemoryBIOProtocol.write} and C{_write} in one (one call per write, not two):
        nothing after C{loseConnection()} unless a producer is registered (Twisted's rule),
        except while the writes kept for after the handshake go out.

        BufferingTLSTransport's write is an instance attribute (its aggregator); this replaces
        it (see L{wholeChunks}).
        """
        if (
            self._lostTLSConnection
            or (self.disconnecting and self._producer is None and not self._flushingKept)
        ):
            return
        if not self._handshakeDone:
            # Kept until the handshake is done, as pyOpenSSL's send would have had it kept,
            # through a WantReadError: a write cannot move the handshake on, since the TLS
            # layer has OpenSSL take each of the peer's flights as it arrives (dataReceived),
            # and starts it itself (makeConnection).
            if data:
                self._bufferedWrite(data)
            return
        connection = self._tlsConnection
        total = len(data)
        sent = 0
        try:
            # pyOpenSSL's send without its Python around SSL_write (several calls a chunk);
            # its own error handling when OpenSSL fails.
            ssl = connection._ssl
            while sent < total:
                rest = memoryview(data)[sent:] if sent else data
                result = _SSL_write(ssl, _fromBuffer(rest), total - sent)
                if result <= 0:
                    connection._raise_ssl_error(ssl, result)
                    raise Error([("SSL routines", "", "SSL_write failed")])
                sent += result
                if sent < total:
                    # pyOpenSSL's contexts allow partial writes: OpenSSL wrote one 16 KiB
                    # record.  From now on one SSL_write takes a whole chunk.
                    _lib.SSL_clear_mode(ssl, _PARTIAL_WRITE)
        except WantReadError:
            # A handshake in progress again (a TLS 1.2 backend renegotiating): keep the rest for
            # later, as Twisted does.
            self._bufferedWrite(data[sent:])
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        # Every record made, in one transport write (drain inline: this runs once per write).
        bio = connection._from_ssl
        size = _held(bio, _NULL)
        if size > 0:
            out = _allocate("char[]", size)
            got = _BIO_read(bio, out, size)
            if got > 0:
                self.transport.write(_buffer(out, got)[:])

    _write = write

    def _unbufferPendingWrites(self) -> None:
        self._flushingKept = True
        try:
            TLSMemoryBIOProtocol._unbufferPendingWrites(self)
        finally:
            del self._flushingKept

    def writeSequence(self, iovec) -> None:
        # BufferingTLSTransport's writeSequence goes to its aggregator, held for the next
        # reactor iteration: after a later write() it would arrive out of order.
        self.write(b"".join(iovec))


class _WholeChunkTLS(_WholeChunkWrites, TLSMemoryBIOProtocol):
    pass


class _WholeChunkBufferingTLS(_WholeChunkWrites, BufferingTLSTransport):
    pass


class _WholeChunkTLSProtocol(_WholeChunkWrites, TLSProtocol):
    pass


_WHOLE = {
    TLSMemoryBIOProtocol: _WholeChunkTLS,
    BufferingTLSTransport: _WholeChunkBufferingTLS,
    TLSProtocol: _WholeChunkTLSProtocol,
}


#: The TLS layers L{wholeChunks} switched.
_SWITCHED = frozenset(_WHOLE.values())

#: casd's TLS layers over a transport (L{TLSProtocol}, whole-chunk writes or not), whose
#: C{getPeer} and C{getHost} are their transport's (L{ProtocolWrapper}'s, not overridden).
TLS_LAYERS = frozenset([TLSProtocol, _WholeChunkTLSProtocol])


def wholeChunks(transport) -> bool:
    """
    Make the TLS layer of C{transport} (if any, and if it is Twisted's own) write each chunk
    whole, at once.  Bytes its aggregator still holds are written first, in order.

    @return: whether it was switched.
    """
    if type(transport) in _SWITCHED:
        return False  # switched already (the relay's start asks again): in the fewest calls
    layer = tlsLayer(transport)
    if layer is None:
        return False
    faster = _WHOLE.get(type(layer))
    if faster is None:
        return False
    # An aggregator the layer made (casd's TLSProtocol makes one only on a first write).
    aggregator = layer.__dict__.get("_aggregator")
    if aggregator is not None:
        aggregator.flush()
    layer.__dict__.pop("write", None)
    layer.__class__ = faster
    return True


def closeTLSNow(transport, closeNow) -> bool:
    """
    End a relayed TLS connection at once, as L{TLSProtocol}'s C{loseConnection} and the
    reactor's next iteration would with nothing left to send: this side's close_notify written
    through (L{TLSProtocol._shutdownTLS}: the peer's is not waited for), then the connection
    below closed by C{closeNow} (the relay's own for plain TCP: at once, the protocols'
    C{connectionLost} called before it returns, when the kernel took everything).  That saves
    the reactor iteration of arming the connection for writing only to find nothing to flush,
    its C{epoll_ctl} calls, and the relay's grace timer.

    @param closeNow: closes a plain TCP transport with nothing queued at once, and says whether
        it did (L{casd.session.relay._closeNow}).
    @return: whether it closed; C{False} without a change for anything but casd's TLS layer
        writing whole chunks, with the handshake done and nothing kept in it (bytes waiting for
        the handshake, a producer, a close in progress).  When the connection below cannot be
        closed at once (bytes the kernel did not take, not plain TCP), it is left to flush and
        close (its C{loseConnection()}), the TLS layer closing: C{False}, so that the caller
        bounds that wait as it would any other (the layer's own C{loseConnection()} does
        nothing more).
    """
    if (
        type(transport) is not _WholeChunkTLSProtocol
        or not transport._handshakeDone
        or transport.disconnecting
        or transport._lostTLSConnection
        or transport._appSendBuffer
        or transport._producer is not None
    ):
        return False
    # TLSMemoryBIOProtocol.loseConnection with TLSProtocol._shutdownTLS, the close_notify
    # written at once, the close below left to closeNow.
    transport.disconnecting = True
    transport._lostTLSConnection = True
    connection = transport._tlsConnection
    try:
        connection.shutdown()
    except Error:
        pass  # as Twisted's _shutdownTLS: closed all the same
    below = transport.transport
    records = drain(connection)
    if records:
        below.write(records)
    if closeNow(below):
        return True
    below.loseConnection()
    return False
