"""
Tests for the integration fixtures in L{tests.support}: each starts a real
server and talks to it with a standard client.
"""

import imaplib
import os
import poplib
import socket
import ssl
import time

from twisted.trial import unittest

from tests.support import procs
from tests.support.certs import CertificateAuthority, selfSigned
from tests.support.dovecot import Dovecot
from tests.support.slapd import (
    SERVICE_PASSWORD, USERS, Slapd, fixtureLDIF, serviceDN, userDN)

MESSAGE = (b"From: sender@example.org\r\nTo: alice@example.com\r\n"
           b"Subject: fixture test\r\n\r\nHello from the fixture.\r\n")


def _waitForLog(fixture, text, timeout=5.0):
    """
    Poll C{fixture.logText()} until it contains C{text}.

    @return: The log text.
    """
    deadline = time.monotonic() + timeout
    while True:
        log = fixture.logText()
        if text in log or time.monotonic() >= deadline:
            return log
        time.sleep(0.05)


def _portClosed(port):
    return not procs.portAccepts("127.0.0.1", port)


class _LineClient:
    """
    Minimal blocking line-oriented client for raw protocol exchanges.
    """

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.file = self.sock.makefile("rb")

    def readLine(self):
        return self.file.readline()

    def send(self, line):
        self.sock.sendall(line + b"\r\n")

    def command(self, tag, line):
        """
        Send an IMAP command and return its tagged response line.
        """
        self.send(tag + b" " + line)
        while True:
            response = self.readLine()
            if not response:
                raise EOFError("connection closed")
            if response.startswith(tag + b" "):
                return response

    def close(self):
        self.file.close()
        self.sock.close()


class ProcsTests(unittest.TestCase):
    """
    Tests for L{tests.support.procs}.
    """

    def test_requireBinaryMissing(self):
        """
        A missing program raises L{RuntimeError} naming the package.
        """
        e = self.assertRaises(
            RuntimeError, procs.requireBinary, "casd-no-such-program",
            [("/nonexistent/casd-no-such-program", "casd-pkg")])
        self.assertIn("apt-get install casd-pkg", str(e))

    def test_requireBinaryCandidate(self):
        """
        A program not on C{PATH} is found among the candidate paths.
        """
        real = procs.requireBinary("dovecot", ["/usr/sbin/dovecot"])
        self.assertEqual(
            procs.requireBinary("casd-no-such-program",
                                ["/nonexistent/x", real]),
            real)

    def test_waitForPortTimeout(self):
        """
        L{procs.waitForPort} raises L{RuntimeError} when nothing listens.
        """
        e = self.assertRaises(RuntimeError, procs.waitForPort,
                              "127.0.0.1", procs.freePort(), timeout=0.2)
        self.assertIn("127.0.0.1", str(e))


class DovecotTests(unittest.TestCase):
    """
    Tests for L{Dovecot} with IMAP, POP3 and ManageSieve over TLS.
    """

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority.create(os.path.join(base, "ca"))
        certificate = self.ca.issue(["localhost", "127.0.0.1"], "dovecot")
        self.dovecot = Dovecot(
            os.path.join(base, "dovecot"),
            users={"alice": "alice-pw", "bob": "bob-pw"},
            masterUsers={"casd": "master-pw"},
            tls=certificate, protocols=("imap", "pop3", "sieve"))
        self.dovecot.start()
        self.addCleanup(self.dovecot.stop)

    def context(self):
        return ssl.create_default_context(cafile=self.ca.caPath)

    def test_imapLoginSeesDeliveredMessage(self):
        """
        A message put into the maildir is seen by an IMAP login.
        """
        path = self.dovecot.deliver("alice", MESSAGE)
        self.assertTrue(path.startswith(self.dovecot.maildir("alice")))
        client = imaplib.IMAP4("127.0.0.1", self.dovecot.imapPort)
        try:
            client.login("alice", "alice-pw")
            typ, data = client.select("INBOX")
            self.assertEqual((typ, data), ("OK", [b"1"]))
            typ, data = client.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")
            self.assertIn(b"fixture test", data[0][1])
        finally:
            client.logout()

    def test_wrongPasswordRefused(self):
        """
        A wrong password fails to log in.
        """
        client = imaplib.IMAP4("127.0.0.1", self.dovecot.imapPort)
        try:
            self.assertRaises(imaplib.IMAP4.error,
                              client.login, "alice", "wrong")
        finally:
            client.shutdown()

    def test_masterUserAuthenticatePlain(self):
        """
        C{AUTHENTICATE PLAIN} with authzid=user and authcid=master logs in
        as the user, over implicit TLS verified with the test CA.
        """
        self.dovecot.deliver("bob", MESSAGE)
        client = imaplib.IMAP4_SSL("127.0.0.1", self.dovecot.imapsPort,
                                   ssl_context=self.context())
        try:
            typ, _ = client.authenticate(
                "PLAIN", lambda challenge: b"bob\0casd\0master-pw")
            self.assertEqual(typ, "OK")
            self.assertEqual(client.select("INBOX"), ("OK", [b"1"]))
        finally:
            client.logout()
        self.assertIn("Master user logging in as bob",
                      _waitForLog(self.dovecot, "Master user"))

    def test_startTLSVerifiesWithCA(self):
        """
        STARTTLS succeeds verifying the certificate against the test CA,
        and fails against a different CA.
        """
        client = imaplib.IMAP4("127.0.0.1", self.dovecot.imapPort)
        try:
            client.starttls(self.context())
            self.assertEqual(client.login("alice", "alice-pw")[0], "OK")
        finally:
            client.logout()

        other = CertificateAuthority.create(os.path.abspath(self.mktemp()))
        client = imaplib.IMAP4("127.0.0.1", self.dovecot.imapPort)
        try:
            self.assertRaises(
                ssl.SSLCertVerificationError, client.starttls,
                ssl.create_default_context(cafile=other.caPath))
        finally:
            client.sock.close()

    def test_imapOriginatingIPLogged(self):
        """
        IMAP C{ID x-originating-ip} from loopback (a trusted network) is
        accepted and shows up as C{rip=} in the login log line.
        """
        client = _LineClient(self.dovecot.imapPort)
        try:
            self.assertTrue(client.readLine().startswith(b"* OK"))
            self.assertTrue(client.command(
                b"a1", b'ID ("x-originating-ip" "192.0.2.7" '
                b'"x-originating-port" "40001")').startswith(b"a1 OK"))
            self.assertTrue(client.command(
                b"a2", b"LOGIN alice alice-pw").startswith(b"a2 OK"))
            client.command(b"a3", b"LOGOUT")
        finally:
            client.close()
        log = _waitForLog(self.dovecot, "Login: user=<alice>")
        self.assertIn("user=<alice>, method=PLAIN, rip=192.0.2.7", log)
        self.assertIn("real_rip=127.0.0.1", log)

    def test_pop3(self):
        """
        POP3 (after STLS, and with XCLIENT from the trusted proxy) lists a
        delivered message and logs the forwarded address.
        """
        self.dovecot.deliver("alice", MESSAGE)
        client = poplib.POP3("127.0.0.1", self.dovecot.pop3Port, timeout=5)
        try:
            client.stls(self.context())
            # Dovecot 2.3 accepts XCLIENT from login_trusted_networks
            # without listing it in CAPA.
            self.assertTrue(client._shortcmd(
                "XCLIENT ADDR=192.0.2.8 PORT=40002").startswith(b"+OK"))
            client.user("alice")
            client.pass_("alice-pw")
            self.assertEqual(client.stat(), (1, len(MESSAGE)))
            self.assertIn(b"Subject: fixture test", client.retr(1)[1])
        finally:
            client.quit()
        self.assertIn("rip=192.0.2.8",
                      _waitForLog(self.dovecot, "rip=192.0.2.8"))

    def test_managesieveGreeting(self):
        """
        The ManageSieve port answers with a capability greeting.
        """
        client = _LineClient(self.dovecot.sievePort)
        try:
            greeting = []
            while True:
                line = client.readLine()
                greeting.append(line)
                if not line or line.startswith(b"OK"):
                    break
        finally:
            client.close()
        self.assertTrue(greeting[0].startswith(b'"IMPLEMENTATION"'))
        self.assertIn(b'"STARTTLS"\r\n', greeting)

    def test_stopClosesPorts(self):
        """
        L{Dovecot.stop} ends the server, closes every port and may be
        called twice.
        """
        ports = self.dovecot.ports
        self.assertEqual(len(ports), 5)
        self.dovecot.stop()
        self.assertEqual([p for p in ports if not _portClosed(p)], [])
        self.dovecot.stop()

    def test_restartKeepsPortsAndMail(self):
        """
        L{Dovecot.restart} comes back on the same ports with the same mail.
        """
        self.dovecot.deliver("alice", MESSAGE)
        ports = self.dovecot.ports
        self.dovecot.restart()
        self.assertEqual(self.dovecot.ports, ports)
        client = imaplib.IMAP4("127.0.0.1", self.dovecot.imapPort)
        try:
            client.login("alice", "alice-pw")
            self.assertEqual(client.select("INBOX"), ("OK", [b"1"]))
        finally:
            client.logout()

    def test_twoInstances(self):
        """
        A second instance in another directory runs alongside the first.
        """
        second = Dovecot(os.path.abspath(self.mktemp()),
                         users={"alice": "other-pw"})
        second.start()
        self.addCleanup(second.stop)
        self.assertEqual(second.imapsPort, None)
        self.assertNotIn(second.imapPort, self.dovecot.ports)
        for port, password in [(self.dovecot.imapPort, "alice-pw"),
                               (second.imapPort, "other-pw")]:
            client = imaplib.IMAP4("127.0.0.1", port)
            try:
                self.assertEqual(client.login("alice", password)[0], "OK")
            finally:
                client.logout()


def _berLength(data, offset):
    """
    Decode a BER length at C{data[offset]}; return C{(length, offset)}.
    """
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    count = first & 0x7F
    return (int.from_bytes(data[offset + 1:offset + 1 + count], "big"),
            offset + 1 + count)


def _berEncode(tag, content):
    length = len(content)
    if length < 0x80:
        header = bytes([length])
    else:
        raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + header + content


def _readMessage(sock):
    data = b""
    while True:
        if len(data) >= 2:
            length, offset = _berLength(data, 1)
            if len(data) >= offset + length:
                return data[:offset + length]
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("LDAP server closed the connection")
        data += chunk


def rawSimpleBind(sock, dn, password):
    """
    Send an LDAPv3 simple BindRequest on C{sock} and return the
    resultCode of the BindResponse.
    """
    request = _berEncode(0x60, (
        _berEncode(0x02, b"\x03")
        + _berEncode(0x04, dn.encode("utf-8"))
        + _berEncode(0x80, password.encode("utf-8"))))
    sock.sendall(_berEncode(0x30, _berEncode(0x02, b"\x01") + request))
    return _bindResult(_readMessage(sock))


def _bindResult(data):
    # LDAPMessage ::= SEQUENCE { messageID, BindResponse [APPLICATION 1] }
    _, offset = _berLength(data, 1)
    length, offset = _berLength(data, offset + 1)      # messageID
    offset += length
    if data[offset] != 0x61:
        raise ValueError("not a BindResponse: %r" % (data,))
    _, offset = _berLength(data, offset + 1)
    if data[offset] != 0x0A:
        raise ValueError("no resultCode: %r" % (data,))
    length, offset = _berLength(data, offset + 1)
    return int.from_bytes(data[offset:offset + length], "big")


class SlapdTests(unittest.TestCase):
    """
    Tests for L{Slapd} loaded with L{fixtureLDIF}, with TLS.
    """

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority.create(os.path.join(base, "ca"))
        certificate = self.ca.issue(["localhost", "127.0.0.1"], "slapd")
        self.slapd = Slapd(os.path.join(base, "slapd"), tls=certificate,
                           caPath=self.ca.caPath)
        self.slapd.start()
        self.addCleanup(self.slapd.stop)
        self.slapd.load(fixtureLDIF(self.slapd.suffix))

    def bind(self, dn, password, tls=False):
        sock = socket.create_connection(
            ("127.0.0.1",
             self.slapd.ldapsPort if tls else self.slapd.port), timeout=5)
        if tls:
            sock = ssl.create_default_context(
                cafile=self.ca.caPath).wrap_socket(
                    sock, server_hostname="127.0.0.1")
        try:
            return rawSimpleBind(sock, dn, password)
        finally:
            sock.close()

    def test_urls(self):
        """
        The fixture exposes its LDAP and LDAPS URLs on loopback.
        """
        self.assertEqual(self.slapd.url,
                         "ldap://127.0.0.1:%d/" % (self.slapd.port,))
        self.assertEqual(self.slapd.ldapsUrl,
                         "ldaps://127.0.0.1:%d/" % (self.slapd.ldapsPort,))

    def test_rawBind(self):
        """
        Alice binds with her password (result 0); a wrong password gives
        invalidCredentials (49).
        """
        self.assertEqual(
            self.bind(userDN("alice"), USERS["alice"]), 0)
        self.assertEqual(self.bind(userDN("alice"), "wrong"), 49)

    def test_ldapsBindWithCA(self):
        """
        Over ldaps, verified with the test CA, alice can bind.
        """
        self.assertEqual(
            self.bind(userDN("alice"), USERS["alice"], tls=True), 0)

    def test_ldapsWrongCARefused(self):
        """
        A client trusting another certificate refuses the server.
        """
        otherCert, _ = selfSigned(os.path.abspath(self.mktemp()),
                                  ["127.0.0.1"], "other")
        sock = socket.create_connection(
            ("127.0.0.1", self.slapd.ldapsPort), timeout=5)
        try:
            self.assertRaises(
                ssl.SSLCertVerificationError,
                ssl.create_default_context(cafile=otherCert).wrap_socket,
                sock, server_hostname="127.0.0.1")
        finally:
            sock.close()

    def test_serviceAccountReads(self):
        """
        The service account reads routing attributes of every user over
        StartTLS, including the disabled carol.
        """
        output = self.slapd.search(
            filter="(objectClass=casdMailUser)",
            attrs=["mail", "mailHost", "accountStatus"],
            bindDN=serviceDN(), password=SERVICE_PASSWORD, startTLS=True)
        self.assertIn("mail: alice@example.com", output)
        self.assertIn("mailHost: mail1.example.com", output)
        self.assertIn("dn: uid=carol,ou=people,dc=example,dc=com\n"
                      "mail: carol@example.com\nmailHost: mail1.example.com"
                      "\naccountStatus: disabled", output)
        self.assertNotIn("userPassword", output)

    def test_anonymousCannotRead(self):
        """
        Anonymous clients see nothing below the suffix.
        """
        self.assertRaises(RuntimeError, self.slapd.search,
                          filter="(uid=alice)")

    def test_restartKeepsPortsAndData(self):
        """
        L{Slapd.restart} comes back on the same ports with the same data.
        """
        port, ldapsPort = self.slapd.port, self.slapd.ldapsPort
        self.slapd.stop()
        self.assertTrue(_portClosed(port))
        self.slapd.start()
        self.assertEqual((self.slapd.port, self.slapd.ldapsPort),
                         (port, ldapsPort))
        self.assertEqual(self.bind(userDN("bob"), USERS["bob"]), 0)
        self.slapd.restart()
        self.assertEqual(self.bind(userDN("bob"), USERS["bob"]), 0)

    def test_stopClosesPorts(self):
        """
        L{Slapd.stop} closes both ports and may be called twice.
        """
        ports = self.slapd.ports
        self.assertEqual(len(ports), 2)
        self.slapd.stop()
        self.assertEqual([p for p in ports if not _portClosed(p)], [])
        self.slapd.stop()
