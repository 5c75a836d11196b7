# -*- test-case-name: tests.test_gctune -*-
"""
The memory allocator and the cyclic garbage collector, set for a long-running server: relay
buffers taken from the heap without page faults, start-up's objects frozen, the young
generation's threshold raised.

L{tuneAllocator}: every relayed chunk is a new C{bytes} object of up to 256 KiB (a C{recv}; up
to 2 MiB for an HTTP response body, L{protocols.http.proxy.MAX_READ_SIZE}).  With
glibc's defaults such a block is carved from the top of the heap, freed, and the heap's top given
back to the kernel soon after (C{M_TRIM_THRESHOLD} follows C{M_MMAP_THRESHOLD}, which follows the
largest freed block), so the next chunk's pages fault in again, zeroed by the kernel: measured
with a 256 KiB C{recv} loop on Debian 12, 13-20 minor page faults per MB received and 0.17-0.21 s
of CPU per GB, against 0.1 and 0.12-0.14 s with the thresholds below.  casd sets, through
C{mallopt}, blocks up to 4 MiB from the heap (not C{mmap}) and keeps up to 16 MiB free at the
heap's top before trimming: a process keeps a few MiB more resident after a burst, and no relay
chunk pays page faults.  Only on glibc (C{mallopt} found in the process); elsewhere nothing
changes.

CPython's collector runs a young-generation pass each time the count of container objects
allocated and not yet freed grows by 700.  A login storm keeps about fifty sessions of some
hundred objects each in flight, so that count crosses 700 over and over although every session
frees its objects (reference counting does, since a finished session leaves no reference cycle:
L{casd.session.relay.Relay} and L{casd.pool.tcpclient.LeanConnector} break theirs, and
C{tests.test_cycles} checks it).  Each pass walks the live sessions' objects again and
promotes them, and the older generations' passes walk them once more: measured in a login storm
(C{gc.callbacks} timing the passes), about 0.02 ms per login, and about 0.06 ms (a twentieth of
a login's CPU) while sessions still left cycles for the collector.

L{tuneCollector}, once the reactor runs (every service started, the configuration read):
  - collects once and freezes what survives (C{gc.freeze}): the modules, the configuration and
    Twisted's machinery move to the permanent generation, which no later pass walks;
  - raises the young generation's threshold to L{YOUNG_THRESHOLD}, above what the sessions in
    flight hold, so that a pass comes only when garbage that needs the collector (a cycle left by
    an error path, a library) has piled up, and then frees it as before.

A reload (C{SIGHUP}) builds a new configuration and drops the old one: L{refreeze} gives the
frozen objects back to the collector, collects, and freezes again, so that a configuration
replaced is freed, not kept forever.
"""

from __future__ import annotations

import ctypes
import gc as _gc

#: The young generation's threshold (CPython's default is 700): allocations not yet freed.
YOUNG_THRESHOLD = 20000

#: glibc's C{mallopt} parameters (malloc.h) and casd's values for them.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Blocks up to this size come from the heap: a relay chunk (256 KiB; an HTTP body's read grows
#: to 2 MiB) and then some.
MMAP_THRESHOLD = 4 << 20
#: Free memory at the heap's top kept before it is given back to the kernel.
TRIM_THRESHOLD = 16 << 20


def tuneAllocator(libc=None) -> bool:
    """
    Set glibc's allocator for relaying (L{casd.service.gctune}).

    @param libc: the C library (default: the process's own, through C{ctypes}; a fake in tests).
    @return: whether it was set (C{False} without glibc's C{mallopt}).
    """
    if libc is None:
        try:
            libc = ctypes.CDLL(None)
        except OSError:
            return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    # Both set: setting either turns glibc's dynamic thresholds off.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def tuneCollector(reactor, collector=_gc) -> None:
    """
    Set the collector for serving once C{reactor} runs (L{casd.service.gctune}).

    @param collector: the C{gc} module (a fake in tests).
    """
    reactor.callWhenRunning(_tune, collector)


def _tune(collector) -> None:
    collector.collect()
    collector.freeze()
    _, middle, old = collector.get_threshold()
    collector.set_threshold(YOUNG_THRESHOLD, middle, old)


def refreeze(config=None, collector=_gc) -> None:
    """
    After a reload: give the frozen objects back to the collector, collect, freeze again.

    @param config: the new configuration (a reload hook's argument; unused).
    """
    if not collector.get_freeze_count():
        return  # not tuned (a test's process, or a reload before the reactor ran)
    collector.unfreeze()
    collector.collect()
    collector.freeze()
