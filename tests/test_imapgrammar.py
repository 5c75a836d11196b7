"""
The IMAP command grammar's fast path (L{protocols.imapgrammar.simpleCommand}) against the full
grammar (L{protocols.imapgrammar.splitTag} and L{protocols.stringgrammar.tokenize}).
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from protocols.imapgrammar import IMAPSyntaxError, simpleCommand, splitTag
from protocols.stringgrammar import LITERAL_MARKER, GrammarError, tokenize

STABLE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=600,
    suppress_health_check=[HealthCheck.too_slow],
)

#: Pieces of command lines, the tricky bytes among them.
PIECES = [
    b"a", b"A1", b"LOGIN", b"login", b"CAPABILITY", b"AUTHENTICATE", b"PLAIN", b" ", b"  ",
    b'"', b'\\', b'\\"', b"{5}", b"{0+}", b"]", b"[", b"(", b")", b"NIL", b"x", b"\xc3\xa9",
    b"+", b"*", b"%", b"\t", b"\r", b"\n", b"\x00", b"\x7f", b"=", b"@", b"-",
]


def fullGrammar(line: bytes):
    """
    What the full grammar makes of C{line}: C{(tag, COMMAND, tokens)}, or C{None} when it
    refuses it.
    """
    try:
        tag, command, rest = splitTag(line)
        return tag, command, tokenize(rest)
    except (IMAPSyntaxError, GrammarError):
        return None


class SimpleCommandTests(SynchronousTestCase):
    def test_commonLines(self):
        """
        The lines of a usual login take the fast path, with the full grammar's result.
        """
        for line in [
            b"a LOGIN alice secret",
            b'a2 login "alice@example.com" "pass word"',
            b"1 CAPABILITY",
            b"x AUTHENTICATE PLAIN AGFsaWNlAHNlY3JldA==",
            b'a LOGIN alice ""',
            b"a LOGIN \xc3\xa9l\xc3\xa8ve secret",
        ]:
            self.assertIsNotNone(simpleCommand(line), line)
            self.assertEqual(simpleCommand(line), fullGrammar(line), line)

    def test_atomsAndStringsKeptApart(self):
        tag, command, args = simpleCommand(b'a LOGIN alice "secret"')
        self.assertEqual((tag, command, args), (b"a", b"LOGIN", [b"alice", b"secret"]))
        self.assertEqual([type(a).__name__ for a in args], ["Atom", "bytes"])

    def test_othersTakeTheGrammar(self):
        """
        Literals, escapes, lists, C{]}, repeated spaces and invalid lines are not simple.
        """
        for line in [
            b"a LOGIN alice {6}",
            b"a LOGIN alice {6+}",
            b'a LOGIN "al\\"ice" secret',
            b'a ID ("name" "x")',
            b"a LOGIN x]y z",
            b"a LOGIN  alice secret",
            b"a LOGIN alice secret ",
            b"a+ LOGIN alice secret",
            b"a",
            b"",
            b"a LOG1N alice secret",
        ]:
            self.assertIsNone(simpleCommand(line), line)

    @STABLE
    @given(st.lists(st.sampled_from(PIECES), max_size=12).map(b"".join))
    def test_sameAsFullGrammar(self, line):
        """
        Whatever the fast path accepts, the full grammar reads the same way, and it announces
        no literal.
        """
        simple = simpleCommand(line)
        if simple is not None:
            self.assertEqual(simple, fullGrammar(line))
            self.assertEqual([type(a) for a in simple[2]], [type(a) for a in fullGrammar(line)[2]])
            self.assertIsNone(LITERAL_MARKER.search(line))

    @STABLE
    @given(
        st.tuples(
            st.sampled_from([b"a", b"A001", b"\xc3\xa9"]),
            st.sampled_from([b"LOGIN", b"capability", b"Authenticate"]),
            st.lists(st.sampled_from([b"alice", b'"pass word"', b'""', b"x=y@z", b"\xff"]), max_size=4),
        ).map(lambda t: b" ".join([t[0], t[1], *t[2]]))
    )
    def test_simpleLinesAccepted(self, line):
        self.assertIsNotNone(simpleCommand(line), line)
        self.assertEqual(simpleCommand(line), fullGrammar(line))
