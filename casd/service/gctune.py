# -*- test-case-name: tests.test_gctune -*-
"""
The cyclic garbage collector, set for a long-running server: start-up's objects frozen, the
young generation's threshold raised.

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

import gc as _gc

#: The young generation's threshold (CPython's default is 700): allocations not yet freed.
YOUNG_THRESHOLD = 20000


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
