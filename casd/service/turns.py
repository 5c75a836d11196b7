# -*- test-case-name: tests.test_turnlog,tests.test_turnloop -*-
"""
The end of the reactor's turn: work held until the reactor has handled what one wake-up brought
and is about to sleep again.

casd's lean main loop (L{casd.service.leanloop}) owns a L{TurnEnd} while it runs and makes it
L{here}'s C{turn} in its thread.  Code in that thread that would rather do something once per
turn than once per event (casd's log files write the lines of a turn with one C{write(2)},
L{casd.service.logfile}) registers a hook with L{TurnEnd.join} once and sets C{due} (a plain
attribute: no call) whenever it has work; before each poll, after the events of the last one
were dispatched and the due timers ran, the loop calls every hook if C{due} is set (one
attribute test per pass otherwise).  Elsewhere (another thread, a reactor without the lean loop,
before the loop runs and after it ended) C{here.turn} is L{None}, and such code does its work at
once, as it would without turns.
"""

from __future__ import annotations

import threading

from twisted.logger import Logger

log = Logger()


class TurnEnd:
    """
    The hooks run at the end of a turn of the loop that owns this.

    @ivar due: whether the hooks have work: set by whoever gives them some, reset by the loop
        before it runs them.
    @ivar hooks: what the loop calls at the end of a turn when C{due} is set (no arguments).
    """

    def __init__(self) -> None:
        self.due = False
        self.hooks: list = []

    def join(self, hook) -> None:
        """
        Have C{hook} called at the end of every turn in which C{due} was set.  A hook finishes
        work (it writes what was held); it arms no timer (the loop has computed its sleep).
        """
        if hook not in self.hooks:
            self.hooks.append(hook)

    def leave(self, hook) -> None:
        """
        Stop calling C{hook} (nothing if it was not called).
        """
        if hook in self.hooks:
            self.hooks.remove(hook)

    def end(self) -> None:
        """
        End the turn: reset C{due} and call every hook; a hook that fails is logged, the others
        still run.  (L{casd.service.leanpoll.passes} calls it when C{due}.)
        """
        self.due = False
        for hook in self.hooks:
            try:
                hook()
            except Exception:
                log.failure("while ending a turn: {hook!r}", hook=hook)


class _Here(threading.local):
    """
    Per thread: the L{TurnEnd} of the lean main loop running in this thread, or L{None}.
    """

    turn = None


#: This thread's turn (C{here.turn}): an attribute of a thread-local object, read without a call.
here = _Here()
