"""
Tests for L{casd.timerwheel}: the coarse timers of the sessions.
"""

from __future__ import annotations

from twisted.internet.error import AlreadyCalled, AlreadyCancelled
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from casd.timerwheel import RESOLUTION, TimerWheel, WheelCall, wheelFor


class WheelTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.wheel = TimerWheel(self.clock)
        self.ran = []

    def note(self, name, *args, **kw):
        self.ran.append((name, self.clock.seconds(), args, kw))

    def names(self):
        return [r[0] for r in self.ran]

    def test_runsOnTimeAtSlotBoundary(self):
        """
        A call due at a multiple of the resolution runs exactly then, with its arguments, and
        only once.
        """
        call = self.wheel.callLater(5, self.note, "a", 1, k=2)
        self.clock.advance(4.75)
        self.assertEqual(self.ran, [])
        self.assertTrue(call.active())
        self.clock.advance(0.25)
        self.assertEqual(self.ran, [("a", 5.0, (1,), {"k": 2})])
        self.assertFalse(call.active())
        self.clock.advance(100)
        self.assertEqual(len(self.ran), 1)

    def test_neverEarlyAtMostOneResolutionLate(self):
        """
        A call due between two slot boundaries runs at the next one: never before its time.
        """
        self.clock.advance(0.1)
        call = self.wheel.callLater(1.0, self.note, "a")
        self.assertEqual(call.getTime(), 1.1)
        self.clock.advance(0.999)
        self.assertEqual(self.ran, [])
        self.clock.advance(RESOLUTION - 0.099)
        self.assertEqual(self.names(), ["a"])
        self.assertLessEqual(self.ran[0][1] - 1.1, RESOLUTION)

    def test_ordering(self):
        """
        Calls due in the same tick run in the order of their times, calls of equal times in
        the order they were armed; calls of later slots wait for theirs.
        """
        self.clock.advance(0.01)
        self.wheel.callLater(0.2, self.note, "c")
        self.wheel.callLater(0.1, self.note, "a")
        self.wheel.callLater(0.15, self.note, "b1")
        self.wheel.callLater(0.15, self.note, "b2")
        self.wheel.callLater(3, self.note, "later")
        self.wheel.callLater(1, self.note, "sooner")
        self.clock.advance(0.5)
        self.assertEqual(self.names(), ["a", "b1", "b2", "c"])
        self.clock.advance(10)
        self.assertEqual(self.names(), ["a", "b1", "b2", "c", "sooner", "later"])

    def test_resetLater(self):
        """
        A reset to a later time moves the call there.
        """
        call = self.wheel.callLater(2, self.note, "a")
        self.clock.advance(1)
        call.reset(5)
        self.assertEqual(call.getTime(), 6.0)
        self.assertEqual(call.time, 6.0)
        self.clock.advance(4.75)
        self.assertEqual(self.ran, [])
        self.clock.advance(0.25)
        self.assertEqual(self.ran, [("a", 6.0, (), {})])

    def test_resetEarlier(self):
        """
        A reset to an earlier time than any other call's brings the wheel's tick forward.
        """
        call = self.wheel.callLater(60, self.note, "a")
        self.wheel.callLater(30, self.note, "b")
        call.reset(2)
        self.clock.advance(2)
        self.assertEqual(self.ran, [("a", 2.0, (), {})])
        self.clock.advance(28)
        self.assertEqual(self.names(), ["a", "b"])

    def test_resetWithinSlot(self):
        """
        A reset inside the same slot changes the call's time and keeps its place.
        """
        call = self.wheel.callLater(1.0, self.note, "a")
        call.reset(0.9)
        self.assertEqual(call.getTime(), 0.9)
        self.clock.advance(1)
        self.assertEqual(self.names(), ["a"])

    def test_delay(self):
        """
        C{delay} pushes the call later by that much.
        """
        call = self.wheel.callLater(1, self.note, "a")
        call.delay(2)
        self.assertEqual(call.getTime(), 3.0)
        self.clock.advance(2.75)
        self.assertEqual(self.ran, [])
        self.clock.advance(0.25)
        self.assertEqual(self.names(), ["a"])

    def test_cancel(self):
        """
        A cancelled call never runs, and says so.
        """
        call = self.wheel.callLater(1, self.note, "a")
        other = self.wheel.callLater(1, self.note, "b")
        call.cancel()
        self.assertFalse(call.active())
        self.clock.advance(1)
        self.assertEqual(self.names(), ["b"])
        self.assertFalse(other.active())

    def test_errorsOfDelayedCall(self):
        """
        Cancelling or resetting a cancelled call raises L{AlreadyCancelled}; a call that ran,
        L{AlreadyCalled}, as for a C{DelayedCall}.
        """
        cancelled = self.wheel.callLater(1, self.note, "a")
        cancelled.cancel()
        for method, args in ((cancelled.cancel, ()), (cancelled.reset, (1,)), (cancelled.delay, (1,))):
            self.assertRaises(AlreadyCancelled, method, *args)
        ran = self.wheel.callLater(1, self.note, "b")
        self.clock.advance(1)
        for method, args in ((ran.cancel, ()), (ran.reset, (1,)), (ran.delay, (1,))):
            self.assertRaises(AlreadyCalled, method, *args)

    def test_cancelOwnCallInsideCallback(self):
        """
        Inside its own callback, a call is no longer active and cancelling it raises
        L{AlreadyCalled}, as for a C{DelayedCall}.
        """
        seen = []

        def fire():
            seen.append(call.active())
            self.assertRaises(AlreadyCalled, call.cancel)
            self.assertRaises(AlreadyCalled, call.reset, 1)

        call = self.wheel.callLater(1, fire)
        self.clock.advance(1)
        self.assertEqual(seen, [False])

    def test_cancelAnotherDueCallInsideCallback(self):
        """
        A callback that cancels a call due in the same tick stops it from running.
        """
        second = []

        def first():
            self.note("first")
            second[0].cancel()

        self.wheel.callLater(0.5, first)
        second.append(self.wheel.callLater(0.75, self.note, "second"))
        self.wheel.callLater(0.75, self.note, "third")
        self.clock.advance(1)
        self.assertEqual(self.names(), ["first", "third"])
        self.assertEqual(self.wheel.pending(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_resetAnotherDueCallInsideCallback(self):
        """
        A callback that resets a call due in the same tick moves it: it runs at its new time,
        once.
        """
        second = []

        def first():
            self.note("first")
            second[0].reset(5)

        self.wheel.callLater(0.5, first)
        second.append(self.wheel.callLater(0.75, self.note, "second"))
        self.clock.advance(1)
        self.assertEqual(self.names(), ["first"])
        self.clock.advance(5)
        self.assertEqual(self.names(), ["first", "second"])
        self.clock.advance(10)
        self.assertEqual(self.names(), ["first", "second"])

    def test_callArmedInsideCallback(self):
        """
        A call armed by a callback for now is not run inside the running tick: the wheel asks
        the reactor for another one, which runs it.
        """
        ticks = []
        realCallLater = self.clock.callLater

        def countingCallLater(delay, f, *a, **kw):
            ticks.append(delay)
            return realCallLater(delay, f, *a, **kw)

        self.clock.callLater = countingCallLater

        def first():
            self.note("first")
            self.wheel.callLater(0, self.note, "again")
            self.assertEqual(self.names(), ["first"])

        self.wheel.callLater(1, first)
        self.clock.advance(1)
        self.assertEqual(self.names(), ["first", "again"])
        self.assertEqual(ticks, [1.0, 0.0])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_raisingCallbackLoggedWheelGoesOn(self):
        """
        A callback that raises is logged with its traceback; the other calls of the tick and
        of later ticks still run.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def boom():
            raise ZeroDivisionError("boom")

        self.wheel.callLater(1, boom)
        self.wheel.callLater(1, self.note, "after")
        self.wheel.callLater(2, self.note, "later")
        self.clock.advance(1)
        self.clock.advance(1)
        self.assertEqual(self.names(), ["after", "later"])
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, ZeroDivisionError)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_noTickWhileEmpty(self):
        """
        An empty wheel holds no reactor call: none before the first call, none once every call
        is cancelled or has run.
        """
        self.assertEqual(self.clock.getDelayedCalls(), [])
        a = self.wheel.callLater(10, self.note, "a")
        b = self.wheel.callLater(20, self.note, "b")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        a.cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        b.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.wheel.callLater(1, self.note, "c")
        self.clock.advance(1)
        self.assertEqual(self.names(), ["c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.wheel.getDelayedCalls(), [])

    def test_oneReactorCallForManyTimers(self):
        """
        However many calls the wheel holds, the reactor holds one call for it, due at the
        earliest one's slot.
        """
        calls = [self.wheel.callLater(5 + i * 0.01, self.note, i) for i in range(200)]
        calls.append(self.wheel.callLater(3, self.note, "first"))
        (tick,) = self.clock.getDelayedCalls()
        self.assertEqual(tick.getTime(), 3.0)
        self.assertEqual(self.wheel.pending(), 201)
        self.assertEqual(len(self.wheel.getDelayedCalls()), 201)
        self.clock.advance(3)
        (tick,) = self.clock.getDelayedCalls()
        self.assertEqual(tick.getTime(), 5.0)

    def test_emptiedSlotsSkipped(self):
        """
        A tick whose slot has been emptied runs nothing, and the next tick is at the next slot
        that holds a call.
        """
        early = self.wheel.callLater(1, self.note, "early")
        self.wheel.callLater(2, self.note, "keep")
        self.wheel.callLater(8, self.note, "last")
        self.clock.advance(0.5)
        early.cancel()
        self.clock.advance(0.5)
        self.assertEqual(self.ran, [])
        (tick,) = self.clock.getDelayedCalls()
        self.assertEqual(tick.getTime(), 2.0)
        self.clock.advance(1)
        self.assertEqual(self.names(), ["keep"])
        (tick,) = self.clock.getDelayedCalls()
        self.assertEqual(tick.getTime(), 8.0)

    def test_lateReactor(self):
        """
        A tick that runs late runs every slot due by then, in time order.
        """
        self.wheel.callLater(3, self.note, "b")
        self.wheel.callLater(1, self.note, "a")
        self.wheel.callLater(30, self.note, "c")
        self.clock.advance(10)
        self.assertEqual(self.names(), ["a", "b"])
        self.clock.advance(20)
        self.assertEqual(self.names(), ["a", "b", "c"])

    def test_heldWheelKeepsItsTick(self):
        """
        While a listener holds the wheel, emptying it leaves its tick, which runs once, finds
        nothing and is not renewed; a call armed meanwhile for a later slot needs no new
        reactor call.  Released, an empty wheel holds no reactor call.
        """
        self.wheel.hold()
        a = self.wheel.callLater(10, self.note, "a")
        (tick,) = self.clock.getDelayedCalls()
        a.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [tick])
        b = self.wheel.callLater(20, self.note, "b")
        self.assertEqual(self.clock.getDelayedCalls(), [tick])
        self.assertEqual(tick.getTime(), 10.0)
        b.cancel()
        self.clock.advance(10)
        self.assertEqual(self.ran, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        c = self.wheel.callLater(5, self.note, "c")
        self.assertEqual([t.getTime() for t in self.clock.getDelayedCalls()], [15.0])
        self.clock.advance(5)
        self.assertEqual(self.names(), ["c"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(c.active())
        self.wheel.callLater(5, self.note, "d").cancel()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.wheel.release()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_releasedWhileBusy(self):
        """
        Released while calls are pending, the wheel cancels its tick once the last is gone.
        """
        self.wheel.hold()
        a = self.wheel.callLater(10, self.note, "a")
        self.wheel.release()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        a.cancel()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_adoptedCallback(self):
        """
        A holder that takes a call over may point it at its own function, as
        L{casd.session.dialogue.BackendDialogue.adoptTimer} does with a C{DelayedCall}.
        """
        call = self.wheel.callLater(1, self.note, "old")
        call.func, call.args, call.kw = self.note, ("new",), {}
        self.clock.advance(1)
        self.assertEqual(self.names(), ["new"])


class WheelForTests(SynchronousTestCase):
    def test_onePerReactor(self):
        """
        L{wheelFor} gives each reactor one wheel, driven by that reactor.
        """
        a, b = MemoryReactorClock(), MemoryReactorClock()
        self.assertIs(wheelFor(a), wheelFor(a))
        self.assertIsNot(wheelFor(a), wheelFor(b))
        call = wheelFor(a).callLater(1, lambda: None)
        self.assertIsInstance(call, WheelCall)
        self.assertEqual(len(a.getDelayedCalls()), 1)
        self.assertEqual(b.getDelayedCalls(), [])
        a.advance(1)
        self.assertFalse(call.active())


class ListenerHoldTests(SynchronousTestCase):
    def test_listenerHoldsTheWheel(self):
        """
        A front end's factory holds its reactor's wheel while it listens: a session's timer
        cancelled leaves the tick for the next session; stopped, an empty wheel holds nothing.
        """
        from casd.testing import makeContext
        from protocols.imap import imap

        reactor = MemoryReactorClock()
        context = makeContext(reactor)
        section = context.config.protocols["imap"]
        factory = imap.buildFactory(context, section, section.listeners[0])
        factory.doStart()
        wheelFor(reactor).callLater(5, lambda: None).cancel()
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        factory.doStop()
        self.assertEqual(reactor.getDelayedCalls(), [])
