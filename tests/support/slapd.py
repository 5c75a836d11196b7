"""
A private OpenLDAP slapd for integration tests.

slapd runs in the foreground (C{-d}) as a child of the test process, with
a C{slapd.conf}-style configuration, an mdb database and its debug output
(the C{stats} level: connections, binds, searches) in C{slapd.log} under
the fixture directory.

Besides the standard core, cosine, inetorgperson, nis and misc schemas
(misc provides C{mailHost}), the fixture writes a tiny C{casd.schema}
with C{mailRoutingSite}, C{accountStatus} and the auxiliary object class
C{casdMailUser}.  Its OIDs are under 1.3.6.1.4.1.32473, the arc that
RFC 5612 reserves for documentation.
"""

import base64
import hashlib
import os
import subprocess

from .procs import (
    freePort, requireBinary, stopPid, waitForPort,
    waitForPortClosed)

SCHEMA_DIRS = ("/etc/ldap/schema", "/etc/openldap/schema")
MODULE_DIRS = ("/usr/lib/ldap", "/usr/lib/openldap", "/usr/lib64/openldap")

ROOT_PASSWORD = "rootpw-secret"

SERVICE_PASSWORD = "servicepw"

USERS = {
    "alice": "alice-secret",
    "bob": "bob-secret",
    "carol": "carol-secret",
}

CASD_SCHEMA = """\
# casd test schema (written by tests/support/slapd.py).
attributetype ( 1.3.6.1.4.1.32473.1.1.1
    NAME 'mailRoutingSite'
    DESC 'Site whose backends hold this mailbox'
    EQUALITY caseIgnoreMatch
    SUBSTR caseIgnoreSubstringsMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{256}
    SINGLE-VALUE )

attributetype ( 1.3.6.1.4.1.32473.1.1.2
    NAME 'accountStatus'
    DESC 'active or disabled'
    EQUALITY caseIgnoreMatch
    SYNTAX 1.3.6.1.4.1.1466.115.121.1.15{64}
    SINGLE-VALUE )

objectclass ( 1.3.6.1.4.1.32473.1.2.1
    NAME 'casdMailUser'
    DESC 'Mail routing data used by casd'
    SUP top AUXILIARY
    MAY ( mailHost $ mailRoutingSite $ accountStatus ) )
"""


def sshaPassword(password, salt=None):
    """
    Hash C{password} as an RFC 2307 C{{SSHA}} userPassword value.

    @rtype: L{str}
    """
    if salt is None:
        salt = os.urandom(8)
    digest = hashlib.sha1(password.encode("utf-8") + salt).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def serviceDN(suffix="dc=example,dc=com"):
    """
    DN of the casd service account created by L{fixtureLDIF}.

    @rtype: L{str}
    """
    return "cn=casd,ou=services,%s" % (suffix,)


def userDN(uid, suffix="dc=example,dc=com"):
    """
    DN of a user created by L{fixtureLDIF}.

    @rtype: L{str}
    """
    return "uid=%s,ou=people,%s" % (uid, suffix)


def fixtureLDIF(suffix="dc=example,dc=com", mailHosts=None,
                routingSites=None):
    """
    LDIF for the standard test directory.

    Entries: the base, C{ou=people}, C{ou=services}, the service account
    L{serviceDN} (password L{SERVICE_PASSWORD}), and users C{alice}
    (mail C{alice@example.com}), C{bob} and the disabled C{carol}
    (C{accountStatus: disabled}); passwords are in L{USERS}, stored as
    C{{SSHA}} hashes.

    @param mailHosts: Optional mapping of uid to C{mailHost} value;
        defaults to C{mail1.example.com} for alice and carol and
        C{mail2.example.com} for bob.
    @param routingSites: Optional mapping of uid to C{mailRoutingSite};
        defaults to C{site-a} for everyone.
    @rtype: L{str}
    """
    hosts = {"alice": "mail1.example.com", "bob": "mail2.example.com",
             "carol": "mail1.example.com"}
    hosts.update(mailHosts or {})
    sites = {uid: "site-a" for uid in USERS}
    sites.update(routingSites or {})
    attr, value = suffix.split(",")[0].split("=", 1)
    if attr.strip().lower() != "dc":
        raise ValueError("suffix must start with a dc= RDN: %r" % (suffix,))
    domain = ".".join(part.split("=", 1)[1] for part in suffix.split(","))
    entries = [
        "dn: %s\nobjectClass: top\nobjectClass: dcObject\n"
        "objectClass: organization\ndc: %s\no: %s\n" % (
            suffix, value.strip(), domain),
        "dn: ou=people,%s\nobjectClass: organizationalUnit\nou: people\n"
        % (suffix,),
        "dn: ou=services,%s\nobjectClass: organizationalUnit\nou: services\n"
        % (suffix,),
        "dn: %s\nobjectClass: applicationProcess\n"
        "objectClass: simpleSecurityObject\ncn: casd\nuserPassword: %s\n"
        % (serviceDN(suffix), sshaPassword(SERVICE_PASSWORD)),
    ]
    names = {"alice": ("Alice", "Example"), "bob": ("Bob", "Example"),
             "carol": ("Carol", "Example")}
    for uid, password in USERS.items():
        given, sn = names[uid]
        entries.append(
            "dn: %s\n"
            "objectClass: inetOrgPerson\nobjectClass: casdMailUser\n"
            "uid: %s\ncn: %s %s\ngivenName: %s\nsn: %s\n"
            "mail: %s@%s\nuserPassword: %s\nmailHost: %s\n"
            "mailRoutingSite: %s\naccountStatus: %s\n" % (
                userDN(uid, suffix), uid, given, sn, given, sn, uid, domain,
                sshaPassword(password), hosts[uid], sites[uid],
                "disabled" if uid == "carol" else "active"))
    return "\n".join(entries)


def _findDir(candidates, probe, package):
    for directory in candidates:
        if os.path.exists(os.path.join(directory, probe)):
            return directory
    raise RuntimeError("%s not found in %s: apt-get install %s"
                       % (probe, ", ".join(candidates), package))


class Slapd:
    """
    A private slapd on C{127.0.0.1}.

    @ivar host: Always C{"127.0.0.1"}.
    @ivar suffix: The database suffix.
    @ivar rootDN: C{cn=admin,<suffix>}, bound with L{rootPassword}; not
        subject to ACLs.
    @ivar rootPassword: The root DN's password.
    @ivar port: Plain LDAP port (StartTLS available when C{tls} given).
    @ivar url: C{ldap://127.0.0.1:<port>/}.
    @ivar ldapsPort: Implicit-TLS port, or L{None} without C{tls}.
    @ivar ldapsUrl: C{ldaps://127.0.0.1:<ldapsPort>/}, or L{None}.
    @ivar pid: PID of the running slapd, else L{None}.
    @ivar logPath: slapd's debug/stats output.
    """

    host = "127.0.0.1"

    def __init__(self, directory, suffix="dc=example,dc=com", tls=None,
                 caPath=None):
        """
        @param directory: Directory for configuration, database and log;
            created if missing.
        @param tls: C{(certPath, keyPath)} to enable StartTLS and ldaps.
        @param caPath: CA certificate file, configured as
            C{TLSCACertificateFile} (and used by L{load}/L{search} over
            TLS).
        """
        self.directory = os.path.abspath(directory)
        self.suffix = suffix
        self.tls = tls
        self.caPath = caPath
        self.rootDN = "cn=admin,%s" % (suffix,)
        self.rootPassword = ROOT_PASSWORD
        self.configPath = os.path.join(self.directory, "slapd.conf")
        self.dbDir = os.path.join(self.directory, "db")
        self.pidPath = os.path.join(self.directory, "slapd.pid")
        self.logPath = os.path.join(self.directory, "slapd.log")
        self.port = None
        self.ldapsPort = None
        self.pid = None
        self._process = None
        self._log = None

    @property
    def url(self):
        if self.port is None:
            return None
        return "ldap://%s:%d/" % (self.host, self.port)

    @property
    def ldapsUrl(self):
        if self.ldapsPort is None:
            return None
        return "ldaps://%s:%d/" % (self.host, self.ldapsPort)

    @property
    def ports(self):
        """
        @rtype: L{list} of L{int}
        """
        return [p for p in (self.port, self.ldapsPort) if p]

    def start(self):
        """
        Write the configuration (first time: also create the database),
        start slapd and wait for its ports.  Ports chosen on the first
        start are kept by later starts.

        @raise RuntimeError: If slapd or the schemas are missing, or it
            fails to start.
        """
        if self.pid is not None:
            raise RuntimeError("slapd fixture already running")
        binary = requireBinary("slapd", [("/usr/sbin/slapd", "slapd")])
        schemaDir = _findDir(SCHEMA_DIRS, "core.schema", "slapd")
        os.makedirs(self.directory, exist_ok=True)
        os.makedirs(self.dbDir, exist_ok=True)
        os.chmod(self.dbDir, 0o700)
        if self.port is None:
            self.port = freePort()
            if self.tls:
                self.ldapsPort = freePort()
        with open(os.path.join(self.directory, "casd.schema"), "w") as f:
            f.write(CASD_SCHEMA)
        with open(self.configPath, "w") as f:
            f.write(self._config(schemaDir))

        urls = " ".join(u for u in (self.url, self.ldapsUrl) if u)
        self._log = open(self.logPath, "ab")
        # -d keeps slapd in the foreground, a child we can reap; "stats"
        # logs connections, binds and operations to the log file.
        self._process = subprocess.Popen(
            [binary, "-d", "stats", "-h", urls, "-f", self.configPath],
            stdin=subprocess.DEVNULL, stdout=self._log,
            stderr=subprocess.STDOUT)
        self.pid = self._process.pid
        try:
            for port in self.ports:
                waitForPort(self.host, port,
                            alive=lambda: self._process.poll() is None)
        except Exception as e:
            self.stop()
            raise RuntimeError("slapd did not come up: %s\nlog:\n%s"
                               % (e, self.logText()[-4000:])) from e

    def stop(self):
        """
        Stop slapd by PID and wait for its ports to close.  Calling it
        again, or before L{start}, does nothing.
        """
        pid, self.pid = self.pid, None
        if pid is None:
            return
        stopPid(pid, timeout=10.0)
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except (subprocess.TimeoutExpired, ChildProcessError):
                pass
            self._process = None
        self._log.close()
        for port in self.ports:
            waitForPortClosed(self.host, port)

    def restart(self):
        """
        Stop and start again on the same ports with the same data.
        """
        self.stop()
        self.start()

    def logText(self):
        """
        slapd's log output so far.

        @rtype: L{str}
        """
        try:
            with open(self.logPath, encoding="utf-8",
                      errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def load(self, ldifText):
        """
        Add the entries in C{ldifText} as the root DN with C{ldapadd}.

        @raise RuntimeError: If C{ldapadd} is missing or fails.
        """
        self._ldapTool("ldapadd", ["-D", self.rootDN, "-w",
                                   self.rootPassword], ldifText)

    def search(self, base=None, filter="(objectClass=*)", attrs=(),
               bindDN=None, password=None, url=None, startTLS=False):
        """
        Run C{ldapsearch} and return its LDIF output.

        @param bindDN: Bind DN (with C{password}); anonymous if L{None}.
        @param url: Defaults to L{url}; pass L{ldapsUrl} for ldaps.
        @param startTLS: Require StartTLS (C{-ZZ}).
        @raise RuntimeError: If C{ldapsearch} is missing or fails.
        @rtype: L{str}
        """
        args = ["-LLL", "-b", base or self.suffix]
        if bindDN is not None:
            args += ["-D", bindDN, "-w", password]
        if startTLS:
            args.append("-ZZ")
        args.append(filter)
        args += list(attrs)
        return self._ldapTool("ldapsearch", args, url=url)

    def _ldapTool(self, name, args, inputText=None, url=None):
        tool = requireBinary(name, [("/usr/bin/" + name, "ldap-utils")])
        # Our own ldap.conf instead of the system one (LDAPNOINIT would
        # also disable the LDAPTLS_* environment variables).
        clientConf = os.path.join(self.directory, "ldap-client.conf")
        with open(clientConf, "w") as f:
            f.write("TLS_REQCERT demand\n")
            if self.caPath:
                f.write("TLS_CACERT %s\n" % (os.path.abspath(self.caPath),))
        env = {key: value for key, value in os.environ.items()
               if not key.startswith("LDAP")}
        env["LDAPCONF"] = clientConf
        env["LDAPRC"] = "casd-tests-no-ldaprc"
        result = subprocess.run(
            [tool, "-x", "-H", url or self.url] + args,
            input=inputText, capture_output=True, text=True, env=env,
            timeout=30)
        if result.returncode != 0:
            raise RuntimeError("%s failed (exit %d): %s%s" % (
                name, result.returncode, result.stdout, result.stderr))
        return result.stdout

    def _config(self, schemaDir):
        lines = ["# Generated by tests/support/slapd.py."]
        for schema in ("core", "cosine", "inetorgperson", "nis", "misc"):
            lines.append("include %s" % (
                os.path.join(schemaDir, schema + ".schema"),))
        lines += [
            "include %s" % (os.path.join(self.directory, "casd.schema"),),
            "pidfile %s" % (self.pidPath,),
            "argsfile %s" % (os.path.join(self.directory, "slapd.args"),),
        ]
        for moduleDir in MODULE_DIRS:
            if os.path.exists(os.path.join(moduleDir, "back_mdb.la")) or \
                    os.path.exists(os.path.join(moduleDir, "back_mdb.so")):
                lines += ["modulepath %s" % (moduleDir,),
                          "moduleload back_mdb"]
                break
        if self.tls:
            certPath, keyPath = self.tls
            lines += [
                "TLSCertificateFile %s" % (os.path.abspath(certPath),),
                "TLSCertificateKeyFile %s" % (os.path.abspath(keyPath),),
            ]
            if self.caPath:
                lines.append("TLSCACertificateFile %s"
                             % (os.path.abspath(self.caPath),))
        service = serviceDN(self.suffix)
        lines += [
            "",
            "database mdb",
            'suffix "%s"' % (self.suffix,),
            'rootdn "%s"' % (self.rootDN,),
            "rootpw %s" % (self.rootPassword,),
            "directory %s" % (self.dbDir,),
            "maxsize 33554432",
            "index objectClass eq",
            "index uid,mail eq",
            "",
            # Root DSE and schema: readable by anyone (StartTLS and
            # capability discovery).
            'access to dn.base="" by * read',
            'access to dn.base="cn=Subschema" by * read',
            "access to attrs=userPassword",
            '  by dn.exact="%s" compare' % (service,),
            "  by self =xw",
            "  by anonymous auth",
            "  by * none",
            "access to *",
            '  by dn.exact="%s" read' % (service,),
            "  by self read",
            # Bound users may search (and so find their own entry) but
            # read only themselves; anonymous clients get nothing.
            "  by users search",
            "  by * none",
        ]
        return "\n".join(lines) + "\n"
