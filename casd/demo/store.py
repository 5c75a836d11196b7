# -*- test-case-name: tests.test_demo -*-
"""
The DEMO mailbox store: in-memory accounts, mailboxes and messages behind casd's demo backend
(L{casd.demo.backend}).  DEMO ONLY: all mail is lost when the process stops.

Why not C{twisted.mail.imap4.MemoryAccount}: it upper-cases every mailbox name (C{Sent} would
be listed as C{SENT}), treats any name sharing a prefix as a child (renaming C{Sent} also
renames C{SentItems}) and matches a LIST pattern without its reference; and Twisted ships no
in-memory mailbox except C{SimpleMailbox} in its own test suite, whose C{fetch} and C{store} do
nothing.  So this module has its own small account, mailbox and message classes.
"""

from __future__ import annotations

import email.message
import email.utils
import itertools
import re
import time
import uuid
from io import BytesIO
from typing import Callable, Iterable

from zope.interface import implementer

from twisted.cred.portal import IRealm
from twisted.internet import defer
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail.interfaces import IMailboxPOP3



from casd.demo.message import DemoMessage, _normalizeNewlines, _parseDate, _SYSTEM_FLAGS

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


