# -*- test-case-name: tests.test_imap,tests.test_imapgrammar,tests.test_fuzz -*-
"""
The slice of IMAP4rev1 (RFC 3501) grammar casd needs before login: tags, C{NIL} and
parenthesised lists, on top of the string grammar IMAP shares with ManageSieve (atoms, quoted
strings, literals: L{protocols.stringgrammar}).
"""

from __future__ import annotations

import re

from protocols.stringgrammar import ATOM_SPECIALS as _ATOM_SPECIALS
from protocols.stringgrammar import LPAREN, RPAREN, Atom, GrammarError

_TAG_SPECIALS = _ATOM_SPECIALS | {ord("+")}


def _charClass(specials) -> bytes:
    return b"[^" + b"".join(re.escape(bytes([c])) for c in sorted(specials)) + b"]"


#: A tag, or a command name: one byte of a special makes it invalid.
_BAD_TAG = re.compile(_charClass(_TAG_SPECIALS).replace(b"[^", b"[", 1))
_BAD_COMMAND = re.compile(_charClass(_ATOM_SPECIALS).replace(b"[^", b"[", 1) + b"|[^\x00-\x7f]")

#: The common commands of a login (C{a LOGIN user pass}, C{a CAPABILITY}, C{a AUTHENTICATE
#: PLAIN ...}): a tag, a command of letters, then arguments that are plain atoms (no C{]}) or
#: quoted strings without escapes, each after one space.  Anything else takes the full grammar.
_SIMPLE_ATOM = _charClass(_ATOM_SPECIALS)
_SIMPLE_COMMAND = re.compile(
    b"(" + _charClass(_TAG_SPECIALS) + b"+) ([A-Za-z]+)((?: (?:"
    + _SIMPLE_ATOM + b'+|"[^"\\\\\x00\r\n]*"))*)'
)
_SIMPLE_ARGUMENT = re.compile(b" (?:(" + _SIMPLE_ATOM + b'+)|"([^"\\\\\x00\r\n]*)")')


def simpleCommand(line: bytes) -> tuple[bytes, bytes, list] | None:
    """
    Parse a command line of the simple kind most logins send, without the full grammar.

    @return: C{(tag, COMMAND upper-cased, arguments)} exactly as L{splitTag} and
        L{protocols.stringgrammar.tokenize} would give them (atoms as L{Atom}, quoted strings as
        C{bytes}), or C{None} when the line is not that simple (it may still be valid: parse it
        with the full grammar).
    """
    m = _SIMPLE_COMMAND.fullmatch(line)
    if m is None:
        return None
    tag, command, rest = m.groups()
    args = [Atom(atom) if atom else quoted for atom, quoted in _SIMPLE_ARGUMENT.findall(rest)] if rest else []
    return tag, command.upper(), args

#: The command does not parse; C{str()} is safe to send to the client.
IMAPSyntaxError = GrammarError


def splitTag(line: bytes) -> tuple[bytes, bytes, bytes]:
    """
    Split C{tag SP command [SP rest]}.

    @return: C{(tag, COMMAND upper-cased, rest)}.
    @raise IMAPSyntaxError: when there is no valid tag or command.
    """
    tag, sep, rest = line.partition(b" ")
    if not tag or _BAD_TAG.search(tag) is not None:
        raise IMAPSyntaxError("Error in IMAP command received by server.")
    if not sep or not rest:
        raise IMAPSyntaxError("Error in IMAP command received by server.")
    command, _, rest = rest.partition(b" ")
    # An atom is 7-bit (RFC 3501 ATOM-CHAR): a command holding other bytes is no command.
    if not command or _BAD_COMMAND.search(command) is not None:
        raise IMAPSyntaxError("Error in IMAP command received by server.")
    return tag, command.upper(), rest


def parseList(tokens: list, maxItems: int = 64) -> list | None:
    """
    Parse C{NIL} or a flat parenthesised list of strings (the ID command's argument), from
    L{protocols.stringgrammar.tokenizeParts}' tokens.

    @return: the strings (C{None} for NIL items), or C{None} for NIL.
    """
    if len(tokens) == 1 and _isNIL(tokens[0]):
        return None
    if not tokens or tokens[0] is not LPAREN or tokens[-1] is not RPAREN:
        raise IMAPSyntaxError("Invalid parameters")
    items = tokens[1:-1]
    if len(items) > maxItems or any(t is LPAREN or t is RPAREN for t in items):
        raise IMAPSyntaxError("Invalid parameters")
    return [None if _isNIL(t) else t for t in items]


def _isNIL(token) -> bool:
    return isinstance(token, Atom) and token.upper() == b"NIL"


_CAPABILITY = re.compile(rb"\[CAPABILITY ([^\]]*)\]", re.IGNORECASE)


def capabilitiesIn(line: bytes) -> bytes | None:
    """
    The C{[CAPABILITY ...]} response code of a status line, or C{None}.
    """
    m = _CAPABILITY.search(line)
    return m.group(1) if m else None
