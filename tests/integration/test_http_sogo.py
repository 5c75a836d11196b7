"""
casd in front of a real SOGo (ActiveSync, CalDAV) with its private PostgreSQL, memcached and
Dovecot: EAS OPTIONS headers pass through, an EAS client (pyactivesync, set to 14.1) runs
FolderSync and a Ping that outlives the vdir's ordinary idle timeout, CalDAV through C{/dav}, a
client's own C{x-webobjects-remote-user} is stripped, SOGo stopped is 503 (never 401), and a user of
another site gets 451 with C{X-MS-Location}.

The servers are slow to start (about 5 s) and shared by the module's tests; they are stopped by
PID when the test process exits.  casd is started per test.

Identity: casd authenticates the user (Basic), then sends SOGo C{x-webobjects-remote-user: USER}
(C{identity = "header"}, C{-SOGoTrustProxyAuthentication YES}).  SOGo then has no password for
IMAP: the private Dovecot trusts logins from the SOGo host (L{TrustingDovecot}), as single
sign-on deployments of SOGo do.
"""

import atexit
import base64
import os
import ssl
import tempfile
import time
import urllib.error
import urllib.request

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase

from tests.integration.httpweb import CASWeb
from tests.support.postgres import PostgreSQL
from tests.support.sogo import SOGo, TrustingDovecot

#: The Ping's heartbeat, in seconds: longer than the vdir's idle timeout (2 s), short enough for CI.
HEARTBEAT = 10

VDIRS = """
[[http.vdir]]
path = "/Microsoft-Server-ActiveSync"
backend = "sogo"
backend_path = "/SOGo/Microsoft-Server-ActiveSync"
auth = ["basic"]
realm = "ActiveSync"
identity = "header"
identity_header = "x-webobjects-remote-user"
idle_timeout = 2.0
long_poll_timeout = 120.0
site_redirect = "451"

[[http.vdir]]
path = "/dav"
backend = "sogo"
backend_path = "/SOGo/dav"
auth = ["basic"]
realm = "Calendar"
identity = "header"
identity_header = "x-webobjects-remote-user"
idle_timeout = 5.0
"""

SITES = """
[sites.north]
action = "redirect"
redirect_url = "https://north.example.com"
"""

EVENT = """BEGIN:VCALENDAR
VERSION:2.0
PRODID:-//casd tests//EN
BEGIN:VEVENT
UID:casd-sogo-1@example.com
DTSTAMP:20261207T120000Z
DTSTART:20261209T090000Z
DTEND:20261209T100000Z
SUMMARY:Standup via casd
END:VEVENT
END:VCALENDAR
"""

_servers = None


class Servers:
    """
    Dovecot, PostgreSQL and SOGo (with memcached), started once for the module.
    """

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="casd-sogo-")
        os.chmod(self.directory, 0o755)
        # Passwords nobody uses: Dovecot trusts the SOGo host.
        users = {"alice": "imap-unused-a", "bob": "imap-unused-b"}
        self.dovecot = TrustingDovecot(os.path.join(self.directory, "dovecot"), users)
        self.postgres = PostgreSQL(os.path.join(self.directory, "postgres"))
        self.sogo = None

    def start(self):
        self.dovecot.start()
        self.postgres.start()
        self.sogo = SOGo(
            os.path.join(self.directory, "sogo"), self.postgres, self.dovecot.imapPort,
            {"alice": "sogo-unused-a", "bob": "sogo-unused-b"},
        ).start()
        return self

    def stop(self):
        for server in (self.sogo, self.postgres, self.dovecot):
            if server is not None:
                try:
                    server.stop()
                except Exception:
                    pass


def servers():
    global _servers
    if _servers is None:
        candidate = Servers()
        atexit.register(candidate.stop)
        candidate.start()
        _servers = candidate
    return _servers


def basic(user, password):
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class SOGoTests(TestCase):
    timeout = 180

    @defer.inlineCallbacks
    def setUp(self):
        self.servers = yield threads.deferToThread(servers)
        self.sogo = self.servers.sogo
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.cas = CASWeb(
            os.path.join(self.tmp, "cas"),
            {
                "alice": ("alice-pw", "address=alice@example.com"),
                "bob": ("bob-pw", "address=bob@example.com"),
                "nora": ("nora-pw", "address=nora@example.com site=north"),
            },
            {"sogo": self.sogo.port},
            VDIRS,
            extra=SITES,
            server='site = "east"',
        ).start()
        self.addCleanup(self.cas.stop)

    def request(self, method, path, headers=None, body=None):
        context = ssl.create_default_context(cafile=self.cas.caPath)
        request = urllib.request.Request(self.cas.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    def eas(self, user="alice", password="alice-pw"):
        import pyactivesync._http
        from pyactivesync.client import Client

        # SOGo speaks EAS up to 14.1; pyactivesync only 16.1 unless told (http-facts §2).
        pyactivesync._http._EAS_PROTOCOL_VERSION = "14.1"
        client = Client("unused", user, password, device_id="casdtest" + user, user=user, timeout=90)
        client._transport.base_url = self.cas.url + "/Microsoft-Server-ActiveSync"
        # This machine may name a CA bundle in REQUESTS_CA_BUNDLE, which would win over ours.
        client._transport.session.trust_env = False
        client._transport.session.verify = self.cas.caPath
        client._provisioned = True
        return client

    @defer.inlineCallbacks
    def test_options(self):
        """
        SOGo's ActiveSync OPTIONS headers reach the client through casd.
        """
        status, headers, _ = yield threads.deferToThread(
            self.request, "OPTIONS", "/Microsoft-Server-ActiveSync", {"Authorization": basic("alice", "alice-pw")}
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers["MS-ASProtocolVersions"], "2.5,12.0,12.1,14.0,14.1")
        self.assertIn("FolderSync", headers["MS-ASProtocolCommands"])
        self.assertIn("Ping", headers["MS-ASProtocolCommands"])

    @defer.inlineCallbacks
    def test_folderSyncAndPing(self):
        """
        FolderSync lists alice's mail folders (SOGo opened her IMAP mailbox); after a Sync of the
        inbox, a Ping is held by SOGo for its whole heartbeat, well beyond the vdir's 2-second
        idle timeout, and ends with SOGo's own status.
        """

        from pyactivesync.models import FolderType

        def run():
            with self.eas() as client:
                folders = client.list_folders()
                inbox = [f for f in folders if f.type == FolderType.INBOX][0]
                key = client.sync_folder(inbox.id).sync_key
                client.sync_folder(inbox.id, key)
                started = time.monotonic()
                result = client.ping(inbox.id, heartbeat=HEARTBEAT, timeout=100)
                return folders, result, time.monotonic() - started

        folders, result, elapsed = yield threads.deferToThread(run)
        names = {f.name for f in folders}
        self.assertTrue({"INBOX", "Drafts", "Sent", "Trash"} <= names, names)
        # 1: the heartbeat expired without changes: SOGo held the request for the whole
        # heartbeat, five times the vdir's 2-second idle timeout, and casd did not cut it.
        self.assertEqual(result.status, "1")
        self.assertGreater(elapsed, HEARTBEAT - 1)

    @defer.inlineCallbacks
    def test_davThroughCasd(self):
        """
        CalDAV through C{/dav}: alice stores and reads an event in her personal calendar.
        """
        path = "/dav/alice/Calendar/personal/casd-sogo-1.ics"
        auth = {"Authorization": basic("alice", "alice-pw")}
        status, _, _ = yield threads.deferToThread(
            self.request, "PUT", path, dict(auth, **{"Content-Type": "text/calendar"}), EVENT.encode()
        )
        self.assertIn(status, (201, 204))
        status, _, body = yield threads.deferToThread(self.request, "GET", path, auth)
        self.assertEqual(status, 200)
        self.assertIn(b"Standup via casd", body)
        status, _, body = yield threads.deferToThread(
            self.request, "PROPFIND", "/dav/alice/Calendar/", dict(auth, Depth="1")
        )
        self.assertEqual(status, 207)
        self.assertIn(b"/alice/Calendar/personal/", body)

    @defer.inlineCallbacks
    def test_clientIdentityHeaderStripped(self):
        """
        bob, sending C{x-webobjects-remote-user: alice} himself, is still bob at SOGo: he cannot
        read alice's event.
        """
        path = "/dav/alice/Calendar/personal/casd-sogo-strip.ics"
        alice = {"Authorization": basic("alice", "alice-pw")}
        yield threads.deferToThread(
            self.request, "PUT", path, dict(alice, **{"Content-Type": "text/calendar"}),
            EVENT.replace("casd-sogo-1", "casd-sogo-strip").encode(),
        )
        bob = {"Authorization": basic("bob", "bob-pw"), "x-webobjects-remote-user": "alice"}
        status, _, body = yield threads.deferToThread(self.request, "GET", path, bob)
        self.assertIn(status, (403, 404))
        self.assertNotIn(b"Standup via casd", body)

    @defer.inlineCallbacks
    def test_otherSite(self):
        """
        A user whose mailbox is in another site gets 451 with X-MS-Location; nothing reaches SOGo.
        """
        status, headers, _ = yield threads.deferToThread(
            self.request, "POST", "/Microsoft-Server-ActiveSync?Cmd=FolderSync&User=nora&DeviceId=x&DeviceType=t",
            {"Authorization": basic("nora", "nora-pw"), "Content-Type": "application/vnd.ms-sync.wbxml"}, b"",
        )
        self.assertEqual(status, 451)
        self.assertEqual(headers["X-MS-Location"], "https://north.example.com/Microsoft-Server-ActiveSync")

    @defer.inlineCallbacks
    def test_sogoStopped(self):
        """
        With SOGo stopped, ActiveSync and DAV clients get 503 (or a 502 for the first failed
        connection), never 401: they must not prompt for the password.
        """
        yield threads.deferToThread(self.sogo.stop)
        self.addCleanup(lambda: threads.deferToThread(self.sogo.start))
        seen = []
        for _ in range(5):
            status, headers, _ = yield threads.deferToThread(
                self.request, "OPTIONS", "/Microsoft-Server-ActiveSync", {"Authorization": basic("alice", "alice-pw")}
            )
            seen.append(status)
            if status == 503:
                break
        self.assertNotIn(401, seen)
        self.assertEqual(seen[-1], 503, seen)
        self.assertIsNotNone(headers["Retry-After"])
        status, _, _ = yield threads.deferToThread(
            self.request, "PROPFIND", "/dav/alice/", {"Authorization": basic("alice", "alice-pw"), "Depth": "0"}
        )
        self.assertIn(status, (502, 503))
