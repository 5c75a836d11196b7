# -*- test-case-name: tests.test_logfile -*-
"""
The files casd's text observers write (L{casd.service.logs.TextLogObserver}), each a I{sink}:
bytes go to C{raw} (an unbuffered file's C{write}, one C{write(2)} per line) under C{lock} (a C
lock: no Python call), after C{rotate()} when C{rotateLength} is set and C{size} has reached it.

  - L{RotatingLogFile}: twistd's C{--logfile}, Twisted's L{LogFile} (the same file names, the
    same rotation every C{rotateLength} bytes into C{.1}, C{.2}, ..., C{rotate()} on a signal),
    written without the pure-Python lock of C{threadable.synchronize} around every write, and
    opened for appending (C{O_APPEND}): with C{--workers} the workers append to it too and the
    parent rotates it (L{SharedRotation});
  - L{AppendFile}: casd's C{[log] file}, opened with C{O_APPEND} and reopened for logrotate.
"""

from __future__ import annotations

import os
import threading

from twisted.python.logfile import LogFile


class RotatingLogFile(LogFile):
    """
    Twisted's L{LogFile} (twistd's C{--logfile}), with a C lock shared by L{write} and C{rotate}
    (C{LogFile}'s synchronised C{rotate} takes the same lock: it is the object's
    C{_threadable_lock}) and a L{write} of one Python call.

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
        would have left its file closed).
        """
        with self.lock:
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

    def write(self, data) -> None:
        """
        Write C{data} (text is encoded as UTF-8), rotating first when the file has reached
        C{rotateLength} bytes.
        """
        if isinstance(data, str):
            data = data.encode("utf-8", "backslashreplace")
        with self.lock:
            if self.rotateLength and self.size >= self.rotateLength:
                self.rotate()
            self.size += self.raw(data)

    def flush(self) -> None:
        """
        Nothing to do: the file is unbuffered.
        """


class AppendFile:
    """
    A file opened for appending (C{O_APPEND}, unbuffered: one C{write(2)} per line, which the
    kernel appends whole even when another process appends to the same file), never rotated by
    casd; L{reopen} opens C{path} again after logrotate moved it away.

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
        self.lock = threading.Lock()
        self._file = open(path if fd is None else fd, "ab", buffering=0)
        self.raw = self._file.write

    def write(self, data) -> None:
        if isinstance(data, str):
            data = data.encode("utf-8", "backslashreplace")
        with self.lock:
            self.raw(data)

    def flush(self) -> None:
        """
        Nothing to do: the file is unbuffered.
        """

    def rotate(self) -> None:  # pragma: no cover - rotateLength is 0
        """
        Never called: logrotate moves the file.
        """

    def reopen(self) -> None:
        """
        Open C{path} again (after logrotate renamed it); the old file is closed.
        """
        new = open(self.path, "ab", buffering=0)
        with self.lock:
            old, self._file = self._file, new
            self.raw = new.write
        old.close()

    def close(self) -> None:
        with self.lock:
            self._file.close()
            self.raw = _closed


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
