# -*- test-case-name: tests.test_smtpgrammar -*-
"""
SMTP grammar: commands, envelope paths, replies, EHLO keywords, xtext, and the DATA stream that
keeps SMTP smuggling out.
"""

import random
import re

from twisted.trial.unittest import SynchronousTestCase

from protocols.smtpgrammar import (
    DataStream,
    Reply,
    ReplyParser,
    ReplySyntaxError,
    SMTPSyntaxError,
    ehloKeywords,
    enhancedCode,
    parsePathArgument,
    splitCommand,
    validHeloName,
    xtext,
)

BAD = b"501 5.1.7 Bad address syntax"


def mail(args, utf8=False):
    return parsePathArgument(args, b"FROM:", utf8, True, BAD)


def rcpt(args, utf8=False):
    return parsePathArgument(args, b"TO:", utf8, False, BAD)


class CommandTests(SynchronousTestCase):
    def test_split(self):
        self.assertEqual(splitCommand(b"mail FROM:<a@b>"), ("MAIL", b"FROM:<a@b>"))
        self.assertEqual(splitCommand(b"QUIT"), ("QUIT", b""))
        self.assertEqual(splitCommand(b"QUIT  "), ("QUIT", b""))
        self.assertEqual(splitCommand(b""), ("", b""))
        self.assertEqual(splitCommand(b"M@IL x"), ("", b""))
        self.assertEqual(splitCommand(b"X" * 17), ("", b""))

    def test_heloName(self):
        self.assertTrue(validHeloName(b"client.example.org"))
        self.assertTrue(validHeloName(b"[192.0.2.1]"))
        self.assertFalse(validHeloName(b""))
        self.assertFalse(validHeloName(b"two words"))
        self.assertFalse(validHeloName(b"bad\x00name"))


class PathTests(SynchronousTestCase):
    def test_plain(self):
        box, params = mail(b"FROM:<Alice@Example.COM>")
        self.assertEqual(
            (box.raw, box.local, box.domain), (b"Alice@Example.COM", "Alice", "example.com")
        )
        self.assertEqual(box.address, "Alice@example.com")
        self.assertEqual(box.path(), b"<Alice@Example.COM>")
        self.assertEqual(params, ())

    def test_spaceAfterColon(self):
        self.assertEqual(mail(b"from: <a@b.example>")[0].raw, b"a@b.example")

    def test_nullSender(self):
        box, params = mail(b"FROM:<> SIZE=10 BODY=8BITMIME")
        self.assertEqual((box.raw, box.address), (b"", ""))
        self.assertEqual(params, (("SIZE", b"10"), ("BODY", b"8BITMIME")))
        self.assertRaises(SMTPSyntaxError, rcpt, b"TO:<>")

    def test_postmaster(self):
        box, _ = rcpt(b"TO:<Postmaster>")
        self.assertEqual((box.local, box.domain), ("Postmaster", ""))
        self.assertRaises(SMTPSyntaxError, mail, b"FROM:<Postmaster>")

    def test_sourceRoute(self):
        box, _ = rcpt(b"TO:<@relay.example,@other.example:bob@example.com>")
        self.assertEqual(box.raw, b"bob@example.com")

    def test_quotedLocal(self):
        box, params = rcpt(b'TO:<"odd > local"@example.com> ')
        self.assertEqual(box.local, '"odd > local"')
        self.assertEqual(params, ())

    def test_addressLiteral(self):
        self.assertEqual(rcpt(b"TO:<x@[192.0.2.1]>")[0].domain, "[192.0.2.1]")

    def test_bad(self):
        for args in (
            b"FROM:a@b.example",
            b"FROM:<a@b.example",
            b"FROM:<a b@c.example>",
            b"FROM:<@b.example>",
            b"FROM:<a@>",
            b"FROM:<a@-b.example>",
            b"FROM:<a..b@c.example>",
            b"FROM:<a@b.example>junk",
            b"FROM:<a\x01@b.example>",
            b"FROM:<" + b"a" * 65 + b"@b.example>",
        ):
            self.assertRaises(SMTPSyntaxError, mail, args)
        e = self.assertRaises(SMTPSyntaxError, mail, b"TO:<a@b.example>")
        self.assertEqual(e.reply, b"501 5.5.4 Syntax: MAIL FROM:<address>")

    def test_utf8(self):
        e = self.assertRaises(SMTPSyntaxError, rcpt, "TO:<jörg@example.com>".encode())
        self.assertEqual(e.reply, b"553 5.6.7 Non-ASCII address requires SMTPUTF8")
        self.assertEqual(rcpt("TO:<jörg@exämple.com>".encode(), utf8=True)[0].domain, "exämple.com")

    def test_parameters(self):
        _, params = mail(b"FROM:<a@b.example> size=5 SMTPUTF8 X-Y=z")
        self.assertEqual(params, (("SIZE", b"5"), ("SMTPUTF8", None), ("X-Y", b"z")))
        for bad in (
            b"FROM:<a@b.example> SIZE=",
            b"FROM:<a@b.example> =x",
            b"FROM:<a@b.example> A=b=c",
        ):
            e = self.assertRaises(SMTPSyntaxError, mail, bad)
            self.assertEqual(e.reply, b"501 5.5.4 Bad parameter syntax")


class ReplyTests(SynchronousTestCase):
    def test_multiline(self):
        p = ReplyParser()
        self.assertIsNone(p.feed(b"250-mbx.example"))
        self.assertIsNone(p.feed(b"250-PIPELINING"))
        self.assertIsNone(p.feed(b"250-SIZE 1000"))
        r = p.feed(b"250 XCLIENT NAME ADDR")
        self.assertEqual(
            r, Reply(250, (b"mbx.example", b"PIPELINING", b"SIZE 1000", b"XCLIENT NAME ADDR"))
        )
        self.assertEqual(
            ehloKeywords(r), {"PIPELINING": (), "SIZE": (b"1000",), "XCLIENT": (b"NAME", b"ADDR")}
        )
        self.assertEqual(
            r.render(),
            b"250-mbx.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 XCLIENT NAME ADDR\r\n",
        )
        self.assertEqual(p.feed(b"354"), Reply(354, (b"",)))

    def test_classes(self):
        self.assertTrue(Reply(250, (b"",)).positive)
        self.assertTrue(Reply(451, (b"",)).temporary)
        self.assertTrue(Reply(554, (b"",)).permanent)
        self.assertEqual(enhancedCode(Reply(550, (b"5.1.1 unknown",))), b"5.1.1")
        self.assertEqual(enhancedCode(Reply(550, (b"unknown",))), b"")

    def test_garbage(self):
        p = ReplyParser()
        self.assertRaises(ReplySyntaxError, p.feed, b"hello")
        self.assertRaises(ReplySyntaxError, p.feed, b"600 no")
        p.feed(b"250-a")
        self.assertRaises(ReplySyntaxError, p.feed, b"251 b")

    def test_sanitised(self):
        r = Reply(250, (b"ok\x1b[31m\xff", b"x" * 1000))
        clean = r.sanitised()
        self.assertEqual(clean.lines[0], b"ok?[31m?")
        self.assertEqual(len(clean.lines[1]), 400)

    def test_xtext(self):
        self.assertEqual(xtext("a+b=c d"), b"a+2Bb+3Dc+20d")
        self.assertEqual(xtext("IPV6:2001:db8::1"), b"IPV6:2001:db8::1")
        self.assertEqual(xtext("ü"), b"+C3+BC")


def feedAll(stream, chunks):
    out = b""
    for chunk in chunks:
        o, rest = stream.feed(chunk)
        out += o
        if rest is not None:
            return out, rest
    return out, None


def backendLines(out: bytes):
    """
    How a backend reads what casd sent: CRLF lines up to the first lone dot, unstuffed.
    """
    lines = out.split(b"\r\n")
    end = lines.index(b".")
    return [l[1:] if l.startswith(b".") else l for l in lines[:end]], lines[end + 1 :]


def clientContent(data: bytes):
    """
    What RFC 5321 makes of the client's data: CRLF lines up to the first lone dot, unstuffed, a
    bare CR or LF then taken as a line break.
    """
    body = b"\r\n" + data
    end = body.find(b"\r\n.\r\n")
    lines = body[2 : end + 2].split(b"\r\n")[:-1]
    content = []
    for line in lines:
        if line.startswith(b"."):
            line = line[1:]
        content.extend(re.split(rb"\r|\n", line))
    return content


class DataStreamTests(SynchronousTestCase):
    def test_plainPassesVerbatim(self):
        data = b"Subject: hi\r\n\r\n..leading dot\r\nend\r\n.\r\nQUIT\r\n"
        out, rest = feedAll(DataStream(), [data])
        self.assertEqual(out, data[: -len(b"QUIT\r\n")])
        self.assertEqual(rest, b"QUIT\r\n")

    def test_emptyMessage(self):
        self.assertEqual(feedAll(DataStream(), [b".\r\n"]), (b".\r\n", b""))

    def test_endAcrossChunks(self):
        s = DataStream()
        self.assertEqual(s.feed(b"a\r")[1], None)
        self.assertEqual(s.feed(b"\n.")[1], None)
        self.assertEqual(s.feed(b"\r")[1], None)
        out, rest = s.feed(b"\nnext")
        self.assertEqual(rest, b"next")
        self.assertEqual(s.size, 3)

    def test_smugglingVectors(self):
        """
        Every known way to end data early at some server: casd's output to the backend has one
        end, the real one, and the smuggled commands are part of the one message.
        """
        smuggled = (
            b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nforged\r\n"
        )
        for marker in (
            b"\n.\n",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r",
            b"\r\n.\r",
            b"\r.\r\n",
            b"\n.\r",
            b"\r.\n",
        ):
            data = b"Subject: x\r\n\r\nhello" + marker + smuggled + b"tail\r\n.\r\nQUIT\r\n"
            for normalise in (True, False):
                stream = DataStream(normalise)
                out, rest = feedAll(stream, [data])
                self.assertEqual(rest, b"QUIT\r\n", marker)
                self.assertTrue(stream.bare, marker)
                lines, after = backendLines(out)
                self.assertEqual(after, [b""], marker)  # nothing after the one end
                self.assertEqual(out.count(b"\r\n.\r\n"), 1, marker)
                if normalise:
                    self.assertNotRegex(out, rb"\r(?!\n)|(?<!\r)\n")
                    self.assertIn(b"forged", lines)
                    self.assertEqual(lines, clientContent(data), marker)

    def test_dotLineBeforeBareBreak(self):
        # The client's line ".<LF>X" unstuffs to "<LF>X": an empty line, then X; never a lone dot.
        out, _ = feedAll(DataStream(), [b"a\r\n.\nX\r\n.\r\n"])
        self.assertEqual(out, b"a\r\n\r\nX\r\n.\r\n")

    def test_dotAfterBareBreakIsStuffed(self):
        out, _ = feedAll(DataStream(), [b"a\n.b\r\n.\r\n"])
        self.assertEqual(out, b"a\r\n..b\r\n.\r\n")

    def test_rejectModeIsVerbatim(self):
        data = b"a\n.\nb\r\n.\r\n"
        stream = DataStream(normalise=False)
        out, rest = feedAll(stream, [data])
        self.assertEqual(out, data)
        self.assertTrue(stream.bare)

    def test_chunkingDoesNotMatter(self):
        """
        However the data is cut into segments, the backend gets the same bytes: what RFC 5321
        makes of the client's data, in CRLF lines, dot-stuffed, with one end.
        """
        rng = random.Random(5321)
        pieces = [b"\r", b"\n", b".", b"a", b"\r\n", b"\r\n.", b"\r\n.\r", b".."]
        for _ in range(3000):
            data = (
                b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) + b"\r\n.\r\nREST"
            )
            whole, _ = feedAll(DataStream(), [data])
            cuts = sorted(rng.sample(range(len(data) + 1), rng.randint(0, min(8, len(data)))))
            chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            cut, _ = feedAll(DataStream(), chunks)
            self.assertEqual(cut, whole, data)
            self.assertNotRegex(whole, rb"\r(?!\n)|(?<!\r)\n")
            lines, after = backendLines(whole)
            self.assertEqual(after, [b""])
            self.assertEqual(lines, clientContent(data), data)

    def test_boundedMemory(self):
        """
        A line without an end is streamed, not held: a few bytes stay behind per chunk.
        """
        stream = DataStream()
        sent = 0
        for _ in range(100):
            out, rest = stream.feed(b"x" * 10000 + b"\n")
            sent += len(out)
            self.assertIsNone(rest)
            self.assertLessEqual(len(stream._pending), 8)
        self.assertGreater(sent, 100 * 10000)
        self.assertEqual(stream.size, 100 * 10001 - len(stream._pending) + stream._start)
