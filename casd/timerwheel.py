# -*- test-case-name: tests.test_timerwheel -*-
"""
A coarse timer wheel: the session timers (pre-login, backend connect, the relay's first idle
check) without a L{twisted.internet.base.DelayedCall} each on the reactor's heap.

Each Twisted timer costs Python calls when it is armed (C{callLater}, C{DelayedCall.__init__},
then the main loop's C{runUntilCurrent} and C{_insertNewDelayedCalls} in the next iteration and
heap comparisons by C{DelayedCall.__lt__}), when it is reset and when it is cancelled: about
thirty per proxied login for its three timers, which nearly always end cancelled.

A L{TimerWheel} keeps its calls in buckets of L{RESOLUTION} seconds (a slot: the calls due
in C{((k - 1) / 4, k / 4]} are in slot C{k}) and holds one reactor C{DelayedCall} at most, for
its earliest non-empty slot, and none while it holds no call.  Arming, resetting and
cancelling a L{WheelCall} is one Python call and a few dictionary operations; the slots
themselves are integers on a C{heapq} heap (compared in C, no C{__lt__}).  A call runs at the
first slot boundary at or after its time: at most L{RESOLUTION} late, never early, and on time
when its time is a multiple of L{RESOLUTION} (the whole seconds a test clock advances by).
Calls that are due together run in the order of their times (armed order for equal times).

L{wheelFor} gives the one wheel of a reactor.  A L{WheelCall} offers what casd's code uses of
a C{DelayedCall}: C{reset}, C{delay}, C{cancel}, C{active}, C{getTime} and the C{time},
C{func}, C{args}, C{kw} attributes, with the same C{AlreadyCancelled}/C{AlreadyCalled} errors.
"""

from __future__ import annotations

from heapq import heappop, heappush
from math import ceil, floor
from operator import attrgetter

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.logger import Logger

log = Logger()

#: Slots per second: the wheel's resolution is its inverse (a power of two, so that slot times
#: are exact floats).
PER_SECOND = 4

#: Seconds a wheel call may run late.
RESOLUTION = 1.0 / PER_SECOND

#: The attribute of a reactor that holds its wheel (L{wheelFor}).
_ATTRIBUTE = "_casdTimerWheel"

#: No tick scheduled: later than every slot.
_NEVER = float("inf")

_byTime = attrgetter("time")


class WheelCall:
    """
    A call on a L{TimerWheel}, as L{TimerWheel.callLater} returns it: a
    L{twisted.internet.interfaces.IDelayedCall} for timeouts of seconds.

    @ivar time: when it is due (seconds, the reactor's clock).
    @ivar slot: the wheel slot it is in; C{None} while its slot is being run.
    """

    __slots__ = ("wheel", "time", "func", "args", "kw", "slot", "cancelled", "called")

    def __init__(self, wheel, time, func, args, kw) -> None:
        self.wheel = wheel
        self.time = time
        self.func = func
        self.args = args
        self.kw = kw
        self.slot = None
        self.cancelled = self.called = False

    def getTime(self) -> float:
        """
        @return: the time it is due.
        """
        return self.time

    def active(self) -> bool:
        """
        @return: whether it is still to run (neither run nor cancelled).
        """
        return not (self.cancelled or self.called)

    def cancel(self) -> None:
        """
        Unschedule it.

        @raise AlreadyCancelled: it was cancelled before.
        @raise AlreadyCalled: it ran (or is running).
        """
        if self.cancelled:
            raise AlreadyCancelled()
        if self.called:
            raise AlreadyCalled()
        self.cancelled = True
        wheel = self.wheel
        bucket = wheel._buckets.get(self.slot)
        if bucket is not None:
            del bucket[self]
        wheel._count -= 1
        if not wheel._count:
            wheel._empty()

    def reset(self, secondsFromNow: float) -> None:
        """
        Reschedule it C{secondsFromNow} from now, sooner or later.

        @raise AlreadyCancelled: it was cancelled.
        @raise AlreadyCalled: it ran (or is running).
        """
        if self.cancelled:
            raise AlreadyCancelled()
        if self.called:
            raise AlreadyCalled()
        wheel = self.wheel
        self.time = time = wheel._seconds() + secondsFromNow
        slot = ceil(time * PER_SECOND)
        old = self.slot
        if slot != old:
            buckets = wheel._buckets
            bucket = buckets.get(old)
            if bucket is not None:
                del bucket[self]
            self.slot = slot
            bucket = buckets.get(slot)
            if bucket is None:
                buckets[slot] = bucket = {}
                heappush(wheel._slots, slot)
            bucket[self] = None
            if slot < wheel._tickSlot:
                wheel._schedule(slot)

    def delay(self, secondsLater: float) -> None:
        """
        Reschedule it C{secondsLater} after the time it was due.
        """
        if self.cancelled:
            raise AlreadyCancelled()
        if self.called:
            raise AlreadyCalled()
        self.reset(self.time + secondsLater - self.wheel._seconds())

    def __repr__(self) -> str:
        state = "cancelled" if self.cancelled else "called" if self.called else "pending"
        return f"<WheelCall {state} at {self.time!r}: {self.func!r}>"


class TimerWheel:
    """
    The coarse timers of one reactor (L{wheelFor}); see the module's description.

    @ivar reactor: the L{twisted.internet.interfaces.IReactorTime} that drives it.
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self._seconds = reactor.seconds
        #: slot -> {call: None} (an ordered set)
        self._buckets: dict[int, dict[WheelCall, None]] = {}
        #: The slots with a bucket, a heap (a slot's bucket may have been emptied since).
        self._slots: list[int] = []
        #: Calls pending (armed, neither run nor cancelled).
        self._count = 0
        self._tick = None
        self._tickSlot = _NEVER

    def callLater(self, delay: float, func, *args, **kw) -> WheelCall:
        """
        Call C{func(*args, **kw)} C{delay} seconds from now (up to L{RESOLUTION} later).

        @return: the L{WheelCall}.
        """
        call = WheelCall(self, self._seconds() + delay, func, args, kw)
        call.slot = slot = ceil(call.time * PER_SECOND)
        buckets = self._buckets
        bucket = buckets.get(slot)
        if bucket is None:
            buckets[slot] = bucket = {}
            heappush(self._slots, slot)
        bucket[call] = None
        self._count += 1
        if slot < self._tickSlot:
            self._schedule(slot)
        return call

    def getDelayedCalls(self) -> list[WheelCall]:
        """
        @return: the calls still to run, in no particular order.
        """
        return [c for b in self._buckets.values() for c in b if c.active()]

    def __len__(self) -> int:
        return self._count

    def _schedule(self, slot: int) -> None:
        # The reactor's one call for the wheel, at the slot's boundary.
        self._tickSlot = slot
        delay = slot / PER_SECOND - self._seconds()
        if delay < 0.0:
            delay = 0.0
        tick = self._tick
        if tick is None:
            self._tick = self.reactor.callLater(delay, self._run)
        else:
            tick.reset(delay)

    def _empty(self) -> None:
        # No call pending: no tick either, and no slot kept.
        tick, self._tick = self._tick, None
        self._tickSlot = _NEVER
        if tick is not None:
            tick.cancel()
        self._buckets.clear()
        del self._slots[:]

    def _run(self) -> None:
        """
        The tick: run the calls of every slot that is due, then schedule the next tick.
        """
        due = floor(self._seconds() * PER_SECOND)
        if self._tickSlot > due:
            # The reactor ran this tick for its slot (its clock may disagree in the last bit).
            due = self._tickSlot
        self._tick = None
        self._tickSlot = _NEVER
        slots, buckets = self._slots, self._buckets
        calls = []
        while slots and slots[0] <= due:
            bucket = buckets.pop(heappop(slots), None)
            if bucket:
                calls.extend(bucket)
        if len(calls) > 1:
            calls.sort(key=_byTime)
        for call in calls:
            call.slot = None
        for call in calls:
            # An earlier call of this tick may have cancelled or reset (re-slotted) this one.
            if call.cancelled or call.slot is not None:
                continue
            call.called = True
            self._count -= 1
            try:
                call.func(*call.args, **call.kw)
            except BaseException:
                log.failure("Unhandled error in a timer-wheel call {call!r}", call=call)
        if not self._count:
            self._empty()
            return
        while slots and not buckets.get(slots[0]):
            buckets.pop(heappop(slots), None)
        if slots and slots[0] < self._tickSlot:
            self._schedule(slots[0])


def wheelFor(reactor) -> TimerWheel:
    """
    @return: C{reactor}'s L{TimerWheel}, made on first use (one per reactor).
    """
    wheel = getattr(reactor, _ATTRIBUTE, None)
    if wheel is None:
        wheel = TimerWheel(reactor)
        setattr(reactor, _ATTRIBUTE, wheel)
    return wheel
