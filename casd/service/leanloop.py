# -*- test-case-name: tests.test_leanloop,tests.test_turnloop -*-
"""
A leaner main loop for Twisted's reactor: the timer bookkeeping of each iteration done only when
there is some to do.

Each pass of L{ReactorBase.mainLoop} enters a logging context manager (C{_topHandler}: two
Python calls), calls C{runUntilCurrent} (which calls C{_insertNewDelayedCalls} and asks the
time) and C{timeout} (C{_insertNewDelayedCalls} again, the time again, C{min} and C{max}): about
ten Python calls per iteration whether or not a timer is due.  A proxied login takes about
eleven iterations, so this is about a tenth of its Python calls.

L{_leanMainLoop} runs the same loop with C{runUntilCurrent} called only when it has work (a
call from a thread queued, a timer armed since the last pass, or the earliest timer due), the
time asked once when it has none, and the sleep computed inline; an exception that escapes an
iteration is logged as C{mainLoop}'s handler logs it ("Unexpected error in main loop") and the
loop goes on.  The timers themselves (L{twisted.internet.base.DelayedCall} on the reactor's
heap) are unchanged.  The passes are L{casd.service.leanpoll.passes}, which on a reactor with the
lean dispatch also polls and dispatches inline (no C{doIteration} call per pass).  While it runs,
the loop ends each turn (L{casd.service.turns}): before it sleeps again, it runs the hooks that
code of its thread gave it work for (the log files' lines of the turn, one C{write(2)}).

L{leanLoop} installs it on a reactor whose class keeps L{ReactorBase}'s C{mainLoop},
C{runUntilCurrent} and C{timeout}, and only when their source is the one this was written
against (L{BASE_SHA256}); the tests fail on a Twisted where it changed, so that the copy is looked
at again.
"""

from __future__ import annotations

import types

from twisted.internet.base import ReactorBase
from twisted.logger import Logger

from casd.pinned import sourceMatches
from casd.service.leanpoll import dispatchesInline, passes
from casd.service.turns import TurnEnd, here

log = Logger(namespace="twisted.internet.base")

#: SHA-256 of the sources of C{ReactorBase.mainLoop}, C{timeout}, C{runUntilCurrent} and
#: C{_insertNewDelayedCalls} in Twisted 26.10.0, which L{_leanMainLoop} stands in for.
BASE_SHA256 = "28f433b18218d4fe81fb668c68e1048e1a3b3dc120b5bb842365a0b86b65f062"

_PINNED = ("mainLoop", "timeout", "runUntilCurrent", "_insertNewDelayedCalls")


def baseMatches() -> bool:
    """
    @return: whether Twisted's main loop and timer handling are those L{_leanMainLoop} was
        written against.
    """
    return sourceMatches(BASE_SHA256, lambda: [getattr(ReactorBase, name) for name in _PINNED])


def _leanMainLoop(self) -> None:
    """
    L{ReactorBase.mainLoop}, with the timer bookkeeping of an iteration skipped when there is
    none to do (L{casd.service.leanpoll.passes}), and the lean dispatch inline when the reactor
    has it.
    """
    inline = dispatchesInline(self)
    # The end of each turn (casd.service.turns), for the code of this thread: the log files'
    # lines of a turn in one write.
    turn = TurnEnd()
    previous = here.turn
    here.turn = turn
    try:
        while self._started:
            try:
                passes(self, None, True, inline, turn)
            except BaseException:
                log.failure("Unexpected error in main loop")
    finally:
        # No turn after the loop: the last one's work now, and anything later at once.
        here.turn = previous
        turn.end()
    log.info("Main loop terminated.")


def leanLoop(reactor) -> bool:
    """
    Give C{reactor} the lean main loop, if its class keeps L{ReactorBase}'s loop and timers and
    they are the ones this module knows.  Call it before the reactor runs.

    @return: whether it was installed.
    """
    kind = type(reactor)
    if not isinstance(reactor, ReactorBase) or any(
        getattr(kind, name) is not getattr(ReactorBase, name) for name in _PINNED
    ):
        return False
    if not baseMatches():
        return False
    reactor.mainLoop = types.MethodType(_leanMainLoop, reactor)
    return True
