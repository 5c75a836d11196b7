"""
A browser (headless Chromium through Playwright) at casd's forms login in front of a real
Roundcube on a private Dovecot: log on, see the inbox, cookie flags, public and private
inactivity limits on a fake clock, 440 for a script, logoff.  Screenshots are saved in each test's
temporary directory.
"""

import os

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.integration.httpweb import CASWeb
from tests.support.browser import Browser
from tests.support.dovecot import Dovecot
from tests.support.roundcube import Roundcube

VDIRS = """
[[http.vdir]]
path = "/owa"
backend = "webmail"
auth = ["forms"]
identity = "header"
identity_header = "X-Remote-User"
"""

MESSAGE = (
    b"From: Bob <bob@example.com>\r\nTo: alice@example.com\r\nSubject: Lunch on Friday\r\n"
    b"Message-ID: <lunch@example.com>\r\nDate: Mon, 07 Dec 2026 12:00:00 +0000\r\n\r\nNoon?\r\n"
)


class OffsetClock:
    """
    The real clock plus an offset the test moves: the fake clock of the node's session cookies.
    """

    def __init__(self, clock):
        self.clock = clock
        self.offset = 0.0

    def seconds(self):
        return self.clock.seconds() + self.offset


class RoundcubeTests(TestCase):
    timeout = 180

    def setUp(self):
        from twisted.internet import reactor

        self.tmp = os.path.abspath(self.mktemp())
        self.dovecot = Dovecot(
            os.path.join(self.tmp, "dovecot"), {"alice": "imap-only-pw"}, masterUsers={"rc-master": "rc-master-pw"}
        )
        self.dovecot.start()
        self.addCleanup(self.dovecot.stop)
        self.dovecot.deliver("alice", MESSAGE)
        self.assertEqual(self.inboxCount(), 1)
        self.roundcube = Roundcube(
            os.path.join(self.tmp, "roundcube"),
            self.dovecot.imapPort,
            "rc-master",
            "rc-master-pw",
            logoffURL="/owa/_casd/logoff",
            prefix="/owa",
        ).start()
        self.addCleanup(self.roundcube.stop)
        self.cas = CASWeb(
            os.path.join(self.tmp, "cas"),
            {"alice": ("alice-web-pw", "address=alice@example.com")},
            {"webmail": self.roundcube.port},
            VDIRS,
        ).start()
        self.addCleanup(self.cas.stop)
        forms = self.cas.sites()[0].authenticator.sources["forms"]
        self.clock = OffsetClock(reactor)
        forms.cookies.clock = self.clock
        self.revocations = forms.cookies.revocations
        self.revoked = []
        add = self.revocations.add

        def recordingAdd(tokenId, expiresAt):
            self.revoked.append(tokenId)
            return add(tokenId, expiresAt)

        self.revocations.add = recordingAdd

    def inboxCount(self):
        """
        Open alice's INBOX once through the master user, as Roundcube will: Dovecot has indexed
        the delivered message before the browser asks for the list.
        """
        import imaplib

        client = imaplib.IMAP4("127.0.0.1", self.dovecot.imapPort, timeout=10)
        try:
            client.authenticate("PLAIN", lambda _: b"alice\0rc-master\0rc-master-pw")
            status, data = client.select("INBOX", readonly=True)
            return int(data[0])
        finally:
            client.logout()

    def shot(self, browser, name):
        return browser.screenshot(os.path.join(self.tmp, "screenshots", name + ".png"))

    def inBrowser(self, scenario):
        """
        Run C{scenario(browser)} in one thread (Playwright's objects belong to the thread that
        made them), with a fresh browser stopped afterwards.
        """

        def run():
            browser = Browser().start()
            try:
                return scenario(browser)
            except Exception:
                try:
                    self.shot(browser, "failure")
                except Exception:
                    pass
                raise
            finally:
                browser.stop()

        return threads.deferToThread(run)

    def logOn(self, browser, security="public", password="alice-web-pw"):
        page = browser.page
        browser.goto(self.cas.url + "/owa/?_task=mail")
        page.wait_for_selector("#username")
        page.fill("#username", "alice")
        page.fill("#password", password)
        page.check("#" + security)
        page.click("#signin")
        page.wait_for_load_state()
        return page

    def waitInbox(self, page):
        """
        Wait for alice's message in Roundcube's list; reload (at most twice) if the list came
        back without it.
        """
        from playwright.sync_api import TimeoutError

        for attempt in range(3):
            try:
                page.wait_for_selector("text=Lunch on Friday", timeout=8000)
                return
            except TimeoutError:
                if attempt == 2:
                    raise
                page.reload()

    def xhrStatus(self, page):
        return page.evaluate(
            """async () => (await fetch('/owa/?_task=mail&_action=refresh',
                 {headers: {'X-Requested-With': 'XMLHttpRequest'}})).status"""
        )

    @defer.inlineCallbacks
    def test_logonInboxCookies(self):
        """
        An anonymous visit shows casd's logon page (labelled fields, public/private choice);
        signing on lands in Roundcube's inbox with alice's message; casd's cookie is Secure,
        HttpOnly and SameSite=Lax.
        """

        def scenario(browser):
            page = browser.page
            browser.goto(self.cas.url + "/owa/?_task=mail")
            logonURL = page.url
            labels = [page.inner_text(f"label[for={f}]") for f in ("username", "password", "public", "private")]
            self.shot(browser, "logon-page")
            self.logOn(browser, "private")
            self.waitInbox(page)
            self.shot(browser, "inbox")
            return logonURL, labels, page.url, browser.cookies()

        logonURL, labels, inboxURL, cookies = yield self.inBrowser(scenario)
        self.assertIn("/owa/_casd/logon?url=%2Fowa%2F%3F_task%3Dmail", logonURL)
        self.assertEqual(labels[:2], ["User name", "Password"])
        self.assertIn("public", labels[2])
        self.assertIn("private", labels[3])
        self.assertIn("_task=mail", inboxURL)
        session = cookies["__Host-casd"]
        self.assertTrue(session["secure"])
        self.assertTrue(session["httpOnly"])
        self.assertEqual(session["sameSite"], "Lax")
        self.assertEqual(session["path"], "/")
        self.assertNotIn("__Host-casd-logon", cookies)
        self.assertIn("roundcube_sessid", cookies)
        self.assertTrue(os.path.getsize(os.path.join(self.tmp, "screenshots", "inbox.png")) > 1000)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        def scenario(browser):
            page = self.logOn(browser, password="not-it")
            return page.url, page.inner_text("[role=alert]"), browser.cookies()

        url, message, cookies = yield self.inBrowser(scenario)
        self.assertIn("/owa/_casd/logon", url)
        self.assertIn("incorrect", message)
        self.assertNotIn("__Host-casd", cookies)

    @defer.inlineCallbacks
    def test_publicExpiry(self):
        """
        A public session survives 14 idle minutes, not 15: then a script gets 440 and a page
        load the logon page, saying why.
        """

        def scenario(browser):
            page = self.logOn(browser, "public")
            self.waitInbox(page)
            self.clock.offset += 14 * 60
            before = self.xhrStatus(page)
            self.clock.offset += 15 * 60 + 1
            after = self.xhrStatus(page)
            browser.goto(self.cas.url + "/owa/?_task=mail")
            self.shot(browser, "expired")
            return before, after, page.url, page.inner_text("[role=alert]")

        before, after, url, message = yield self.inBrowser(scenario)
        self.assertEqual(before, 200)
        self.assertEqual(after, 440)
        self.assertIn("/owa/_casd/logon", url)
        self.assertIn("reason=expired", url)
        self.assertIn("session has ended", message)

    @defer.inlineCallbacks
    def test_privateLimitAndBackgroundPolls(self):
        """
        A private session outlives an idle hour; Roundcube's own refresh polls do not keep it
        alive, and it ends after 8 idle hours.
        """

        def scenario(browser):
            page = self.logOn(browser, "private")
            self.waitInbox(page)
            self.clock.offset += 3600
            page.reload()
            self.waitInbox(page)
            alive = "_casd/logon" not in page.url
            for _ in range(9):
                self.clock.offset += 3600
                polled = self.xhrStatus(page)
                if polled != 200:
                    break
            browser.goto(self.cas.url + "/owa/?_task=mail")
            return alive, polled, page.url

        alive, polled, url = yield self.inBrowser(scenario)
        self.assertTrue(alive)
        self.assertEqual(polled, 440)
        self.assertIn("/owa/_casd/logon", url)

    @defer.inlineCallbacks
    def test_logoff(self):
        """
        Roundcube's own Logout leads to casd's logoff: the cookie is cleared and revoked, and the
        next visit asks for the password again.
        """

        def scenario(browser):
            page = self.logOn(browser, "private")
            self.waitInbox(page)
            page.click("a.logout")
            page.wait_for_selector("text=You have signed out.")
            self.shot(browser, "signed-out")
            cookies = browser.cookies()
            browser.goto(self.cas.url + "/owa/?_task=mail")
            return cookies, page.url

        cookies, url = yield self.inBrowser(scenario)
        self.assertNotIn("__Host-casd", cookies)
        # The session's token is revoked (in the node's shared state).
        self.assertEqual(len(self.revoked), 1)
        self.assertTrue((yield self.revocations.contains(self.revoked[0])))
        self.assertIn("/owa/_casd/logon", url)
