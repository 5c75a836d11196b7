# -*- test-case-name: tests.test_demo -*-
"""
casd's in-process DEMO mailbox backend.  DEMO ONLY: never use it to hold real mail.

C{twistd -n cas --demo} runs this beside the proxy so that a newcomer sees the whole path
(client -> casd -> backend) in one command, with no mail server to install.  It is a small
IMAP4rev1 and POP3 server built on C{twisted.mail}:

  - all mail lives in memory and is lost when the process stops;
  - plaintext C{LOGIN}, C{AUTHENTICATE PLAIN}/C{LOGIN} and POP3 C{USER}/C{PASS} are accepted
    without TLS: it is meant to listen on the loopback interface only;
  - it accepts exactly the users that the given checker accepts (casd passes its own users-file
    checker), and creates a user's mailboxes on their first login: an C{INBOX} holding one
    welcome message and an empty C{Sent} folder.

IMAP supports SELECT/EXAMINE, FETCH (BODY[...], BODY.PEEK[...], ENVELOPE, FLAGS, RFC822.SIZE,
INTERNALDATE, UID, BODYSTRUCTURE), STORE, APPEND, COPY, EXPUNGE, SEARCH, LIST/LSUB, STATUS,
CREATE/DELETE/RENAME, (UN)SUBSCRIBE, NAMESPACE and IDLE (new mail delivered to a mailbox is
announced to every session that has it selected, including one that is idling).  POP3 serves
the INBOX (STAT, LIST, UIDL, RETR, TOP, DELE, RSET, QUIT).

The store (accounts, mailboxes, messages) is L{casd.demo.store}.
"""
from __future__ import annotations

import copy
import email.message
import email.utils
from email.header import decode_header, make_header

from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.mail import imap4, pop3

from casd.interfaces import IUserRecordChecker

from casd.demo.store import (  # noqa: F401  (re-exported: the demo's public names)
    DEMO_FROM,
    WELCOME_SUBJECT,
    DemoAccount,
    DemoMailbox,
    DemoMailStore,
    DemoRealm,
    POP3Inbox,
    ownerOf,
)
from casd.demo.message import DemoMessage, _normalizeFlag  # noqa: F401  (DemoMessage re-exported)

__all__ = [
    "DEMO_FROM",
    "WELCOME_SUBJECT",
    "DemoMailStore",
    "DemoAccount",
    "DemoMailbox",
    "DemoMessage",
    "DemoRealm",
    "DemoIMAP4Server",
    "DemoPOP3Server",
    "POP3Inbox",
    "ownerOf",
    "demoIMAPFactory",
    "demoPOP3Factory",
]

log = Logger()

def _term(query: list) -> str:
    term = query.pop(0)
    if isinstance(term, tuple):  # a literal, as twisted.mail.imap4.parseNestedParens gives it
        term = term[0]
    return term.decode("utf-8", "replace") if isinstance(term, bytes) else term


def _searchDay(query: list) -> tuple[int, int, int]:
    return tuple(imap4.parseTime(_term(query))[:3])


def _internalDay(msg) -> tuple[int, int, int]:
    return tuple(email.utils.parsedate(msg.getInternalDate())[:3])


def _sentDay(msg) -> tuple[int, int, int] | None:
    parsed = email.utils.parsedate(msg.getHeaders(False, "date").get("date", ""))
    return tuple(parsed[:3]) if parsed else None


def _reactorScheduler(reactor):
    """
    C{twisted.mail.imap4.iterateInReactor}, on the given reactor instead of the global one.
    """

    def schedule(iterator):
        done = defer.Deferred()

        def step(last):
            try:
                result = next(iterator)
            except StopIteration:
                done.callback(last)
            except BaseException:
                done.errback()
            else:
                if isinstance(result, defer.Deferred):
                    result.addCallback(step)
                else:
                    reactor.callLater(0, step, result)

        step(None)
        return done

    return schedule


class DemoIMAP4Server(imap4.IMAP4Server):
    """
    Twisted's IMAP4 server with the demo's fixes: APPEND without a flag list works, and an
    oversized one is refused before it is read; SEARCH runs without the global reactor, always
    answers C{* SEARCH}, and its header, date and keyword keys work (Twisted's raise TypeError
    on Python 3 or always say no); fetching a body without C{.PEEK} sets C{\\Seen}; a
    read-write SELECT clears C{\\Recent}; a closed connection stops listening to its mailbox.
    """

    IDENT = b"casd DEMO backend (in-memory, demo only) ready"

    def connectionLost(self, reason):
        # Twisted's server stays a listener of its selected mailbox after the connection is gone
        if self.mbox is not None:
            try:
                self.mbox.removeListener(self)
            except ValueError:
                pass
            self.mbox = None
        super().connectionLost(reason)

    def do_SEARCH(self, tag, charset, query, uid=0):
        d = defer.maybeDeferred(self.mbox.fetch, imap4.MessageSet(1, None), False)
        d.addCallback(self._searchResults, tag, query, uid)
        d.addErrback(self._searchFailed, tag)

    select_SEARCH = (do_SEARCH, imap4.IMAP4Server.opt_charset, imap4.IMAP4Server.arg_searchkeys)

    def _searchResults(self, result, tag, query, uid):
        result = list(result)
        lastSeq = result[-1][0] if result else 0
        lastUID = result[-1][1].getUID() if result else 0
        hits = [
            b"%d" % (msg.getUID() if uid else seq,)
            for seq, msg in result
            if self._searchFilter(copy.deepcopy(query), seq, msg, lastSeq, lastUID)
        ]
        self.sendUntaggedResponse(b" ".join([b"SEARCH"] + hits))
        self.sendPositiveResponse(tag, b"SEARCH completed")

    def _searchFailed(self, failure, tag):
        if failure.check(imap4.IllegalQueryError, ValueError):
            self.sendBadResponse(tag, b"SEARCH failed: " + str(failure.value).encode("ascii", "replace"))
        else:
            log.failure("SEARCH failed", failure)
            self.sendBadResponse(tag, b"SEARCH failed: server error")

    # Twisted's header, date and keyword search keys compare str header values with the bytes
    # search terms (TypeError) or always answer False; these replace them.

    def _headerMatches(self, msg, name, query):
        value = msg.getHeaders(False, name).get(name, "")
        try:
            value = str(make_header(decode_header(value)))
        except (ValueError, LookupError):
            pass
        return _term(query).lower() in value.lower()

    def search_FROM(self, query, id, msg):
        return self._headerMatches(msg, "from", query)

    def search_TO(self, query, id, msg):
        return self._headerMatches(msg, "to", query)

    def search_CC(self, query, id, msg):
        return self._headerMatches(msg, "cc", query)

    def search_BCC(self, query, id, msg):
        return self._headerMatches(msg, "bcc", query)

    def search_SUBJECT(self, query, id, msg):
        return self._headerMatches(msg, "subject", query)

    def search_HEADER(self, query, id, msg):
        return self._headerMatches(msg, _term(query).lower(), query)

    def search_BODY(self, query, id, msg):
        return _term(query).lower().encode("utf-8") in msg.getBodyFile().read().lower()

    def search_TEXT(self, query, id, msg):
        return _term(query).lower().encode("utf-8") in msg.open().read().lower()

    def search_KEYWORD(self, query, id, msg):
        return _normalizeFlag(_term(query)) in msg.getFlags()

    def search_UNKEYWORD(self, query, id, msg):
        return not self.search_KEYWORD(query, id, msg)

    def search_BEFORE(self, query, id, msg):
        return _internalDay(msg) < _searchDay(query)

    def search_ON(self, query, id, msg):
        return _internalDay(msg) == _searchDay(query)

    def search_SINCE(self, query, id, msg):
        return _internalDay(msg) >= _searchDay(query)

    def search_SENTBEFORE(self, query, id, msg):
        day, sent = _searchDay(query), _sentDay(msg)
        return sent is not None and sent < day

    def search_SENTON(self, query, id, msg):
        day, sent = _searchDay(query), _sentDay(msg)
        return sent is not None and sent == day

    def search_SENTSINCE(self, query, id, msg):
        day, sent = _searchDay(query), _sentDay(msg)
        return sent is not None and sent >= day

    def arg_literal(self, line):
        # refuse an oversized APPEND before reading it (Twisted would spool it to a temporary
        # file: blocking disk I/O)
        try:
            size = int(line.strip()[1:-1])
        except ValueError:
            size = 0
        if size > DemoMailbox.maxMessageSize:
            raise imap4.IllegalClientResponse(
                f"message larger than the demo's {DemoMailbox.maxMessageSize} octets"
            )
        return super().arg_literal(line)

    auth_APPEND = (
        imap4.IMAP4Server.do_APPEND,
        imap4.IMAP4Server.arg_astring,
        imap4.IMAP4Server.opt_plist,
        imap4.IMAP4Server.opt_datetime,
        arg_literal,
    )
    select_APPEND = auth_APPEND

    def _cbAppendGotMailbox(self, mbox, tag, flags, date, message):
        # Twisted iterates the optional flag list even when APPEND has none (it is then None)
        return super()._cbAppendGotMailbox(mbox, tag, flags or [], date, message)

    def _cbSelectWork(self, mbox, cmdName, tag):
        super()._cbSelectWork(mbox, cmdName, tag)
        if self.mbox is mbox and mbox is not None and mbox.isWriteable():
            mbox.clearRecent()

    def _markSeen(self, msg):
        if self.mbox is not None and self.mbox.isWriteable() and hasattr(msg, "setFlags"):
            msg.setFlags(["\\Seen"], 1)

    def spew_body(self, part, id, msg, _w=None, _f=None):
        if not part.peek and (part.header or part.text or part.mime or part.empty):
            self._markSeen(msg)
        return super().spew_body(part, id, msg, _w, _f)

    def spew_rfc822(self, id, msg, _w=None, _f=None):
        self._markSeen(msg)
        return super().spew_rfc822(id, msg, _w, _f)

    def spew_rfc822text(self, id, msg, _w=None, _f=None):
        self._markSeen(msg)
        return super().spew_rfc822text(id, msg, _w, _f)


class _DemoIMAPFactory(protocol.ServerFactory):
    def __init__(self, portal: Portal, reactor):
        self.portal = portal
        self.reactor = reactor
        self._scheduler = _reactorScheduler(reactor)

    def startFactory(self):
        log.info(
            "casd DEMO IMAP backend starting: in-memory mailboxes, plaintext login, "
            "demo only -- never use it for real mail"
        )

    def buildProtocol(self, addr):
        challengers = {b"LOGIN": imap4.LOGINCredentials, b"PLAIN": imap4.PLAINCredentials}
        p = DemoIMAP4Server(chal=challengers, contextFactory=None, scheduler=self._scheduler)
        p.factory = self
        p.portal = self.portal
        p.callLater = self.reactor.callLater
        return p


@implementer(ICredentialsChecker)
class _TextUsername:
    """
    Gives a casd checker the username as text: casd's checkers (L{IUserRecordChecker}) take the
    C{str} username its frontends decode, while Twisted's IMAP4 and POP3 servers pass the raw
    C{bytes}.  A username that is not UTF-8 is refused.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, checker: ICredentialsChecker):
        self.checker = checker

    def requestAvatarId(self, credentials):
        username, password = credentials.username, credentials.password
        if isinstance(username, bytes):
            try:
                username = username.decode("utf-8")
            except UnicodeDecodeError:
                return defer.fail(UnauthorizedLogin("username is not UTF-8"))
        if isinstance(password, str):
            password = password.encode("utf-8")
        return defer.maybeDeferred(self.checker.requestAvatarId, UsernamePassword(username, password))


def _portal(checker: ICredentialsChecker, store: DemoMailStore) -> Portal:
    if IUserRecordChecker.providedBy(checker):
        checker = _TextUsername(checker)
    return Portal(DemoRealm(store), [checker])


def demoIMAPFactory(checker: ICredentialsChecker, store: DemoMailStore, reactor) -> IProtocolFactory:
    """
    A factory of demo IMAP4rev1 servers over C{store}, accepting the users C{checker} accepts
    (by C{LOGIN}, C{AUTHENTICATE PLAIN} or C{AUTHENTICATE LOGIN}, without TLS: loopback only).

    @param checker: an C{ICredentialsChecker} for C{IUsernamePassword}.  Twisted's usual
        checkers get the username as C{bytes}, as Twisted's servers give it; a casd checker
        (L{IUserRecordChecker}) gets it as UTF-8-decoded C{str}, as casd's frontends give it.
    @param reactor: the reactor for timeouts and scheduling (the service's, never the global
        one: the demo runs inside casd's process and tests).
    """
    return _DemoIMAPFactory(_portal(checker, store), reactor)


class DemoPOP3Server(pop3.POP3):
    """
    Twisted's POP3 server, USER/PASS only, with these fixes: dot-stuffing also holds across
    the 16 KiB chunks in which it sends a message (Twisted's own misses a C{.} that starts a
    chunk, or the message); DELE of a missing or deleted message is a plain C{-ERR}.

    No APOP: its challenge needs the clear-text password on the server side, which casd's
    users file does not have, and a client that sees an APOP timestamp in the greeting may use
    it without falling back to USER/PASS.  So the greeting carries no timestamp.
    """

    magic = b"casd DEMO POP3 backend (in-memory, demo only) ready"
    _lastSent = b"\n"

    def do_APOP(self, user, digest):
        self.failResponse(b"APOP is not supported here: use USER and PASS")

    def do_DELE(self, i):
        try:
            index = int(i) - 1
            if index < 0:
                raise ValueError(b"no such message")
            self.mbox.deleteMessage(index)
        except ValueError as e:
            reason = e.args[0] if e.args and isinstance(e.args[0], bytes) else b"no such message"
            self.failResponse(reason)
        else:
            self.successResponse()

    def _sendMessageContent(self, i, fpWrapper, successResponse):
        def wrap(fp):
            self._lastSent = b"\n"
            return fpWrapper(fp)

        return super()._sendMessageContent(i, wrap, successResponse)

    def transformChunk(self, chunk):
        out = super().transformChunk(chunk)
        if self._lastSent == b"\n" and chunk.startswith(b"."):
            out = b"." + out
        self._lastSent = chunk[-1:] or self._lastSent
        return out


class _DemoPOP3Factory(protocol.ServerFactory):
    def __init__(self, portal: Portal, reactor):
        self.portal = portal
        self.reactor = reactor
        self._cooperator = task.Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    def startFactory(self):
        log.info(
            "casd DEMO POP3 backend starting: in-memory mailboxes, plaintext login, "
            "demo only -- never use it for real mail"
        )

    def buildProtocol(self, addr):
        p = DemoPOP3Server()
        p.factory = self
        p.portal = self.portal
        p.schedule = self._cooperator.coiterate
        p.callLater = self.reactor.callLater
        return p


def demoPOP3Factory(checker: ICredentialsChecker, store: DemoMailStore, reactor) -> IProtocolFactory:
    """
    A factory of demo POP3 servers (C{USER}/C{PASS}) serving each user's demo INBOX from
    C{store}, accepting the users C{checker} accepts.

    @param checker: an C{ICredentialsChecker} for C{IUsernamePassword}, as for
        L{demoIMAPFactory}.
    @param reactor: the reactor for timeouts and scheduling (the service's, never the global
        one).
    """
    return _DemoPOP3Factory(_portal(checker, store), reactor)
