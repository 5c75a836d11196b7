"""
Tests for L{casd.demo.backend}, casd's in-process demo mailbox backend.

The servers listen on real loopback sockets and are driven by real clients: Python's C{imaplib}
and C{poplib} (each in a thread, through C{deferToThread}) and the C{curl} command.
"""

from __future__ import annotations

import ast
import imaplib
import inspect
import os
import poplib
import shutil

from attrs import frozen
from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker, InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, reactor
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.mail import imap4
from twisted.protocols.policies import WrappingFactory
from twisted.trial import unittest

import casd
from casd.demo import backend as demo
from casd.auth.usersfile import UsersFileChecker
from casd.interfaces import IUserRecordChecker
from casd.demo.backend import DemoMailStore, demoIMAPFactory, demoPOP3Factory

TIMEOUT = 20  # seconds, for each client socket operation


class _Tracked(WrappingFactory):
    """
    Wraps a server factory to know its open connections, so that a test can end only after
    the server side of every connection is closed (trial fails a test that leaves sockets).
    """

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self._waiters: list[defer.Deferred] = []

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(None)

    def closeAll(self) -> defer.Deferred:
        if not self.protocols:
            return defer.succeed(None)
        d = defer.Deferred()
        self._waiters.append(d)
        for p in list(self.protocols):
            p.transport.loseConnection()
        return d


@frozen
class _Record:
    """
    Like casd's user record: the avatar id its users-file checker returns.
    """

    login: str
    address: str = ""


@implementer(ICredentialsChecker, IUserRecordChecker)
class _RecordChecker:
    """
    A checker like casd's users-file checker: it takes the username as C{str} and its avatar
    ids are records with a C{login}.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: dict[str, bytes]):
        self._users = {login.lower(): (login, password) for login, password in users.items()}

    def requestAvatarId(self, credentials):
        assert isinstance(credentials.username, str), credentials.username
        login, password = self._users.get(credentials.username.lower(), (None, None))
        if login is not None and credentials.checkPassword(password):
            return defer.succeed(_Record(login=login))
        return defer.fail(UnauthorizedLogin())


class _ServersMixin:
    """
    Start the demo IMAP and POP3 servers on loopback ports for each test.
    """

    users = {b"alice": b"secret", b"bob": b"hunter2"}

    def makeChecker(self):
        return InMemoryUsernamePasswordDatabaseDontUse(**{k.decode(): v for k, v in self.users.items()})

    @defer.inlineCallbacks
    def setUp(self):
        self.store = DemoMailStore()
        checker = self.makeChecker()
        self.imapFactory = _Tracked(demoIMAPFactory(checker, self.store, reactor))
        self.pop3Factory = _Tracked(demoPOP3Factory(checker, self.store, reactor))
        imapPort = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.imapFactory)
        self.addCleanup(self._stop, imapPort, self.imapFactory)
        pop3Port = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(self.pop3Factory)
        self.addCleanup(self._stop, pop3Port, self.pop3Factory)
        self.imapPort = imapPort.getHost().port
        self.pop3Port = pop3Port.getHost().port

    @defer.inlineCallbacks
    def _stop(self, port, factory):
        yield port.stopListening()
        yield factory.closeAll()

    def imap(self, session, login=True):
        """
        Run C{session(client)} in a thread with an C{imaplib} client (logged in as alice unless
        C{login} is false); fire with its result.  The client logs out afterwards.
        """

        def run():
            client = imaplib.IMAP4("127.0.0.1", self.imapPort, timeout=TIMEOUT)
            try:
                if login:
                    client.login("alice", "secret")
                return session(client)
            finally:
                try:
                    client.logout()
                except (imaplib.IMAP4.abort, OSError):
                    client.shutdown()

        return deferToThread(run)

    def pop3(self, session, user="alice", password="secret"):
        """
        Run C{session(client)} in a thread with a logged-in C{poplib} client; it quits afterwards.
        """

        def run():
            client = poplib.POP3("127.0.0.1", self.pop3Port, timeout=TIMEOUT)
            try:
                client.user(user)
                client.pass_(password)
                return session(client)
            finally:
                try:
                    client.quit()
                except (poplib.error_proto, OSError):
                    client.close()

        return deferToThread(run)


def _refused(client, command, *args):
    """
    Whether C{imaplib} raises its error for C{command} (the server said BAD or NO).
    """
    try:
        getattr(client, command.lower())(*args)
    except imaplib.IMAP4.error:
        return True
    return False


class IMAPTests(_ServersMixin, unittest.TestCase):
    """
    The demo IMAP server, driven by C{imaplib}.
    """

    @defer.inlineCallbacks
    def test_loginSelectFetchWelcome(self):
        """
        A new user logs in and finds an INBOX with one message: the welcome message.
        """

        def session(client):
            return client.capabilities, client.select("INBOX"), client.fetch("1", "(BODY[])")

        caps, selected, fetched = yield self.imap(session)
        self.assertEqual(selected, ("OK", [b"1"]))
        typ, data = fetched
        self.assertEqual(typ, "OK")
        body = data[0][1]
        self.assertIn(b"Welcome to casd", body)
        self.assertIn(b"From: casd demo <demo@casd.invalid>", body)
        self.assertIn(b"Subject: Welcome to casd", body)
        self.assertIn(b"demo backend", body.replace(b"\r\n", b" "))
        self.assertIn("AUTH=PLAIN", caps)
        self.assertIn("AUTH=LOGIN", caps)
        self.assertNotIn("LOGINDISABLED", caps)
        self.assertNotIn("STARTTLS", caps)

    @defer.inlineCallbacks
    def test_appendThenCount(self):
        """
        A message appended to the INBOX (with or without flags and date) is the second one.
        """

        def session(client):
            appended = client.append("INBOX", None, None, b"Subject: hi\r\n\r\nhello there\r\n")
            return appended, client.select("INBOX"), client.fetch("2", "(BODY.PEEK[])")

        appended, selected, fetched = yield self.imap(session)
        self.assertEqual(appended[0], "OK")
        self.assertEqual(selected, ("OK", [b"2"]))
        self.assertEqual(fetched[1][0][1], b"Subject: hi\r\n\r\nhello there\r\n")

        def session2(client):
            date = imaplib.Time2Internaldate(1700000000)
            appended = client.append("INBOX", r"(\Flagged)", date, b"Subject: two\n\nlf only\n")
            client.select("INBOX")
            return appended, client.fetch("3", "(FLAGS INTERNALDATE RFC822.SIZE)")

        appended, fetched = yield self.imap(session2)
        self.assertEqual(appended[0], "OK")
        line = fetched[1][0]
        self.assertIn(b"\\Flagged", line)
        self.assertIn(b'INTERNALDATE "14-Nov-2023 22:13:20 +0000"', line)
        # stored with CRLF line endings
        self.assertIn(b"RFC822.SIZE %d" % len(b"Subject: two\r\n\r\nlf only\r\n"), line)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        """
        A wrong password is refused with a tagged NO, and imaplib raises its error.
        """

        def session(client):
            with self.assertRaises(imaplib.IMAP4.error):
                client.login("alice", "wrong")
            refused = client.xatom("LOGIN", "alice", '"wrong"')
            unknown = client.xatom("LOGIN", "mallory", '"secret"')
            return refused, unknown

        refused, unknown = yield self.imap(session, login=False)
        self.assertEqual(refused[0], "NO")
        self.assertEqual(unknown[0], "NO")
        self.assertEqual(self.store.owners(), [])

    @defer.inlineCallbacks
    def test_authenticatePlain(self):
        """
        AUTHENTICATE PLAIN works, without TLS; a wrong password is refused.
        """

        def session(client):
            with self.assertRaises(imaplib.IMAP4.error):
                client.authenticate("PLAIN", lambda challenge: b"\0alice\0wrong")
            authenticated = client.authenticate("PLAIN", lambda challenge: b"\0alice\0secret")
            return authenticated, client.select("INBOX")

        authenticated, selected = yield self.imap(session, login=False)
        self.assertEqual(authenticated[0], "OK")
        self.assertEqual(selected, ("OK", [b"1"]))

    @defer.inlineCallbacks
    def test_authenticateLogin(self):
        """
        AUTHENTICATE LOGIN works too.
        """
        answers = {b"User Name\0": b"bob", b"Password\0": b"hunter2"}

        def session(client):
            authenticated = client.authenticate("LOGIN", lambda challenge: answers[challenge])
            return authenticated, client.select("INBOX")

        authenticated, selected = yield self.imap(session, login=False)
        self.assertEqual(authenticated[0], "OK")
        self.assertEqual(selected, ("OK", [b"1"]))
        self.assertEqual(self.store.owners(), ["bob"])

    @defer.inlineCallbacks
    def test_fetchEnvelopeFlagsSize(self):
        """
        FETCH gives ENVELOPE, FLAGS and an RFC822.SIZE that is the size of BODY[].
        """

        def session(client):
            client.select("INBOX")
            return (
                client.fetch("1", "(ENVELOPE FLAGS RFC822.SIZE UID)"),
                client.fetch("1", "(BODY.PEEK[])"),
                client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"),
                client.fetch("1", "(BODYSTRUCTURE)"),
            )

        meta, body, header, structure = yield self.imap(session)
        line = meta[1][0]
        self.assertIn(b'"Welcome to casd"', line)
        self.assertIn(b'(("casd demo" NIL "demo" "casd.invalid"))', line)
        self.assertIn(b"UID 1", line)
        self.assertIn(b"FLAGS ()", line)
        self.assertIn(b"RFC822.SIZE %d" % len(body[1][0][1]), line)
        self.assertEqual(header[1][0][1], b"Subject: Welcome to casd\r\n")
        self.assertIn(b'("text" "plain" ("charset" "utf-8")', structure[1][0])

    @defer.inlineCallbacks
    def test_seenFlag(self):
        """
        BODY.PEEK[] leaves a message unseen, BODY[] marks it seen; EXAMINE leaves it alone.
        """

        def session(client):
            client.select("INBOX", readonly=True)
            client.fetch("1", "(BODY[])")
            examined = client.search(None, "UNSEEN")
            client.select("INBOX")
            client.fetch("1", "(BODY.PEEK[])")
            peeked = client.search(None, "UNSEEN")
            client.fetch("1", "(BODY[])")
            return examined, peeked, client.search(None, "UNSEEN"), client.search(None, "SEEN")

        examined, peeked, fetched, seen = yield self.imap(session)
        self.assertEqual(examined, ("OK", [b"1"]))
        self.assertEqual(peeked, ("OK", [b"1"]))
        self.assertEqual(fetched, ("OK", [b""]))
        self.assertEqual(seen, ("OK", [b"1"]))

    @defer.inlineCallbacks
    def test_storeExpungeSearch(self):
        """
        STORE sets flags, SEARCH finds by flag, subject, sequence and UID, EXPUNGE removes the
        deleted messages and reports each one's number.
        """

        def session(client):
            for subject in ("two", "three", "four"):
                client.append("INBOX", None, None, b"Subject: %s\r\n\r\nbody\r\n" % subject.encode())
            client.select("INBOX")
            results = {
                "store": client.store("2:3", "+FLAGS", r"(\Deleted)"),
                "all": client.search(None, "ALL"),
                "deleted": client.search(None, "DELETED"),
                "subject": client.search(None, "SUBJECT", "three"),
                "from": client.search(None, "FROM", "casd"),
                "or": client.search(None, "OR", "1", "4"),
                "range": client.search(None, "2:*"),
                "none": client.search(None, "SUBJECT", "nothing-matches"),
                "expunge": client.expunge(),
                "after": client.search(None, "ALL"),
                "uids": client.uid("SEARCH", None, "ALL"),
                "unflag": client.store("1", "-FLAGS", r"(\Seen)"),
                "replace": client.store("2", "FLAGS", r"(\Answered $Label1)"),
                "keyword": client.search(None, "KEYWORD", "$Label1"),
            }
            return results

        r = yield self.imap(session)
        self.assertEqual(r["store"][0], "OK")
        self.assertIn(b"\\Deleted", r["store"][1][0])
        self.assertEqual(r["all"], ("OK", [b"1 2 3 4"]))
        self.assertEqual(r["deleted"], ("OK", [b"2 3"]))
        self.assertEqual(r["subject"], ("OK", [b"3"]))
        self.assertEqual(r["from"], ("OK", [b"1"]))
        self.assertEqual(r["or"], ("OK", [b"1 4"]))
        self.assertEqual(r["range"], ("OK", [b"2 3 4"]))
        self.assertEqual(r["none"], ("OK", [b""]))
        # messages 2 and 3 go: "2 EXPUNGE" twice (3 became 2 when 2 went)
        self.assertEqual(r["expunge"], ("OK", [b"2", b"2"]))
        self.assertEqual(r["after"], ("OK", [b"1 2"]))
        self.assertEqual(r["uids"], ("OK", [b"1 4"]))
        self.assertEqual(r["replace"][0], "OK")
        self.assertIn(b"\\Answered $Label1", r["replace"][1][0])
        self.assertEqual(r["keyword"], ("OK", [b"2"]))

    @defer.inlineCallbacks
    def test_searchKeys(self):
        """
        SEARCH by dates, text, body, header and size works.
        """

        def session(client):
            client.append(
                "INBOX",
                None,
                imaplib.Time2Internaldate(1700000000),
                b"Subject: old\r\nDate: Tue, 14 Nov 2023 22:13:20 +0000\r\nX-Tag: blue\r\n\r\nan old body\r\n",
            )
            client.select("INBOX")
            criteria = {
                "since": ("SINCE", "1-Jan-2024"),
                "before": ("BEFORE", "1-Jan-2024"),
                "on": ("ON", "14-Nov-2023"),
                "senton": ("SENTON", "14-Nov-2023"),
                "sentsince": ("SENTSINCE", "15-Nov-2023"),
                "body": ("BODY", "old"),
                "text": ("TEXT", '"X-Tag: blue"'),
                "header": ("HEADER", "X-Tag", "blue"),
                "larger": ("LARGER", "200"),
                "not": ("NOT", "SUBJECT", "old"),
            }
            results = {key: client.search(None, *args)[1] for key, args in criteria.items()}
            results["badDate"] = _refused(client, "SEARCH", None, "SINCE", "yesterday")
            return results

        r = yield self.imap(session)
        self.assertEqual(r["since"], [b"1"])
        self.assertEqual(r["before"], [b"2"])
        self.assertEqual(r["on"], [b"2"])
        self.assertEqual(r["senton"], [b"2"])
        self.assertEqual(r["sentsince"], [b"1"])
        self.assertEqual(r["body"], [b"2"])
        self.assertEqual(r["text"], [b"2"])
        self.assertEqual(r["header"], [b"2"])
        self.assertEqual(r["larger"], [b"1"])
        self.assertEqual(r["not"], [b"1"])
        self.assertTrue(r["badDate"])

    @defer.inlineCallbacks
    def test_appendTooLarge(self):
        """
        An APPEND larger than the demo allows is refused before the client sends it.
        """
        self.store.accountFor("alice")  # the welcome message is larger than that
        self.patch(demo.DemoMailbox, "maxMessageSize", 100)

        def session(client):
            refused = _refused(client, "APPEND", "INBOX", None, None, b"x" * 101)
            return refused, client.select("INBOX")

        refused, selected = yield self.imap(session)
        self.assertTrue(refused)
        self.assertEqual(selected, ("OK", [b"1"]))

    @defer.inlineCallbacks
    def test_foldersAndCopy(self):
        """
        LIST shows INBOX and Sent (names keep their case); folders can be made, renamed and
        deleted; COPY and STATUS work.
        """

        def session(client):
            results = {"list": client.list()}
            client.select("INBOX")
            results["copy"] = client.copy("1", "Sent")
            results["status"] = client.status("Sent", "(MESSAGES UIDNEXT)")
            results["create"] = client.create("Projects/casd")
            results["rename"] = client.rename("Projects", "Work")
            results["list2"] = client.list('""', "*")
            results["delete"] = client.delete("Work/casd")
            results["missing"] = client.select("Nope")
            results["sent"] = client.select("Sent")
            return results

        r = yield self.imap(session)
        self.assertEqual(
            r["list"],
            ("OK", [b'(\\HasNoChildren) "/" "INBOX"', b'(\\HasNoChildren \\Sent) "/" "Sent"']),
        )
        self.assertEqual(r["copy"][0], "OK")
        self.assertEqual(r["status"], ("OK", [b"Sent (MESSAGES 1 UIDNEXT 2)"]))
        self.assertEqual(r["create"][0], "OK")
        self.assertEqual(r["rename"][0], "OK")
        names = [line.rsplit(b" ", 1)[1] for line in r["list2"][1]]
        self.assertEqual(names, [b'"INBOX"', b'"Sent"', b'"Work"', b'"Work/casd"'])
        self.assertEqual(r["delete"][0], "OK")
        self.assertEqual(r["missing"][0], "NO")
        self.assertEqual(r["sent"], ("OK", [b"1"]))

    @defer.inlineCallbacks
    def test_idle(self):
        """
        IDLE is advertised and works: a session idling on the INBOX is told of a message that
        another session appends.
        """
        holder = {}

        def startIdle():
            client = imaplib.IMAP4("127.0.0.1", self.imapPort, timeout=TIMEOUT)
            holder["client"] = client
            client.login("alice", "secret")
            client.select("INBOX")
            client.send(b"i1 IDLE\r\n")
            return client.capabilities, client.readline()

        def finishIdle():
            client = holder["client"]
            lines = [client.readline(), client.readline()]
            client.send(b"DONE\r\n")
            lines.append(client.readline())
            client.logout()
            del holder["client"]
            return lines

        try:
            caps, cont = yield deferToThread(startIdle)
            self.assertIn("IDLE", caps)
            self.assertTrue(cont.startswith(b"+"), cont)
            appended = yield self.imap(
                lambda client: client.append("INBOX", None, None, b"Subject: new\r\n\r\nnew mail\r\n")
            )
            self.assertEqual(appended[0], "OK")
            lines = yield deferToThread(finishIdle)
        finally:
            if "client" in holder:  # the test failed half-way: just close the socket
                holder["client"].sock.close()
        self.assertEqual(lines, [b"* 2 EXISTS\r\n", b"* 1 RECENT\r\n", b"i1 OK IDLE terminated\r\n"])

    @defer.inlineCallbacks
    def test_usersAreSeparate(self):
        """
        Each user has their own mailboxes.
        """
        yield self.imap(lambda client: client.append("INBOX", None, None, b"Subject: a\r\n\r\nx\r\n"))

        def bob():
            client = imaplib.IMAP4("127.0.0.1", self.imapPort, timeout=TIMEOUT)
            try:
                client.login("bob", "hunter2")
                return client.select("INBOX"), client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (TO)])")
            finally:
                client.logout()

        selected, to = yield deferToThread(bob)
        self.assertEqual(selected, ("OK", [b"1"]))
        self.assertEqual(to[1][0][1], b"To: bob@casd.invalid\r\n")
        self.assertEqual(self.store.owners(), ["alice", "bob"])
        self.assertEqual(self.store.accountFor("alice").inbox.getMessageCount(), 2)


class RecordAvatarTests(_ServersMixin, unittest.TestCase):
    """
    With a checker like casd's users-file checker, whose avatar ids are records: the mailbox
    owner is the record's C{login}.
    """

    def makeChecker(self):
        return _RecordChecker({"Carol": b"pw"})

    @defer.inlineCallbacks
    def test_recordLogin(self):
        def session(client):
            return client.select("INBOX"), client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (TO)])")

        def run():
            client = imaplib.IMAP4("127.0.0.1", self.imapPort, timeout=TIMEOUT)
            try:
                client.login("carol", "pw")
                return session(client)
            finally:
                client.logout()

        selected, to = yield deferToThread(run)
        self.assertEqual(selected, ("OK", [b"1"]))
        self.assertEqual(to[1][0][1], b"To: Carol@casd.invalid\r\n")
        self.assertEqual(self.store.owners(), ["Carol"])

        stat = yield self.pop3(lambda client: client.stat(), user="CAROL", password="pw")
        self.assertEqual(stat[0], 1)
        self.assertEqual(self.store.owners(), ["Carol"])


class UsersFileTests(_ServersMixin, unittest.TestCase):
    """
    With casd's own users-file checker and its shipped demo users (what C{twistd -n cas --demo}
    runs): the demo backend accepts exactly the users casd accepts.
    """

    def makeChecker(self):
        path = os.path.join(os.path.dirname(casd.__file__), "demo", "data", "users")
        return UsersFileChecker(path, lambda f, *args: deferToThread(f, *args), reactor)

    @defer.inlineCallbacks
    def test_demoUsers(self):
        def session():
            results = []
            for user, password in (("alice", "alice"), ("demo", "demo"), ("alice", "wrong"), ("nobody", "x")):
                client = imaplib.IMAP4("127.0.0.1", self.imapPort, timeout=TIMEOUT)
                try:
                    results.append(client.xatom("LOGIN", user, f'"{password}"')[0])
                finally:
                    client.logout()
            client = imaplib.IMAP4("127.0.0.1", self.imapPort, timeout=TIMEOUT)
            try:
                results.append(client.authenticate("PLAIN", lambda _: b"\0demo\0demo")[0])
            finally:
                client.logout()
            return results

        results = yield deferToThread(session)
        self.assertEqual(results, ["OK", "OK", "NO", "NO", "OK"])
        self.assertEqual(self.store.owners(), ["alice", "demo"])
        welcome = self.store.accountFor("alice").inbox.messages[0]
        self.assertEqual(welcome.getHeaders(False, "to"), {"to": "alice@example.com"})
        stat = yield self.pop3(lambda client: client.stat(), user="demo", password="demo")
        self.assertEqual(stat[0], 1)


class POP3Tests(_ServersMixin, unittest.TestCase):
    """
    The demo POP3 server over the same store, driven by C{poplib}.
    """

    @defer.inlineCallbacks
    def test_statRetr(self):
        """
        USER/PASS, STAT shows the one welcome message, RETR gives it.
        """

        def session(client):
            return client.stat(), client.retr(1), client.uidl(), client.top(1, 0)

        stat, retr, uidl, top = yield self.pop3(session)
        self.assertEqual(stat[0], 1)
        welcome = self.store.accountFor("alice").inbox.messages[0].raw
        self.assertEqual(stat[1], len(welcome))
        lines = retr[1]
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", welcome)
        self.assertIn(b"Subject: Welcome to casd", lines)
        self.assertIn(b"Welcome to casd!  This message comes from casd's DEMO mailbox backend, a small", lines)
        self.assertEqual(len(uidl[1]), 1)
        self.assertEqual(top[1][-1], b"")
        self.assertIn(b"Subject: Welcome to casd", top[1])
        # RETR marks it seen for IMAP too
        self.assertIn("\\Seen", self.store.accountFor("alice").inbox.messages[0].getFlags())

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        """
        A wrong password is refused.
        """

        def run():
            client = poplib.POP3("127.0.0.1", self.pop3Port, timeout=TIMEOUT)
            try:
                client.user("alice")
                with self.assertRaises(poplib.error_proto) as e:
                    client.pass_("wrong")
                return e.exception
            finally:
                client.quit()

        error = yield deferToThread(run)
        self.assertTrue(error.args[0].startswith(b"-ERR"), error)

    @defer.inlineCallbacks
    def test_deleteAtQuit(self):
        """
        DELE marks a message; RSET unmarks; QUIT removes the marked ones from the INBOX that IMAP
        sees.  DELE of a missing or already deleted message is an error.
        """
        self.store.deliver("alice", b"Subject: second\r\n\r\nbody\r\n")

        def session(client):
            client.dele(1)
            with self.assertRaises(poplib.error_proto):
                client.dele(1)
            with self.assertRaises(poplib.error_proto):
                client.dele(7)
            stat = client.stat()
            client.rset()
            client.dele(2)
            return stat

        stat = yield self.pop3(session)
        self.assertEqual(stat[0], 2)  # the message count does not change before QUIT
        inbox = self.store.accountFor("alice").inbox
        self.assertEqual(inbox.getMessageCount(), 1)
        self.assertIn(b"Welcome to casd", inbox.messages[0].raw)

    @defer.inlineCallbacks
    def test_dotStuffingAcrossChunks(self):
        """
        A line starting with C{.} comes back intact even where it starts one of the 16 KiB chunks
        in which Twisted sends a message (Twisted's own POP3 server misses that one), or the
        message itself.
        """
        head = b"Subject: dots\n\n"
        filler = b"x" * 99 + b"\n"
        count, rest = divmod(16384 - len(head), len(filler))
        # poplib removes one dot from a line starting with "..": lines that start with two dots
        # show whether the server stuffed them
        body = filler * count + b"y" * (rest - 1) + b"\n" + b"..starts a chunk\n" + b"..\n" + b".\n" + b"end\n"
        self.assertEqual((head + body).index(b"..starts"), 16384)
        message = (head + body).replace(b"\n", b"\r\n")
        self.store.deliver("alice", message)
        self.store.deliver("alice", b"..first line has two dots\r\n\r\nbody\r\n")

        def session(client):
            return client.retr(2), client.retr(3)

        second, third = yield self.pop3(session)
        self.assertEqual(b"\r\n".join(second[1]) + b"\r\n", message)
        self.assertEqual(third[1][0], b"..first line has two dots")


class CurlTests(_ServersMixin, unittest.TestCase):
    """
    C{curl}, a client that has never heard of casd, lists and reads the demo INBOX.
    """

    def curl(self, *args):
        curl = shutil.which("curl")
        if curl is None:
            self.fail("curl is not installed: these tests need it (apt-get install curl)")
        return getProcessOutputAndValue(curl, ("--silent", "--show-error", "--max-time", str(TIMEOUT)) + args, env=os.environ)

    @defer.inlineCallbacks
    def test_listInbox(self):
        out, err, code = yield self.curl(f"imap://alice:secret@127.0.0.1:{self.imapPort}/INBOX")
        self.assertEqual(code, 0, err)
        self.assertIn(b'* LIST (\\HasNoChildren) "/" "INBOX"', out)

    @defer.inlineCallbacks
    def test_fetchWelcome(self):
        out, err, code = yield self.curl(f"imap://alice:secret@127.0.0.1:{self.imapPort}/INBOX;UID=1")
        self.assertEqual(code, 0, err)
        self.assertIn(b"Subject: Welcome to casd", out)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        out, err, code = yield self.curl(f"imap://alice:nope@127.0.0.1:{self.imapPort}/INBOX")
        self.assertNotEqual(code, 0)
        self.assertEqual(self.store.owners(), [])

    @defer.inlineCallbacks
    def test_pop3(self):
        out, err, code = yield self.curl(f"pop3://alice:secret@127.0.0.1:{self.pop3Port}/1")
        self.assertEqual(code, 0, err)
        self.assertIn(b"Subject: Welcome to casd", out)


class StoreTests(unittest.TestCase):
    """
    L{DemoMailStore} without a network.
    """

    def test_firstLoginSeeds(self):
        store = DemoMailStore(clock=lambda: 1700000000.0)
        account = store.accountFor("dave@example.com")
        self.assertIs(store.accountFor("dave@example.com"), account)
        self.assertEqual(sorted(account.mailboxes), ["INBOX", "Sent"])
        self.assertEqual(account.mailboxes["Sent"].getMessageCount(), 0)
        [welcome] = account.inbox.messages
        headers = welcome.getHeaders(True)
        self.assertEqual(headers["from"], "casd demo <demo@casd.invalid>")
        self.assertEqual(headers["subject"], "Welcome to casd")
        self.assertEqual(headers["to"], "dave@example.com")
        self.assertEqual(headers["date"], "Tue, 14 Nov 2023 22:13:20 -0000")
        self.assertIn(b"demo backend", welcome.getBodyFile().read().replace(b"\r\n", b" "))
        self.assertEqual(welcome.getFlags(), ["\\Recent"])

    def test_ownerOf(self):
        self.assertEqual(demo.ownerOf(b"alice"), "alice")
        self.assertEqual(demo.ownerOf("alice"), "alice")
        self.assertEqual(demo.ownerOf(_Record(login="Carol")), "Carol")

    def test_deliverNotifiesListeners(self):
        store = DemoMailStore()
        inbox = store.accountFor("alice").inbox
        seen = []

        class Listener:
            def newMessages(self, exists, recent):
                seen.append((exists, recent))

        inbox.addListener(Listener())
        uid = store.deliver("alice", b"Subject: x\n\ny\n")
        self.assertEqual(uid, 2)
        self.assertEqual(seen, [(2, 2)])
        self.assertEqual(inbox.messages[1].raw, b"Subject: x\r\n\r\ny\r\n")
        self.assertRaises(imap4.NoSuchMailbox, store.deliver, "alice", b"x", "Nope")

    def test_multipart(self):
        """
        Multipart messages have parts (for BODYSTRUCTURE and BODY[n]).
        """
        raw = (
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\npreamble\r\n'
            b"--b1\r\nContent-Type: text/plain\r\n\r\npart one\r\n"
            b"--b1\r\nContent-Type: text/html\r\n\r\n<p>two</p>\r\n"
            b"--b1--\r\nepilogue\r\n"
        )
        msg = demo.DemoMessage(raw, 1, (), 0)
        self.assertTrue(msg.isMultipart())
        self.assertEqual(msg.getSubPart(0).getBodyFile().read(), b"part one")
        self.assertEqual(msg.getSubPart(1).getHeaders(False, "content-type"), {"content-type": "text/html"})
        self.assertRaises(IndexError, msg.getSubPart, 2)
        structure = imap4.getBodyStructure(msg)
        self.assertEqual(structure[-1], "mixed")

    def test_nonAsciiHeader(self):
        """
        A raw 8-bit header value is given to Twisted as an RFC 2047 encoded word (ASCII).
        """
        msg = demo.DemoMessage("Subject: café\r\n\r\nx\r\n".encode(), 1, (), 0)
        self.assertEqual(msg.getHeaders(False, "subject"), {"subject": "=?utf-8?b?Y2Fmw6k=?="})


class ReactorTests(unittest.TestCase):
    """
    The factories use the reactor they are given and never import the global one at import time.
    """

    def test_noGlobalReactorImportInModuleBody(self):
        tree = ast.parse(inspect.getsource(demo))
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names]
                self.assertNotIn("reactor", names)
                self.assertNotIn("twisted.internet.reactor", names)

    def test_imapTimeoutUsesGivenReactor(self):
        clock = Clock()
        factory = demoIMAPFactory(InMemoryUsernamePasswordDatabaseDontUse(), DemoMailStore(), clock)
        server = factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        self.assertIn(b"casd DEMO backend", transport.value())
        clock.advance(61)
        self.assertIn(b"* BYE Autologout", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_pop3TimeoutUsesGivenReactor(self):
        clock = Clock()
        factory = demoPOP3Factory(InMemoryUsernamePasswordDatabaseDontUse(), DemoMailStore(), clock)
        server = factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"+OK"))
        clock.advance(301)
        self.assertTrue(transport.disconnecting)

    def test_startLogsDemoOnly(self):
        """
        Starting a demo factory logs that it is a demo.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        checker, store = InMemoryUsernamePasswordDatabaseDontUse(), DemoMailStore()
        for factory in (demoIMAPFactory(checker, store, Clock()), demoPOP3Factory(checker, store, Clock())):
            factory.doStart()
            factory.doStop()
        texts = [e.get("log_format", "") for e in events]
        self.assertTrue(any("DEMO IMAP" in t and "demo only" in t for t in texts), texts)
        self.assertTrue(any("DEMO POP3" in t and "demo only" in t for t in texts), texts)
