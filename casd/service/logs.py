# -*- test-case-name: tests.test_logs -*-
"""
casd's own log file (C{[log] file}): text or one JSON object per line, reopened on C{SIGUSR2} (and
on C{SIGHUP}) so that logrotate can move it away without C{copytruncate}.
"""

from __future__ import annotations

import json
import signal as _signal
import time

from twisted.application import service
from twisted.logger import Logger, formatEvent, formatEventAsClassicLogText, globalLogPublisher

#: Event keys never written as JSON fields (Twisted's bookkeeping, or objects).
_SKIP = frozenset({"log_logger", "log_source", "log_format", "log_time", "log_level", "log_namespace",
                   "log_failure", "log_io", "log_trace", "log_system", "log_text", "log_flattened",
                   "line", "format", "message", "isError", "system", "time", "why"})


def eventAsLine(event: dict) -> str:
    """
    One event as one JSON object: C{time} (ISO 8601, UTC), C{level}, C{namespace}, C{message}
    (the rendered text) and every plain field of the event (the session line's fields among
    them).
    """
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        + "Z",
        "level": getattr(event.get("log_level"), "name", "info"),
        "namespace": event.get("log_namespace", ""),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key in _SKIP or key.startswith("log_") or key in record:
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["failure"] = failure.getErrorMessage()
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False)


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
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)

    def _onSignal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reopen)

    def reopen(self) -> None:
        """
        Close the file and open C{path} again (after logrotate renamed it).
        """
        if self._file is None:
            return
        old, self._file = self._file, None
        old.close()
        self._open()
        self.log.info("log file {path} reopened", path=self.path)

    def __call__(self, event: dict) -> None:
        f = self._file
        if f is None:
            return
        if self.format == "json":
            text = eventAsLine(event) + "\n"
        else:
            text = formatEventAsClassicLogText(event) or ""
        if text:
            try:
                f.write(text)
            except (OSError, ValueError):
                pass
