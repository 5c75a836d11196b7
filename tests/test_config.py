"""
Configuration parsing: every error is one line naming the file, the key and what was expected.
"""

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from casd.config import ConfigError, loadConfig, parseConfig
from casd.service.discovery import discoverProtocols
from tests.support.certs import CertificateAuthority

PROTOCOLS = discoverProtocols().values()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD = """
[server]
hostname = "cas1.example.com"
trusted_networks = ["10.0.0.0/8", "2001:db8::/32"]

[routing]
default_backend = "mbx1"

[backends.mbx1]
host = "mbx1.example.com"
[backends.mbx1.imap]
port = 10143
tls = "implicit"

[imap]
max_literal_size = 4096
[[imap.listen]]
endpoint = "tcp:1143"
[[imap.listen]]
endpoint = "haproxy:tcp:2143"
trusted = true
name = "behind-lb"
proxy_trusted = ["10.0.0.0/24", "2001:db8::/64"]
proxy_untrusted = "ignore"
"""


class ParseTests(SynchronousTestCase):
    def parse(self, text):
        return parseConfig(text, "casd.toml", PROTOCOLS)

    def assertError(self, text, key, fragment):
        e = self.assertRaises(ConfigError, self.parse, text)
        self.assertEqual(e.key, key)
        self.assertIn(fragment, e.message)
        self.assertTrue(str(e).startswith(f"casd.toml: {key}: "))
        self.assertNotIn("\n", str(e))
        return e

    def test_proxyListenerNeedsTrustedSenders(self):
        """
        A haproxy: listener without proxy_trusted is refused with one line: no default believes
        every PROXY header.
        """
        self.assertError(
            '[[imap.listen]]\nendpoint = "haproxy:tcp:2143"\n',
            "imap.listen[0].proxy_trusted",
            "haproxy: listener needs the networks of its load balancers",
        )

    def test_proxyTrustedOnlyOnProxyListener(self):
        self.assertError(
            '[[imap.listen]]\nendpoint = "tcp:2143"\nproxy_trusted = ["10.0.0.1"]\n',
            "imap.listen[0].proxy_trusted",
            "only on a haproxy: endpoint",
        )

    def test_proxyUntrustedChoices(self):
        self.assertError(
            '[[imap.listen]]\nendpoint = "haproxy:tcp:2143"\nproxy_trusted = ["10.0.0.1"]\n'
            'proxy_untrusted = "believe"\n',
            "imap.listen[0].proxy_untrusted",
            "close",
        )

    def test_good(self):
        c = self.parse(GOOD)
        self.assertEqual(c.hostname, "cas1.example.com")
        imap = c.protocols["imap"]
        self.assertEqual(imap.max_literal_size, 4096)
        self.assertEqual(imap.max_line_length, 8192)
        self.assertEqual([l.endpoint for l in imap.listeners], ["tcp:1143", "haproxy:tcp:2143"])
        self.assertEqual(imap.listeners[1].name, "behind-lb")
        self.assertTrue(imap.listeners[1].trusted)
        self.assertEqual(
            [str(n) for n in imap.listeners[1].proxyTrusted], ["10.0.0.0/24", "2001:db8::/64"]
        )
        self.assertEqual(imap.listeners[1].proxyUntrusted, "ignore")
        self.assertTrue(imap.listeners[1].proxyProtocol)
        self.assertFalse(imap.listeners[0].proxyProtocol)
        self.assertEqual(imap.listeners[0].tls, "starttls")
        b = c.backends["mbx1"].protocols["imap"]
        self.assertEqual((b.port, b.tls), (10143, "implicit"))
        self.assertEqual(c.backends["mbx1"].tlsName, "mbx1.example.com")

    def test_defaults(self):
        c = self.parse("")
        self.assertEqual(c.auth.failure_delay, 2.0)
        self.assertEqual([l.endpoint for l in c.protocols["imap"].listeners], ["tcp:143"])
        self.assertFalse(c.tls.enabled)

    def test_frozen(self):
        c = self.parse(GOOD)
        self.assertRaises(Exception, setattr, c, "path", "x")
        self.assertRaises(Exception, setattr, c.protocols["imap"].values, "max_line_length", 1)

    def test_syntaxError(self):
        self.assertError("[imap\n", "(syntax)", "expected valid TOML")

    def test_unknownSection(self):
        self.assertError("[imapp]\n", "imapp", "unknown section")

    def test_unknownKey(self):
        self.assertError("[imap]\nmax_line_lenght = 5\n", "imap.max_line_lenght", "unknown key")

    def test_wrongType(self):
        self.assertError('[imap]\nmax_line_length = "long"\n', "imap.max_line_length", "a number")
        self.assertError("[auth]\nfailure_delay = true\n", "auth.failure_delay", "a number")
        self.assertError("[imap]\nenabled = 1\n", "imap.enabled", "true or false")
        self.assertError("[imap]\nmax_line_length = 10\n", "imap.max_line_length", "at least 64")

    def test_badNetwork(self):
        self.assertError('[server]\ntrusted_networks = ["10.0.0.0/33"]\n', "server.trusted_networks", "networks")

    def test_badEndpoint(self):
        self.assertError(
            '[[imap.listen]]\nendpoint = "tpc:143"\n', "imap.listen[0].endpoint", "endpoint string"
        )
        self.assertError(
            '[[imap.listen]]\nendpoint = "tcp:notaport"\n', "imap.listen[0].endpoint", "endpoint string"
        )

    def test_badTLSMode(self):
        self.assertError(
            '[[imap.listen]]\nendpoint = "tcp:1"\ntls = "yes"\n', "imap.listen[0].tls", "one of"
        )

    def test_implicitWithoutCertificate(self):
        self.assertError(
            '[[imap.listen]]\nendpoint = "tcp:993"\ntls = "implicit"\n', "imap.listen", "certificate"
        )

    def test_missingCertificate(self):
        self.assertError(
            '[tls]\ncertificate = "nope.pem"\nkey = "nope.key"\n', "tls.certificate", "does not exist"
        )

    def test_unknownDefaultBackend(self):
        self.assertError('[routing]\ndefault_backend = "x"\n', "routing.default_backend", "[backends.NAME]")

    def test_backendWithoutHost(self):
        self.assertError("[backends.a]\n", "backends.a.host", "missing")

    def test_masterUserNeedsPasswordFile(self):
        self.assertError(
            '[backends.a]\nhost = "h"\n[backends.a.imap]\nmaster_user = "m"\n',
            "backends.a.imap.master_password_file",
            "required",
        )

    def test_relativePathsFromConfigDirectory(self):
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "users"), "w") as f:
            f.write("")
        c = parseConfig('[auth]\nusers_file = "users"\n', os.path.join(d, "casd.toml"), PROTOCOLS)
        self.assertEqual(c.auth.users_file, os.path.join(os.path.abspath(d), "users"))

    def test_sslEndpointIsImplicit(self):
        d = self.mktemp()
        os.makedirs(d)
        cert, key = CertificateAuthority.create(d).issue(["x"], "s")
        c = self.parse(f'[[imap.listen]]\nendpoint = "ssl:1993:privateKey={key}:certKey={cert}"\n')
        listener = c.protocols["imap"].listeners[0]
        self.assertEqual(listener.tls, "implicit")
        self.assertFalse(listener.wrapTLS)

    def test_missingFile(self):
        e = self.assertRaises(ConfigError, loadConfig, "does-not-exist.toml", PROTOCOLS)
        self.assertEqual(e.key, "(file)")


class TwistdTests(SynchronousTestCase):
    """
    C{twistd cas} with a bad configuration stops with one line and a non-zero exit.
    """

    def twistd(self, *args):
        env = dict(os.environ, PYTHONPATH=ROOT)
        d = self.mktemp()
        os.makedirs(d)
        return subprocess.run(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "cas", *args],
            capture_output=True,
            text=True,
            cwd=d,
            env=env,
            timeout=60,
        )

    def test_badConfig(self):
        d = os.path.abspath(self.mktemp())
        os.makedirs(d)
        path = os.path.join(d, "casd.toml")
        with open(path, "w") as f:
            f.write("[imap]\nmax_line_length = 'x'\n")
        r = self.twistd("--config", path)
        self.assertNotEqual(r.returncode, 0)
        lines = [l for l in r.stderr.splitlines() + r.stdout.splitlines() if l.strip()]
        self.assertEqual(
            lines, [f"casd: configuration error: {path}: imap.max_line_length: expected a number, got 'x'"]
        )

    def test_pluginListed(self):
        r = self.twistd("--help")
        self.assertEqual(r.returncode, 0)
        self.assertIn("--demo", r.stdout)
        self.assertIn("--config", r.stdout)


class ReferenceTests(SynchronousTestCase):
    def test_configurationReferenceCurrent(self):
        """
        docs/configuration.md is what `casd config-reference` prints: regenerate it with
        `python -m casd config-reference > docs/configuration.md` after changing a setting.
        """
        from casd.config.reference import configurationReference

        with open(os.path.join(ROOT, "docs", "configuration.md")) as f:
            self.assertEqual(f.read(), configurationReference())
