# -*- test-case-name: tests.test_logfile,tests.test_turnlog -*-
"""
The files casd's text observers write (L{casd.service.logs.TextLogObserver}), each a I{sink}:
bytes go to C{raw} (an unbuffered file's C{write}) under C{lock} (a C lock: no Python call),
after C{rotate()} when C{rotateLength} is set and C{size} has reached it.

In the thread of casd's lean main loop (L{casd.service.turns}), the lines of a turn
(L{casd.service.logs.LineLog}'s) are appended to the sink's C{pending} buffer instead, and the
sink writes them with one C{write(2)} when the loop ends the turn (L{TurnBuffer.flushTurn}),
before it sleeps again; or earlier: when C{pending} reaches L{PENDING_LIMIT} bytes, before
anything else is written to the file (an event that is not such a line, a line from another
thread), before a rotation or a reopening, when the file is closed, and when the loop stops.
Elsewhere (other threads, a reactor without the lean loop) every line is written at once, one
C{write(2)} each.

  - L{RotatingLogFile}: twistd's C{--logfile}, Twisted's L{LogFile} (the same file names, the
    same rotation every C{rotateLength} bytes into C{.1}, C{.2}, ..., C{rotate()} on a signal),
    written without the pure-Python lock of C{threadable.synchronize} around every write, and
    opened for appending (C{O_APPEND}): with C{--workers} the workers append to it too and the
    parent rotates it (L{SharedRotation});
  - L{AppendFile}: casd's C{[log] file}, opened with C{O_APPEND} and reopened for logrotate;
  - L{StreamFile}: standard output (C{twistd -n} without C{--logfile}), the process's own or
    a worker's inherited one.
"""

from __future__ import annotations

import os
import sys
import threading
from select import PIPE_BUF

from twisted.python.logfile import LogFile

from casd.service.turns import here as _here

#: The most bytes a sink holds for the end of the turn: one more line and they are written.
PENDING_LIMIT = 65536


class TurnBuffer:
    """
    The lines a sink holds until the end of the reactor's turn (mixed into L{RotatingLogFile},
    L{AppendFile} and L{StreamFile}), and what writes them.

    Only the thread of the lean loop appends to C{pending}, without the lock (its observers do
    it inline: L{casd.service.logs.TextLogObserver}, L{put}); every other change to it is made
    under C{lock}: L{flushTurn} in that thread, L{drain} in any thread (it takes the bytes that
    are there, so that a line appended meanwhile stays for the next write).

    @ivar pending: the bytes of the lines not written yet.
    @ivar turn: the L{casd.service.turns.TurnEnd} this sink's L{flushTurn} is a hook of, or
        L{None}.
    """

    turn = None

    def joinTurn(self, turn) -> None:
        """
        Have C{turn} call L{flushTurn} at the end of its turns.
        """
        if self.turn is not None:
            self.turn.leave(self.flushTurn)
        self.turn = turn
        turn.join(self.flushTurn)

    def leaveTurn(self) -> None:
        """
        No more L{flushTurn} at the end of a turn.
        """
        if self.turn is not None:
            self.turn.leave(self.flushTurn)
            self.turn = None

    def lastWrite(self) -> None:
        """
        Before the file is closed: no more turns, and the pending lines written if they can be.
        """
        with self.lock:
            self.leaveTurn()
            if self.pending:
                try:
                    self.drain()
                except (OSError, ValueError):
                    del self.pending[:]

    def flushTurn(self) -> None:
        """
        Write the pending lines, one C{write(2)}: the end of the turn, in the loop's thread.
        """
        with self.lock:
            pending = self.pending
            if not pending:
                return
            # A copy (a slice: no call) that nothing appends to while it is being written, in
            # case a signal handler logs in between.
            data = pending[:]
            del pending[:]
            try:
                # _writeOut(data), inline.
                if self.rotateLength and self.size >= self.rotateLength:
                    self.rotate()
                self.size += self.raw(data)
            except (OSError, ValueError):
                pass  # lost, as a line whose write(2) fails (a full disk, a closed file)

    def drain(self) -> None:
        """
        Write the pending lines now, from any thread.
        """
        with self.lock:
            pending = self.pending
            n = len(pending)
            if not n:
                return
            data = pending[:n]
            del pending[:n]
            self._writeOut(data)

    def _writeOut(self, data) -> None:
        """
        Under C{lock}: rotate first when the file has reached C{rotateLength}, then write.
        """
        if self.rotateLength and self.size >= self.rotateLength:
            self.rotate()
        self.size += self.raw(data)

    def write(self, data) -> None:
        """
        Write C{data} (text is encoded as UTF-8) now, after the pending lines, rotating first
        when the file has reached C{rotateLength} bytes.
        """
        if isinstance(data, str):
            data = data.encode("utf-8", "backslashreplace")
        with self.lock:
            if self.pending:
                self.drain()
            self._writeOut(data)

    def flush(self) -> None:
        """
        Nothing to do: the file is unbuffered (L{flushTurn} and L{drain} write what is held).
        """

    def put(self, data: bytes) -> None:
        """
        Write one line: held for the end of the turn in the lean loop's thread, else now
        (after the pending ones).  L{casd.service.logs.TextLogObserver} does the same inline.
        """
        turn = _here.turn
        if turn is not None:
            if self.turn is not turn:
                self.joinTurn(turn)
            pending = self.pending
            pending += data
            turn.due = True
            if pending[PENDING_LIMIT:]:
                self.flushTurn()
            return
        self.write(data)


class RotatingLogFile(TurnBuffer, LogFile):
    """
    Twisted's L{LogFile} (twistd's C{--logfile}), with a C lock shared by L{write} and C{rotate}
    (C{LogFile}'s synchronised C{rotate} takes the same lock: it is the object's
    C{_threadable_lock}), and the lines of a turn held (L{TurnBuffer}).

    @ivar raw: the open file's C{write} (bytes, unbuffered).
    @ivar lock: the lock around C{size}, the rotation and C{raw}.
    @ivar size: bytes in the current file.
    @ivar onRotate: called after each rotation (or L{None}).
    """

    onRotate = None

    def __init__(self, name, directory, rotateLength=1000000, defaultMode=None, maxRotatedFiles=None):
        # threadable's _synchPre uses this lock when the object has one (rotate, and
        # LogFile.write if anybody calls it): one lock for every path.
        self.__dict__["_threadable_lock"] = self.lock = threading.RLock()
        self.pending = bytearray()
        super().__init__(name, directory, rotateLength, defaultMode, maxRotatedFiles)

    def _openFile(self):
        # As Twisted's (the same mode for a new file), but appending (O_APPEND): with --workers
        # the workers append their session lines to the same file, and a copytruncate leaves no
        # hole.
        self.closed = False
        if self.defaultMode is not None and not os.path.exists(self.path):
            umask = os.umask(0o777)
            try:
                self._file = open(self.path, "ab", 0)
            finally:
                os.umask(umask)
        else:
            self._file = open(self.path, "ab", 0)
        if self.defaultMode is not None:
            try:
                os.chmod(self.path, self.defaultMode)
            except OSError:
                pass
        self.size = self._file.tell()
        self.raw = self._file.write

    def rotate(self) -> None:
        """
        Rotate as Twisted's L{LogFile} does (C{.1}, C{.2}, ...), then tell L{onRotate}.  A
        rotation the file system refuses leaves the lines going to the file at C{path} (Twisted's
        would have left its file closed).  The pending lines go to the file being rotated away.
        """
        with self.lock:
            if self.pending:
                self.drain()
            try:
                LogFile.rotate(self)
            except OSError:
                if self._file.closed:
                    self._openFile()
                return
        if self.onRotate is not None:
            self.onRotate()

    def fileno(self) -> int:
        return self._file.fileno()

    def checkSize(self) -> None:
        """
        Take the file's size from the file system (other processes append to it too) and rotate
        when it has reached C{rotateLength}.
        """
        try:
            with self.lock:
                if self.closed:
                    return
                self.size = os.fstat(self._file.fileno()).st_size
                due = self.rotateLength and self.size >= self.rotateLength
            if due:
                self.rotate()
        except OSError:
            pass  # the next check tries again; the lines go on to the file that is open

    def close(self) -> None:
        """
        Write the pending lines, then close the file as Twisted's L{LogFile} does.
        """
        with self.lock:
            if self.closed:
                self.leaveTurn()
                return
            self.lastWrite()
            LogFile.close(self)


class AppendFile(TurnBuffer):
    """
    A file opened for appending (C{O_APPEND}, unbuffered: one C{write(2)} per line or per turn's
    lines, which the kernel appends whole even when another process appends to the same file),
    never rotated by casd; L{reopen} opens C{path} again after logrotate moved it away.

    @ivar raw: the open file's C{write}.
    """

    rotateLength = 0
    size = 0

    def __init__(self, path: str, fd: int | None = None) -> None:
        """
        @param fd: the file, open already (for appending), which this object then owns; else
            C{path} is opened.
        """
        self.path = path
        # Reentrant: a signal handler may log while a write holds it.
        self.lock = threading.RLock()
        self.pending = bytearray()
        self._file = open(path if fd is None else fd, "ab", buffering=0)
        self.raw = self._file.write

    def rotate(self) -> None:  # pragma: no cover - rotateLength is 0
        """
        Never called: logrotate moves the file.
        """

    def reopen(self) -> None:
        """
        Open C{path} again (after logrotate renamed it); the old file is closed.  The pending
        lines go to the old one.
        """
        new = open(self.path, "ab", buffering=0)
        with self.lock:
            if self.pending:
                self.drain()
            old, self._file = self._file, new
            self.raw = new.write
        old.close()

    def close(self) -> None:
        """
        Write the pending lines and close the file.
        """
        with self.lock:
            self.lastWrite()
            self._file.close()
            self.raw = _closed


class StreamFile(TurnBuffer):
    """
    A descriptor casd's log goes to that it neither opened nor rotates: standard output (a
    terminal, a pipe, journald's socket, a file), its own or, in a worker, the parent's.  Each
    C{write(2)} is at most C{PIPE_BUF} bytes and ends at the end of a line when it can, so that
    on a pipe shared with other processes (the workers) another's lines never cut one; a partial
    write is completed.

    @ivar fd: the descriptor (not closed by L{close}).
    """

    rotateLength = 0
    size = 0

    def __init__(self, fd: int, write=os.write) -> None:
        """
        @param write: C{os.write}.
        """
        self.fd = fd
        self._write = write
        self.lock = threading.RLock()
        self.pending = bytearray()
        self.raw = self._writeWhole

    def _writeWhole(self, data) -> int:
        total = len(data)
        view = memoryview(data)
        start = 0
        while start < total:
            end = start + PIPE_BUF
            if end < total:
                cut = data.rfind(b"\n", start, end)
                if cut >= start:
                    end = cut + 1
            start += self._write(self.fd, view[start:end])
        return total

    def rotate(self) -> None:  # pragma: no cover - rotateLength is 0
        """
        Never called.
        """

    def close(self) -> None:
        """
        Write the pending lines; the descriptor stays open.
        """
        self.lastWrite()


def standardOutput(stdout=None):
    """
    @param stdout: a text stream (default: C{sys.stdout}).
    @return: a L{StreamFile} on C{stdout}'s descriptor (once what was written to it is flushed),
        or C{stdout} itself if it has none.
    """
    stdout = sys.stdout if stdout is None else stdout
    try:
        stdout.flush()
        fd = stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return stdout
    return StreamFile(fd)


def _closed(data: bytes) -> int:
    raise ValueError("I/O operation on closed file")


#: What a parent writes on a worker's standard input when the workers must reopen its log file.
REOPEN_WORD = b"reopen-log\n"


class SharedRotation:
    """
    The rotation of twistd's C{--logfile} when worker processes append their session lines to
    it themselves (C{--workers N}): the parent checks the file's size every C{interval} seconds
    (theirs and its own lines) and rotates it at C{rotateLength}; after every rotation (this
    one, or C{rotate()} on a signal) the workers are told to reopen the path.
    """

    def __init__(self, logFile: RotatingLogFile, clock, tellWorkers, interval: float = 1.0) -> None:
        """
        @param clock: an L{IReactorTime} (and C{callFromThread}).
        @param tellWorkers: called with L{REOPEN_WORD} after each rotation, in the reactor thread.
        """
        from twisted.internet.task import LoopingCall

        self.logFile = logFile
        self.clock = clock
        self.tellWorkers = tellWorkers
        self.interval = interval
        self._loop = LoopingCall(logFile.checkSize)
        self._loop.clock = clock

    def start(self) -> None:
        self.logFile.onRotate = self._rotated
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self.logFile.onRotate == self._rotated:
            self.logFile.onRotate = None

    def _rotated(self) -> None:
        self.clock.callFromThread(self.tellWorkers, REOPEN_WORD)
