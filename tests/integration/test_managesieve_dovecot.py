"""
ManageSieve through casd to a real Dovecot (C{dovecot-managesieved}), with Debian's
C{sieve-connect} and a small client speaking the protocol by hand (literals, STARTTLS, the
client's own address).
"""

import os
import shutil
import socket
import subprocess

from twisted.internet import defer, reactor, task, threads
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from protocols.stringgrammar import LITERAL_MARKER
from tests.support.casdnode import DovecotFront

CLIENT_ADDRESS = "127.0.0.2"
SCRIPT = b'require ["fileinto"];\r\nif header :contains "subject" "casd" {\r\n  fileinto "casd";\r\n}\r\n'


class SieveClient:
    """
    A small blocking ManageSieve client, from L{CLIENT_ADDRESS}.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 10, source_address=(CLIENT_ADDRESS, 0))
        self.file = self.sock.makefile("rb")

    def response(self):
        """
        @return: C{(data lines, final line)}, literals read whole into their line.
        """
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("server closed the connection")
            line = line.rstrip(b"\r\n")
            m = LITERAL_MARKER.search(line)
            if m is not None:
                data = self.file.read(int(m.group(1)))
                line = line[: m.start()] + data + self.file.readline().rstrip(b"\r\n")
            if line.split(b" ", 1)[0] in (b"OK", b"NO", b"BYE"):
                return lines, line
            lines.append(line)

    def command(self, data: bytes):
        self.sock.sendall(data)
        return self.response()

    def starttls(self, context):
        lines, final = self.command(b"STARTTLS\r\n")
        assert final.startswith(b"OK"), final
        self.sock = context.wrap_socket(self.sock, server_hostname="127.0.0.1")
        self.file = self.sock.makefile("rb")
        return self.response()

    def close(self):
        self.sock.close()


class DovecotManageSieveTests(DovecotFront, TestCase):
    timeout = 60
    protocol = "managesieve"
    dovecotProtocol = "sieve"

    def setUp(self):
        super().setUp()
        self.sieveConnect = shutil.which("sieve-connect")
        self.assertIsNotNone(self.sieveConnect, "sieve-connect is missing: apt-get install sieve-connect")

    def sieveConnectRun(self, *args, user="alice", password="alice-pw"):
        command = [
            self.sieveConnect,
            "--server", "127.0.0.1",
            "--port", str(self.port),
            "--user", user,
            "--passwordfd", "0",
            "--tlscafile", self.ca.caPath,
            *args,
        ]
        return subprocess.run(command, input=password.encode() + b"\n", capture_output=True, timeout=30)

    def sieveDir(self, user="alice"):
        return os.path.join(self.dovecot.mailRoot, user)

    @defer.inlineCallbacks
    def test_sieveConnectUploadActivateList(self):
        """
        sieve-connect (STARTTLS, AUTHENTICATE PLAIN) uploads, activates, lists and downloads a
        script through casd; Dovecot stores and activates it.
        """
        self.startCAS()
        local = os.path.join(self.tmp, "filter.sieve")
        with open(local, "wb") as f:
            f.write(SCRIPT)
        back = os.path.join(self.tmp, "back.sieve")

        def session():
            return [
                self.sieveConnectRun("--upload", "--localsieve", local, "--remotesieve", "casd-filter"),
                self.sieveConnectRun("--activate", "--remotesieve", "casd-filter"),
                self.sieveConnectRun("--list"),
                self.sieveConnectRun("--download", "--remotesieve", "casd-filter", "--localsieve", back),
            ]

        results = yield threads.deferToThread(session)
        for r in results:
            self.assertEqual(r.returncode, 0, (r.args, r.stdout, r.stderr))
        self.assertEqual(results[2].stdout.split(), [b'"casd-filter"', b"ACTIVE"])
        with open(back, "rb") as f:
            self.assertEqual(f.read().replace(b"\r\n", b"\n"), SCRIPT.replace(b"\r\n", b"\n"))
        home = self.sieveDir()
        with open(os.path.join(home, "sieve", "casd-filter.sieve"), "rb") as f:
            self.assertEqual(f.read().replace(b"\r\n", b"\n"), SCRIPT.replace(b"\r\n", b"\n"))
        self.assertEqual(os.readlink(os.path.join(home, ".dovecot.sieve")), "sieve/casd-filter.sieve")

    @defer.inlineCallbacks
    def test_literalsAndClientAddress(self):
        """
        A client from another address: STARTTLS, AUTHENTICATE with a literal, then PUTSCRIPT and
        CHECKSCRIPT (literals again) relayed to Dovecot, which logs the client's address and
        casd's session id.
        """
        self.startCAS()
        events = []

        def observe(event):
            if event.get("log_namespace") == "casd.session":
                events.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

        def session():
            import base64

            c = SieveClient(self.port)
            greeting, ok = c.response()
            caps, tlsOK = c.starttls(self.clientContext())
            blob = base64.b64encode(b"\0alice\0alice-pw")
            _, login = c.command(b'AUTHENTICATE "PLAIN" {%d+}\r\n%s\r\n' % (len(blob), blob))
            _, put = c.command(b'PUTSCRIPT "lit" {%d+}\r\n%s\r\n' % (len(SCRIPT), SCRIPT))
            _, check = c.command(b'CHECKSCRIPT {15+}\r\nrequire "nope";\r\n')
            listing, _ = c.command(b"LISTSCRIPTS\r\n")
            _, bye = c.command(b"LOGOUT\r\n")
            c.close()
            return greeting, caps, login, put, check, listing, bye

        greeting, caps, login, put, check, listing, bye = yield threads.deferToThread(session)
        self.assertIn(b'"SASL" ""', greeting)
        self.assertIn(b'"SASL" "PLAIN LOGIN"', caps)
        self.assertEqual(login, b'OK "Logged in."')
        self.assertTrue(put.startswith(b"OK"), put)
        self.assertTrue(check.startswith(b"NO"), check)  # Dovecot's own verdict, relayed
        self.assertIn(b'"lit"', listing)
        self.assertTrue(bye.startswith(b"OK"), bye)
        for _ in range(50):
            if events:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["client"].split(":")[0], CLIENT_ADDRESS)
        logins = [l for l in self.dovecot.logText().splitlines() if "Login: user=<alice>" in l]
        self.assertEqual(len(logins), 1, self.dovecot.logText())
        self.assertIn(f"rip={CLIENT_ADDRESS},", logins[0])
        self.assertIn("real_rip=127.0.0.1,", logins[0])
        self.assertIn(f"session=<{events[0]['session']}>", logins[0])

    @defer.inlineCallbacks
    def test_masterUser(self):
        self.startCAS(master=True)
        r = yield threads.deferToThread(self.sieveConnectRun, "--list", user="bob", password="bob-pw")
        self.assertEqual(r.returncode, 0, (r.stdout, r.stderr))
        self.assertIn("Master user logging in as bob", self.dovecot.logText())

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        self.startCAS()

        def session():
            import base64

            c = SieveClient(self.port)
            c.response()
            c.starttls(self.clientContext())
            blob = base64.b64encode(b"\0alice\0nope")
            _, answer = c.command(b'AUTHENTICATE "PLAIN" "%s"\r\n' % (blob,))
            c.close()
            return answer

        self.assertEqual((yield threads.deferToThread(session)), b'NO "Authentication failed."')
        r = yield threads.deferToThread(self.sieveConnectRun, "--list", password="nope")
        self.assertNotEqual(r.returncode, 0)
        self.assertNotIn("Login: user=<alice>", self.dovecot.logText())
