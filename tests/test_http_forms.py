"""
Forms login through a real L{twisted.web.server.Site} on a L{StringTransport}: the logon page,
CSRF, open-redirect attempts, 302 versus 440, logoff and revocation, and casd's cookies kept away
from the backend.
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote, urlencode

from zope.interface import implementer

from twisted.cred.portal import Portal
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from casd.auth import UserRecord
from casd.auth.authenticator import Authenticator, MailboxRealm
from casd.auth.penalty import LoginPenalty
from casd.failures import DirectoryUnavailable
from casd.session.clientinfo import ClientInfo
from casd.testing import MemoryDirectory
from protocols.http.cookies import CookieKeys, MemoryRevocationSet, SessionCookies
from protocols.http.forms import FormsLogon, LogonRequired, safeTarget
from protocols.http.status import render

ALICE = UserRecord(login="alice", address="alice@example.com", mailHost="mbx1")


@implementer(ISSLTransport)
class TLSTransport(StringTransport):
    def getPeerCertificate(self):
        return None

    def setTcpNoDelay(self, enabled):
        pass


def clientInfo(request) -> ClientInfo:
    return ClientInfo("s1", "http", "https", "198.51.100.7", 40000, "127.0.0.1", 443, True, False)


class Vdir(Resource):
    """
    What the HTTP vdir does with forms: logon pages first, then the cookie, then the "backend"
    (here an echo of the user and of the Cookie header the backend would see).
    """

    isLeaf = True

    def __init__(self, forms: FormsLogon) -> None:
        super().__init__()
        self.forms = forms

    def render(self, request):
        if self.forms.ownsPath(request.path):
            return self.forms.render(request)
        d = self.forms.authenticate(request, longPoll=request.path.endswith(b"/ping"))

        def ok(user):
            cookie = b";".join(request.requestHeaders.getRawHeaders(b"cookie", [b"-"]))
            body = b"user=" + user.login.encode() + b" cookie=" + cookie
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

        def refused(failure):
            failure.trap(LogonRequired)
            render(request, self.forms.challenge(request, failure.value.state))

        d.addCallbacks(ok, refused)
        return NOT_DONE_YET


class Response:
    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        version, code, *reason = lines[0].split(b" ", 2)
        self.code = int(code)
        self.reason = reason[0] if reason else b""
        self.headers: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None

    def setCookies(self) -> dict[str, bytes]:
        """name -> the whole Set-Cookie value"""
        return {v.split(b"=", 1)[0].decode(): v for v in self.headers.get(b"set-cookie", [])}


class FormsTestsMixin:
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.directory = MemoryDirectory({"alice": ("secret", ALICE), "bob": "hunter2"})
        authenticator = Authenticator(
            Portal(MailboxRealm(), [self.directory]), self.clock, penalty=LoginPenalty(self.clock, initialDelay=0)
        )
        self.revocations = MemoryRevocationSet(self.clock)
        self.cookies = SessionCookies(CookieKeys([os.urandom(32)]), self.clock, self.revocations)
        self.forms = FormsLogon("/owa", self.cookies, authenticator, clientInfo, logoffAliases=["logoff.owa"])
        self.site = Site(Vdir(self.forms), reactor=self.clock)
        self.jar: dict[str, bytes] = {}

    def request(self, method: bytes, uri: bytes, body: bytes = b"", headers=(), useJar=True) -> Response:
        protocol = self.site.buildProtocol(None)
        transport = TLSTransport()
        protocol.makeConnection(transport)
        lines = [method + b" " + uri + b" HTTP/1.1", b"Host: mail.example.com"]
        if useJar and self.jar:
            lines.append(b"Cookie: " + b"; ".join(k.encode() + b"=" + v for k, v in self.jar.items()))
        lines.extend(name + b": " + value for name, value in headers)
        if body or method == b"POST":
            lines.append(b"Content-Length: %d" % len(body))
        protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        response = Response(transport.value())
        protocol.connectionLost(None)
        for name, value in response.setCookies().items():
            cookieValue = value.split(b";")[0].split(b"=", 1)[1]
            if b"Max-Age=0" in value or not cookieValue:
                self.jar.pop(name, None)
            else:
                self.jar[name] = cookieValue
        return response

    def logonPage(self, url: bytes = b"/owa/") -> tuple[Response, str]:
        page = self.request(b"GET", b"/owa/_casd/logon?url=" + quote(url, safe="").encode())
        csrf = re.search(rb'name="csrf" value="([^"]+)"', page.body).group(1).decode()
        return page, csrf

    def logon(self, user="alice", password="secret", security="public", url="/owa/", csrf=None, headers=()):
        if csrf is None:
            _, csrf = self.logonPage()
        form = urlencode(
            {"username": user, "password": password, "security": security, "url": url, "csrf": csrf}
        ).encode()
        return self.request(
            b"POST",
            b"/owa/_casd/logon",
            form,
            [(b"Content-Type", b"application/x-www-form-urlencoded")] + list(headers),
        )


NAV = [(b"Accept", b"text/html,application/xhtml+xml"), (b"Sec-Fetch-Mode", b"navigate")]
XHR = [(b"Accept", b"application/json"), (b"X-Requested-With", b"XMLHttpRequest")]


class LogonPageTests(FormsTestsMixin, SynchronousTestCase):
    def test_page(self):
        """
        The logon page is plain HTML: a form posting to itself, labelled fields, the
        public/private choice (public checked), a CSRF token also set as a strict cookie; the
        page may not be framed or cached.
        """
        page, csrf = self.logonPage(b"/owa/?_task=mail")
        self.assertEqual(page.code, 200)
        body = page.body.decode()
        self.assertIn('<form method="post" action="/owa/_casd/logon">', body)
        for field in ("username", "password", "public", "private"):
            self.assertIn(f'<label for="{field}">', body)
            self.assertIn(f'id="{field}"', body)
        self.assertRegex(body, r'id="public" name="security" value="public" checked')
        self.assertNotIn("<script", body)
        self.assertIn('name="url" value="/owa/?_task=mail"', body)
        cookie = page.setCookies()["__Host-casd-logon"]
        self.assertIn(csrf.encode(), cookie)
        for flag in (b"Secure", b"HttpOnly", b"SameSite=Strict", b"Path=/"):
            self.assertIn(flag, cookie)
        self.assertEqual(page.header(b"x-frame-options"), b"DENY")
        self.assertEqual(page.header(b"cache-control"), b"no-store")
        self.assertIn(b"frame-ancestors 'none'", page.header(b"content-security-policy"))

    def test_reasonIsNotEchoed(self):
        """
        Messages come from a fixed table: a crafted C{reason} or C{url} is never reflected raw.
        """
        page = self.request(b"GET", b"/owa/_casd/logon?reason=%3Cscript%3E&url=%22%3E%3Cscript%3E")
        self.assertNotIn(b"<script", page.body)
        self.assertIn(b'name="url" value="/owa/"', page.body)

    def test_logon(self):
        """
        A good logon sets the session cookie (Secure, HttpOnly, SameSite=Lax), clears the CSRF
        cookie and redirects to the page asked for; the session then reaches the backend as the
        user, with casd's cookies removed from what the backend sees.
        """
        response = self.logon(url="/owa/?_task=mail&_mbox=INBOX")
        self.assertEqual(response.code, 302)
        self.assertEqual(response.header(b"location"), b"/owa/?_task=mail&_mbox=INBOX")
        session = response.setCookies()["__Host-casd"]
        for flag in (b"Secure", b"HttpOnly", b"SameSite=Lax", b"Path=/"):
            self.assertIn(flag, session)
        self.assertIn(b"Max-Age=0", response.setCookies()["__Host-casd-logon"])
        self.jar["roundcube_sessid"] = b"abc"
        page = self.request(b"GET", b"/owa/?_task=mail", headers=NAV)
        self.assertEqual(page.code, 200)
        self.assertEqual(page.body, b"user=alice cookie=roundcube_sessid=abc")

    def test_badPassword(self):
        """
        A wrong password shows the page again with a message and no session; the password is
        not put back into the page.
        """
        response = self.logon(password="wrong-pass-123")
        self.assertEqual(response.code, 200)
        self.assertIn(b"incorrect", response.body)
        self.assertIn(b'value="alice"', response.body)
        self.assertNotIn(b"wrong-pass-123", response.body)
        self.assertNotIn("__Host-casd", response.setCookies())

    def test_badUsername(self):
        """
        A user name with a NUL is a failed logon (the page again), never an error.
        """
        response = self.logon(user="alice\x00admin")
        self.assertEqual(response.code, 200)
        self.assertIn(b"incorrect", response.body)
        self.assertNotIn("__Host-casd", response.setCookies())

    def test_directoryDown(self):
        """
        Directory trouble is a 503 with Retry-After and a message, not a wrong password.
        """
        self.directory.error = DirectoryUnavailable("down")
        response = self.logon()
        self.assertEqual(response.code, 503)
        self.assertEqual(response.header(b"retry-after"), b"30")
        self.assertIn(b"temporarily unavailable", response.body)

    def test_badForm(self):
        for ctype, body in (
            (b"text/plain", b"username=alice"),
            (b"application/x-www-form-urlencoded", b"\xff\xfe"),
            (b"application/x-www-form-urlencoded", b"a=" + b"x" * 9000),
        ):
            response = self.request(b"POST", b"/owa/_casd/logon", body, [(b"Content-Type", ctype)])
            self.assertEqual(response.code, 400)
        self.assertEqual(self.request(b"PUT", b"/owa/_casd/logon").code, 405)


class CSRFTests(FormsTestsMixin, SynchronousTestCase):
    def test_missingToken(self):
        self.logonPage()
        response = self.logon(csrf="")
        self.assertEqual(response.code, 403)
        self.assertNotIn("__Host-casd", response.setCookies())

    def test_wrongToken(self):
        self.logonPage()
        response = self.logon(csrf="A" * 43)
        self.assertEqual(response.code, 403)
        self.assertIn(b"expired", response.body)
        self.assertNotIn("__Host-casd", response.setCookies())

    def test_tokenWithoutCookie(self):
        """
        A token copied from a page without the matching cookie (a forged cross-site form) fails.
        """
        _, csrf = self.logonPage()
        self.jar.clear()
        self.assertEqual(self.logon(csrf=csrf).code, 403)

    def test_crossOrigin(self):
        """
        Even with a matching token, a POST whose Origin or Sec-Fetch-Site names another site is
        refused; the same origin (default port or not) is accepted.
        """
        for headers in (
            [(b"Origin", b"https://evil.example")],
            [(b"Origin", b"null")],
            [(b"Origin", b"http://mail.example.com")],
            [(b"Sec-Fetch-Site", b"cross-site")],
            [(b"Sec-Fetch-Site", b"same-site")],
        ):
            _, csrf = self.logonPage()
            self.assertEqual(self.logon(csrf=csrf, headers=headers).code, 403, headers)
        for headers in (
            [(b"Origin", b"https://mail.example.com")],
            [(b"Origin", b"https://mail.example.com:443"), (b"Sec-Fetch-Site", b"same-origin")],
        ):
            _, csrf = self.logonPage()
            self.assertEqual(self.logon(csrf=csrf, headers=headers).code, 302, headers)


class RedirectTests(FormsTestsMixin, SynchronousTestCase):
    EVIL = [
        "https://evil.example/owa/",
        "//evil.example/owa/",
        "/\\evil.example",
        "\\\\evil.example",
        "/%2F/evil.example",
        "/%2f%2fevil.example",
        "/%5Cevil.example",
        "/%252F%252Fevil.example",
        "javascript:alert(1)",
        "/owa/\r\nSet-Cookie: x=1",
        "/owa/ x",
        "/ecp/",
        "/owax/",
        "/owa/_casd/logoff",
        "owa/",
        "",
        "/owa/" + "a" * 3000,
    ]

    def test_safeTarget(self):
        for url in self.EVIL:
            self.assertIsNone(safeTarget(url, "/owa"), url)
        for url in ("/owa", "/owa/", "/OWA/?_task=mail", "/owa/a/b?c=%2F#frag"):
            self.assertEqual(safeTarget(url, "/owa"), url)

    def test_openRedirectAttempts(self):
        """
        Whatever target a logon POST names, the redirect stays on the vdir of this origin.
        """
        for url in self.EVIL:
            response = self.logon(url=url)
            self.assertEqual(response.code, 302, url)
            self.assertEqual(response.header(b"location"), b"/owa/", url)


class ChallengeTests(FormsTestsMixin, SynchronousTestCase):
    def test_navigationWithoutCookie(self):
        """
        A page load without a session is sent to the logon page, remembering where it was going.
        """
        response = self.request(b"GET", b"/owa/?_task=mail&_uid=3", headers=NAV)
        self.assertEqual(response.code, 302)
        self.assertEqual(
            response.header(b"location"), b"/owa/_casd/logon?url=%2Fowa%2F%3F_task%3Dmail%26_uid%3D3"
        )
        plain = self.request(b"GET", b"/owa/", headers=[(b"Accept", b"text/html")])
        self.assertEqual(plain.code, 302)

    def test_xhrWithoutCookie(self):
        for headers in (XHR, [(b"Sec-Fetch-Mode", b"cors")], [(b"Accept", b"*/*")]):
            response = self.request(b"GET", b"/owa/?_action=list", headers=headers)
            self.assertEqual((response.code, response.reason), (440, b"Login Timeout"), headers)
        self.assertEqual(self.request(b"POST", b"/owa/?_action=send", headers=NAV[:1]).code, 440)

    def test_expiredPublic(self):
        """
        A public session idle for 15 minutes: a navigation gets a 302 to the logon page saying
        why (and clears the cookie), an XHR a 440 (keeping it, so that the page load that follows
        still says why).
        """
        self.logon(security="public")
        cookie = dict(self.jar)
        self.clock.advance(15 * 60)
        nav = self.request(b"GET", b"/owa/", headers=NAV)
        self.assertEqual(nav.code, 302)
        self.assertTrue(nav.header(b"location").endswith(b"&reason=expired"))
        self.assertIn(b"Max-Age=0", nav.setCookies()["__Host-casd"])
        self.jar.update(cookie)
        xhr = self.request(b"GET", b"/owa/?_action=list", headers=XHR)
        self.assertEqual(xhr.code, 440)
        self.assertNotIn("__Host-casd", xhr.setCookies())
        again = self.request(b"GET", b"/owa/", headers=NAV)
        self.assertTrue(again.header(b"location").endswith(b"&reason=expired"))

    def test_privateOutlivesPublic(self):
        self.logon(security="private")
        self.clock.advance(60 * 60)
        self.assertEqual(self.request(b"GET", b"/owa/", headers=NAV).code, 200)
        self.clock.advance(8 * 3600)
        self.assertEqual(self.request(b"GET", b"/owa/", headers=NAV).code, 302)

    def test_activitySlidesBackgroundDoesNot(self):
        """
        Foreground requests keep a public session alive; Roundcube's refresh polls and the
        vdir's long polls, however frequent, do not.
        """
        self.logon(security="public")
        for _ in range(4):
            self.clock.advance(10 * 60)
            response = self.request(b"GET", b"/owa/?_task=mail", headers=NAV)
            self.assertEqual(response.code, 200)
            self.assertIn("__Host-casd", response.setCookies())
        for _ in range(2):
            self.clock.advance(7 * 60)
            poll = self.request(b"GET", b"/owa/?_task=mail&_action=refresh", headers=XHR)
            self.assertEqual(poll.code, 200)
            self.assertNotIn("__Host-casd", poll.setCookies())
            self.assertEqual(self.request(b"POST", b"/owa/ping", headers=XHR).code, 200)
        self.clock.advance(60)
        self.assertEqual(self.request(b"GET", b"/owa/?_task=mail&_action=refresh", headers=XHR).code, 440)

    def test_tamperedCookie(self):
        self.logon()
        value = bytearray(self.jar["__Host-casd"])
        value[10] = ord("A") if value[10] != ord("A") else ord("B")
        self.jar["__Host-casd"] = bytes(value)
        self.assertEqual(self.request(b"GET", b"/owa/", headers=XHR).code, 440)


class LogoffTests(FormsTestsMixin, SynchronousTestCase):
    def test_logoff(self):
        """
        Logoff clears the cookie, shows the logon page, and revokes the session: a copy of the
        cookie kept by an attacker is refused afterwards.
        """
        self.logon(security="private")
        stolen = dict(self.jar)
        response = self.request(b"GET", b"/owa/_casd/logoff", headers=NAV)
        self.assertEqual(response.code, 200)
        self.assertIn(b"signed out", response.body)
        self.assertIn(b"Max-Age=0", response.setCookies()["__Host-casd"])
        self.assertEqual(len(self.revocations), 1)
        self.assertEqual(self.request(b"GET", b"/owa/", headers=NAV).code, 302)
        self.jar.update(stolen)
        self.assertEqual(self.request(b"GET", b"/owa/", headers=XHR).code, 440)

    def test_alias(self):
        self.logon()
        self.request(b"GET", b"/owa/logoff.owa")
        self.assertEqual(len(self.revocations), 1)

    def test_logoffWithoutSession(self):
        response = self.request(b"GET", b"/owa/_casd/logoff")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.revocations), 0)
