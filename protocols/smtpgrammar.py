# -*- test-case-name: tests.test_smtpgrammar -*-
"""
The slice of SMTP (RFC 5321) grammar casd needs to proxy a mail transaction: command lines,
envelope paths and their ESMTP parameters, replies (one line or many, RFC 3463 enhanced codes),
EHLO keywords, xtext (RFC 3461) for XCLIENT/XFORWARD, and L{DataStream}, the DATA transformer
that makes SMTP smuggling impossible.
"""

from __future__ import annotations

import re

from attrs import frozen

#: Longest local part and domain (RFC 5321 4.5.3.1) and path, in octets.
MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256

#: Most lines and characters of a backend reply passed on to a client.
MAX_REPLY_LINES = 20
MAX_REPLY_TEXT = 400

_VERB = re.compile(rb"^([A-Za-z]{1,16})(?: (.*))?$", re.DOTALL)
_KEYWORD = re.compile(rb"^[A-Za-z0-9][A-Za-z0-9-]*$")
_REPLY = re.compile(rb"^([2-5][0-9][0-9])([ -]|$)(.*)$", re.DOTALL)
_ENHANCED = re.compile(rb"^([245]\.[0-9]{1,3}\.[0-9]{1,3})(?: |$)")
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ATEXT = frozenset(
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~"
)


class SMTPSyntaxError(ValueError):
    """
    A command or path does not parse.

    @ivar reply: the reply to send, e.g. C{501 5.1.7 Bad sender address syntax}.
    """

    def __init__(self, reply: bytes) -> None:
        super().__init__(reply.decode("ascii", "replace"))
        self.reply = reply


def splitCommand(line: bytes) -> tuple[str, bytes]:
    """
    Split C{VERB [SP arguments]}.

    @return: C{(VERB upper-cased, arguments)}; C{("", b"")} when the line holds no verb.
    """
    m = _VERB.match(line.rstrip(b" "))
    if m is None:
        return "", b""
    return m.group(1).decode("ascii").upper(), m.group(2) or b""


# -- envelope paths ----------------------------------------------------------------------------


@frozen
class Mailbox:
    """
    An envelope address as the client wrote it.

    @ivar raw: the mailbox between the angle brackets (a source route dropped), passed on to the
        backend byte for byte; C{b""} for the null reverse-path C{<>}.
    @ivar local: the local part, as text.
    @ivar domain: the domain, lower-cased (an address literal keeps its brackets); C{""} for the
        null path and for C{<Postmaster>}.
    """

    raw: bytes
    local: str
    domain: str

    @property
    def address(self) -> str:
        """
        C{local@domain}, the form looked up in the directory; C{""} for the null path.
        """
        if not self.raw:
            return ""
        return f"{self.local}@{self.domain}" if self.domain else self.local

    def path(self) -> bytes:
        return b"<" + self.raw + b">"


def _splitPath(text: bytes, errorReply: bytes) -> tuple[bytes, bytes]:
    """
    Split C{<path> params}, honouring quoted strings and escapes inside the brackets.
    """
    if not text.startswith(b"<"):
        raise SMTPSyntaxError(errorReply)
    quoted = escaped = False
    for i in range(1, len(text)):
        c = text[i]
        if escaped:
            escaped = False
        elif c == 0x5C and quoted:
            escaped = True
        elif c == 0x22:
            quoted = not quoted
        elif c == 0x3E and not quoted:
            rest = text[i + 1 :]
            if rest and not rest.startswith(b" "):
                raise SMTPSyntaxError(errorReply)
            return text[1:i], rest.strip(b" ")
    raise SMTPSyntaxError(errorReply)


def _checkText(value: bytes, utf8: bool, errorReply: bytes) -> str:
    if any(c < 0x21 and c != 0x20 or c == 0x7F for c in value):
        raise SMTPSyntaxError(errorReply)
    if not utf8 and any(c > 0x7E for c in value):
        # Non-ASCII addresses need SMTPUTF8 (RFC 6531 3.4).
        raise SMTPSyntaxError(b"553 5.6.7 Non-ASCII address requires SMTPUTF8")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise SMTPSyntaxError(errorReply) from None


def _checkLocal(local: bytes, errorReply: bytes) -> None:
    if not local or len(local) > MAX_LOCAL:
        raise SMTPSyntaxError(errorReply)
    if local.startswith(b'"'):
        if len(local) < 2 or not local.endswith(b'"'):
            raise SMTPSyntaxError(errorReply)
        return
    if b" " in local or local.startswith(b".") or local.endswith(b".") or b".." in local:
        raise SMTPSyntaxError(errorReply)
    if any(c not in _ATEXT and c != 0x2E and c < 0x80 for c in local):
        raise SMTPSyntaxError(errorReply)


def _checkDomain(domain: str, errorReply: bytes) -> str:
    if domain.startswith("[") and domain.endswith("]") and len(domain) > 2:
        if any(c.isspace() for c in domain):
            raise SMTPSyntaxError(errorReply)
        return domain.lower()
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise SMTPSyntaxError(errorReply)
    labels = domain.rstrip(".").split(".") if domain else []
    if not labels:
        raise SMTPSyntaxError(errorReply)
    for label in labels:
        if label.isascii():
            if not _LABEL.match(label):
                raise SMTPSyntaxError(errorReply)
        elif not label or label.startswith("-") or any(c in ' @[]"\\' for c in label):
            raise SMTPSyntaxError(errorReply)
    return domain.rstrip(".").lower()


def parseMailbox(raw: bytes, utf8: bool, errorReply: bytes, allowPostmaster: bool) -> Mailbox:
    """
    Validate the mailbox between the angle brackets.

    @param allowPostmaster: accept the domain-less C{Postmaster} (RCPT only, RFC 5321 4.5.1).
    """
    if raw.startswith(b"@"):
        # A source route (RFC 5321 C.): obsolete; the mailbox after the colon is what counts.
        _, sep, raw = raw.partition(b":")
        if not sep:
            raise SMTPSyntaxError(errorReply)
    if len(raw) > MAX_PATH - 2:
        raise SMTPSyntaxError(errorReply)
    text = _checkText(raw, utf8, errorReply)
    if allowPostmaster and text.lower() == "postmaster":
        return Mailbox(raw, text, "")
    local, sep, domain = raw.rpartition(b"@")
    if not sep:
        raise SMTPSyntaxError(errorReply)
    _checkLocal(local, errorReply)
    return Mailbox(raw, local.decode("utf-8"), _checkDomain(domain.decode("utf-8"), errorReply))


def parseParameters(text: bytes, errorReply: bytes) -> tuple[tuple[str, bytes | None], ...]:
    """
    Parse ESMTP parameters C{KEY[=VALUE] ...}.

    @return: C{(KEY upper-cased, value or None)} pairs in the client's order.
    """
    params = []
    for word in text.split(b" "):
        if not word:
            continue
        key, sep, value = word.partition(b"=")
        if not _KEYWORD.match(key) or (
            sep and (not value or any(c < 0x21 or c == 0x3D or c == 0x7F for c in value))
        ):
            raise SMTPSyntaxError(errorReply)
        params.append((key.decode("ascii").upper(), value if sep else None))
    return tuple(params)


def parsePathArgument(
    args: bytes, keyword: bytes, utf8: bool, nullAllowed: bool, errorReply: bytes
) -> tuple[Mailbox, tuple]:
    """
    Parse the arguments of C{MAIL FROM:<path> params} or C{RCPT TO:<path> params}.

    @param keyword: C{b"FROM:"} or C{b"TO:"}.
    @param utf8: whether non-ASCII is allowed in the path (SMTPUTF8 was given).
    @return: C{(Mailbox, parameters)}.
    @raise SMTPSyntaxError: with the reply to send.
    """
    if args[: len(keyword)].upper() != keyword:
        raise SMTPSyntaxError(
            b"501 5.5.4 Syntax: "
            + (b"MAIL FROM:<address>" if nullAllowed else b"RCPT TO:<address>")
        )
    # Many clients put a space after the colon; RFC 5321 does not, Postfix and Exchange accept it.
    raw, rest = _splitPath(args[len(keyword) :].lstrip(b" "), errorReply)
    params = parseParameters(rest, b"501 5.5.4 Bad parameter syntax")
    if not raw:
        if not nullAllowed:
            raise SMTPSyntaxError(errorReply)
        return Mailbox(b"", "", ""), params
    return parseMailbox(raw, utf8, errorReply, allowPostmaster=not nullAllowed), params


def renderParameters(params) -> bytes:
    return b"".join(
        b" " + key.encode("ascii") + (b"=" + value if value is not None else b"")
        for key, value in params
    )


def validHeloName(name: bytes) -> bool:
    """
    Whether an EHLO/HELO argument is one printable word (a name or an address literal); its
    truth is the backend's policy to judge, its syntax is ours.
    """
    return 0 < len(name) <= MAX_DOMAIN and all(0x21 <= c <= 0x7E for c in name)


# -- replies -----------------------------------------------------------------------------------


class ReplySyntaxError(ValueError):
    """
    A backend sent something that is not an SMTP reply.
    """


@frozen
class Reply:
    """
    An SMTP reply: one code, one or more lines of text.
    """

    code: int
    lines: tuple[bytes, ...]

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600

    @property
    def text(self) -> bytes:
        return b" ".join(self.lines)

    def render(self) -> bytes:
        """
        The reply in wire form, every line but the last continued with C{-}.
        """
        code = b"%03d" % self.code
        lines = self.lines or (b"",)
        out = [code + b"-" + line + b"\r\n" for line in lines[:-1]]
        out.append(code + (b" " + lines[-1] if lines[-1] else b"") + b"\r\n")
        return b"".join(out)

    def sanitised(self) -> Reply:
        """
        The reply safe to pass on to a client: printable ASCII, bounded in size.
        """
        lines = []
        for line in self.lines[:MAX_REPLY_LINES]:
            clean = bytes(c if 0x20 <= c <= 0x7E else 0x3F for c in line[:MAX_REPLY_TEXT])
            lines.append(clean)
        return Reply(self.code, tuple(lines))


def reply(code: int, text: bytes) -> Reply:
    return Reply(code, (text,))


class ReplyParser:
    """
    Assembles reply lines (without their line endings) into L{Reply} values.
    """

    def __init__(self) -> None:
        self._code: bytes | None = None
        self._lines: list[bytes] = []

    def feed(self, line: bytes) -> Reply | None:
        """
        @return: the complete L{Reply} after its last line, else C{None}.
        @raise ReplySyntaxError: on a line that is not part of a reply.
        """
        m = _REPLY.match(line)
        if m is None:
            raise ReplySyntaxError(f"not an SMTP reply: {line[:80]!r}")
        code, sep, text = m.groups()
        if self._code is not None and code != self._code:
            raise ReplySyntaxError("reply code changed inside a multi-line reply")
        self._code = code
        self._lines.append(text)
        if len(self._lines) > 1000:
            raise ReplySyntaxError("reply too long")
        if sep == b"-":
            return None
        done = Reply(int(code), tuple(self._lines))
        self._code, self._lines = None, []
        return done


def enhancedCode(r: Reply) -> bytes:
    """
    The RFC 3463 code at the start of a reply's text, or C{b""}.
    """
    m = _ENHANCED.match(r.lines[0]) if r.lines else None
    return m.group(1) if m else b""


def ehloKeywords(r: Reply) -> dict[str, tuple[bytes, ...]]:
    """
    The extensions an EHLO reply advertises: KEYWORD -> its parameters.  The first line is the
    server's name, not an extension.
    """
    found = {}
    for line in r.lines[1:]:
        words = line.split()
        if words and _KEYWORD.match(words[0]):
            found[words[0].decode("ascii").upper()] = tuple(words[1:])
    return found


def xtext(value: str | bytes) -> bytes:
    """
    Encode a value as xtext (RFC 3461 4): C{+XX} for C{+}, C{=}, controls, space and non-ASCII.
    """
    if isinstance(value, str):
        value = value.encode("utf-8")
    return b"".join(
        bytes((c,)) if 0x21 <= c <= 0x7E and c not in (0x2B, 0x3D) else b"+%02X" % c for c in value
    )


# -- DATA ----------------------------------------------------------------------------------------

#: A bare CR or LF, and the dot after it: the new line break brings it to the start of a line.
_BARE = re.compile(rb"(\r(?!\n)|(?<!\r)\n)(\.?)")
_END = b"\r\n.\r\n"
#: Bytes held back at the end of a chunk: a possible beginning of the end marker.
_HOLD = len(_END) - 1
#: Bytes kept before the unconverted rest: what looking back from a bare line break needs.
_CONTEXT = 3


class DataStream:
    """
    The client's DATA, streamed: finds the one true end (C{<CRLF>.<CRLF>}, RFC 5321 4.1.1.4) and
    makes what goes to the backend unambiguous, so that no reading of line endings a backend may
    have can see a second message in it (SMTP smuggling).

    Lines the client ended with CRLF pass byte for byte, its dot-stuffing included.  A bare CR or
    LF either becomes CRLF (C{normalise}), or marks the message for refusal (C{reject}: the caller
    stops forwarding).  Normalising, a dot that the new line break brings to the start of a line
    is stuffed, and a line that held only the client's stuffing dot before a bare line break
    loses it, as the client's own unstuffing would have had it; so the backend only ever sees
    CRLF line endings and a single C{.} line: the one casd writes.

    Memory is bounded: a few bytes are held back between chunks, never a line.  Data without bare
    line breaks costs two C{bytes.find} and four C{bytes.count} per chunk.

    @ivar size: bytes of message data seen, as sent (dot-stuffing included).
    @ivar bare: whether a bare CR or LF was seen.
    """

    def __init__(self, normalise: bool = True) -> None:
        self.normalise = normalise
        self.size = 0
        self.bare = False
        # A virtual CRLF before the first byte: the first line starts a line like any other, and
        # an empty message ends with ".\r\n" alone.
        self._pending = b"\r\n"
        self._start = 0
        self._skip = 2

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        """
        @return: C{(bytes for the backend, rest)}: C{rest} is C{None} while the data goes on;
            once the end is found it is what followed the end (the next commands), and the bytes
            for the backend end with the final C{.} line.
        """
        buf = self._pending + data
        start = self._start
        end = buf.find(_END, start)
        if end >= 0:
            limit = end + 2
        else:
            limit = len(buf) - _HOLD
            if buf[limit - 3 : limit] == b"\r\n.":
                # A dot alone at the start of a line: what follows decides what it is.
                limit -= 1
            if limit <= start + self._skip:
                self._pending = buf
                return b"", None
        out, stop = self._convert(buf, start, limit)
        if self._skip:
            out, self._skip = out[self._skip :], 0
        if end >= 0:
            self._pending, self._start = b"", 0
            return out + b".\r\n", buf[end + 5 :]
        keep = min(stop, _CONTEXT)
        self._pending, self._start = buf[stop - keep :], keep
        return out, None

    def _convert(self, buf: bytes, start: int, limit: int) -> tuple[bytes, int]:
        """
        Convert C{buf[start:limit]}, looking at the bytes around it where a line break needs
        them; a dot after a bare line break just before C{limit} moves the stop past it.

        @return: C{(converted bytes, where the conversion stopped)}.
        """
        self.size += limit - start - self._skip
        # Every LF in the window must end a CRLF and every CR begin one, or there is a bare one.
        pairsBefore = buf.count(b"\r\n", max(start - 1, 0), limit)
        pairsAfter = buf.count(b"\r\n", start, limit + 1)
        if (
            buf.count(b"\n", start, limit) == pairsBefore
            and buf.count(b"\r", start, limit) == pairsAfter
        ):
            return buf[start:limit], limit
        self.bare = True
        if not self.normalise:
            return buf[start:limit], limit
        pieces = []
        pos = start
        for m in _BARE.finditer(buf, start):
            i = m.start()
            if i >= limit:
                break
            if i >= 3 and buf[i - 3 : i] == b"\r\n.":
                # The line held only the client's stuffing dot: it goes with the unstuffing.
                pieces.append(buf[pos : i - 1])
            else:
                pieces.append(buf[pos:i])
            pieces.append(b"\r\n.." if m.group(2) else b"\r\n")
            pos = m.end()
        stop = max(pos, limit)
        self.size += stop - limit
        pieces.append(buf[pos:stop])
        return b"".join(pieces), stop
