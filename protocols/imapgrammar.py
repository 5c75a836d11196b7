"""
The slice of IMAP4rev1 (RFC 3501) grammar casd needs before login: tags, atoms, quoted strings
with escapes, literals (RFC 7888 C{{n}} and C{{n+}}), parenthesised lists and NIL.
"""

from __future__ import annotations

import re

from attrs import frozen

#: A literal announcement at the end of a line: C{{123}} or C{{123+}}.
LITERAL_MARKER = re.compile(rb"\{(\d{1,10})(\+?)\}$")

_ATOM_SPECIALS = frozenset(b'(){ %*"\\]') | frozenset(range(0, 32)) | {127}
_TAG_SPECIALS = _ATOM_SPECIALS | {ord("+")}


class IMAPSyntaxError(ValueError):
    """
    The command does not parse; C{str()} is safe to send to the client.
    """


@frozen
class Literal:
    """
    A literal's contents, as one token.
    """

    value: bytes


NIL = object()
LPAREN = object()
RPAREN = object()


def splitTag(line: bytes) -> tuple[bytes, bytes, bytes]:
    """
    Split C{tag SP command [SP rest]}.

    @return: C{(tag, COMMAND upper-cased, rest)}.
    @raise IMAPSyntaxError: when there is no valid tag or command.
    """
    tag, sep, rest = line.partition(b" ")
    if not tag or any(c in _TAG_SPECIALS for c in tag):
        raise IMAPSyntaxError("Error in IMAP command received by server.")
    if not sep or not rest:
        raise IMAPSyntaxError("Error in IMAP command received by server.")
    command, _, rest = rest.partition(b" ")
    if not command or any(c in _ATOM_SPECIALS for c in command):
        raise IMAPSyntaxError("Error in IMAP command received by server.")
    return tag, command.upper(), rest


def tokenize(text: bytes) -> list:
    """
    Tokenize arguments: atoms and quoted strings become C{bytes}, C{NIL} becomes L{NIL},
    parentheses L{LPAREN}/L{RPAREN}.
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
            i += 1
            out = bytearray()
            while True:
                if i >= n:
                    raise IMAPSyntaxError("Missing '\"'")
                c = text[i]
                if c == 0x5C:
                    if i + 1 >= n or text[i + 1] not in (0x22, 0x5C):
                        raise IMAPSyntaxError("Invalid escape in quoted string")
                    out.append(text[i + 1])
                    i += 2
                elif c == 0x22:
                    i += 1
                    break
                elif c in (0, 0x0A, 0x0D):
                    raise IMAPSyntaxError("Invalid character in quoted string")
                else:
                    out.append(c)
                    i += 1
            tokens.append(bytes(out))
        else:
            start = i
            while i < n and text[i] not in _ATOM_SPECIALS:
                i += 1
            # "]" is allowed in an astring.
            while i < n and text[i] == 0x5D:
                i += 1
                while i < n and text[i] not in _ATOM_SPECIALS:
                    i += 1
            if i == start:
                raise IMAPSyntaxError(f"Unexpected character {chr(c)!r}")
            atom = text[start:i]
            tokens.append(NIL if atom.upper() == b"NIL" else atom)
    return tokens


def tokenizeParts(parts: list) -> list:
    """
    Tokenize a command split at its literals: C{bytes} text pieces and L{Literal}s.
    """
    tokens: list = []
    for part in parts:
        if isinstance(part, Literal):
            tokens.append(part.value)
        else:
            tokens.extend(tokenize(part))
    return tokens


def parseList(tokens: list, maxItems: int = 64) -> list | None:
    """
    Parse C{NIL} or a flat parenthesised list of strings (the ID command's argument).

    @return: the strings (C{None} for NIL items), or C{None} for NIL.
    """
    if tokens == [NIL]:
        return None
    if not tokens or tokens[0] is not LPAREN or tokens[-1] is not RPAREN:
        raise IMAPSyntaxError("Invalid parameters")
    items = tokens[1:-1]
    if len(items) > maxItems or any(t is LPAREN or t is RPAREN for t in items):
        raise IMAPSyntaxError("Invalid parameters")
    return [None if t is NIL else t for t in items]


def quote(value: bytes | str) -> bytes:
    """
    Render a quoted string; values with CR, LF or NUL are refused.
    """
    if isinstance(value, str):
        value = value.encode("utf-8")
    if any(c in value for c in b"\r\n\x00"):
        raise ValueError("cannot quote CR, LF or NUL")
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


_CAPABILITY = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


def capabilitiesIn(line: bytes) -> bytes | None:
    """
    The C{[CAPABILITY ...]} response code of a status line, or C{None}.
    """
    m = _CAPABILITY.search(line)
    return m.group(1) if m else None
