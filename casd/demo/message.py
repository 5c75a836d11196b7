# -*- test-case-name: tests.test_demo -*-
"""
The DEMO store's messages (L{casd.demo.store}): one stored message and its MIME parts, as
C{twisted.mail.imap4} asks for them.
"""

from __future__ import annotations

import email.message
import email.utils
import re
from datetime import datetime
from email.header import Header
from io import BytesIO
from typing import Iterable

from zope.interface import implementer

from twisted.mail import imap4

_SYSTEM_FLAGS = {f.lower(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")}
_RECENT = "\\Recent"


def _normalizeFlag(flag: str | bytes) -> str:
    if isinstance(flag, bytes):
        flag = flag.decode("ascii", "replace")
    return _SYSTEM_FLAGS.get(flag.lower(), flag)


def _normalizeNewlines(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


def _parseDate(date: str | bytes | None, now: float) -> float:
    """
    Parse an IMAP date-time (C{22-Nov-2025 05:48:00 +0000}, from APPEND) or an RFC 5322 date (from
    COPY, which passes the source's internal date); fall back to C{now}.
    """
    if not date:
        return now
    if isinstance(date, bytes):
        date = date.decode("ascii", "replace")
    date = date.strip()
    try:
        return datetime.strptime(date, "%d-%b-%Y %H:%M:%S %z").timestamp()
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError, IndexError):
        return now


def _asciiHeaderValue(raw: bytes) -> str:
    """
    An unfolded header value as ASCII text (what C{twisted.mail.imap4} can put on the wire):
    raw 8-bit values are re-encoded as RFC 2047 encoded words.
    """
    value = re.sub(rb"\r\n(?=[ \t])", b"", raw).strip()
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        text = value.decode("utf-8", "replace")
        return Header(text, "utf-8").encode(maxlinelen=0)


class _Part:
    """
    One MIME entity of a stored message, over its exact bytes (CRLF line endings): what
    C{twisted.mail.imap4} calls an C{IMessagePart}.
    """

    def __init__(self, raw: bytes):
        self.raw = raw
        if raw.startswith(b"\r\n"):
            headerBlock, self._body = b"", raw[2:]
        else:
            headerBlock, sep, body = raw.partition(b"\r\n\r\n")
            self._body = body if sep else b""
        self._headers: list[tuple[str, str]] = []
        for field in re.split(rb"\r\n(?![ \t])", headerBlock):
            name, sep, value = field.partition(b":")
            if sep and name.strip():
                self._headers.append(
                    (name.strip().decode("ascii", "replace").lower(), _asciiHeaderValue(value))
                )
        self._parts: list[_Part] | None = None

    def _header(self, name: str) -> str | None:
        for key, value in self._headers:
            if key == name:
                return value
        return None

    def _contentType(self) -> email.message.Message:
        m = email.message.Message()
        m["content-type"] = self._header("content-type") or "text/plain"
        return m

    def _subparts(self) -> list[_Part]:
        if self._parts is None:
            self._parts = []
            ct = self._contentType()
            boundary = ct.get_boundary()
            if ct.get_content_maintype() == "multipart" and boundary:
                delimiter = re.compile(
                    rb"(?:^|\r\n)--" + re.escape(boundary.encode("ascii", "replace")) + rb"(--)?[ \t]*(?:\r\n|$)"
                )
                marks = list(delimiter.finditer(self._body))
                for start, end in zip(marks, marks[1:]):
                    if start.group(1):
                        break
                    self._parts.append(_Part(self._body[start.end() : end.start()]))
        return self._parts

    # IMessagePart

    def getHeaders(self, negate, *names):
        wanted = {(n.decode("ascii", "replace") if isinstance(n, bytes) else n).lower() for n in names}
        headers: dict[str, str] = {}
        for key, value in self._headers:
            if (key in wanted) != bool(negate) and key not in headers:
                headers[key] = value
        return headers

    def getBodyFile(self):
        return BytesIO(self._body)

    def getSize(self):
        return len(self.raw)

    def isMultipart(self):
        return bool(self._subparts())

    def getSubPart(self, part):
        if self.isMultipart():
            return self._subparts()[part]
        ct = self._contentType()
        if ct.get_content_type() == "message/rfc822":
            if part != 0:
                raise IndexError(part)
            return _Part(self._body)
        raise TypeError("not a multipart message")


@implementer(imap4.IMessage, imap4.IMessageFile)
class DemoMessage(_Part):
    """
    A stored message: its bytes, UID, flags and internal date.
    """

    def __init__(self, raw: bytes, uid: int, flags: Iterable[str], internalDate: float):
        super().__init__(raw)
        self.uid = uid
        self.flags: list[str] = []
        for flag in flags:
            flag = _normalizeFlag(flag)
            if flag != _RECENT and flag not in self.flags:
                self.flags.append(flag)
        self.recent = True
        self.internalDate = internalDate

    def getUID(self):
        return self.uid

    def getFlags(self):
        return self.flags + ([_RECENT] if self.recent else [])

    def getInternalDate(self):
        return email.utils.formatdate(self.internalDate, usegmt=True)

    def open(self):
        return BytesIO(self.raw)

    def setFlags(self, flags: Iterable[str], mode: int) -> None:
        """
        Add (C{mode} 1), remove (-1) or replace (0) flags; C{\\Recent} cannot be set by a client.
        """
        flags = [f for f in (_normalizeFlag(f) for f in flags) if f != _RECENT]
        if mode == 0:
            self.flags = []
        for flag in flags:
            if mode >= 0 and flag not in self.flags:
                self.flags.append(flag)
            elif mode < 0 and flag in self.flags:
                self.flags.remove(flag)
