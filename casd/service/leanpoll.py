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
copy is looked at again.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import sys
import types

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.posixbase import _NO_FILEDESC
from twisted.logger import Logger
from twisted.python import log as legacyLog

log = Logger()

#: SHA-256 of the sources of C{EPollReactor.doPoll} and C{EPollReactor._doReadOrWrite} in
#: Twisted 26.10.0, which L{_leanDoPoll} repeats.
DOPOLL_SHA256 = "819089e0c72b570d461e7ee0d1f5e43a14246f75f4f19ef9c53cf24cd7a30f18"


def _pinnedSource() -> str:
    return inspect.getsource(EPollReactor.doPoll) + inspect.getsource(EPollReactor._doReadOrWrite)


def doPollMatches() -> bool:
    """
    @return: whether Twisted's C{EPollReactor.doPoll} and C{_doReadOrWrite} are the ones
        L{_leanDoPoll} was copied from.
    """
    try:
        source = _pinnedSource()
    except (OSError, TypeError, AttributeError):
        return False
    return hashlib.sha256(source.encode("utf-8")).hexdigest() == DOPOLL_SHA256


def _leanDoPoll(self, timeout):
    """
    C{EPollReactor.doPoll} without C{log.callWithLogger} around each event, and with
    C{_doReadOrWrite} inlined.
    """
    if timeout is None:
        timeout = -1
    try:
        l = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    selectables = self._selectables
    reads = self._reads
    pollIn, pollOut, pollDisconnected = self._POLL_IN, self._POLL_OUT, self._POLL_DISCONNECTED
    for fd, event in l:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
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
                self._disconnectSelectable(selectable, why, inRead)
        except KeyboardInterrupt:
            raise
        except BaseException:
            log.failure("while handling an event on {selectable!r}", selectable=selectable)


def leanDispatch(reactor) -> bool:
    """
    Give C{reactor} the lean per-event dispatch, if it is Twisted's epoll reactor with the
    C{doPoll} this module knows.

    @return: whether it was installed.
    """
    if type(reactor) is not EPollReactor or not doPollMatches():
        return False
    reactor.doIteration = types.MethodType(_leanDoPoll, reactor)
    return True
