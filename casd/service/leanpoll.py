# -*- test-case-name: tests.test_leanpoll -*-
"""
A leaner per-event dispatch for Twisted's epoll reactor.

For every readable or writable socket, L{EPollReactor.doPoll} calls
C{twisted.python.log.callWithLogger}: it asks the connection for its C{logPrefix()}, copies the
legacy logging context into a new dictionary and pushes it on a thread-local stack, about a dozen
Python calls per event.  The context only names the C{system} of events logged with the legacy
C{twisted.python.log.msg()} while the event is handled; casd logs with C{twisted.logger}, whose
events carry their namespace instead.  A proxied login handles about eleven events, so the
wrapper is about a tenth of the Python calls of a login.

L{leanDispatch} replaces the reactor's C{doIteration} with L{_leanDoPoll}: Twisted's C{doPoll},
line for line, with the events dispatched directly and the reactor's C{_doReadOrWrite} (one
method call per event) inlined, line for line too: a failure of C{doRead} or C{doWrite} is
logged and disconnects the selectable, as there; a failure that escapes the dispatch is logged,
as before.  It is installed only on an L{EPollReactor} whose C{doPoll} and C{_doReadOrWrite}
are the ones it was copied from (the hash of their source, L{DOPOLL_SHA256}); any other reactor
or Twisted keeps its own, and the tests fail on a Twisted where either changed, so that the
copy is looked at again.  The dispatch lives in L{passes}, which the lean main loop
(L{casd.service.leanloop}) runs whole; each C{epoll_wait} reports at most L{_MAX_EVENTS} events.
"""

from __future__ import annotations

import errno
import sys
import types
from select import EPOLLIN
from time import time as _now

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger
from twisted.python import log as legacyLog

from casd.pinned import sourceMatches
from casd.service.turns import TurnEnd
from casd.session.heldwrites import flushHeld, sendHeld, startHolding

log = Logger()

#: SHA-256 of the sources of C{EPollReactor.doPoll} and C{EPollReactor._doReadOrWrite} in
#: Twisted 26.10.0, which L{_leanDoPoll} repeats.
DOPOLL_SHA256 = "819089e0c72b570d461e7ee0d1f5e43a14246f75f4f19ef9c53cf24cd7a30f18"


def doPollMatches() -> bool:
    """
    @return: whether Twisted's C{EPollReactor.doPoll} and C{_doReadOrWrite} are the ones
        L{_leanDoPoll} was copied from.
    """
    return sourceMatches(DOPOLL_SHA256, lambda: (EPollReactor.doPoll, EPollReactor._doReadOrWrite))


#: The most events one C{epoll_wait} reports.  Twisted asks for as many as there are registered
#: descriptors, which costs a C{len()} per wake-up; the rest of a larger batch of ready
#: descriptors is reported by the next C{epoll_wait} (epoll is level-triggered: nothing is lost),
#: with the reactor's due timers run in between.
_MAX_EVENTS = 1024

#: The longest sleep, as L{twisted.internet.base.ReactorBase.timeout} bounds it (epoll's
#: milliseconds in a C int).
_LONGEST = 2147483

#: The turn of a single pass (never due).
_NO_TURN = TurnEnd()


def _leanDoPoll(self, timeout):
    """
    C{EPollReactor.doPoll} without C{log.callWithLogger} around each event, with
    C{_doReadOrWrite} inlined, and at most L{_MAX_EVENTS} events per wake-up: one pass of
    L{passes}.
    """
    passes(self, timeout)


def passes(self, timeout=None, loop=False, inline=True, turn=_NO_TURN):
    """
    One pass of the lean dispatch (L{_leanDoPoll}) or, with C{loop}, the passes of the lean main
    loop (L{casd.service.leanloop}) until the reactor stops: before each, the reactor's timer
    bookkeeping when it has some to do (C{runUntilCurrent} only when a call from a thread is
    queued, a timer was armed since the last pass or the earliest is due; the time asked once
    otherwise; the sleep computed inline), then the end of the turn (C{turn}'s hooks, when it
    is C{due}: the work of the events the last poll brought and of the timers that just ran,
    done before the loop sleeps again), then the poll, with its dispatch inline (no call to
    C{doIteration} per pass) when C{inline}, else the reactor's own C{doIteration}.

    An exception that escapes a pass ends the call; the main loop logs it and calls again.

    @param turn: with C{loop}, the loop's L{casd.service.turns.TurnEnd}.
    """
    held = self.__dict__.get("casdHeld")
    if held is None:
        held = ()
    while True:
        if loop:
            if not self._started:
                if held:
                    flushHeld(held)
                return
            # ReactorBase.mainLoop's runUntilCurrent() and timeout(), when there is work.
            pending = self._pendingTimedCalls
            now = _now()
            if self.threadCallQueue or self._newTimedCalls or (pending and pending[0].time <= now):
                self.runUntilCurrent()
                if self._newTimedCalls:
                    self._insertNewDelayedCalls()
                pending = self._pendingTimedCalls  # runUntilCurrent may rebuild the heap
                now = _now()
            if pending:
                delay = pending[0].time - now
                t2 = 0 if delay < 0 else (delay if delay < _LONGEST else _LONGEST)
            else:
                t2 = None
            timeout = self.running and t2
            if turn.due:
                # One attribute test per pass when nothing is due.
                turn.end()
            if not inline:
                self.doIteration(timeout)
                continue
        if held:
            # The small writes of the turn so far, before sleeping (casd.session.heldwrites).
            flushHeld(held)
        # EPollReactor.doPoll(timeout), line for line but for the dispatch below.
        if timeout is None:
            timeout = -1
        try:
            l = self._poller.poll(timeout, _MAX_EVENTS)
        except OSError as err:
            if err.errno == errno.EINTR:
                if loop:
                    continue
                return
            raise
        selectables = self._selectables
        reads = self._reads
        pollIn, pollOut, pollDisconnected = self._POLL_IN, self._POLL_OUT, self._POLL_DISCONNECTED
        for fd, event in l:
            # selectables.get(fd), and nothing for a descriptor gone since the poll, without a
            # call.
            if fd not in selectables:
                continue
            selectable = selectables[fd]
            try:
                # _PollLikeMixin._doReadOrWrite(selectable, fd, event), line for line.
                why = None
                inRead = False
                if event & pollDisconnected and not (event & pollIn):
                    # Disconnected, with all input read: a clean shutdown if it was being read.
                    if fd in reads:
                        inRead = True
                        why = CONNECTION_DONE
                    else:
                        why = CONNECTION_LOST
                else:
                    try:
                        if selectable.fileno() == -1:
                            why = _NO_FILEDESC
                        else:
                            if event & pollIn:
                                why = selectable.doRead()
                                inRead = True
                            if not why and event & pollOut:
                                why = selectable.doWrite()
                                inRead = False
                    except BaseException:
                        why = sys.exc_info()[1]
                        legacyLog.err()
                if why:
                    if held and getattr(selectable, "casdHeldNow", False) and selectable.connected:
                        # Its peer closed, or it failed: what this turn wrote to it goes first
                        # (casd.session.heldwrites), as it would have without holding.
                        sendHeld(selectable)
                    self._disconnectSelectable(selectable, why, inRead)
            except KeyboardInterrupt:
                raise
            except BaseException:
                log.failure("while handling an event on {selectable!r}", selectable=selectable)
        if not loop:
            return


def dispatchesInline(reactor) -> bool:
    """
    @return: whether C{reactor} has the lean dispatch (L{leanDispatch}), which L{passes} can
        run inline.
    """
    iteration = reactor.__dict__.get("doIteration")
    return getattr(iteration, "__func__", None) is _leanDoPoll


def leanDispatch(reactor) -> bool:
    """
    Give C{reactor} the lean per-event dispatch, if it is Twisted's epoll reactor with the
    C{doPoll} this module knows.  (Its TCP listening ports get the lean accept from
    L{casd.service.leanaccept.leanAccept}, installed beside it.)

    @return: whether the dispatch was installed.
    """
    if type(reactor) is not EPollReactor or not doPollMatches():
        return False
    reactor.doIteration = types.MethodType(_leanDoPoll, reactor)
    # Small writes wait for the end of the turn (casd.session.heldwrites): passes() sends them
    # before each poll.
    startHolding(reactor)
    return True


#: SHA-256 of the sources of C{EPollReactor}'s C{_add}, C{_remove}, C{addReader} and
#: C{removeWriter} in Twisted 26.10.0: the bookkeeping that L{readInsteadOfWriting} does in one
#: step.
FDSET_SHA256 = "03259116de604056b15058af0627bfcf8bc6e4531451c8ccf32776bde5b59661"

_FDSET_PINNED = ("_add", "_remove", "addReader", "removeWriter")


def fdSetMatches() -> bool:
    """
    @return: whether Twisted's epoll reactor keeps its readers and writers as
        L{readInsteadOfWriting} expects.
    """
    return sourceMatches(
        FDSET_SHA256, lambda: [getattr(EPollReactor, name) for name in _FDSET_PINNED]
    )


_fdSetKnown: list[bool] = []


def readInsteadOfWriting(selectable) -> None:
    """
    Switch C{selectable} from waiting to write to waiting to read: C{startReading()} then
    C{stopWriting()}, in one C{epoll_ctl} (C{EPOLL_CTL_MOD} to C{EPOLLIN}) instead of two when
    its reactor is Twisted's epoll reactor, with the bookkeeping this module knows
    (L{fdSetMatches}), and it is registered for writing alone.  A connecting socket's
    completion (L{casd.pool.tcpclient.LeanClient}) is the case.

    @param selectable: a L{twisted.internet.abstract.FileDescriptor}.
    """
    reactor = selectable.reactor
    if type(reactor) is EPollReactor:
        if not _fdSetKnown:
            _fdSetKnown.append(fdSetMatches())
        if _fdSetKnown[0]:
            fd = selectable.fileno()
            writes = reactor._writes
            selectables = reactor._selectables
            if (
                fd in writes
                and fd not in reactor._reads
                and fd in selectables
                and selectables[fd] is selectable
            ):
                reactor._poller.modify(fd, EPOLLIN)
                # As _add and _remove do: the sets follow the poller's state once it succeeded.
                writes.remove(fd)
                reactor._reads.add(fd)
                return
    selectable.startReading()
    selectable.stopWriting()
