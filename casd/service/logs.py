# -*- test-case-name: tests.test_logs,tests.test_turnlog -*-
"""
casd's logs.

  - L{LineLog}: one line per session or request (the session line, the HTTP access line), rendered
    once by its caller and written by casd's observers without Twisted's per-event formatting;
  - L{TextLogObserver}: the text observer of twistd's log (C{--logfile}, standard output), with
    that cheap path for those lines (L{MainLogRoot} hands it to twistd);
  - L{LogFileService}: casd's own log file (C{[log] file}): text or one JSON object per line,
    reopened on C{SIGUSR2} (and on C{SIGHUP}) so that logrotate can move it away without
    C{copytruncate}.
"""

from __future__ import annotations

import json
import json.scanner
import signal as _signal
import time

from zope.interface import implementer

from twisted.application import service
from twisted.logger import (
    ILogObserver,
    LogLevel,
    Logger,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
    globalLogPublisher,
)
from twisted.python.components import Componentized

from casd.service.logfile import PENDING_LIMIT, AppendFile, RotatingLogFile, TurnBuffer, standardOutput
from casd.service.turns import here as _here

#: Event keys never written as JSON fields (Twisted's bookkeeping, or objects).
_SKIP = frozenset({"log_logger", "log_source", "log_format", "log_time", "log_level", "log_namespace",
                   "log_failure", "log_io", "log_trace", "log_system", "log_text", "log_flattened",
                   "line", "casd_line", "format", "message", "isError", "system", "time", "why"})

#: The key of a L{LineLog} event holding its rendered text: an observer that finds it writes the
#: text as it is (the event's C{log_format} renders the same text for every other observer).
LINE_KEY = "casd_line"

_INFO = LogLevel.info


class LineLog:
    """
    A log of one line per session or request, the API for casd's per-request lines.

    The caller renders the line once (an f-string) and passes its fields::

        access = LineLog("casd.http.access")
        access.emit(f"vdir={vdir} status={status} ...", {"vdir": vdir, "status": status, ...})

    L{emit} publishes one event, as C{Logger.info("{line}", line=text, **fields)} would, straight
    to the log publisher: every observer sees the same event and fields as before (the metrics,
    the JSON log, a worker's pipe to its parent), and casd's text observers (L{TextLogObserver},
    L{LogFileService}, the workers') write C{text} under the key L{LINE_KEY} without rendering
    the format, the fields or, more than once a second, the time stamp.  Never put a secret in
    the text or the fields.
    """

    def __init__(self, namespace: str, publisher=None, now=time.time) -> None:
        """
        @param publisher: where events go (default: Twisted's global log publisher).
        @param now: the wall clock of the events' C{log_time}.
        """
        self.namespace = namespace
        self.publisher = globalLogPublisher if publisher is None else publisher
        self.logger = Logger(namespace=namespace, observer=self.publisher)
        self.now = now

    def emit(self, text: str, fields: dict) -> None:
        """
        Log one line at level C{info}.

        @param text: the rendered line.
        @param fields: the line's fields (plain values); this dict becomes the event.
        """
        fields["line"] = fields[LINE_KEY] = text
        fields["log_logger"] = self.logger
        fields["log_level"] = _INFO
        fields["log_namespace"] = self.namespace
        fields["log_source"] = None
        fields["log_format"] = "{line}"
        fields["log_time"] = self.now()
        self.publisher(fields)


@implementer(ILogObserver)
class TextLogObserver:
    """
    Writes events as Twisted's text observer (C{textFileLogObserver}) does, the same text, with
    L{LineLog}'s lines written as they are.

    C{outFile} is a text stream (C{write} and C{flush} per event), or a sink of
    L{casd.service.logfile} (L{RotatingLogFile}, L{casd.service.logfile.AppendFile},
    L{casd.service.logfile.StreamFile}): then a line is encoded once and,
    in the thread of casd's lean main loop, appended to the sink's pending bytes, which the sink
    writes with one C{write(2)} at the end of the reactor's turn (L{casd.service.turns}); in
    other threads, or without the lean loop, written at once (after the pending ones) as one
    C{write(2)}, rotating first when due; no Python call on the way either way.  Any other event
    is written after the pending lines.
    """

    def __init__(self, outFile, systemPrefix: str | None = None, other=None) -> None:
        """
        @param systemPrefix: when given, a line's system is always this prefix, then its
            namespace and level (a worker's C{worker<index>:}), whatever its C{log_system}.
        @param other: what gets the events that are not L{LineLog} lines (default: their text,
            written as Twisted's text observer writes it).
        """
        self.outFile = outFile
        self._prefix = systemPrefix
        self._other = self._writeClassic if other is None else other
        self._second = None
        self._stamp = "-"

    @property
    def outFile(self):
        return self._out

    @outFile.setter
    def outFile(self, outFile) -> None:
        self._out = outFile
        self._sink = outFile if isinstance(outFile, TurnBuffer) else None

    def __call__(self, event: dict) -> None:
        # Subscripts and "in" rather than event.get: no call per line.
        if LINE_KEY not in event or "log_failure" in event:
            sink = self._sink
            if sink is not None and sink.pending:
                sink.drain()  # the lines before it first, wherever it goes
            self._other(event)
            return
        text = event[LINE_KEY]
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        when = event["log_time"] if "log_time" in event else None
        if when is None:
            stamp = "-"
        else:
            second = int(when)
            if second != self._second:
                self._stamp = formatTime(second)
                self._second = second
            stamp = self._stamp
        prefix = self._prefix
        system = event["log_system"] if prefix is None and "log_system" in event else None
        if system is None:
            level = event["log_level"] if "log_level" in event else None
            namespace = event["log_namespace"] if "log_namespace" in event else "-"
            system = f"{prefix or ''}{namespace}#{'-' if level is None else level.name}"
        sink = self._sink
        if sink is None:
            out = self._out
            out.write(f"{stamp} [{system}] {text}\n")
            out.flush()
            return
        data = f"{stamp} [{system}] {text}\n".encode("utf-8", "backslashreplace")
        # TurnBuffer.put(data), inline: held for the end of the turn in the lean loop's thread.
        turn = _here.turn
        if turn is not None:
            if sink.turn is not turn:
                sink.joinTurn(turn)
            pending = sink.pending
            pending += data
            turn.due = True
            if pending[PENDING_LIMIT:]:
                sink.flushTurn()
            return
        with sink.lock:
            if sink.pending:
                sink.drain()
            if sink.rotateLength and sink.size >= sink.rotateLength:
                sink.rotate()
            sink.size += sink.raw(data)

    def _writeClassic(self, event: dict) -> None:
        text = formatEventAsClassicLogText(event)
        if text:
            self._write(text)

    def _write(self, text: str) -> None:
        sink = self._sink
        if sink is not None:
            sink.write(text)
            return
        self._out.write(text)
        self._out.flush()


def mainLogObserver(twistdOptions, reactor, stdout=None, signals=_signal):
    """
    The observer of twistd's log for twistd's own options, as twistd would build it (standard
    output, or C{--logfile}'s L{LogFile}, rotated by it as before), but a L{TextLogObserver}.

    @param twistdOptions: twistd's options (the parent of C{cas}'s), or L{None}.
    @param reactor: the reactor that rotates C{--logfile} on C{SIGUSR1} (as twistd does, until
        casd's node takes that signal for draining).
    @return: the observer, or L{None} where twistd's choice is left alone (no twistd options,
        C{--syslog}, C{--logger}, or C{--logfile=-} without C{--nodaemon}, which twistd refuses).
    """
    if twistdOptions is None:
        return None
    get = twistdOptions.get
    if get("syslog") or get("logger"):
        return None
    name = get("logfile")
    if name == "-" or (get("nodaemon") and not name):
        if not logsToStandardOutput(twistdOptions):
            return None
        return TextLogObserver(standardOutput(stdout))
    logFile = RotatingLogFile.fromFullPath(name or "twistd.log")
    if not signals.getsignal(signals.SIGUSR1):
        # twistd's own rotation signal (casd's node takes SIGUSR1 for draining when it starts).
        def rotate(signum, frame):
            reactor.callFromThread(logFile.rotate)

        signals.signal(signals.SIGUSR1, rotate)
    return TextLogObserver(logFile)


def logsToStandardOutput(twistdOptions) -> bool:
    """
    @param twistdOptions: twistd's options, or L{None}.
    @return: whether twistd's log is its standard output (C{--nodaemon} with no C{--logfile} or
        C{--logfile=-}, and neither C{--syslog} nor C{--logger}).
    """
    if twistdOptions is None:
        return False
    get = twistdOptions.get
    name = get("logfile")
    return bool(get("nodaemon") and not get("syslog") and not get("logger") and (name == "-" or not name))


class MainLogRoot(service.MultiService):
    """
    The root of casd's service tree.  Under twistd, when twistd attaches it to its application
    (before it starts logging), it gives the application L{mainLogObserver} as its
    C{ILogObserver} component, which twistd then logs to.
    """

    def __init__(self, twistdOptions=None, reactor=None) -> None:
        """
        @param twistdOptions: twistd's options (C{cas}'s options' C{parent}), or L{None} (not
            under twistd: nothing is handed over).
        """
        super().__init__()
        self.twistdOptions = twistdOptions
        self.reactor = reactor
        self.observer = None

    def setServiceParent(self, parent):
        if isinstance(parent, Componentized) and parent.getComponent(ILogObserver, None) is None:
            observer = mainLogObserver(self.twistdOptions, self.reactor)
            if observer is not None:
                parent.setComponent(ILogObserver, observer)
                self.observer = observer
        return super().setServiceParent(parent)

    def rotatingLogFile(self):
        """
        @return: the L{RotatingLogFile} twistd's log goes to (C{--logfile}), or L{None}.
        """
        out = getattr(self.observer, "outFile", None)
        return out if isinstance(out, RotatingLogFile) else None


#: The first byte of a worker's record of a L{LineLog} line on its way to the parent; other events
#: go as Twisted's JSON records (C{jsonFileLogObserver}, which start with C{\\x1e}).
LINE_RECORD = "\x1f"
#: Keys of an event that a line record leaves out (objects, or sent another way).
_NOT_SENT = frozenset({"log_logger", "log_source", "log_level", "log_format", "line"})
_LEVELS = {level.name: level for level in LogLevel.iterconstants()}
#: JSON's scanner (C), without C{json.loads}' encoding detection and whitespace handling.
_SCAN = json.scanner.make_scanner(json.JSONDecoder())


@implementer(ILogObserver)
class WorkerLogObserver:
    """
    A worker's log to its parent (its standard output): a L{LineLog} line as one compact JSON
    record (L{LINE_RECORD}, then its plain fields), which the parent reads back with
    L{eventFromLineRecord} without Twisted's JSON event decoding; every other event as
    C{jsonFileLogObserver} writes it.  In the thread of the lean loop the records of a turn are
    flushed to the pipe together at its end (L{casd.service.turns}); the other events flush the
    stream, the records before them with them.
    """

    _turn = None

    def __init__(self, outFile, direct=None, index: int = 0) -> None:
        """
        @param direct: where the parent's own log goes when the worker can write it too: the
            parent's standard output (inherited: a L{casd.service.logfile.StreamFile}), or
            twistd's C{--logfile} opened for appending (an L{AppendFile}, reopened when the
            parent rotates it): the worker writes its
            L{LineLog} lines there itself, as the parent would have written them
            (C{[worker<index>:...]}), and the parent does nothing per line.  L{None}: they go to
            the parent.
        @param index: the worker's number.
        """
        from twisted.logger import jsonFileLogObserver

        self.outFile = outFile
        self._other = jsonFileLogObserver(outFile)
        self.direct = direct
        self._direct = None if direct is None else TextLogObserver(direct, f"worker{index}:", self._other)

    def __call__(self, event: dict) -> None:
        if self._direct is not None:
            self._direct(event)
            return
        if LINE_KEY not in event or "log_failure" in event:
            self._other(event)
            return
        record = dict(event)
        for key in _NOT_SENT:
            if key in record:
                del record[key]
        level = event["log_level"] if "log_level" in event else None
        record["log_level"] = "info" if level is None else level.name
        out = self.outFile
        out.write(LINE_RECORD + _ENCODE(record) + "\n")
        turn = _here.turn
        if turn is None:
            out.flush()
            return
        if self._turn is not turn:
            self._turn = turn
            turn.join(out.flush)
        turn.due = True


def workerLogObserver(outFile, direct=None, index: int = 0):
    """
    A worker's log observer: L{WorkerLogObserver}, or where the worker writes the parent's log
    itself (C{direct}), the L{TextLogObserver} that one would call, without the call.
    """
    observer = WorkerLogObserver(outFile, direct, index)
    return observer if observer._direct is None else observer._direct


def eventFromLineRecord(data: bytes) -> dict:
    """
    The event of a line record written by L{WorkerLogObserver}: its fields, the line, its level,
    namespace and time, as L{LineLog} published it in the worker.

    @param data: the record without its L{LINE_RECORD} byte, UTF-8.
    @raise ValueError: not such a record.
    """
    text = data.decode("utf-8", "replace").rstrip()
    try:
        event, end = _SCAN(text, 0)
    except StopIteration:
        raise ValueError("not a line record") from None
    if end != len(text) or type(event) is not dict or type(event.get(LINE_KEY)) is not str:
        raise ValueError("not a line record")
    event["line"] = event[LINE_KEY]
    event["log_level"] = _LEVELS.get(event.get("log_level"), _INFO)
    event["log_format"] = "{line}"
    return event


#: The types of the event values written as JSON fields (others: see L{eventAsLine}).
_PLAIN = frozenset({str, int, float, bool, type(None)})
_LEVEL_NAMES = {level: level.name for level in LogLevel.iterconstants()}


def _lineEncoder(ensureASCII: bool = False, default=None):
    """
    @return: what C{json.JSONEncoder(separators=(",", ":"), ensure_ascii=ensureASCII,
        default=default).encode} returns for a flat dict, as one call into the C encoder (no
        C{iterencode} per line).
    """
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=ensureASCII, default=default)
    try:
        from _json import make_encoder
    except ImportError:  # pragma: no cover - CPython has it
        make_encoder = None
    if make_encoder is None:  # pragma: no cover
        return encoder.encode
    strings = json.encoder.encode_basestring_ascii if ensureASCII else json.encoder.encode_basestring
    encode = make_encoder(None, encoder.default, strings, None, ":", ",", False, False, True)
    join = "".join
    return lambda record: join(encode(record, 0))


_encodeLine = _lineEncoder()
#: A worker's line record (L{WorkerLogObserver}): any value as its C{str}.
_ENCODE = _lineEncoder(True, str)


class _JSONStamp:
    """
    C{eventAsLine}'s time (ISO 8601, UTC, to the second), computed once a second.
    """

    second = None
    text = ""


def eventAsLine(event: dict) -> str:
    """
    One event as one JSON object: C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message}
    (the rendered text) and every plain field of the event (the session line's fields among
    them).
    """
    when = event["log_time"] if "log_time" in event else None
    second = int(time.time() if when is None else when)
    if second != _JSONStamp.second:
        _JSONStamp.text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)) + "Z"
        _JSONStamp.second = second
    level = event["log_level"] if "log_level" in event else None
    message = event[LINE_KEY] if LINE_KEY in event else None
    record = {
        "time": _JSONStamp.text,
        "level": _LEVEL_NAMES[level] if level in _LEVEL_NAMES else getattr(level, "name", "info"),
        "namespace": event["log_namespace"] if "log_namespace" in event else "",
        "message": message or formatEvent(event),
    }
    for key, value in event.items():
        if key in _SKIP or key[:4] == "log_" or key in record:
            continue
        if type(value) in _PLAIN or isinstance(value, (str, int, float)):
            record[key] = value
    failure = event["log_failure"] if "log_failure" in event else None
    if failure is not None:
        record["failure"] = failure.getErrorMessage()
    return _encodeLine(record)


class LogFileService(service.Service):
    """
    Writes every log event to a file, reopened by L{reopen}.
    """

    name = "logfile"
    log = Logger()

    def __init__(self, reactor, path: str, fmt: str = "text", publisher=globalLogPublisher,
                 signals=_signal) -> None:
        self.reactor = reactor
        self.path = path
        self.format = fmt
        self.publisher = publisher
        self.signals = signals
        self._file = None
        self._previous = None
        self._text = TextLogObserver(None)

    def startService(self) -> None:
        super().startService()
        self._open()
        self.publisher.addObserver(self)
        try:
            self._previous = self.signals.signal(self.signals.SIGUSR2, self._onSignal)
        except (ValueError, AttributeError, OSError):
            self._previous = None

    def stopService(self) -> None:
        super().stopService()
        self.publisher.removeObserver(self)
        if self._previous is not None:
            try:
                self.signals.signal(self.signals.SIGUSR2, self._previous)
            except (ValueError, OSError):
                pass
            self._previous = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self) -> None:
        self._file = AppendFile(self.path)
        self._text.outFile = self._file

    def _onSignal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reopen)

    def reopen(self) -> None:
        """
        Close the file and open C{path} again (after logrotate renamed it).
        """
        if self._file is None:
            return
        self._file.reopen()
        self.log.info("log file {path} reopened", path=self.path)

    def __call__(self, event: dict) -> None:
        f = self._file
        if f is None:
            return
        try:
            if self.format == "json":
                data = (eventAsLine(event) + "\n").encode("utf-8", "backslashreplace")
                if LINE_KEY in event and "log_failure" not in event:
                    f.put(data)  # held for the end of the turn, as the text observer's lines
                else:
                    f.write(data)  # after the lines before it
            else:
                self._text(event)
        except (OSError, ValueError, TypeError):
            pass
