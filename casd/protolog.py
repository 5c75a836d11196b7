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
        self.log.info(
            SESSION_FORMAT,
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
