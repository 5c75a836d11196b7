# -*- test-case-name: tests.test_auth -*-
"""
The users file: casd's embedded default directory, in the spirit of Dovecot's passwd-file.

One user a line::

    login:{SCHEME}hash[:key=value key=value ...]

or Dovecot's eight-field form C{login:password:uid:gid:gecos:home:shell:extra}, whose eighth field
holds the same C{key=value} pairs.  Known keys: C{mailhost}, C{site}, C{address},
C{backend_login}, C{disabled} (C{yes}/C{no}); any other key is a policy attribute.  Blank lines and
lines starting with C{#} are ignored.  Logins are matched case-insensitively.
"""

from __future__ import annotations

import os
from typing import Callable

from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger

from casd.auth import UnknownUser, UserRecord, hashing
from casd.interfaces import IUserDirectory, IUserRecordChecker

_TRUE = ("yes", "true", "1", "y")
_KNOWN = {"mailhost", "site", "address", "backend_login", "disabled"}


class UsersFileError(ValueError):
    """
    The users file cannot be used; C{str()} names the file and line.
    """


def parseUsers(text: str, path: str) -> dict[str, tuple[str, UserRecord]]:
    """
    Parse a users file.

    @return: lower-cased login -> (stored hash, record).
    @raise UsersFileError: on a malformed line (the message never quotes a hash).
    """
    users: dict[str, tuple[str, UserRecord]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        if len(fields) < 2 or not fields[0] or not fields[1]:
            raise UsersFileError(f"{path}:{number}: expected login:{{SCHEME}}hash[:fields]")
        login, stored = fields[0], fields[1]
        extra = fields[7] if len(fields) >= 8 else (":".join(fields[2:]) if len(fields) == 3 else "")
        try:
            hashing.splitScheme(stored)
        except hashing.UnknownScheme as e:
            raise UsersFileError(f"{path}:{number}: unknown password scheme {e}") from None
        attrs = {}
        for item in extra.split():
            key, sep, value = item.partition("=")
            if not sep:
                raise UsersFileError(f"{path}:{number}: expected key=value, got {key!r}")
            attrs[key.lower()] = value
        record = UserRecord(
            login=login,
            address=attrs.get("address", ""),
            backendLogin=attrs.get("backend_login", ""),
            mailHost=attrs.get("mailhost", ""),
            site=attrs.get("site", ""),
            disabled=attrs.get("disabled", "no").lower() in _TRUE,
            policy=[(k, v) for k, v in attrs.items() if k not in _KNOWN],
        )
        key = login.lower()
        if key in users:
            raise UsersFileError(f"{path}:{number}: duplicate login {login!r}")
        users[key] = (stored, record)
    return users


@implementer(ICredentialsChecker, IUserRecordChecker, IUserDirectory)
class UsersFileChecker:
    """
    Checks passwords against a users file, re-read when it changes.

    @ivar runInThread: C{callable(f, *args) -> Deferred}: where hashes are verified (a thread pool).
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    #: Seconds between two looks at the file's modification time.
    statInterval = 1.0

    def __init__(self, path: str, runInThread: Callable, clock) -> None:
        self.path = path
        self.runInThread = runInThread
        self.clock = clock
        self._stamp = None
        self._checked = float("-inf")
        self._users: dict[str, tuple[str, UserRecord]] = {}
        self._byAddress: dict[str, tuple[str, UserRecord]] = {}
        self._dummy: str | None = None
        self.reload(initial=True)

    def _fileStamp(self):
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, initial: bool = False) -> None:
        """
        Re-read the file.  At start-up an error is raised; later it is logged and the previous
        table kept, so a bad edit never locks everyone out.
        """
        try:
            stamp = self._fileStamp()
            with open(self.path, encoding="utf-8") as f:
                users = parseUsers(f.read(), self.path)
        except (OSError, UnicodeDecodeError, UsersFileError) as e:
            if initial:
                raise UsersFileError(str(e)) from None
            self.log.error("users file not reloaded, keeping the previous one: {reason}", reason=str(e))
            return
        if not initial:
            self.log.info("users file {path} reloaded: {count} users", path=self.path, count=len(users))
        clear = sum(1 for stored, _ in users.values() if hashing.splitScheme(stored)[0] in ("PLAIN", "CLEAR"))
        if clear:
            self.log.warn(
                "users file {path}: {count} passwords stored in clear ({{PLAIN}}): for tests only;"
                " hash them with casd hash-password",
                path=self.path,
                count=clear,
            )
        self._users = users
        self._byAddress = {r.address.lower(): (h, r) for h, r in users.values() if r.address}
        self._stamp = stamp

    def _maybeReload(self) -> None:
        now = self.clock.seconds()
        if now - self._checked < self.statInterval:
            return
        self._checked = now
        try:
            stamp = self._fileStamp()
        except OSError:
            return
        if stamp != self._stamp:
            self.reload()

    def lookup(self, name: str):
        """
        The record of a login or address, without checking a password (L{IUserDirectory}).

        @return: a L{Deferred} firing with the L{UserRecord} or C{None}.
        """
        self._maybeReload()
        entry = self._users.get(name.lower())
        if entry is None:
            entry = self._byAddress.get(name.lower())
        return defer.succeed(entry[1] if entry else None)

    def _dummyHash(self) -> str:
        if self._dummy is None:
            self._dummy = hashing.makeHash("BLF-CRYPT", os.urandom(16), rounds=10)
        return self._dummy

    @defer.inlineCallbacks
    def requestAvatarId(self, credentials):
        self._maybeReload()
        entry = self._users.get(credentials.username.lower())
        if entry is None:
            # Spend the time a real check would, so unknown users cannot be told by timing.
            yield self.runInThread(hashing.verify, self._dummyHash(), credentials.password)
            raise UnknownUser("unknown user")
        stored, record = entry
        ok = yield self.runInThread(hashing.verify, stored, credentials.password)
        if not ok:
            raise UnauthorizedLogin("wrong password")
        return record
