"""
Two casd processes (C{twistd -n cas}) sharing the forms-cookie key file: a cookie issued by one is
accepted by the other, so an array needs no affinity; a node with another key refuses it; the
cookie never appears in either node's log.
"""

import base64
import http.cookiejar
import os
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request

from twisted.internet import defer, threads
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.integration.httpweb import CASWeb
from tests.support.certs import CertificateAuthority

VDIRS = """
[[http.vdir]]
path = "/owa"
backend = "web"
auth = ["forms"]
identity = "header"
identity_header = "X-Remote-User"
"""


class Echo(Resource):
    """
    The web backend: says who casd says the user is, and which cookies reached it.
    """

    isLeaf = True

    def render_GET(self, request):
        user = request.getHeader(b"x-remote-user") or b"-"
        cookies = request.getHeader(b"cookie") or b"-"
        request.setHeader(b"content-type", b"text/plain")
        return b"user=" + user + b"\ncookies=" + cookies + b"\n"


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kw):
        return None


class CookieArrayTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        from twisted.internet import reactor

        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.backend = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
        self.addCleanup(self.backend.stopListening)
        self.ca = CertificateAuthority.create(os.path.join(self.tmp, "ca"))
        shared = os.path.join(self.tmp, "array.keys")
        with open(shared, "w") as f:
            f.write("# the array's forms-cookie keys\n" + base64.b64encode(os.urandom(32)).decode() + "\n")
        other = os.path.join(self.tmp, "other.keys")
        with open(other, "w") as f:
            f.write(base64.b64encode(os.urandom(32)).decode() + "\n")
        self.nodes = {}
        for name, keys in (("a", shared), ("b", shared), ("c", other)):
            node = CASWeb(
                os.path.join(self.tmp, name),
                {"alice": ("alice-pw", "address=alice@example.com")},
                {"web": self.backend.getHost().port},
                VDIRS,
                http=f'forms_key_files = ["{keys}"]',
                ca=self.ca,
            )
            self.nodes[name] = node
            self.addCleanup(node.stopProcess)
        yield defer.gatherResults([n.startProcess() for n in self.nodes.values()])

    def opener(self, jar):
        context = ssl.create_default_context(cafile=self.ca.caPath)
        return urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context),
            urllib.request.HTTPCookieProcessor(jar),
            NoRedirect(),
        )

    def fetch(self, opener, url, data=None, headers=None):
        request = urllib.request.Request(url, data=data, headers=headers or {})
        try:
            with opener.open(request, timeout=15) as response:
                return response.status, response.headers, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read().decode()

    def logOnAndVisit(self):
        """
        Log on at node a, then visit node b and node c with the same browser cookie jar.
        Runs in a thread.
        """
        jar = http.cookiejar.CookieJar()
        opener = self.opener(jar)
        a, b, c = (self.nodes[n].url for n in "abc")
        status, _, page = self.fetch(opener, a + "/owa/_casd/logon?url=%2Fowa%2Fhello")
        csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
        form = urllib.parse.urlencode(
            {"username": "alice", "password": "alice-pw", "security": "private", "url": "/owa/hello", "csrf": csrf}
        ).encode()
        posted = self.fetch(
            opener, a + "/owa/_casd/logon", form, {"Content-Type": "application/x-www-form-urlencoded", "Origin": a}
        )
        session = [ck.value for ck in jar if ck.name == "__Host-casd"]
        # The jar keeps cookies per host; every node is 127.0.0.1 on another port, and a browser
        # in front of a load balancer would send the same cookie to whichever node answers.
        header = {"Cookie": "__Host-casd=" + session[0], "Accept": "text/html"} if session else {}
        plain = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=self.ca.caPath)), NoRedirect()
        )
        atB = self.fetch(plain, b + "/owa/hello", headers=header)
        atC = self.fetch(plain, c + "/owa/hello", headers=header)
        atA = self.fetch(plain, a + "/owa/hello", headers=header)
        return posted, session, atA, atB, atC

    @defer.inlineCallbacks
    def test_sharedKey(self):
        posted, session, atA, atB, atC = yield threads.deferToThread(self.logOnAndVisit)
        self.assertEqual(posted[0], 302)
        self.assertEqual(posted[1]["Location"], "/owa/hello")
        self.assertEqual(len(session), 1)
        for status, _, body in (atA, atB):
            self.assertEqual(status, 200)
            self.assertIn("user=alice\n", body)
            self.assertNotIn("__Host-casd", body)
        self.assertEqual(atC[0], 302)
        self.assertTrue(atC[1]["Location"].startswith("/owa/_casd/logon?url="))
        for node in self.nodes.values():
            node.stopProcess()
            text = node.logText()
            self.assertNotIn(session[0], text)
            self.assertNotIn(session[0][:24], text)
            self.assertNotIn("alice-pw", text)
        self.assertIn("forms logon of 'alice'", self.nodes["a"].logText())
        self.assertIn("user=alice", self.nodes["b"].logText())
