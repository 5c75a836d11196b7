"""
Forms logons under C{twistd cas --workers 2} without C{forms_key_files}: the workers derive one
cookie key from the node secret their parent gave them, so a cookie issued by one worker is
accepted by the other, and by a worker the parent restarted after a C{SIGKILL}; a logoff on one
worker is refused by every worker; neither the secret nor a key derived from it reaches a log.
"""

import base64
import os
import re
import signal
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from twisted.internet import defer, reactor, task, threads
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from casd.nodesecret import FORMS_COOKIE_KEY, ROUTE_COOKIE_KEY
from casd.service.tap import Options
from casd.service.workers import WorkerPool
from tests.integration.httpweb import CASWeb
from tests.integration.test_http_cookiearray import VDIRS, Echo, NoRedirect
from tests.integration.test_workers import childrenOf
from tests.support.procs import pidAlive

#: Bound of every wait (seconds).
WAIT = 40.0
#: Requests per round, each on a new connection.
ROUND = 20


class Browser:
    """
    A client whose every request is a new TLS connection (C{urllib} closes each); used in a
    thread.
    """

    def __init__(self, url, caPath):
        self.url = url
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=caPath)), NoRedirect()
        )

    def fetch(self, path, data=None, headers=None):
        request = urllib.request.Request(self.url + path, data=data, headers=headers or {})
        try:
            with self.opener.open(request, timeout=15) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode()

    def logOn(self):
        """
        @return: the value of the session cookie the logon set.
        """
        status, headers, page = self.fetch("/owa/_casd/logon?url=%2Fowa%2Fhello")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        logonCookie = re.search(r"__Host-casd-logon=([^;]+)", headers["Set-Cookie"]).group(1)
        form = urllib.parse.urlencode(
            {"username": "alice", "password": "alice-pw", "security": "private", "url": "/owa/hello", "csrf": csrf}
        ).encode()
        status, headers, _ = self.fetch(
            "/owa/_casd/logon",
            form,
            {
                "Content-Type": "application/x-www-form-urlencoded",
                "Origin": self.url,
                "Cookie": "__Host-casd-logon=" + logonCookie,
            },
        )
        if status != 302:
            raise AssertionError(f"logon answered {status}")
        cookies = [v for v in headers.get_all("Set-Cookie") if v.startswith("__Host-casd=")]
        return cookies[0].split(";")[0].split("=", 1)[1]

    def visits(self, cookie, count=ROUND):
        """
        @return: the status of C{count} requests with C{cookie}, each on a new connection.
        """
        header = {"Cookie": "__Host-casd=" + cookie, "Accept": "text/html"}
        return [self.fetch("/owa/hello", headers=header)[0] for _ in range(count)]

    def logOff(self, cookie):
        return self.fetch("/owa/_casd/logoff", headers={"Cookie": "__Host-casd=" + cookie})[0]

    def refusedOnce(self, cookie):
        """
        Poll until a request with C{cookie} is refused (the other workers learn a logoff within
        moments): bounded.
        """
        deadline = time.monotonic() + WAIT
        while self.visits(cookie, 1) != [302]:
            if time.monotonic() > deadline:
                raise AssertionError("the revoked cookie is still accepted")
            time.sleep(0.05)


def servedBy(text, status=None):
    """
    @param status: only the requests answered with this status.
    @return: the numbers of the workers whose access lines of C{/owa/hello} the log holds.
    """
    code = r"\d+" if status is None else str(status)
    return {
        int(n) for n in re.findall(rf"\[worker(\d+):casd\.http\.access#info\] .* path=/owa/hello status={code} ", text)
    }


class WorkersFormsTests(TestCase):
    timeout = 240

    @defer.inlineCallbacks
    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.backend = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.node = CASWeb(
            os.path.join(self.tmp, "node"),
            {"alice": ("alice-pw", "address=alice@example.com")},
            {"web": self.backend.getHost().port},
            VDIRS,
        )
        self.addCleanup(self.node.stopProcess)
        yield self.node.startProcess(workers=2)
        self.parent = self.node.process.pid
        self.workers = yield self.waitWorkers(2)
        self.browser = Browser(self.node.url, self.node.caPath)

    @defer.inlineCallbacks
    def waitWorkers(self, count, gone=None):
        """
        Wait (bounded) until the parent has C{count} workers, each listening, C{gone} (a PID)
        not among them.
        """
        deadline = time.monotonic() + WAIT
        while True:
            pids = childrenOf(self.parent)
            listening = self.node.logText().count("Starting factory <protocols.http.site.HTTPSite")
            if len(pids) == count and gone not in pids and listening >= count + (gone is not None):
                return pids
            if time.monotonic() > deadline:
                self.fail(f"workers: {pids}\n{self.node.logText()[-3000:]}")
            yield task.deferLater(reactor, 0.05, lambda: None)

    @defer.inlineCallbacks
    def visitsUntilBothServe(self, cookie, since=0):
        """
        Rounds of L{ROUND} requests with C{cookie} until both workers served some (bounded).

        @return: every status seen.
        """
        statuses = []
        for _ in range(10):
            statuses += yield threads.deferToThread(self.browser.visits, cookie)
            if servedBy(self.node.logText()[since:]) == {1, 2}:
                break
        return statuses

    @defer.inlineCallbacks
    def test_cookieAcrossWorkersLogoffAndRestart(self):
        cookie = yield threads.deferToThread(self.browser.logOn)
        statuses = yield self.visitsUntilBothServe(cookie)
        self.assertEqual(set(statuses), {200}, self.node.logText()[-3000:])
        self.assertGreaterEqual(len(statuses), ROUND)
        self.assertEqual(servedBy(self.node.logText(), 200), {1, 2})

        # A second session, logged off: refused on every worker.
        revoked = yield threads.deferToThread(self.browser.logOn)
        self.assertEqual((yield threads.deferToThread(self.browser.logOff, revoked)), 200)
        yield threads.deferToThread(self.browser.refusedOnce, revoked)
        since = len(self.node.logText())
        statuses = yield self.visitsUntilBothServe(revoked, since)
        self.assertEqual(set(statuses), {302})
        self.assertEqual(servedBy(self.node.logText()[since:], 302), {1, 2})

        # A worker killed and restarted by the parent: the same keys, the logoff it missed.
        killed = self.workers[0]
        os.kill(killed, signal.SIGKILL)
        restarted = yield self.waitWorkers(2, gone=killed)
        self.assertFalse(pidAlive(killed))
        self.assertEqual(len(set(restarted) - set(self.workers)), 1)
        since = len(self.node.logText())
        statuses = yield self.visitsUntilBothServe(cookie, since)
        self.assertEqual(set(statuses), {200})
        self.assertEqual(servedBy(self.node.logText()[since:], 200), {1, 2})
        since = len(self.node.logText())
        statuses = yield self.visitsUntilBothServe(revoked, since)
        self.assertEqual(set(statuses), {302})
        self.assertEqual(servedBy(self.node.logText()[since:], 302), {1, 2})

        text = self.node.logText()
        for value in (cookie, revoked):
            self.assertNotIn(value, text)
            self.assertNotIn(value[:24], text)
        self.assertNotIn("Traceback", text)


    def resumed(self, version, count=ROUND):
        """
        One full handshake, then C{count} new connections offering its session, each with a
        request.  Runs in a thread.

        @return: whether each of the C{count} resumed.
        """
        context = ssl.create_default_context(cafile=self.node.caPath)
        context.minimum_version = context.maximum_version = version

        def connect(session=None):
            raw = socket.create_connection(("127.0.0.1", self.node.port), timeout=15)
            with context.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as tls:
                tls.sendall(b"GET /owa/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                while tls.recv(4096):
                    pass
                return tls.session, tls.session_reused

        session, _ = connect()
        return [connect(session)[1] for _ in range(count)]

    @defer.inlineCallbacks
    def test_ticketsResumeOnEveryWorker(self):
        """
        Without C{[tls] ticket_keys}, a TLS session made on one worker resumes on the other:
        their ticket key is derived from the node secret too.
        """
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            since = len(self.node.logText())
            resumed = yield threads.deferToThread(self.resumed, version)
            self.assertEqual(set(resumed), {True}, version)
            self.assertEqual(servedBy(self.node.logText()[since:]), {1, 2})
        self.assertEqual(self.node.logText().count("one key derived from the node secret"), 2)

def spellings(secret):
    """
    @return: the ways C{secret} could be written in a log or a command line.
    """
    return {
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret)[2:-1],
    }


class SecretNeverLoggedTests(TestCase):
    """
    The parent in this process (a L{WorkerPool}, as C{twistd cas --workers 2} builds it, its
    workers real processes sending it every log event): the test knows the node secret, and
    finds it nowhere in the log, the workers' command lines or environments.
    """

    timeout = 120

    @defer.inlineCallbacks
    def test_secretAndKeysNeverLogged(self):
        tmp = os.path.abspath(self.mktemp())
        backend = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
        self.addCleanup(backend.stopListening)
        node = CASWeb(
            os.path.join(tmp, "node"),
            {"alice": ("alice-pw", "address=alice@example.com")},
            {"web": backend.getHost().port},
            VDIRS,
        )
        configPath = os.path.join(tmp, "casd.toml")
        with open(configPath, "w") as f:
            f.write(node.config)
        options = Options()
        options.parseOptions(["--config", configPath])
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        pool = WorkerPool(reactor, configPath, options.config, 2, executable=sys.executable)
        pool.startService()
        stopped = []
        self.addCleanup(lambda: None if stopped else pool.stopService())

        # The parent bound the port: the first connections wait in its backlog for a worker.
        browser = Browser(node.url, node.caPath)
        cookie = yield threads.deferToThread(browser.logOn)
        statuses = yield threads.deferToThread(browser.visits, cookie, 6)
        self.assertEqual(set(statuses), {200})
        self.assertEqual((yield threads.deferToThread(browser.logOff, cookie)), 200)
        yield threads.deferToThread(browser.refusedOnce, cookie)

        secret = pool.nodeSecret._secret
        keys = [pool.nodeSecret.derive(FORMS_COOKIE_KEY), pool.nodeSecret.derive(ROUTE_COOKIE_KEY)]
        for pid in [w.transport.pid for w in pool.workers.values()]:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode("latin-1")
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().decode("latin-1")
            self.assertIn("--node-secret-fd=", cmdline)
            for value in (secret, *keys):
                for spelling in spellings(value):
                    self.assertNotIn(spelling, cmdline)
                    self.assertNotIn(spelling, environ)

        yield pool.stopService()
        stopped.append(True)

        text = "\n".join(formatEvent(e) + " " + repr(e) for e in events)
        self.assertIn("forms logon of 'alice'", text)
        self.assertIn("forms logoff of 'alice'", text)
        self.assertNotIn("Traceback", text)
        for value in (secret, *keys):
            for spelling in spellings(value):
                self.assertNotIn(spelling, text)
        self.assertNotIn(cookie, text)
