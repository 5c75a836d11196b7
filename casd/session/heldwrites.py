# -*- test-case-name: tests.test_heldwrites -*-
"""
Small writes held until the end of the reactor's turn, then sent: fewer wake-ups of the peers.

casd's write-through transports (L{casd.session.relay.writeThrough}) send at once what they are
given, without Twisted's round trip through the reactor (buffer, register for writing, poll,
C{doWrite}, unregister).  But each C{send} on a connection whose reader sleeps in C{epoll_wait}
wakes that reader: on loopback the kernel does the reader's receive work and the wake-up in the
sender's system call, and waking a sleeping process on another CPU is the dearest part of a small
write (in a VM an inter-processor interrupt, a VM exit).  A reactor turn dispatches many events
(under load, 8 or more requests per C{epoll_wait}); sent one by one, spread over the turn, the
writes wake the same peer (a load generator, a backend) again and again, each time after it went
back to sleep.

So a small write (under L{HOLD_LIMIT}) on a reactor with casd's lean dispatch
(L{casd.service.leanpoll}) goes to the transport's own buffer (Twisted's C{_tempDataBuffer}, so
that every check of "bytes queued" sees it: a close waits for them, later writes follow them) and
the transport to the reactor's list C{casdHeld}, without registering it for writing.  Before
the reactor polls again (L{flushHeld}, called by the lean dispatch) each held transport's bytes
are sent, in one C{send} per connection, back to back: the first wakes a peer, the others find
it awake.  What the kernel does not take is queued the usual way (registered for writing, flow
control).  No byte waits longer than the turn it was written in, and when L{HOLD_BATCH}
connections hold bytes they are sent then, so that in a long turn (under heavy load an
C{epoll_wait} reports up to 1,024 events) no write waits for the whole turn's work.  A large
write (bulk relaying, where the wake-ups are few already) is sent at once as before.

With 16 keep-alive connections of small proxied HTTP GETs (C{bench.http}), casd's CPU per
request fell by about a quarter; see C{docs/performance.md}.
"""

from __future__ import annotations

from twisted.internet import tcp

#: Writes smaller than this are held until the end of the turn; larger ones are sent at once.
HOLD_LIMIT = 64 * 1024

#: At most this many connections hold bytes at once: in a long turn (up to 1,024 events under
#: load) the writes go out by batches of this many, so that none waits for the whole turn.
HOLD_BATCH = 64


def holdList(reactor):
    """
    @return: the list of C{reactor}'s held transports, or L{None} when it does not hold writes
        (no lean dispatch to flush them).
    """
    return reactor.__dict__.get("casdHeld")


def startHolding(reactor) -> None:
    """
    Hold small writes on C{reactor}'s write-through transports from now on; whatever polls it
    must call L{flushHeld} before each poll.
    """
    if "casdHeld" not in reactor.__dict__:
        reactor.casdHeld = []


def flushHeld(held: list) -> None:
    """
    Send the bytes held by each transport in C{held} (a reactor's C{casdHeld}), then empty it.

    A transport that is gone, closing (C{loseConnection} registered it for writing: the
    reactor's C{doWrite} sends what it holds, then closes) or that has other bytes queued
    already (registered too) is left to the reactor.
    """
    transports = held[:]
    del held[:]
    for transport in transports:
        if (
            transport.casdHeldNow
            and transport.connected
            and not transport.dataBuffer
            and not transport.disconnecting
            and not transport._writeDisconnecting
        ):
            sendHeld(transport)
        else:
            transport.casdHeldNow = False


def sendHeld(transport) -> None:
    """
    Send now what C{transport} (connected, nothing else queued) holds for the end of the turn:
    at the end of the turn, or before casd closes it at once (L{casd.session.relay}).  What the
    kernel does not take is queued the usual way.
    """
    transport.casdHeldNow = False
    size = transport._tempDataLen
    if not size:
        return
    # (One bytes object is joined into itself, without a copy.)
    data = b"".join(transport._tempDataBuffer)
    transport._tempDataBuffer = []
    transport._tempDataLen = 0
    try:
        sent = transport.socket.send(data)
    except OSError:
        # EAGAIN, or an error the queued write's doWrite reports as a lost connection.
        sent = 0
    if sent != size:
        tcp.Connection.write(transport, data[sent:] if sent else data)


__all__ = ["HOLD_BATCH", "HOLD_LIMIT", "flushHeld", "holdList", "sendHeld", "startHolding"]
