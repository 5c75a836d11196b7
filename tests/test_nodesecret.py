"""
The node secret (L{casd.nodesecret}): its derivation, its pipe, and what the HTTP front end derives
from it: two workers (two service trees given the same secret) open each other's forms and
routing cookies; without a secret each keeps its own random keys.
"""

from __future__ import annotations

import os
import re
from urllib.parse import urlencode

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd import nodesecret
from casd.nodesecret import (
    FORMS_COOKIE_KEY,
    ROUTE_COOKIE_KEY,
    NodeSecret,
    NodeSecretError,
    readSecretPipe,
    secretPipe,
)
from casd.testing import connectFrontend, makeContext
from protocols.http import http
from protocols.http.cookies import CookieKeys
from tests.test_http_forms_site import CONFIG, Exchange


def installed(testCase, secret, relay=None):
    """
    Install C{secret} (and C{relay}) as this process's node secret until C{testCase} ends.
    """
    nodesecret.install(secret, relay)
    testCase.addCleanup(nodesecret.install, None, None)


class DerivationTests(SynchronousTestCase):
    def test_sameSecretSameKeys(self):
        raw = os.urandom(32)
        a, b = NodeSecret(raw), NodeSecret(raw)
        for label in (FORMS_COOKIE_KEY, ROUTE_COOKIE_KEY):
            self.assertEqual(a.derive(label), b.derive(label))
            self.assertEqual(len(a.derive(label)), 32)
        self.assertEqual(len(a.derive(FORMS_COOKIE_KEY, 16)), 16)

    def test_labelsDiffer(self):
        secret = NodeSecret.generate()
        forms, route = secret.derive(FORMS_COOKIE_KEY), secret.derive(ROUTE_COOKIE_KEY)
        self.assertNotEqual(forms, route)
        self.assertNotEqual(FORMS_COOKIE_KEY, ROUTE_COOKIE_KEY)
        self.assertNotIn(secret._secret, (forms, route))

    def test_secretsDiffer(self):
        self.assertNotEqual(
            NodeSecret.generate().derive(FORMS_COOKIE_KEY), NodeSecret.generate().derive(FORMS_COOKIE_KEY)
        )

    def test_knownAnswer(self):
        """
        HKDF-SHA256 without salt, the label as C{info}: a worker of another casd version derives
        the same keys from the same secret.
        """
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        raw = bytes(range(32))
        expected = HKDF(hashes.SHA256(), 32, None, FORMS_COOKIE_KEY).derive(raw)
        self.assertEqual(NodeSecret(raw).derive(FORMS_COOKIE_KEY), expected)

    def test_wrongSize(self):
        for raw in (b"", os.urandom(31), os.urandom(33), "x" * 32):
            self.assertRaises(NodeSecretError, NodeSecret, raw)

    def test_reprHidesSecret(self):
        secret = NodeSecret.generate()
        self.assertEqual(repr(secret), "<NodeSecret>")
        self.assertNotIn(secret._secret.hex(), repr(secret) + str(secret))
        self.assertFalse(hasattr(secret, "__dict__"))

    def test_derivedKeyWithoutSecret(self):
        """
        A single process has no node secret: the callers make their own random keys.
        """
        self.assertIsNone(nodesecret.derivedKey(FORMS_COOKIE_KEY))
        self.assertIsNone(nodesecret.revocationRelay())
        secret = NodeSecret.generate()
        installed(self, secret)
        self.assertEqual(nodesecret.derivedKey(ROUTE_COOKIE_KEY), secret.derive(ROUTE_COOKIE_KEY))


class PipeTests(SynchronousTestCase):
    def test_roundTrip(self):
        secret = NodeSecret.generate()
        fd = secretPipe(secret)
        self.assertEqual(readSecretPipe(fd)._secret, secret._secret)
        self.assertRaises(OSError, os.fstat, fd)  # closed once read

    def test_shortOrLong(self):
        for data in (b"", os.urandom(10), os.urandom(33), os.urandom(100)):
            readEnd, writeEnd = os.pipe()
            os.write(writeEnd, data)
            os.close(writeEnd)
            e = self.assertRaises(NodeSecretError, readSecretPipe, readEnd)
            self.assertNotIn(data.hex() or "-", str(e))
            self.assertRaises(OSError, os.fstat, readEnd)

    def test_notAPipe(self):
        readEnd, writeEnd = os.pipe()
        os.close(readEnd)
        os.close(writeEnd)
        self.assertRaises(NodeSecretError, readSecretPipe, readEnd)


class TwoWorkersTests(SynchronousTestCase):
    """
    Two service trees in this process stand for two workers of one node.
    """

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)

    def worker(self):
        return makeContext(self.reactor, users={"alice": "secret"}, config=CONFIG)

    def send(self, context, head, body=b"", cookies=b""):
        client, transport = connectFrontend(http, context)
        if cookies:
            head += b"Cookie: " + cookies + b"\r\n"
        client.dataReceived(head + b"\r\n" + body)
        self.reactor.advance(0)
        return Exchange(transport.value()) if transport.value() else None

    def logon(self, context) -> bytes:
        page = self.send(context, b"GET /owa/_casd/logon HTTP/1.1\r\nHost: mail.example.com\r\n")
        csrf = re.search(rb'name="csrf" value="([^"]+)"', page.body).group(1)
        form = urlencode({"username": "alice", "password": "secret", "url": "/owa/", "csrf": csrf}).encode()
        answer = self.send(
            context,
            b"POST /owa/_casd/logon HTTP/1.1\r\nHost: mail.example.com\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: %d\r\n" % len(form),
            form,
            cookies=b"__Host-casd-logon=" + csrf,
        )
        self.assertEqual(answer.code, 302)
        return [c.split(b";")[0] for c in answer.all(b"set-cookie") if c.startswith(b"__Host-casd=")][0]

    def visit(self, context, cookie):
        """
        @return: the response's status, or C{"backend"} when the request went on to the backend.
        """
        before = len(self.reactor.tcpClients)
        answer = self.send(
            context, b"GET /owa/inbox HTTP/1.1\r\nHost: mail.example.com\r\nAccept: text/html\r\n", cookies=cookie
        )
        if answer is None and len(self.reactor.tcpClients) == before + 1:
            return "backend"
        return answer.code

    def test_formsCookieAcrossWorkers(self):
        installed(self, NodeSecret.generate())
        a, b = self.worker(), self.worker()
        cookie = self.logon(a)
        self.assertEqual(self.visit(a, cookie), "backend")
        self.assertEqual(self.visit(b, cookie), "backend")

    def test_formsCookieWithoutSecret(self):
        """
        Without a node secret (a single process), each service tree has its own key: the
        other's cookie sends the browser to the logon page.
        """
        a, b = self.worker(), self.worker()
        cookie = self.logon(a)
        self.assertEqual(self.visit(b, cookie), 302)
        self.assertEqual(self.reactor.tcpClients, [])

    def test_formsKeyIsDerived(self):
        secret = NodeSecret.generate()
        installed(self, secret)
        sealed = CookieKeys([secret.derive(FORMS_COOKIE_KEY)]).seal(b"x", b"")
        self.assertEqual(CookieKeys.forNode().open(sealed, b""), b"x")
        self.assertIsNone(CookieKeys([secret.derive(ROUTE_COOKIE_KEY)]).open(sealed, b""))

    def test_routeKeys(self):
        a, b = self.worker(), self.worker()
        section = a.config.protocols["http"]
        alone = (http.shared(a, section).cookies.keys, http.shared(b, section).cookies.keys)
        self.assertNotEqual(alone[0], alone[1])
        secret = NodeSecret.generate()
        installed(self, secret)
        c, d = self.worker(), self.worker()
        keys = (http.shared(c, section).cookies.keys, http.shared(d, section).cookies.keys)
        self.assertEqual(keys[0], (secret.derive(ROUTE_COOKIE_KEY),))
        self.assertEqual(keys[0], keys[1])
        sealed = http.shared(c, section).cookies.seal("alice", "anchor", "server")
        self.assertEqual(http.shared(d, section).cookies.open("alice", sealed), ("anchor", "server"))

    def test_routeKeyFileWins(self):
        path = self.mktemp()
        key = os.urandom(32)
        with open(path, "w") as f:
            f.write(key.hex() + "\n")
        installed(self, NodeSecret.generate())
        context = makeContext(
            self.reactor,
            users={"alice": "secret"},
            config=CONFIG.replace("forms_public_timeout = 600", f'route_cookie_key_file = "{path}"'),
        )
        self.assertEqual(http.shared(context, context.config.protocols["http"]).cookies.keys, (key,))

    def test_logoffReachesTheOtherWorker(self):
        """
        A logoff on one worker is sent to the parent as a record; once the parent's word
        arrives, the other worker refuses the cookie too.
        """
        import io

        from casd.service.nodeshare import REVOKE_RECORD, ParentRevocations, WorkerRevocations

        out = io.StringIO()
        relay = WorkerRevocations(out)
        installed(self, NodeSecret.generate(), relay)
        a, b = self.worker(), self.worker()
        cookie = self.logon(a)
        answer = self.send(a, b"GET /owa/_casd/logoff HTTP/1.1\r\nHost: mail.example.com\r\n", cookies=cookie)
        self.assertEqual(answer.code, 200)
        record = out.getvalue()
        self.assertTrue(record.startswith(REVOKE_RECORD), record)
        self.assertNotIn(cookie.split(b"=", 1)[1].decode()[:20], record)
        self.assertEqual(self.visit(a, cookie), 302)
        # Not told yet (in one process the two trees share the relay, which the parent feeds).
        self.assertEqual(self.visit(b, cookie), "backend")
        parent = ParentRevocations(self.reactor)
        relay.wordsReceived(parent.recordReceived(record[1:].encode()))
        self.assertEqual(self.visit(b, cookie), 302)


class TicketKeyTests(SynchronousTestCase):
    def test_derivedTicketKey(self):
        """
        Without C{[tls] ticket_keys}, a worker's ticket key is derived from the node secret; a
        single process leaves OpenSSL its own.
        """
        from casd.nodesecret import TLS_TICKET_KEY
        from casd.ticketkeys import TicketKey
        from casd.tls import ServerTLS

        self.assertIsNone(ServerTLS._keyring("", "casd.toml"))
        secret = NodeSecret.generate()
        installed(self, secret)
        raw = secret.derive(TLS_TICKET_KEY, 80)
        keyring = ServerTLS._keyring("", "casd.toml")
        self.assertEqual(keyring.keys, (TicketKey(raw[:16], raw[16:48], raw[48:]),))
        self.assertEqual(ServerTLS._keyring("", "casd.toml").keys, keyring.keys)
        self.assertNotIn(raw[:32], (secret.derive(FORMS_COOKIE_KEY), secret.derive(ROUTE_COOKIE_KEY)))
