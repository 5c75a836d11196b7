"""
A private Dovecot 2.3 instance (IMAP, POP3, ManageSieve) for integration
tests.

The generated configuration is self-contained: nothing from the system's
C{/etc/dovecot} is read.  Everything lives under the fixture directory
except, when that directory's path is too long for Unix socket names,
Dovecot's C{base_dir} (then a short temporary directory, removed by
L{Dovecot.stop}).

Dovecot is started as root (it needs to in order to switch users):
login processes run as C{dovenull}, internal ones as C{dovecot}, and the
mail processes also run as the C{dovecot} uid/gid, which owns the
maildirs (hence C{first_valid_uid} is lowered to that uid).

The master runs in the foreground (C{dovecot -F}) as a child of the test
process, in its own session; it still writes C{base_dir/master.pid}.
L{Dovecot.stop} signals the whole process group.
"""

import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

from .procs import (
    checkTraversable, freePort, readPidFile, requireBinary,
    stopPid, waitForPort, waitForPortClosed)

# Longest socket name Dovecot creates below base_dir is about 30
# characters; sun_path holds 107.
_MAX_BASE_DIR = 70

_PROTOCOLS = ("imap", "pop3", "sieve")

_deliveryCounter = itertools.count()


def _checkField(kind, value):
    if ":" in value or "\n" in value:
        raise ValueError("%s %r may not contain ':' or newlines"
                         % (kind, value))


class Dovecot:
    """
    A private Dovecot server on C{127.0.0.1}.

    @ivar host: Always C{"127.0.0.1"}.
    @ivar imapPort: Plain IMAP (with STARTTLS when C{tls} is given), or
        L{None} if C{"imap"} is not in C{protocols}.
    @ivar imapsPort: Implicit-TLS IMAP, or L{None} without C{tls}.
    @ivar pop3Port: Plain POP3 (with STLS when C{tls} is given) or L{None}.
    @ivar pop3sPort: Implicit-TLS POP3, or L{None}.
    @ivar sievePort: ManageSieve (with STARTTLS when C{tls} is given) or
        L{None}.
    @ivar pid: PID of the Dovecot master process while running.
    @ivar logPath: Dovecot's log file (see L{logText}).
    @ivar mailUid: Owner uid of the maildirs (and of mail processes).
    @ivar mailGid: Owner gid of the maildirs.
    """

    host = "127.0.0.1"

    def __init__(self, directory, users, masterUsers=None, tls=None,
                 protocols=("imap",)):
        """
        @param directory: Directory for configuration, state, logs and
            mail; created if missing.
        @param users: Mapping of user name to clear-text password.  Names
            are lower-cased (Dovecot's default C{auth_username_format}).
        @param masterUsers: Mapping of master user name to password.  A
            master user may log in as any user with C{AUTHENTICATE PLAIN}
            (authzid = user, authcid = master).
        @param tls: C{(certPath, keyPath)} to enable STARTTLS and the
            implicit-TLS ports, or L{None} for plain text only.
        @param protocols: Any of C{"imap"}, C{"pop3"}, C{"sieve"}.
        """
        unknown = set(protocols) - set(_PROTOCOLS)
        if unknown or not protocols:
            raise ValueError("protocols must be a non-empty subset of %r"
                             % (_PROTOCOLS,))
        for name, password in list(users.items()) + list(
                (masterUsers or {}).items()):
            _checkField("user name", name)
            _checkField("password", password)
        self.directory = os.path.abspath(directory)
        self.users = {name.lower(): pw for name, pw in users.items()}
        self.masterUsers = dict(masterUsers or {})
        self.tls = tls
        self.protocols = tuple(protocols)
        self.configPath = os.path.join(self.directory, "dovecot.conf")
        self.logPath = os.path.join(self.directory, "dovecot.log")
        self.stateDir = os.path.join(self.directory, "state")
        self.mailRoot = os.path.join(self.directory, "mail")
        self.baseDir = None
        self._tempBaseDir = False
        self.pid = None
        self._process = None
        self._output = None
        self.imapPort = self.imapsPort = None
        self.pop3Port = self.pop3sPort = None
        self.sievePort = None
        internal = pwd.getpwnam("dovecot") if _userExists("dovecot") else None
        self.mailUid = internal.pw_uid if internal else None
        self.mailGid = internal.pw_gid if internal else None

    @property
    def ports(self):
        """
        All ports this instance listens on.

        @rtype: L{list} of L{int}
        """
        return [p for p in (self.imapPort, self.imapsPort, self.pop3Port,
                            self.pop3sPort, self.sievePort) if p]

    def start(self):
        """
        Write the configuration, start Dovecot and wait until every port
        accepts connections.  Ports chosen on the first start are kept by
        later starts.

        @raise RuntimeError: If Dovecot (or a requested protocol's package)
            is missing, or it fails to start.
        """
        if self.pid is not None:
            raise RuntimeError("Dovecot fixture already running")
        binary = requireBinary(
            "dovecot", [("/usr/sbin/dovecot", "dovecot-imapd")])
        if os.geteuid() != 0:
            raise RuntimeError("the Dovecot fixture must run as root")
        for user in ("dovecot", "dovenull"):
            if not _userExists(user):
                raise RuntimeError(
                    "system user %r missing: apt-get install dovecot-core"
                    % (user,))

        os.makedirs(self.directory, exist_ok=True)
        os.chmod(self.directory, 0o755)
        checkTraversable(self.directory, self.mailUid, self.mailGid)
        os.makedirs(self.stateDir, exist_ok=True)
        os.makedirs(self.mailRoot, exist_ok=True)
        os.chown(self.mailRoot, self.mailUid, self.mailGid)
        for user in self.users:
            self._ensureMaildir(user)

        self.baseDir = os.path.join(self.directory, "run")
        self._tempBaseDir = len(self.baseDir) > _MAX_BASE_DIR
        if self._tempBaseDir:
            self.baseDir = tempfile.mkdtemp(prefix="casd-dovecot-")
        else:
            os.makedirs(self.baseDir, exist_ok=True)
        os.chmod(self.baseDir, 0o755)

        usersPath = os.path.join(self.directory, "users.passwd")
        mastersPath = os.path.join(self.directory, "masters.passwd")
        _writePasswd(usersPath, self.users)
        _writePasswd(mastersPath, self.masterUsers)

        if not self.ports:
            # Chosen once: a restart comes back on the same ports.
            wanted = set(self.protocols)
            if "imap" in wanted:
                self.imapPort = freePort()
                self.imapsPort = freePort() if self.tls else None
            if "pop3" in wanted:
                self.pop3Port = freePort()
                self.pop3sPort = freePort() if self.tls else None
            if "sieve" in wanted:
                self.sievePort = freePort()

        with open(self.configPath, "w") as f:
            f.write(self._config(usersPath, mastersPath))

        # -F keeps the master in the foreground as our child, so it is
        # reaped (a daemonised master would linger as a zombie where PID 1
        # does not reap orphans, e.g. in containers); a new session makes
        # it a process-group leader so stop() can signal all its children.
        pidPath = os.path.join(self.baseDir, "master.pid")
        if os.path.exists(pidPath):
            os.remove(pidPath)
        self._output = open(os.path.join(self.directory, "dovecot.out"), "w+")
        process = subprocess.Popen(
            [binary, "-F", "-c", self.configPath],
            stdin=subprocess.DEVNULL, stdout=self._output,
            stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = process.pid

        def alive():
            return process.poll() is None

        try:
            masterPid = readPidFile(pidPath, alive=alive)
            if masterPid != process.pid:
                raise RuntimeError("master.pid holds %d, expected %d"
                                   % (masterPid, process.pid))
            for port in self.ports:
                waitForPort(self.host, port, alive=alive)
        except Exception as e:
            self._output.seek(0)
            output = self._output.read()
            self.stop()
            raise RuntimeError(
                "dovecot did not come up: %s\n%s%s\nlog:\n%s" % (
                    e, output, _packageHint(output), self.logText())) from e
        self._process = process

    def stop(self):
        """
        Stop Dovecot (the master, whose PID is in C{master.pid}, and its
        process group) and wait for its ports to close.  Calling it
        again, or before L{start}, does nothing.
        """
        pid, self.pid = self.pid, None
        if pid is not None:
            stopPid(pid, timeout=10.0, processGroup=True)
            self._output.close()
            self._process = None
            for port in self.ports:
                waitForPortClosed(self.host, port)
        self._cleanBaseDir()

    def restart(self):
        """
        Stop and start again on the same ports with the same mail.
        """
        self.stop()
        self.start()

    def _cleanBaseDir(self):
        if self._tempBaseDir and self.baseDir:
            shutil.rmtree(self.baseDir, ignore_errors=True)
            self._tempBaseDir = False

    def maildir(self, user):
        """
        Path of C{user}'s maildir (it holds C{cur}, C{new} and C{tmp}).

        @rtype: L{str}
        """
        return os.path.join(self.mailRoot, user.lower(), "Maildir")

    def deliver(self, user, messageBytes):
        """
        Drop a message into C{user}'s maildir C{new/} (via C{tmp/}, owned
        by the mail uid), where IMAP IDLE and POP3 will find it.

        @param messageBytes: The RFC 5322 message, LF or CRLF line ends.
        @return: Path of the delivered file.
        @rtype: L{str}
        """
        maildir = self._ensureMaildir(user)
        name = "%d.M%dP%dQ%d.%s" % (
            int(time.time()), time.time_ns() % 1000000, os.getpid(),
            next(_deliveryCounter), socket.gethostname().replace("/", "_"))
        tmp = os.path.join(maildir, "tmp", name)
        with open(tmp, "wb") as f:
            f.write(messageBytes)
        os.chown(tmp, self.mailUid, self.mailGid)
        final = os.path.join(maildir, "new", name)
        os.rename(tmp, final)
        return final

    def logText(self):
        """
        The contents of Dovecot's log file so far (empty if none).

        @rtype: L{str}
        """
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def _ensureMaildir(self, user):
        home = os.path.join(self.mailRoot, user.lower())
        maildir = self.maildir(user)
        for path in (self.mailRoot, home, maildir) + tuple(
                os.path.join(maildir, sub) for sub in ("cur", "new", "tmp")):
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
                os.chown(path, self.mailUid, self.mailGid)
        return maildir

    def _config(self, usersPath, mastersPath):
        lines = [
            "# Generated by tests/support/dovecot.py; self-contained.",
            "instance_name = casd-test-%d" % (self.ports[0],),
            "base_dir = %s" % (self.baseDir,),
            "state_dir = %s" % (self.stateDir,),
            "log_path = %s" % (self.logPath,),
            "protocols = %s" % (" ".join(self.protocols),),
            "listen = 127.0.0.1",
            "default_internal_user = dovecot",
            "default_login_user = dovenull",
            "first_valid_uid = %d" % (self.mailUid,),
            "last_valid_uid = 0",
            "first_valid_gid = %d" % (self.mailGid,),
            "mail_location = maildir:~/Maildir",
            "mail_max_userip_connections = 10000",
            "auth_mechanisms = plain login",
            "disable_plaintext_auth = no",
            "auth_verbose = yes",
            "verbose_proctitle = yes",
            "login_trusted_networks = 127.0.0.0/8",
            # %r/%{rip} is the (possibly forwarded) client IP; real_rip
            # is the peer that actually connected (the proxy).
            "login_log_format_elements = user=<%u> method=%m rip=%r "
            "lip=%l real_rip=%{real_rip} mpid=%e %c session=<%{session}>",
            "imap_id_log = *",
            "shutdown_clients = yes",
            # No 2 s penalty after failed logins: keeps tests fast.
            "auth_failure_delay = 0",
            # IDLE sees new mail through inotify, but the kernel allows 128 inotify instances
            # per uid machine-wide, all Dovecots' mail processes share the "dovecot" uid, and a
            # benchmark's 2,000 IDLE sessions use them all up ("Inotify instance limit ...
            # exceeded, disabling").  Dovecot then only looks every 30 s (the default), beyond
            # any test's wait: look every second instead.
            "mailbox_idle_check_interval = 1 secs",
        ]
        if self.tls:
            certPath, keyPath = self.tls
            lines += [
                "ssl = yes",
                "ssl_cert = <%s" % (os.path.abspath(certPath),),
                "ssl_key = <%s" % (os.path.abspath(keyPath),),
            ]
        else:
            lines.append("ssl = no")
        lines += [
            "passdb {",
            "  driver = passwd-file",
            "  args = scheme=PLAIN username_format=%%u %s" % (mastersPath,),
            "  master = yes",
            "  pass = yes",
            "}",
            "passdb {",
            "  driver = passwd-file",
            "  args = scheme=PLAIN username_format=%%u %s" % (usersPath,),
            "}",
            "userdb {",
            "  driver = static",
            "  args = uid=%d gid=%d home=%s/%%u" % (
                self.mailUid, self.mailGid, self.mailRoot),
            "}",
        ]

        def listener(name, port, ssl):
            return [
                "  inet_listener %s {" % (name,),
                "    address = 127.0.0.1",
                "    port = %d" % (port or 0,),
                "    ssl = %s" % ("yes" if ssl else "no",),
                "  }",
            ]

        if "imap" in self.protocols:
            lines += ["service imap-login {"]
            lines += listener("imap", self.imapPort, False)
            lines += listener("imaps", self.imapsPort, True)
            lines += ["}"]
        if "pop3" in self.protocols:
            lines += ["service pop3-login {"]
            lines += listener("pop3", self.pop3Port, False)
            lines += listener("pop3s", self.pop3sPort, True)
            lines += ["}"]
        if "sieve" in self.protocols:
            lines += ["service managesieve-login {"]
            lines += listener("sieve", self.sievePort, False)
            lines += ["}"]
            lines += [
                "plugin {",
                "  sieve = file:~/sieve;active=~/.dovecot.sieve",
                "}",
            ]
        return "\n".join(lines) + "\n"


def _userExists(name):
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _writePasswd(path, users):
    with open(path, "w") as f:
        for name, password in users.items():
            f.write("%s:{PLAIN}%s::::::\n" % (name, password))
    # Read by the auth process, which runs as the dovecot user.
    os.chmod(path, 0o644)


def _packageHint(text):
    hints = []
    lowered = text.lower()
    if "pop3" in lowered:
        hints.append("dovecot-pop3d")
    if "sieve" in lowered:
        hints.append("dovecot-managesieved")
    if hints and ("unknown" in lowered or "not found" in lowered
                  or "no such file" in lowered):
        return "(maybe not installed: apt-get install %s)" % (
            " ".join(hints),)
    return ""
