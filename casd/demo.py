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

Why not C{twisted.mail.imap4.MemoryAccount}: it upper-cases every mailbox name (C{Sent} would
be listed as C{SENT}), treats any name sharing a prefix as a child (renaming C{Sent} also
renames C{SentItems}) and matches a LIST pattern without its reference; and Twisted ships no in-memory mailbox
except C{SimpleMailbox} in its own test suite, whose C{fetch} and C{store} do nothing.  So this
module has its own small account, mailbox and message classes.
"""

from __future__ import annotations

import copy
import email.message
import email.utils
import itertools
import re
import time
import uuid
from datetime import datetime
from email.header import Header, decode_header, make_header
from io import BytesIO
from typing import Callable, Iterable

from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.mail import imap4, pop3
from twisted.mail.interfaces import IMailboxPOP3

from casd.interfaces import IUserRecordChecker

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

DEMO_FROM = "casd demo <demo@casd.invalid>"
WELCOME_SUBJECT = "Welcome to casd"
_WELCOME_BODY = """\
Hello {owner},

Welcome to casd!  This message comes from casd's DEMO mailbox backend, a small
in-memory IMAP and POP3 server that `twistd -n cas --demo` runs beside the proxy,
so that you can see the whole path in one command:

    your mail client  ->  casd (the Client Access Server)  ->  this demo backend

Everything here lives in memory and is gone when casd stops.  The demo backend
is for trying casd out only: in production casd relays you to your real mailbox
server and stores no mail itself.

Try appending a message, flagging this one or deleting it: every IMAP command
you send goes through casd on its way here.

-- casd demo
"""

_DELIM = "/"
_INBOX = "INBOX"
_SYSTEM_FLAGS = {f.lower(): f for f in ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")}
_RECENT = "\\Recent"
_STATUS = {
    "MESSAGES": "getMessageCount",
    "RECENT": "getRecentCount",
    "UIDNEXT": "getUIDNext",
    "UIDVALIDITY": "getUIDValidity",
    "UNSEEN": "getUnseenCount",
}


def ownerOf(avatarId: object) -> str:
    """
    The mailbox owner for a checker's avatar id: its C{login} attribute if it has one (casd's
    users-file checker returns a record), else the id itself; bytes are decoded as UTF-8.
    """
    login = getattr(avatarId, "login", avatarId)
    if isinstance(login, bytes):
        login = login.decode("utf-8", "replace")
    return str(login)


def _canonicalName(name: str | bytes) -> str:
    """
    A mailbox name as the account keys it: str, no trailing delimiter, and C{INBOX} (alone or as
    the first level of a path) spelled C{INBOX} whatever its case.
    """
    if isinstance(name, bytes):
        name = name.decode("imap4-utf-7")
    name = name.rstrip(_DELIM)
    head, sep, rest = name.partition(_DELIM)
    if head.upper() == _INBOX:
        name = _INBOX + sep + rest
    return name


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


@implementer(imap4.IMailboxInfo)
class _ListInfo:
    """
    What LIST shows for a mailbox: its attributes (C{IMailboxInfo.getFlags} doubles as mailbox
    attributes in Twisted's LIST, while a selected mailbox's C{getFlags} gives message flags).
    """

    def __init__(self, attributes: list[str]):
        self._attributes = attributes

    def getFlags(self):
        return self._attributes

    def getHierarchicalDelimiter(self):
        return _DELIM


@implementer(imap4.IMailbox, imap4.IMailboxInfo)
class DemoMailbox:
    """
    An in-memory mailbox shared by every session of its owner.

    C{\\Recent} is simplified: a message is recent from its arrival until the next read-write
    SELECT of its mailbox has reported it.
    """

    maxMessageSize = 10 * 1024 * 1024

    def __init__(self, name: str, uidValidity: int, clock: Callable[[], float] = time.time):
        self.name = name
        self.uidValidity = uidValidity
        self.messages: list[DemoMessage] = []
        self.listeners: list = []
        self.destroyed = False
        self.specialUse: str | None = None
        self._nextUID = 1
        self._clock = clock

    # IMailboxInfo

    def getFlags(self):
        if self.destroyed:
            return ["\\Noselect"]
        keywords = sorted({f for m in self.messages for f in m.flags if not f.startswith("\\")})
        return list(_SYSTEM_FLAGS.values()) + keywords

    def getHierarchicalDelimiter(self):
        return _DELIM

    # IMailbox

    def getUIDValidity(self):
        return self.uidValidity

    def getUIDNext(self):
        return self._nextUID

    def getUID(self, message):
        return self.messages[message - 1].uid

    def getMessageCount(self):
        return len(self.messages)

    def getRecentCount(self):
        return sum(1 for m in self.messages if m.recent)

    def getUnseenCount(self):
        return sum(1 for m in self.messages if "\\Seen" not in m.flags)

    def isWriteable(self):
        return True

    def destroy(self):
        self.destroyed = True
        self.messages = []

    def requestStatus(self, names):
        return {n: getattr(self, _STATUS[n.upper()])() for n in names if n.upper() in _STATUS}

    def addListener(self, listener):
        self.listeners.append(listener)

    def removeListener(self, listener):
        self.listeners.remove(listener)

    def addMessage(self, message, flags=(), date=None):
        """
        Store a message (a file or bytes); fire with its UID and tell the listeners.
        """
        return defer.maybeDeferred(self.deliver, message, flags, date)

    def deliver(self, message, flags=(), date=None) -> int:
        """
        L{addMessage}, synchronously: store a message (a file or bytes), tell the listeners
        (sessions that have this mailbox selected, idling or not) and return its UID.

        @raise imap4.MailboxException: if the message is too large or the mailbox was deleted.
        """
        if self.destroyed:
            raise imap4.MailboxException("mailbox was deleted")
        data = message if isinstance(message, bytes) else message.read()
        if len(data) > self.maxMessageSize:
            raise imap4.MailboxException(f"message larger than the demo's {self.maxMessageSize} octets")
        now = self._clock()
        msg = DemoMessage(_normalizeNewlines(data), self._nextUID, flags or (), _parseDate(date, now))
        self._nextUID += 1
        self.messages.append(msg)
        for listener in list(self.listeners):
            listener.newMessages(len(self.messages), self.getRecentCount())
        return msg.uid

    def expunge(self):
        """
        Remove the C{\\Deleted} messages; return the EXPUNGE numbers to report, in order (each
        relative to the mailbox after the previous ones went).
        """
        kept, gone = [], []
        for seq, msg in enumerate(self.messages, 1):
            if "\\Deleted" in msg.flags:
                gone.append(seq - len(gone))
            else:
                kept.append(msg)
        self.messages = kept
        return gone

    def fetch(self, messages, uid):
        if not self.messages:
            return []
        try:
            messages.last = self.messages[-1].uid if uid else len(self.messages)
        except ValueError:
            pass  # already set by a previous use of this message set
        return [
            (seq, msg)
            for seq, msg in enumerate(self.messages, 1)
            if (msg.uid if uid else seq) in messages
        ]

    def store(self, messages, flags, mode, uid):
        result = {}
        for seq, msg in self.fetch(messages, uid):
            msg.setFlags(flags, mode)
            result[seq] = msg.getFlags()
        return result

    # for the server and POP3

    def clearRecent(self) -> None:
        for msg in self.messages:
            msg.recent = False

    def removeMessages(self, doomed: Iterable[DemoMessage]) -> None:
        doomed = {id(m) for m in doomed}
        self.messages = [m for m in self.messages if id(m) not in doomed]


@implementer(imap4.IMailbox, imap4.IMailboxInfo)
class _ExaminedMailbox:
    """
    A read-only view of a mailbox, for EXAMINE (and STATUS).
    """

    def __init__(self, mailbox: DemoMailbox):
        self._mailbox = mailbox

    def __getattr__(self, name):
        return getattr(self._mailbox, name)

    def isWriteable(self):
        return False

    def store(self, messages, flags, mode, uid):
        raise imap4.ReadOnlyMailbox()

    def expunge(self):
        raise imap4.ReadOnlyMailbox()


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class DemoAccount:
    """
    One user's mailboxes.  Names are case-sensitive except C{INBOX}; the hierarchy delimiter is
    C{/}.
    """

    def __init__(self, owner: str, newMailbox: Callable[[str], DemoMailbox]):
        self.owner = owner
        self.mailboxes: dict[str, DemoMailbox] = {}
        self.subscriptions: set[str] = set()
        self._newMailbox = newMailbox

    @property
    def inbox(self) -> DemoMailbox:
        return self.mailboxes[_INBOX]

    # IAccount

    def addMailbox(self, name, mbox=None):
        name = _canonicalName(name)
        if not name:
            raise imap4.MailboxException("empty mailbox name")
        if name in self.mailboxes:
            raise imap4.MailboxCollision(name)
        self.mailboxes[name] = mbox if mbox is not None else self._newMailbox(name)
        return True

    def create(self, pathspec):
        name = _canonicalName(pathspec)
        paths = [p for p in name.split(_DELIM) if p]
        for depth in range(1, len(paths)):
            parent = _DELIM.join(paths[:depth])
            if parent not in self.mailboxes:
                self.addMailbox(parent)
        if name in self.mailboxes:
            if not self.mailboxes[name].destroyed:
                return False
            del self.mailboxes[name]
        self.addMailbox(name)
        return True

    def select(self, name, rw=True):
        mbox = self.mailboxes.get(_canonicalName(name))
        if mbox is None or rw:
            return mbox
        return _ExaminedMailbox(mbox)

    def delete(self, name):
        name = _canonicalName(name)
        mbox = self.mailboxes.get(name)
        if mbox is None:
            raise imap4.NoSuchMailbox(name)
        if self._children(name):
            if mbox.destroyed:
                raise imap4.MailboxException("mailbox has inferior mailboxes and is \\Noselect")
            mbox.destroy()  # RFC 3501 6.3.4: keep the name as \Noselect while it has children
        else:
            mbox.destroy()
            del self.mailboxes[name]
        self.subscriptions.discard(name)

    def rename(self, oldname, newname):
        oldname, newname = _canonicalName(oldname), _canonicalName(newname)
        if oldname not in self.mailboxes:
            raise imap4.NoSuchMailbox(oldname)
        if newname in self.mailboxes:
            raise imap4.MailboxCollision(newname)
        if newname.startswith(oldname + _DELIM):
            raise imap4.MailboxException("cannot move a mailbox into itself")
        moves = [(oldname, newname)] + [
            (child, newname + child[len(oldname) :]) for child in self._children(oldname)
        ]
        for old, new in moves:
            if old != oldname and new in self.mailboxes:
                raise imap4.MailboxCollision(new)
        for old, new in moves:
            self.mailboxes[new] = self.mailboxes.pop(old)
            self.mailboxes[new].name = new
            if old in self.subscriptions:
                self.subscriptions.discard(old)
                self.subscriptions.add(new)
        parents = newname.split(_DELIM)
        for depth in range(1, len(parents)):
            parent = _DELIM.join(parents[:depth])
            if parent not in self.mailboxes:
                self.addMailbox(parent)
        return True

    def isSubscribed(self, name):
        return _canonicalName(name) in self.subscriptions

    def subscribe(self, name):
        self.subscriptions.add(_canonicalName(name))

    def unsubscribe(self, name):
        name = _canonicalName(name)
        if name not in self.subscriptions:
            raise imap4.MailboxException(f"not subscribed to {name}")
        self.subscriptions.discard(name)

    def listMailboxes(self, ref, wildcard):
        ref, wildcard = (x.decode("imap4-utf-7") if isinstance(x, bytes) else x for x in (ref, wildcard))
        if not wildcard:
            # RFC 3501 6.3.8: an empty pattern asks for the delimiter and the root
            return [("", _ListInfo(["\\Noselect"]))]
        pattern = ref + wildcard  # RFC 3501 6.3.8: the reference and the pattern, concatenated
        regex = "".join(
            ".*" if p == "*" else f"[^{re.escape(_DELIM)}]*" if p == "%" else re.escape(p)
            for p in re.split(r"([*%])", pattern)
        )
        matches = []
        for name in sorted(self.mailboxes, key=lambda n: (n != _INBOX, n)):
            if re.fullmatch(regex, name) or (
                name == _INBOX and re.fullmatch(regex, name, re.IGNORECASE)
            ):
                matches.append((name, _ListInfo(self._attributes(name))))
        return matches

    # INamespacePresenter

    def getPersonalNamespaces(self):
        return [[b"", _DELIM.encode("ascii")]]

    def getSharedNamespaces(self):
        return None

    def getOtherNamespaces(self):
        return None

    def getUserNamespaces(self):
        return None

    # helpers

    def _children(self, name: str) -> list[str]:
        return [n for n in self.mailboxes if n.startswith(name + _DELIM)]

    def _attributes(self, name: str) -> list[str]:
        mbox = self.mailboxes[name]
        attributes = ["\\HasChildren" if self._children(name) else "\\HasNoChildren"]
        if mbox.destroyed:
            attributes.insert(0, "\\Noselect")
        if mbox.specialUse:
            attributes.append(mbox.specialUse)
        return attributes


class DemoMailStore:
    """
    All of the demo's mail, in memory: one L{DemoAccount} per user, made on the user's first
    login with an C{INBOX} holding a welcome message and an empty C{Sent} folder.

    @param clock: gives the current POSIX time (for internal dates and UIDVALIDITY).
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._accounts: dict[str, DemoAccount] = {}
        self._uidValidities = itertools.count(max(1, int(clock()) % 2**31))

    def owners(self) -> list[str]:
        """
        The users who have a mailbox so far.
        """
        return sorted(self._accounts)

    def accountFor(self, owner: str, address: str | None = None) -> DemoAccount:
        """
        The account of C{owner}, made (and seeded) if this is their first login.

        @param address: the owner's e-mail address, for the welcome message's C{To:} (when the
            account is made); by default C{owner} if it holds an C{@}, else
            C{owner@casd.invalid}.
        """
        account = self._accounts.get(owner)
        if account is None:
            account = DemoAccount(owner, self._newMailbox)
            account.addMailbox(_INBOX)
            account.addMailbox("Sent")
            account.mailboxes["Sent"].specialUse = "\\Sent"
            account.subscriptions.update({_INBOX, "Sent"})
            account.inbox.deliver(self.welcomeMessage(owner, address))
            self._accounts[owner] = account
        return account

    def deliver(self, owner: str, message: bytes, mailbox: str = _INBOX, flags: Iterable[str] = ()) -> int:
        """
        Put C{message} in a mailbox of C{owner} (making their account if need be), as new mail
        arriving would; every session that has that mailbox selected is told.

        @return: the new message's UID.
        @raise imap4.NoSuchMailbox: if there is no such mailbox.
        """
        account = self.accountFor(owner)
        mbox = account.mailboxes.get(_canonicalName(mailbox))
        if mbox is None or mbox.destroyed:
            raise imap4.NoSuchMailbox(mailbox)
        return mbox.deliver(message, list(flags))

    def welcomeMessage(self, owner: str, address: str | None = None) -> bytes:
        """
        The welcome message seeded in a new INBOX.
        """
        owner = re.sub(r"[\x00-\x1f\x7f]", "", owner)  # these go into headers
        address = re.sub(r"[\x00-\x1f\x7f]", "", address or "")
        to = address or (owner if "@" in owner else f"{owner}@casd.invalid")
        now = self._clock()
        headers = [
            ("From", DEMO_FROM),
            ("To", to),
            ("Subject", WELCOME_SUBJECT),
            ("Date", email.utils.formatdate(now, localtime=False)),
            ("Message-ID", f"<welcome.{uuid.uuid4().hex}@casd.invalid>"),
            ("MIME-Version", "1.0"),
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Transfer-Encoding", "8bit"),
        ]
        head = "".join(f"{name}: {value}\r\n" for name, value in headers)
        body = _WELCOME_BODY.format(owner=owner).replace("\n", "\r\n")
        return (head + "\r\n" + body).encode("utf-8")

    def _newMailbox(self, name: str) -> DemoMailbox:
        return DemoMailbox(name, next(self._uidValidities), self._clock)


@implementer(IRealm)
class DemoRealm:
    """
    Gives an authenticated user their demo account (IMAP) or INBOX (POP3).  The owner is
    L{ownerOf} the avatar id; a record's C{address}, if any, addresses the welcome message.
    """

    def __init__(self, store: DemoMailStore):
        self.store = store

    def requestAvatar(self, avatarId, mind, *interfaces):
        address = getattr(avatarId, "address", None)
        account = self.store.accountFor(ownerOf(avatarId), address if isinstance(address, str) else None)
        for iface in interfaces:
            if iface is imap4.IAccount:
                return iface, account, lambda: None
            if iface is IMailboxPOP3:
                return iface, POP3Inbox(account.inbox), lambda: None
        raise NotImplementedError("the demo backend serves IMAP accounts and POP3 mailboxes only")


@implementer(IMailboxPOP3)
class POP3Inbox:
    """
    The POP3 view of an INBOX for one session: the messages there at login, 0-based; deletions
    take effect at QUIT (C{sync}).  Retrieving a message marks it C{\\Seen} for IMAP.
    """

    loginDelay = 0
    messageExpiration = None

    def __init__(self, mailbox: DemoMailbox):
        self._mailbox = mailbox
        self._messages = list(mailbox.messages)
        self._deleted: set[int] = set()

    def _message(self, i: int) -> DemoMessage:
        # bytes: twisted.mail.pop3 joins a ValueError's args into its -ERR line as bytes
        if not 0 <= i < len(self._messages):
            raise ValueError(b"no such message")
        return self._messages[i]

    def listMessages(self, i=None):
        if i is None:
            return [0 if n in self._deleted else m.getSize() for n, m in enumerate(self._messages)]
        size = self._message(i).getSize()
        return 0 if i in self._deleted else size

    def getMessage(self, i):
        msg = self._message(i)
        if i in self._deleted:
            raise ValueError(b"message deleted")
        msg.setFlags(["\\Seen"], 1)
        # twisted.mail.pop3 turns every LF into CRLF on the way out, so hand it LF endings
        return BytesIO(msg.raw.replace(b"\r\n", b"\n"))

    def getUidl(self, i):
        return b"%d.%d" % (self._mailbox.uidValidity, self._message(i).uid)

    def deleteMessage(self, i):
        self._message(i)
        if i in self._deleted:
            raise ValueError(b"message already deleted")
        self._deleted.add(i)

    def undeleteMessages(self):
        self._deleted.clear()

    def sync(self):
        self._mailbox.removeMessages(self._messages[i] for i in self._deleted)
        self._messages = [m for n, m in enumerate(self._messages) if n not in self._deleted]
        self._deleted.clear()


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


def demoIMAPFactory(checker: ICredentialsChecker, store: DemoMailStore, reactor=None) -> IProtocolFactory:
    """
    A factory of demo IMAP4rev1 servers over C{store}, accepting the users C{checker} accepts
    (by C{LOGIN}, C{AUTHENTICATE PLAIN} or C{AUTHENTICATE LOGIN}, without TLS: loopback only).

    @param checker: an C{ICredentialsChecker} for C{IUsernamePassword}.  Twisted's usual
        checkers get the username as C{bytes}, as Twisted's servers give it; a casd checker
        (L{IUserRecordChecker}) gets it as UTF-8-decoded C{str}, as casd's frontends give it.
    @param reactor: the reactor for timeouts and scheduling; the global one if L{None}.
    """
    if reactor is None:
        from twisted.internet import reactor
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


def demoPOP3Factory(checker: ICredentialsChecker, store: DemoMailStore, reactor=None) -> IProtocolFactory:
    """
    A factory of demo POP3 servers (C{USER}/C{PASS}) serving each user's demo INBOX from
    C{store}, accepting the users C{checker} accepts.

    @param checker: an C{ICredentialsChecker} for C{IUsernamePassword}, as for
        L{demoIMAPFactory}.
    @param reactor: the reactor for timeouts and scheduling; the global one if L{None}.
    """
    if reactor is None:
        from twisted.internet import reactor
    return _DemoPOP3Factory(_portal(checker, store), reactor)
