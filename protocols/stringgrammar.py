# -*- test-case-name: tests.test_imap,tests.test_managesieve -*-
"""
The string grammar that IMAP (RFC 3501) and ManageSieve (RFC 5804) share: atoms, quoted strings
with backslash escapes, literals (C{{n}} and the non-synchronising C{{n+}} of RFC 7888), and the
framing of one command that arrives as several lines and literals.

ManageSieve took its strings from IMAP, so one tokenizer and one literal reader serve both; each
protocol adds its own words on top (IMAP's tags and C{NIL}, ManageSieve's response codes).
"""

from __future__ import annotations

import re

from attrs import frozen

#: A literal announcement at the end of a line: C{{123}} or C{{123+}}.  At most ten digits, so a
#: hostile length is a syntax error rather than an allocation.
LITERAL_MARKER = re.compile(rb"\{(\d{1,10})(\+?)\}$")

ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0, 32)) | {127}


class GrammarError(ValueError):
    """
    The command does not parse; C{str()} is safe to send to the client.
    """


@frozen
class Literal:
    """
    A literal's contents, as one token.
    """

    value: bytes


class Atom(bytes):
    """
    An unquoted token.  It is C{bytes}, so code that accepts "an atom or a string" need not care;
    code that requires a string (ManageSieve's arguments) can tell them apart.
    """


LPAREN = object()
RPAREN = object()


def _quoted(text: bytes, i: int) -> tuple[bytes, int]:
    """
    Read a quoted string whose opening quote is at C{text[i - 1]}.

    @return: the unescaped value and the index after the closing quote.
    """
    n = len(text)
    out = bytearray()
    while True:
        if i >= n:
            raise GrammarError("Missing '\"'")
        c = text[i]
        if c == 0x5C:
            if i + 1 >= n or text[i + 1] not in (0x22, 0x5C):
                raise GrammarError("Invalid escape in quoted string")
            out.append(text[i + 1])
            i += 2
        elif c == 0x22:
            return bytes(out), i + 1
        elif c in (0, 0x0A, 0x0D):
            raise GrammarError("Invalid character in quoted string")
        else:
            out.append(c)
            i += 1


def tokenize(text: bytes) -> list:
    """
    Tokenize arguments: atoms become L{Atom}, quoted strings plain C{bytes}, parentheses
    L{LPAREN}/L{RPAREN}.

    @raise GrammarError: on an unterminated string, a bad escape or a stray special.
    """
    tokens: list = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == 0x20:
            i += 1
        elif c == 0x28:
            tokens.append(LPAREN)
            i += 1
        elif c == 0x29:
            tokens.append(RPAREN)
            i += 1
        elif c == 0x22:
            value, i = _quoted(text, i + 1)
            tokens.append(value)
        else:
            start = i
            while i < n and text[i] not in ATOM_SPECIALS:
                i += 1
            # "]" is allowed in an IMAP astring (and harmless in a ManageSieve atom).
            while i < n and text[i] == 0x5D:
                i += 1
                while i < n and text[i] not in ATOM_SPECIALS:
                    i += 1
            if i == start:
                raise GrammarError(f"Unexpected character {chr(c)!r}")
            tokens.append(Atom(text[start:i]))
    return tokens


def tokenizeParts(parts: list) -> list:
    """
    Tokenize a command split at its literals: C{bytes} text pieces and L{Literal}s.  A literal
    becomes a plain C{bytes} token, like a quoted string.
    """
    tokens: list = []
    for part in parts:
        if isinstance(part, Literal):
            tokens.append(part.value)
        else:
            tokens.extend(tokenize(part))
    return tokens


def quote(value: bytes | str) -> bytes:
    """
    Render a quoted string; values with CR, LF or NUL are refused (they need a literal).
    """
    if isinstance(value, str):
        value = value.encode("utf-8")
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        raise ValueError("cannot quote CR, LF or NUL")
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class LiteralFraming:
    """
    A mixin for a L{casd.session.frontend.FrontendProtocol} whose commands may carry literals: it
    collects one command across its lines and literals (read whole in raw mode), enforces the
    size and count limits, and hands the command to L{commandReceived} as a list of C{bytes} text
    pieces and L{Literal}s, ready for L{tokenizeParts}.

    The protocol's C{lineReceived} calls L{collectLine} for each line that belongs to a command.

    @ivar maxLiteral: the largest literal accepted, in bytes.
    @ivar maxLiterals: the most literals one command may carry.
    """

    maxLiteral = 8192
    maxLiterals = 8

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._parts: list = []
        self._literals = 0

    # -- hooks ------------------------------------------------------------------------------

    def commandReceived(self, parts: list) -> None:
        """
        A whole command arrived.
        """
        raise NotImplementedError()

    def literalContinue(self) -> None:
        """
        A synchronising literal C{{n}} was announced: tell the client to send it (IMAP's
        C{+ OK}).  By default nothing is sent (ManageSieve has no continuation).
        """

    def literalTooLarge(self, nonSync: bool) -> None:
        """
        A literal exceeded L{maxLiteral}, or a command announced more than L{maxLiterals}.  The
        partial command is already discarded.  When C{nonSync} is true the client is sending the
        data regardless, so the protocol should close the connection.
        """
        raise NotImplementedError()

    # -- framing ----------------------------------------------------------------------------

    @property
    def inCommand(self) -> bool:
        """
        Whether part of a command (a line ending in a literal announcement) was received.
        """
        return bool(self._parts)

    def resetCommand(self) -> None:
        """
        Forget a partly received command.
        """
        self._parts, self._literals = [], 0

    def collectLine(self, line: bytes) -> None:
        """
        Take one line of a command: dispatch the command when the line ends it, or prepare to
        read the literal the line announces.
        """
        m = LITERAL_MARKER.search(line)
        if m is None:
            self._parts.append(line)
            parts = self._parts
            self.resetCommand()
            self.commandReceived(parts)
            return
        size, nonSync = int(m.group(1)), bool(m.group(2))
        self._literals += 1
        if size > self.maxLiteral or self._literals > self.maxLiterals:
            self.resetCommand()
            self.literalTooLarge(nonSync)
            return
        self._parts.append(line[: m.start()])
        if size == 0:
            self._parts.append(Literal(b""))
            return
        if not nonSync:
            self.literalContinue()
        self.setRawMode(size)

    def rawReceived(self, data: bytes) -> None:
        self._parts.append(Literal(data))
