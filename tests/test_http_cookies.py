"""
The forms-login cookie: sealing, expiry on a fake clock, key rotation, tampering, revocation.
"""

from __future__ import annotations

import base64
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from zope.interface.verify import verifyObject

from casd.auth import UserRecord
from casd.interfaces import IRevocationSet
from protocols.http import cookies
from protocols.http.cookies import (
    CookieKeyError,
    CookieKeys,
    FormsSession,
    MemoryRevocationSet,
    SessionCookies,
)

ALICE = UserRecord(login="alice", address="alice@example.com", mailHost="mbx1", site="east")


def key() -> bytes:
    return os.urandom(32)


def requestWith(cookie: bytes | None = None, uri: bytes = b"/owa/", **headers) -> DummyRequest:
    request = DummyRequest(uri.split(b"/")[1:])
    request.uri = uri
    if cookie is not None:
        request.requestHeaders.addRawHeader(b"cookie", cookie)
    for name, value in headers.items():
        request.requestHeaders.addRawHeader(name.replace("_", "-").encode(), value)
    return request


def cookieHeader(setCookie: bytes) -> bytes:
    """The C{Cookie} request header a browser sends back for a C{Set-Cookie}."""
    return setCookie.split(b";")[0]


def result(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


class SealingTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.jar = SessionCookies(CookieKeys([key()]), self.clock)

    def test_roundTrip(self):
        """
        A cookie the jar issues reads back as the same user and public/private choice, with the
        flags Secure, HttpOnly, SameSite=Lax and Path=/, and no readable user name inside.
        """
        session = self.jar.issue(ALICE, public=False)
        header = self.jar.setCookie(session)
        flags = [f.strip() for f in header.split(b";")[1:]]
        self.assertEqual(flags, [b"Path=/", b"Secure", b"HttpOnly", b"SameSite=Lax"])
        self.assertTrue(header.startswith(b"__Host-casd="))
        self.assertNotIn(b"alice", header)
        self.assertNotIn(b"alice", base64.urlsafe_b64decode(cookieHeader(header).split(b"=", 1)[1] + b"=="))
        check = result(self.jar.check(requestWith(cookieHeader(header))))
        self.assertEqual(check.state, "valid")
        self.assertEqual(check.session, session)
        self.assertEqual(check.session.user, ALICE)
        self.assertFalse(check.session.public)

    def test_absent(self):
        self.assertEqual(result(self.jar.check(requestWith())).state, "absent")
        self.assertEqual(result(self.jar.check(requestWith(b"other=1"))).state, "absent")

    def test_tampered(self):
        """
        Flipping any single bit of the sealed value makes it invalid.
        """
        value = self.jar.seal(self.jar.issue(ALICE, public=True))
        raw = bytearray(base64.urlsafe_b64decode(value + "=="))
        for index in range(len(raw)):
            changed = bytearray(raw)
            changed[index] ^= 0x01
            forged = base64.urlsafe_b64encode(bytes(changed)).rstrip(b"=")
            check = result(self.jar.check(requestWith(b"__Host-casd=" + forged)))
            self.assertEqual(check.state, "invalid", index)

    def test_garbage(self):
        for value in (b"", b"x", b"%%%", b"AAAA", base64.urlsafe_b64encode(os.urandom(80))):
            check = result(self.jar.check(requestWith(b"__Host-casd=" + value)))
            self.assertEqual(check.state, "invalid", value)

    def test_otherName(self):
        """
        A value sealed for another cookie name does not open under this one (the name is bound
        into the seal).
        """
        other = SessionCookies(self.jar.keys, self.clock, name="__Host-other")
        value = other.seal(other.issue(ALICE, public=False)).encode()
        self.assertEqual(result(self.jar.check(requestWith(b"__Host-casd=" + value))).state, "invalid")

    def test_unknownKey(self):
        stranger = SessionCookies(CookieKeys([key()]), self.clock)
        header = cookieHeader(stranger.setCookie(stranger.issue(ALICE, public=False)))
        self.assertEqual(result(self.jar.check(requestWith(header))).state, "invalid")

    def test_secondCookieOfSameName(self):
        """
        A garbage cookie of the same name beside the real one does not hide it.
        """
        header = cookieHeader(self.jar.setCookie(self.jar.issue(ALICE, public=False)))
        check = result(self.jar.check(requestWith(b"__Host-casd=junk; " + header)))
        self.assertEqual(check.state, "valid")

    def test_clearCookie(self):
        header = self.jar.clearCookie()
        self.assertTrue(header.startswith(b"__Host-casd=;"))
        self.assertIn(b"Max-Age=0", header)
        self.assertIn(b"Secure", header)


class RotationTests(SynchronousTestCase):
    def test_firstSealsAllOpen(self):
        """
        With the new key added second, old and new nodes read each other's cookies; once it is
        first, cookies sealed by the old key still open until the old key is removed.
        """
        clock = Clock()
        old, new = key(), key()
        before = SessionCookies(CookieKeys([old]), clock)
        during = SessionCookies(CookieKeys([old, new]), clock)
        after = SessionCookies(CookieKeys([new, old]), clock)
        final = SessionCookies(CookieKeys([new]), clock)
        oldCookie = cookieHeader(before.setCookie(before.issue(ALICE, public=False)))
        newCookie = cookieHeader(after.setCookie(after.issue(ALICE, public=False)))
        for jar in (before, during, after):
            self.assertEqual(result(jar.check(requestWith(oldCookie))).state, "valid")
        for jar in (during, after, final):
            self.assertEqual(result(jar.check(requestWith(newCookie))).state, "valid")
        self.assertEqual(result(final.check(requestWith(oldCookie))).state, "invalid")
        self.assertEqual(result(before.check(requestWith(newCookie))).state, "invalid")

    def test_keyFiles(self):
        """
        Key files hold base64 keys one a line, with comments; several files concatenate.
        """
        k1, k2, k3 = key(), key(), os.urandom(16)
        first = self.mktemp()
        with open(first, "w") as f:
            f.write(f"# current\n{base64.b64encode(k1).decode()}\n\n{base64.urlsafe_b64encode(k2).decode()}\n")
        second = self.mktemp()
        with open(second, "w") as f:
            f.write(base64.b64encode(k3).decode() + "\n")
        keys = CookieKeys.fromFiles([first, second])
        self.assertEqual(keys._sealer[0], cookies.keyID(k1))
        self.assertEqual(set(keys._openers), {cookies.keyID(k) for k in (k1, k2, k3)})

    def test_badKeyFiles(self):
        """
        Errors name the file and line, never the key material.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("# c\nc2VjcmV0LXNob3J0\n")
        e = self.assertRaises(CookieKeyError, CookieKeys.fromFiles, [path])
        self.assertIn("line 2", str(e))
        self.assertNotIn("c2VjcmV0", str(e))
        self.assertIn("not 12", str(e))
        with open(path, "w") as f:
            f.write("not base64 at all!\n")
        self.assertIn("line 1", str(self.assertRaises(CookieKeyError, CookieKeys.fromFiles, [path])))
        with open(path, "w") as f:
            f.write("# only a comment\n")
        self.assertRaises(CookieKeyError, CookieKeys.fromFiles, [path])
        self.assertRaises(CookieKeyError, CookieKeys.fromFiles, [path + ".missing"])
        self.assertRaises(CookieKeyError, CookieKeys, [])


class ExpiryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.jar = SessionCookies(CookieKeys([key()]), self.clock)

    def state(self, header: bytes) -> str:
        return result(self.jar.check(requestWith(header))).state

    def test_publicLimit(self):
        """
        A public session expires 15 minutes after its last activity; a private one lives on.
        """
        public = cookieHeader(self.jar.setCookie(self.jar.issue(ALICE, public=True)))
        private = cookieHeader(self.jar.setCookie(self.jar.issue(ALICE, public=False)))
        self.clock.advance(15 * 60 - 1)
        self.assertEqual(self.state(public), "valid")
        self.clock.advance(1)
        self.assertEqual(self.state(public), "expired")
        self.assertEqual(self.state(private), "valid")

    def test_privateLimit(self):
        private = cookieHeader(self.jar.setCookie(self.jar.issue(ALICE, public=False)))
        self.clock.advance(8 * 3600 - 1)
        self.assertEqual(self.state(private), "valid")
        self.clock.advance(1)
        self.assertEqual(self.state(private), "expired")

    def test_configurableLimits(self):
        jar = SessionCookies(self.jar.keys, self.clock, publicTimeout=60, privateTimeout=120)
        public = cookieHeader(jar.setCookie(jar.issue(ALICE, public=True)))
        private = cookieHeader(jar.setCookie(jar.issue(ALICE, public=False)))
        self.clock.advance(60)
        self.assertEqual(result(jar.check(requestWith(public))).state, "expired")
        self.assertEqual(result(jar.check(requestWith(private))).state, "valid")
        self.clock.advance(60)
        self.assertEqual(result(jar.check(requestWith(private))).state, "expired")

    def test_foregroundSlides(self):
        """
        A foreground request refreshes the cookie (at most once a minute), and the refreshed
        cookie carries the limit forward.
        """
        session = self.jar.issue(ALICE, public=True)
        self.clock.advance(30)
        self.assertIsNone(self.jar.touch(session, background=False))
        self.clock.advance(14 * 60)
        refreshed = self.jar.touch(session, background=False)
        self.assertEqual(refreshed.lastActivity, int(self.clock.seconds()))
        self.assertEqual(refreshed.tokenId, session.tokenId)
        self.assertEqual(refreshed.issuedAt, session.issuedAt)
        header = cookieHeader(self.jar.setCookie(refreshed))
        self.clock.advance(10 * 60)
        self.assertEqual(self.state(header), "valid")
        self.assertEqual(self.state(cookieHeader(self.jar.setCookie(session))), "expired")

    def test_backgroundDoesNotSlide(self):
        session = self.jar.issue(ALICE, public=True)
        self.clock.advance(14 * 60)
        self.assertIsNone(self.jar.touch(session, background=True))

    def test_futureCookieRefused(self):
        """
        A cookie claiming activity far in the future (another node's clock badly wrong, or a
        replay from a test system) is refused; small skew is tolerated.
        """
        ahead = SessionCookies(self.jar.keys, Clock())
        ahead.clock.advance(self.clock.seconds() + 200)
        near = cookieHeader(ahead.setCookie(ahead.issue(ALICE, public=False)))
        ahead.clock.advance(3600)
        far = cookieHeader(ahead.setCookie(ahead.issue(ALICE, public=False)))
        self.assertEqual(self.state(near), "valid")
        self.assertEqual(self.state(far), "invalid")


class RevocationTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.revocations = MemoryRevocationSet(self.clock)
        self.jar = SessionCookies(CookieKeys([key()]), self.clock, self.revocations)

    def test_interface(self):
        self.assertTrue(verifyObject(IRevocationSet, self.revocations))

    def test_revokedAcrossCopies(self):
        """
        After logoff every copy of the cookie (also an older, not yet refreshed one) is refused
        by every jar sharing the revocation set, and another logon of the same user is not.
        """
        session = self.jar.issue(ALICE, public=False)
        old = cookieHeader(self.jar.setCookie(session))
        self.clock.advance(120)
        refreshed = self.jar.touch(session, background=False)
        other = SessionCookies(self.jar.keys, self.clock, self.revocations)
        second = cookieHeader(other.setCookie(other.issue(ALICE, public=False)))
        result(self.jar.revoke(refreshed))
        for header in (old, cookieHeader(self.jar.setCookie(refreshed))):
            self.assertEqual(result(other.check(requestWith(header))).state, "revoked")
        self.assertEqual(result(other.check(requestWith(second))).state, "valid")

    def test_entriesExpire(self):
        """
        A revocation is kept until the cookie would have expired anyway, then forgotten.
        """
        session = self.jar.issue(ALICE, public=True)
        result(self.jar.revoke(session))
        self.clock.advance(15 * 60 + 299)
        self.assertTrue(result(self.revocations.contains(session.tokenId)))
        self.clock.advance(1)
        self.assertFalse(result(self.revocations.contains(session.tokenId)))
        self.assertEqual(len(self.revocations), 0)

    def test_sweep(self):
        """
        Adding many entries drops the expired ones: the set does not grow without bound.
        """
        for n in range(100):
            self.revocations.add(f"t{n}", self.clock.seconds() + 10)
        self.clock.advance(11)
        for n in range(200):
            self.revocations.add(f"u{n}", self.clock.seconds() + 10)
        self.assertLessEqual(len(self.revocations), 200)


class HelperTests(SynchronousTestCase):
    def test_stripCookies(self):
        self.assertEqual(
            cookies.stripCookies(b"a=1; __Host-casd=SEALED; b=2", ["__Host-casd"]), b"a=1; b=2"
        )
        self.assertIsNone(cookies.stripCookies(b"__Host-casd=x;__Host-casd-logon=y", ["__Host-casd", "__Host-casd-logon"]))

    def test_background(self):
        """
        Polls named by the patterns, long polls, prefetches and self-declared background
        requests are background; a page load or a user's XHR is not.
        """
        patterns = cookies.compileBackground(cookies.DEFAULT_BACKGROUND_PATTERNS)
        bg = lambda uri, **h: cookies.isBackground(requestWith(uri=uri, **h), patterns)
        self.assertTrue(bg(b"/owa/?_task=mail&_action=refresh&_mbox=INBOX"))
        self.assertTrue(bg(b"/owa/?_task=mail&_action=keep-alive"))
        self.assertTrue(bg(b"/owa/ev.owa?ns=PendingRequest"))
        self.assertTrue(bg(b"/owa/service.svc?action=GetUnreadCount&ID=-1"))
        self.assertTrue(bg(b"/owa/", sec_purpose=b"prefetch;prerender"))
        self.assertTrue(bg(b"/owa/x", x_cas_background=b"1"))
        self.assertTrue(cookies.isBackground(requestWith(uri=b"/owa/"), patterns, longPoll=True))
        self.assertFalse(bg(b"/owa/?_task=mail&_action=list&_mbox=INBOX", x_requested_with=b"XMLHttpRequest"))
        self.assertFalse(bg(b"/owa/?_task=mail&_action=refreshed"))
        self.assertFalse(bg(b"/owa/"))
        none = cookies.compileBackground([])
        self.assertFalse(cookies.isBackground(requestWith(uri=b"/owa/?_action=refresh"), none))

    def test_sessionBytesRejectGarbage(self):
        self.assertIsNone(FormsSession.fromBytes(b"{}"))
        self.assertIsNone(FormsSession.fromBytes(b"\xff"))
        self.assertIsNone(FormsSession.fromBytes(b'{"u": 1, "t": "x", "i": 0, "a": 0, "p": 0}'))
