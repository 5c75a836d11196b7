# -*- test-case-name: tests.test_nodeadmin -*-
"""
The control channel between the parent of C{--workers N} and each worker: a pair of pipes apart
from the log (the worker's standard output), one line per message.

Parent to worker:
  - C{ask ID WHAT}: the worker answers at once with one JSON line
    C{{"id": ID, "pid": ..., "health": [healthy, why], "draining": ...}}, and with
    C{"families"} (its metric families, L{casd.service.nodemetrics.familiesOf}) when WHAT is
    C{metrics}, C{"status"} (its C{/status}) when WHAT is C{status};
  - C{drain}: the node was drained (C{SIGUSR1} to the parent): the worker drains too.

Nothing secret travels here: figures, verdicts and the status, the same as the admin pages show.
"""

from __future__ import annotations

import json
import os

from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver

#: What the parent may ask for.
ASKS = ("health", "metrics", "status")


def askLine(ident: int, what: str) -> bytes:
    """
    @return: the parent's request C{ask ID WHAT}.
    """
    return f"ask {ident} {what}\n".encode("ascii")


#: The parent's word that drains a worker.
DRAIN_LINE = b"drain\n"


class WorkerControl(LineOnlyReceiver):
    """
    The worker's side: answers the parent's questions from its L{casd.service.admin.LocalView}.
    """

    delimiter = b"\n"
    MAX_LENGTH = 1024
    log = Logger()

    def __init__(self, view, getpid=os.getpid) -> None:
        self.view = view
        self.getpid = getpid

    def lineReceived(self, line: bytes) -> None:
        words = line.split()
        if words == [b"drain"]:
            self.view.node.drain("SIGUSR1")
            return
        if len(words) != 3 or words[0] != b"ask" or not words[1].isdigit():
            self.log.warn("control: unknown request ignored ({length} bytes)", length=len(line))
            return
        what = words[2].decode("ascii", "replace")
        healthy, why = self.view.health()
        reply = {
            "id": int(words[1]),
            "pid": self.getpid(),
            "health": [healthy, why],
            "draining": self.view.node.draining,
        }
        if what == "metrics":
            reply["families"] = self.view.families()
        elif what == "status" and self.view.hasMetrics():
            reply["status"] = self.view.status()
        self.transport.write(json.dumps(reply, separators=(",", ":")).encode() + b"\n")

    def lineLengthExceeded(self, line):
        # The parent writes short lines only: drop this one, keep the channel.
        self._buffer = b""
        self.log.warn("control: overlong request ignored")
