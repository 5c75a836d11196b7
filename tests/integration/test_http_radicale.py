"""
casd in front of a real Radicale (CalDAV), driven by the C{caldav} client: Basic at casd, the
user handed to Radicale in the trusted C{X-Remote-User} header, which casd always strips from
clients.
"""

import os
import ssl
import urllib.error
import urllib.request
from base64 import b64encode

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.integration.httpweb import CASWeb
from tests.support.radicale import Radicale

EVENT = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//casd tests//EN
BEGIN:VEVENT
UID:casd-test-1@example.com
DTSTAMP:20261207T120000Z
DTSTART:20261208T100000Z
DTEND:20261208T110000Z
SUMMARY:Planning through casd
END:VEVENT
END:VCALENDAR
"""

VDIRS = """
[[http.vdir]]
path = "/dav"
backend = "radicale"
auth = ["basic"]
realm = "Calendar"
identity = "header"
identity_header = "X-Remote-User"
"""


class RadicaleTests(TestCase):
    timeout = 120

    def setUp(self):
        # Radicale starts in well under a second: one per test keeps the tests independent.
        self.tmp = os.path.abspath(self.mktemp())
        self.radicale = Radicale(os.path.join(self.tmp, "radicale"), scriptName="/dav").start()
        self.addCleanup(self.radicale.stop)
        self.cas = CASWeb(
            os.path.join(self.tmp, "cas"),
            {"alice": ("alice-pw", "address=alice@example.com"), "bob": ("bob-pw", "")},
            {"radicale": self.radicale.port},
            VDIRS,
        ).start()
        self.addCleanup(self.cas.stop)

    def client(self, user, password, **kw):
        import caldav

        return caldav.DAVClient(
            url=f"{self.cas.url}/dav/{user}/",
            username=user,
            password=password,
            ssl_verify_cert=self.cas.caPath,
            **kw,
        )

    def rawRequest(self, method, path, headers):
        context = ssl.create_default_context(cafile=self.cas.caPath)
        request = urllib.request.Request(self.cas.url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, context=context, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def makeCalendar(self):
        """
        As alice: a calendar with one event, read back.  Runs in a thread.
        """
        with self.client("alice", "alice-pw") as client:
            calendar = client.principal().make_calendar(name="Work")
            calendar.save_event(EVENT)
            summaries = [e.vobject_instance.vevent.summary.value for e in calendar.events()]
            return str(calendar.url), summaries

    @defer.inlineCallbacks
    def test_calendarAndEvent(self):
        """
        alice creates a calendar and an event through casd and reads them back; Radicale stored
        them under alice's own collection.
        """
        url, summaries = yield threads.deferToThread(self.makeCalendar)
        self.assertEqual(summaries, ["Planning through casd"])
        self.assertTrue(url.startswith(f"{self.cas.url}/dav/alice/"), url)
        stored = os.path.join(self.radicale.directory, "collections", "collection-root", "alice")
        self.assertTrue(os.path.isdir(stored), stored)

    @defer.inlineCallbacks
    def test_otherUserForbidden(self):
        """
        bob, correctly authenticated at casd, gets Radicale's own 403 on alice's calendar; even
        when he sends C{X-Remote-User: alice} himself (casd replaces it with bob).
        """
        import caldav
        from caldav.lib.error import AuthorizationError

        url, _ = yield threads.deferToThread(self.makeCalendar)

        def asBob(headers):
            with self.client("bob", "bob-pw", headers=headers) as client:
                return client.calendar(url=url).events()

        for headers in ({}, {"X-Remote-User": "alice"}):
            yield self.assertFailure(threads.deferToThread(asBob, headers), AuthorizationError)
        basic = "Basic " + b64encode(b"bob:bob-pw").decode()
        status, _, _ = yield threads.deferToThread(
            self.rawRequest, "PROPFIND", "/dav/alice/", {"Authorization": basic, "X-Remote-User": "alice", "Depth": "0"}
        )
        self.assertEqual(status, 403)
        self.assertIn("bob", self.radicale.logText())
        del caldav

    @defer.inlineCallbacks
    def test_clientHeaderAloneIsNothing(self):
        """
        A client that sends only C{X-Remote-User} gets casd's 401 challenge; nothing reaches
        Radicale.
        """
        before = self.radicale.logText().count("PROPFIND")
        status, headers, _ = yield threads.deferToThread(
            self.rawRequest, "PROPFIND", "/dav/alice/", {"X-Remote-User": "alice", "Depth": "0"}
        )
        self.assertEqual(status, 401)
        self.assertIn('Basic realm="Calendar"', headers.get("WWW-Authenticate", ""))
        self.assertEqual(self.radicale.logText().count("PROPFIND"), before)

    @defer.inlineCallbacks
    def test_wrongPassword(self):
        import caldav
        from caldav.lib.error import AuthorizationError

        def bad():
            with self.client("alice", "wrong") as client:
                return client.principal()

        yield self.assertFailure(threads.deferToThread(bad), AuthorizationError)
        del caldav
