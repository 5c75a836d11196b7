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
line for line, with the events dispatched directly; a failure that escapes the dispatch (the
reactor's own C{_doReadOrWrite} already handles those of C{doRead} and C{doWrite}) is logged,
as before.  It is installed only on an L{EPollReactor} whose C{doPoll} is the one it was copied
from (the hash of its source, L{DOPOLL_SHA256}); any other reactor or Twisted keeps its own, and
the tests fail on a Twisted whose C{doPoll} changed, so that the copy is looked at again.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import types

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

log = Logger()

#: SHA-256 of the source of C{EPollReactor.doPoll} in Twisted 26.10.0, which L{_leanDoPoll}
#: repeats.
DOPOLL_SHA256 = "09b62ae68ef01b4bc5eaa170827e2baf0a2a5098e7e7ce7b5e1c80cda187c827"


def doPollMatches() -> bool:
    """
    @return: whether Twisted's C{EPollReactor.doPoll} is the one L{_leanDoPoll} was copied from.
    """
    try:
        source = inspect.getsource(EPollReactor.doPoll)
    except (OSError, TypeError):
        return False
    return hashlib.sha256(source.encode("utf-8")).hexdigest() == DOPOLL_SHA256


def _leanDoPoll(self, timeout):
    """
    C{EPollReactor.doPoll} without C{log.callWithLogger} around each event.
    """
    if timeout is None:
        timeout = -1
    try:
        l = self._poller.poll(timeout, len(self._selectables))
    except OSError as err:
        if err.errno == errno.EINTR:
            return
        raise
    _drdw = self._doReadOrWrite
    selectables = self._selectables
    for fd, event in l:
        selectable = selectables.get(fd)
        if selectable is None:
            continue
        try:
            _drdw(selectable, fd, event)
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
