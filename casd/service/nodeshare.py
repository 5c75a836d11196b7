# -*- test-case-name: tests.test_nodeshare -*-
"""
What the workers of one node (C{twistd cas --workers N}) share through their parent: the node
secret (L{casd.nodesecret}), read from the pipe the parent gave (L{installNodeSecret}), and the
forms logoffs.

The logoffs are relayed when C{[state]} is not shared (Redis shares them already): a worker that records a logoff tells its parent, which tells
every other worker, and every worker it starts later.

Only a token's ID and the time its entry may be forgotten travel, never a cookie:
  - worker -> parent: a record on the worker's standard output, beside its log records:
    L{REVOKE_RECORD}, then C{revoke <token ID in hex> <expiry>};
  - parent -> worker: the word C{revoke <token ID in hex> <expiry>} on the worker's standard
    input, beside C{stop} and C{reopen-log} (hexadecimal digits can spell neither).
Bad input is ignored, and no line or buffer grows past L{MAX_LINE}.
"""

from __future__ import annotations

import binascii
import weakref
from collections import OrderedDict

from twisted.logger import Logger
from zope.interface import implementer

from casd import nodesecret
from casd.interfaces import IRevocationSet

#: The first character of a worker's revocation record on its standard output (log records start
#: with C{\\x1e} or C{\\x1f}).
REVOKE_RECORD = "\x1d"
_WORD = b"revoke "
#: The longest token ID relayed, in bytes (casd's are 22).
MAX_TOKEN = 64
#: The longest line either side accepts.
MAX_LINE = len(_WORD) + 2 * MAX_TOKEN + 1 + 20
#: Expiry times accepted: after 2001, before 2^40 (POSIX seconds).
_EXPIRY_RANGE = (10**9, 2**40)
#: Live revocations the parent keeps for the workers it starts later.
MAX_ENTRIES = 100_000

log = Logger()


def revocationLine(tokenId: str, expiresAt: float) -> bytes | None:
    """
    @return: the word telling a revocation (C{revoke <hex> <expiry>\\n}), or L{None} when
        C{tokenId} or C{expiresAt} is not one that can travel.
    """
    try:
        raw = tokenId.encode("utf-8")
        expiry = int(expiresAt)
    except (AttributeError, UnicodeEncodeError, ValueError, TypeError, OverflowError):
        return None
    if not 0 < len(raw) <= MAX_TOKEN or not _EXPIRY_RANGE[0] <= expiry < _EXPIRY_RANGE[1]:
        return None
    return _WORD + raw.hex().encode("ascii") + b" %d\n" % (expiry,)


def parseRevocation(line: bytes) -> tuple[str, int] | None:
    """
    @param line: one line, with or without its line feed.
    @return: C{(tokenId, expiresAt)}, or L{None} when C{line} is not a well-formed revocation.
    """
    if len(line) > MAX_LINE or not line.startswith(_WORD):
        return None
    fields = line[len(_WORD) :].rstrip(b"\n").split(b" ")
    if len(fields) != 2 or not fields[1].isdigit() or len(fields[0]) % 2:
        return None
    try:
        tokenId = binascii.unhexlify(fields[0]).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    expiry = int(fields[1])
    if not 0 < len(fields[0]) <= 2 * MAX_TOKEN or not _EXPIRY_RANGE[0] <= expiry < _EXPIRY_RANGE[1]:
        return None
    return tokenId, expiry


class _Lines:
    """
    Splits a byte stream into lines of at most L{MAX_LINE} bytes; a longer one is skipped whole.
    """

    def __init__(self) -> None:
        self._buffer = b""
        self._skipping = False

    def feed(self, data: bytes) -> list[bytes]:
        *lines, rest = (self._buffer + data).split(b"\n")
        if self._skipping and lines:
            lines.pop(0)
            self._skipping = False
        if len(rest) > MAX_LINE:
            rest, self._skipping = b"", True
        self._buffer = rest
        return lines


class WorkerRevocations:
    """
    A worker's side of the relay: sends its logoffs to the parent, applies the others'.

    @ivar receivers: the L{RelayedRevocationSet}s of this process.
    """

    def __init__(self, out) -> None:
        """
        @param out: the worker's standard output (text), where its parent reads its records.
        """
        self.out = out
        self.receivers = weakref.WeakSet()
        self._lines = _Lines()

    def send(self, tokenId: str, expiresAt: float) -> None:
        line = revocationLine(tokenId, expiresAt)
        if line is None:
            return
        try:
            self.out.write(REVOKE_RECORD + line.decode("ascii"))
            self.out.flush()
        except (OSError, ValueError):
            log.warn("a forms logoff could not be told to the other workers (parent gone)")

    def wordsReceived(self, data: bytes) -> None:
        """
        @param data: what the parent wrote on the worker's standard input (other words too).
        """
        for line in self._lines.feed(data):
            parsed = parseRevocation(line)
            if parsed is None:
                continue
            for receiver in list(self.receivers):
                receiver.local.add(*parsed).addErrback(
                    lambda f: log.failure("recording another worker's forms logoff failed", f)
                )


@implementer(IRevocationSet)
class RelayedRevocationSet:
    """
    This worker's revocation set, whose additions reach every worker of the node.

    @ivar local: the process's own L{IRevocationSet}, which answers.
    """

    def __init__(self, local, relay: WorkerRevocations) -> None:
        self.local = local
        self.relay = relay
        relay.receivers.add(self)

    def add(self, tokenId, expiresAt):
        d = self.local.add(tokenId, expiresAt)
        self.relay.send(tokenId, expiresAt)
        return d

    def contains(self, tokenId):
        return self.local.contains(tokenId)


class ParentRevocations:
    """
    The parent's side: checks what a worker sent, and keeps the live revocations for the
    workers it starts later (at most L{MAX_ENTRIES}, the oldest dropped first).
    """

    def __init__(self, clock, maxEntries: int = MAX_ENTRIES) -> None:
        self.clock = clock
        self.maxEntries = maxEntries
        self._entries: OrderedDict[str, int] = OrderedDict()
        self._sweepAt = 64

    def recordReceived(self, payload: bytes) -> bytes | None:
        """
        @param payload: a worker's record, without its L{REVOKE_RECORD}.
        @return: the word to write to the other workers, or L{None} (bad input, ignored).
        """
        parsed = parseRevocation(payload)
        if parsed is None:
            return None
        tokenId, expiry = parsed
        if expiry <= self.clock.seconds():
            return None
        self._entries[tokenId] = max(expiry, self._entries.pop(tokenId, 0))
        if len(self._entries) > self.maxEntries:
            self._entries.popitem(last=False)
        if len(self._entries) >= self._sweepAt:
            now = self.clock.seconds()
            self._entries = OrderedDict((t, e) for t, e in self._entries.items() if e > now)
            self._sweepAt = max(64, 2 * len(self._entries))
        return revocationLine(tokenId, expiry)

    def live(self) -> bytes:
        """
        @return: the words of every revocation not yet expired (for a worker that starts).
        """
        now = self.clock.seconds()
        return b"".join(revocationLine(t, e) for t, e in self._entries.items() if e > now)

    def __len__(self) -> int:
        return len(self._entries)


def nodeWords(data: bytes) -> None:
    """
    Hand what the parent wrote to this worker's revocation relay.
    """
    relay = nodesecret.revocationRelay()
    if relay is not None:
        relay.wordsReceived(data)


def installNodeSecret(fd: int, out) -> None:
    """
    Read the node secret from the pipe C{fd} the parent gave, and install it with the revocation
    relay over C{out} (L{casd.nodesecret}), before the service tree is built.
    """
    try:
        secret = nodesecret.readSecretPipe(fd)
    except nodesecret.NodeSecretError as e:
        raise SystemExit(f"casd worker: {e}") from None
    nodesecret.install(secret, WorkerRevocations(out))
