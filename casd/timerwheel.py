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
from operator import attrgetter

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.logger import Logger

log = Logger()

#: Slots per second: the wheel's resolution is its inverse (a power of two, so that slot times
#: are exact floats).
PER_SECOND = 4

#: Seconds a wheel call may run late.
RESOLUTION = 1.0 / PER_SECOND

#: The attribute of a reactor that holds its wheel (L{wheelFor}); a hot path may read it
#: (C{getattr(reactor, WHEEL_ATTRIBUTE, None) or wheelFor(reactor)}) without a Python call.
WHEEL_ATTRIBUTE = "_casdTimerWheel"

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

    # Made by L{TimerWheel.callLater}, which sets every attribute (no __init__: a Python call).
    __slots__ = ("wheel", "time", "func", "args", "kw", "slot", "cancelled", "called")

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
        slot = self.slot
        if slot is not None:  # None: its slot is being run
            del wheel._buckets[slot][self]
        wheel._count -= 1
        if not wheel._count and not wheel._holders:
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
        slot = -(time * -PER_SECOND // 1.0)  # ceil(), as a float: no call
        old = self.slot
        if slot != old:
            buckets = wheel._buckets
            if old is not None:
                del buckets[old][self]
            self.slot = slot
            if slot in buckets:
                buckets[slot][self] = None
            else:
                buckets[slot] = {self: None}
                heappush(wheel._slots, slot)
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
        #: slot -> {call: None} (an ordered set); a slot is a whole number, as a float.
        self._buckets: dict[float, dict[WheelCall, None]] = {}
        #: The slots with a bucket, a heap (a slot's bucket may have been emptied since).
        self._slots: list[float] = []
        #: Calls pending (armed, neither run nor cancelled).
        self._count = 0
        self._tick = None
        self._tickSlot = _NEVER
        #: L{hold}s not yet released: while there is one, an emptied wheel keeps its tick.
        self._holders = 0

    def callLater(self, delay: float, func, *args, **kw) -> WheelCall:
        """
        Call C{func(*args, **kw)} C{delay} seconds from now (up to L{RESOLUTION} later).

        @return: the L{WheelCall}.
        """
        call = WheelCall()
        call.wheel = self
        call.time = time = self._seconds() + delay
        call.func, call.args, call.kw = func, args, kw
        call.cancelled = call.called = False
        # The slot: ceil(time * PER_SECOND), as a float (no call); the slots are on a heap.
        call.slot = slot = -(time * -PER_SECOND // 1.0)
        buckets = self._buckets
        if slot in buckets:
            buckets[slot][call] = None
        else:
            buckets[slot] = {call: None}
            heappush(self._slots, slot)
        self._count += 1
        if slot < self._tickSlot:
            self._schedule(slot)
        return call

    def getDelayedCalls(self) -> list[WheelCall]:
        """
        @return: the calls still to run, in no particular order.
        """
        return [c for b in self._buckets.values() for c in b if c.active()]

    def pending(self) -> int:
        """
        @return: how many calls are still to run.
        """
        return self._count

    def hold(self) -> None:
        """
        A server that keeps arming calls started (a listener): until it L{release}s the wheel,
        a wheel that empties keeps its tick, which runs once and finds nothing, instead of
        cancelling it (only to schedule a new one for the next session's first call).
        """
        self._holders += 1

    def release(self) -> None:
        """
        Undo one L{hold}: with no holder left, an empty wheel holds no reactor call.
        """
        self._holders -= 1
        if self._holders <= 0:
            self._holders = 0
            if not self._count:
                self._empty()

    def _schedule(self, slot: float) -> None:
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
        # No call pending (and no holder): no tick either, and no slot kept.
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
        due = self._seconds() * PER_SECOND // 1.0
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
            if not self._holders:
                self._empty()
            # Held: the emptied slots stay until their tick, no new tick.
            return
        while slots and not buckets.get(slots[0]):
            buckets.pop(heappop(slots), None)
        if slots and slots[0] < self._tickSlot:
            self._schedule(slots[0])


def wheelFor(reactor) -> TimerWheel:
    """
    @return: C{reactor}'s L{TimerWheel}, made on first use (one per reactor).
    """
    wheel = getattr(reactor, WHEEL_ATTRIBUTE, None)
    if wheel is None:
        wheel = TimerWheel(reactor)
        setattr(reactor, WHEEL_ATTRIBUTE, wheel)
    return wheel
