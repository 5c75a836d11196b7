"""
A private SOGo 5 (Debian C{sogo} + C{sogo-activesync}) on C{127.0.0.1}: ActiveSync, CalDAV and
CardDAV behind casd.

It needs a L{tests.support.postgres.PostgreSQL} (SOGo's profile, folder and session tables, and
the C{sogo_users} table it authenticates against), a private C{memcached} (started here) and an
IMAP server (L{TrustingDovecot}: the private Dovecot of L{tests.support.dovecot} trusting logins
from the SOGo host, since SOGo behind proxy authentication has no password to give it).  Every setting is a C{sogod} argument: GNUstep would otherwise read
C{~/GNUstep/Defaults} of the C{sogo} account.  C{-SOGoTrustProxyAuthentication YES} makes SOGo
take the user from C{x-webobjects-remote-user}, which casd sets (and strips from clients).
"""

import os
import pwd
import subprocess

from .dovecot import Dovecot
from .procs import checkTraversable, freePort, requireBinary, stopPid, waitForPort, waitForPortClosed


class TrustingDovecot(Dovecot):
    """
    The private Dovecot as a webmail host's IMAP server sees it in a single sign-on deployment:
    logins from 127.0.0.1 need no password (a C{static} passdb with C{nopassword} and
    C{allow_nets}), because the front end already authenticated the user.  SOGo behind trusted
    proxy authentication has no user password to give IMAP.
    """

    def _config(self, usersPath, mastersPath):
        text = super()._config(usersPath, mastersPath)
        trusting = (
            "passdb {\n  driver = static\n  args = nopassword=y allow_nets=127.0.0.1/32\n}\n"
        )
        return text.replace("passdb {", trusting + "passdb {", 1)


class Memcached:
    host = "127.0.0.1"

    def __init__(self):
        self.port = None
        self.pid = None
        self._process = None

    def start(self):
        binary = requireBinary("memcached", [("/usr/bin/memcached", "memcached")])
        self.port = freePort()
        self._process = subprocess.Popen(
            [binary, "-u", "nobody", "-l", self.host, "-p", str(self.port), "-U", "0", "-m", "16"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self._process.pid
        waitForPort(self.host, self.port, alive=lambda: self._process.poll() is None)
        return self

    def stop(self):
        if self.pid is not None:
            stopPid(self.pid)
            self.pid = None
        if self._process is not None:
            self._process.wait()
            self._process = None


class SOGo:
    """
    @ivar port: sogod's HTTP port (paths start with C{/SOGo}).
    @ivar pid: sogod's process ID while running.
    """

    host = "127.0.0.1"

    def __init__(self, directory, postgres, imapPort, users, domain="example.com"):
        """
        @param postgres: a started L{tests.support.postgres.PostgreSQL}.
        @param users: login -> password (stored in C{sogo_users}; SOGo's own logins use them,
            proxied ones do not).
        """
        self.directory = os.path.abspath(directory)
        self.postgres = postgres
        self.imapPort = imapPort
        self.users = dict(users)
        self.domain = domain
        self.logPath = os.path.join(self.directory, "sogo.log")
        self.pidPath = os.path.join(self.directory, "sogo.pid")
        self.memcached = Memcached()
        self.port = None
        self.pid = None
        self._process = None

    @property
    def url(self):
        return "http://%s:%d/SOGo/" % (self.host, self.port)

    def _prepareDatabase(self):
        pg = self.postgres
        if "sogo" not in pg.psql("SELECT datname FROM pg_database").split():
            pg.psql("CREATE DATABASE sogo")
        rows = ", ".join(
            "('%s', '%s', '%s', '%s')" % (
                login, password.replace("'", "''"), login, "%s@%s" % (login, self.domain))
            for login, password in self.users.items())
        pg.psql(
            "CREATE TABLE IF NOT EXISTS sogo_users (c_uid varchar(128) PRIMARY KEY,"
            " c_name varchar(128), c_password varchar(128), c_cn varchar(128), mail varchar(128));"
            " DELETE FROM sogo_users;"
            " INSERT INTO sogo_users (c_uid, c_password, c_name, mail) VALUES %s" % (rows,),
            "sogo")

    def arguments(self):
        pg = self.postgres
        imap = "imap://127.0.0.1:%d/?tls=NO" % (self.imapPort,)
        sources = (
            '({type = sql; id = users; viewURL = "%s"; canAuthenticate = YES;'
            ' isAddressBook = YES; displayName = "Users"; userPasswordAlgorithm = plain;})'
            % (pg.url("sogo", "sogo_users"),))
        return [
            "-WONoDetach", "YES",
            "-WOPort", "%s:%d" % (self.host, self.port),
            "-WOLogFile", self.logPath,
            "-WOPidFile", self.pidPath,
            "-WOWorkersCount", "3",
            "-WOWatchDogRequestTimeout", "10",
            "-SOGoProfileURL", pg.url("sogo", "sogo_user_profile"),
            "-OCSFolderInfoURL", pg.url("sogo", "sogo_folder_info"),
            "-OCSSessionsFolderURL", pg.url("sogo", "sogo_sessions_folder"),
            "-OCSEMailAlarmsFolderURL", pg.url("sogo", "sogo_alarms_folder"),
            "-OCSCacheFolderURL", pg.url("sogo", "sogo_cache_folder"),
            "-OCSStoreURL", pg.url("sogo", "sogo_store"),
            "-OCSAclURL", pg.url("sogo", "sogo_acl"),
            "-SOGoIMAPServer", imap,
            "-NGImap4AuthMechanism", "plain",
            "-SOGoIMAPAclStyle", "rfc4314",
            "-SOGoMemcachedHost", "127.0.0.1:%d" % (self.memcached.port,),
            "-SOGoUserSources", sources,
            "-SOGoMailDomain", self.domain,
            "-SOGoTrustProxyAuthentication", "YES",
            "-SOGoMaximumPingInterval", "3540",
            "-SOGoMaximumSyncInterval", "3540",
            "-SOGoInternalSyncInterval", "5",
            "-SOGoTimeZone", "UTC",
            "-SOGoLanguage", "English",
            "-SOGoPasswordChangeEnabled", "NO",
        ]

    def start(self, timeout=60.0):
        binary = requireBinary("sogod", [("/usr/sbin/sogod", "sogo")])
        account = pwd.getpwnam("sogo")
        os.makedirs(self.directory, exist_ok=True)
        checkTraversable(self.directory, account.pw_uid, account.pw_gid)
        os.chown(self.directory, account.pw_uid, account.pw_gid)
        self._prepareDatabase()
        self.memcached.start()
        self.port = freePort()

        def demote():
            os.setsid()
            os.setgid(account.pw_gid)
            os.initgroups("sogo", account.pw_gid)
            os.setuid(account.pw_uid)

        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": self.directory,
               "LC_ALL": "C.UTF-8", "GNUSTEP_USER_ROOT": os.path.join(self.directory, "GNUstep")}
        self._output = open(os.path.join(self.directory, "sogod.out"), "ab")
        self._process = subprocess.Popen(
            [binary] + self.arguments(), stdin=subprocess.DEVNULL, stdout=self._output,
            stderr=subprocess.STDOUT, preexec_fn=demote, env=env, cwd=self.directory,
        )
        self.pid = self._process.pid
        try:
            waitForPort(self.host, self.port, timeout=timeout,
                        alive=lambda: self._process.poll() is None)
        except RuntimeError:
            self.stop()
            raise RuntimeError("sogod did not start:\n" + self.logText()[-3000:])
        return self

    def stop(self):
        """
        Stop sogod (its whole process group: the parent and its workers), then memcached.
        """
        if self.pid is not None:
            stopPid(self.pid, timeout=5.0, processGroup=True)
            self.pid = None
        if self._process is not None:
            self._process.wait()
            self._process = None
            self._output.close()
            waitForPortClosed(self.host, self.port, timeout=15.0)
        self.memcached.stop()

    def logText(self):
        text = ""
        for path in (self.logPath, os.path.join(self.directory, "sogod.out")):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    text += f.read()
            except FileNotFoundError:
                pass
        return text
