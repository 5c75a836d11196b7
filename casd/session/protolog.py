# -*- test-case-name: tests.test_imap -*-
"""
The protocol log: one line per session, the same fields for every protocol.  A password, hash,
cookie or token is never a field.
"""

from __future__ import annotations

from twisted.logger import Logger

from casd.service.logs import LineLog

#: The session line's text (L{SessionLog.record} renders the same with an f-string).
SESSION_FORMAT = (
    "session={session} proto={protocol} listener={listener} client={client} user={user} "
    "backend={backend} result={result} in={bytesIn} out={bytesOut} duration={duration:.3f}"
)


class SessionLog:
    """
    Writes the end-of-session line (namespace C{casd.session}) through a L{LineLog}: rendered
    here once, its fields on the event for structured observers.
    """

    def __init__(self, log: Logger | None = None, lines: LineLog | None = None) -> None:
        """
        @param log: a L{Logger} whose namespace and observer the lines take (tests).
        @param lines: the L{LineLog} to write to (default: C{casd.session} on the global log).
        """
        if lines is None:
            lines = LineLog("casd.session") if log is None else LineLog(log.namespace, log.observer)
        self.lines = lines

    def record(self, client, user, backend, result, bytesIn, bytesOut, duration) -> None:
        host = client.peerHost
        if ":" in host:
            host = f"[{host}]"
        peer = f"{host}:{client.peerPort}"
        user = user or "-"
        backend = backend or "-"
        session = client.sessionId
        protocol = client.protocol
        listener = client.listener
        self.lines.emit(
            f"session={session} proto={protocol} listener={listener} client={peer} user={user} "
            f"backend={backend} result={result} in={bytesIn} out={bytesOut} duration={duration:.3f}",
            {
                "session": session,
                "protocol": protocol,
                "listener": listener,
                "client": peer,
                "user": user,
                "backend": backend,
                "result": result,
                "bytesIn": bytesIn,
                "bytesOut": bytesOut,
                "duration": duration,
            },
        )
