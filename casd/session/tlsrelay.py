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
made, written to the transport at once; nothing is held for later.  Reads are unchanged.

This relies on L{TLSMemoryBIOProtocol}'s private state (C{_tlsConnection},
C{_lostTLSConnection}, C{_bufferedWrite}, C{_tlsShutdownFinished}, C{_aggregator}); the tests
check each of them, so that a Twisted upgrade that changes them fails loudly.
"""

from __future__ import annotations

from OpenSSL.SSL import Error, WantReadError

from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOProtocol
from twisted.python.failure import Failure


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

    def write(self, data: bytes) -> None:
        # BufferingTLSTransport's write is an instance attribute (its aggregator); this class's
        # write replaces it (see wholeChunks), with TLSMemoryBIOProtocol.write's rule.
        if self.disconnecting and self._producer is None:
            return
        self._write(data)

    def writeSequence(self, iovec) -> None:
        # BufferingTLSTransport's writeSequence goes to its aggregator, held for the next
        # reactor iteration: after a later write() it would arrive out of order.
        self.write(b"".join(iovec))

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        connection = self._tlsConnection
        total = len(data)
        sent = 0
        try:
            while sent < total:
                sent += connection.send(data if not sent else memoryview(data)[sent:])
        except WantReadError:
            # A handshake in progress: keep the rest for later, as Twisted does.
            self._bufferedWrite(data[sent:])
        except Error:
            self._tlsShutdownFinished(Failure())
            return
        self._flushAllRecords(total)

    def _flushAllRecords(self, hint: int) -> None:
        """
        Write every record OpenSSL made to the transport, in one write.
        """
        connection = self._tlsConnection
        # Room for the records of C{hint} bytes (at most 29 bytes per 16 KiB record), at once.
        size = hint + (hint >> 9) + 2**14
        records = []
        while True:
            try:
                chunk = connection.bio_read(size)
            except WantReadError:
                break
            records.append(chunk)
            if len(chunk) < size:
                break
        if records:
            self.transport.write(records[0] if len(records) == 1 else b"".join(records))


class _WholeChunkTLS(_WholeChunkWrites, TLSMemoryBIOProtocol):
    pass


class _WholeChunkBufferingTLS(_WholeChunkWrites, BufferingTLSTransport):
    pass


_WHOLE = {TLSMemoryBIOProtocol: _WholeChunkTLS, BufferingTLSTransport: _WholeChunkBufferingTLS}


def wholeChunks(transport) -> bool:
    """
    Make the TLS layer of C{transport} (if any, and if it is Twisted's own) write each chunk
    whole, at once.  Bytes its aggregator still holds are written first, in order.

    @return: whether it was switched.
    """
    layer = tlsLayer(transport)
    if layer is None:
        return False
    faster = _WHOLE.get(type(layer))
    if faster is None:
        return False
    aggregator = getattr(layer, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()
    layer.__dict__.pop("write", None)
    layer.__class__ = faster
    return True
