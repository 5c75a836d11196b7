# -*- test-case-name: tests.test_imap -*-
"""
The protocol log: one line per session, the same fields for every protocol.  A password, hash,
cookie or token is never a field.
"""

from __future__ import annotations

from twisted.logger import Logger

SESSION_FORMAT = (
    "session={session} proto={protocol} listener={listener} client={client} user={user} "
    "backend={backend} result={result} in={bytesIn} out={bytesOut} duration={duration:.3f}"
)


class SessionLog:
    """
    Writes the end-of-session line through L{twisted.logger} (namespace C{casd.session}).
    """

    def __init__(self, log: Logger | None = None) -> None:
        self.log = log or Logger(namespace="casd.session")

    def record(self, client, user, backend, result, bytesIn, bytesOut, duration) -> None:
        host = f"[{client.peerHost}]" if ":" in client.peerHost else client.peerHost
        fields = dict(
            session=client.sessionId,
            protocol=client.protocol,
            listener=client.listener,
            client=f"{host}:{client.peerPort}",
            user=user or "-",
            backend=backend or "-",
            result=result,
            bytesIn=bytesIn,
            bytesOut=bytesOut,
            duration=duration,
        )
        # The line is rendered here once, with str.format's C implementation; the event's format
        # is then a single field.  Twisted's own formatter walks every field in Python, which
        # cost more than the rest of a proxied login's logging.  The fields stay on the event
        # for structured observers.
        self.log.info("{line}", line=SESSION_FORMAT.format(**fields), **fields)
