"""
The plugin API from the outside: the tutorial's example plugin (docs/examples/casd-hello), an
external package with its own C{twisted/plugins/} module, put on the path and exercised through
discovery, configuration, the public fakes of L{casd.testing} and a real socket; and those fakes
themselves.
"""

import os
import re
import socket
import subprocess
import sys

from zope.interface.verify import verifyObject

import twisted.plugins
from twisted.internet import defer, reactor, task, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.plugin import getPlugins
from twisted.trial.unittest import SynchronousTestCase, TestCase

from casd.config import ConfigError, parseConfig
from casd.interfaces import ICASProtocol
from casd.service.discovery import LazyProtocol, discoverProtocols
from casd.testing import (
    CLOSE,
    ScriptedBackend,
    ScriptMismatch,
    acceptBackend,
    connectFrontend,
    makeContext,
)
from tests.support.casdnode import CASNode
from tests.support.procs import freePort

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "docs", "examples", "casd-hello")
TUTORIAL = os.path.join(ROOT, "docs", "writing-a-protocol-plugin.md")


class ExampleOnPath:
    """
    Put the example package on C{sys.path}, and its C{twisted/plugins/} on the plugin path, as
    installing it would; undo both afterwards so other tests see casd's own protocols only.
    """

    def setUp(self):
        super().setUp()
        sys.path.insert(0, EXAMPLE)
        self.addCleanup(sys.path.remove, EXAMPLE)
        plugins = os.path.join(EXAMPLE, "twisted", "plugins")
        # twisted.plugins computed its __path__ when first imported; a later sys.path entry is
        # not searched unless added, exactly as pluginPackagePaths() would have.
        twisted.plugins.__path__.append(plugins)
        self.addCleanup(twisted.plugins.__path__.remove, plugins)

    def hello(self):
        from casd_hello.protocol import hello

        return hello


def exampleEnvironment():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, EXAMPLE])
    return env


class DiscoveryTests(ExampleOnPath, SynchronousTestCase):
    def test_getPlugins(self):
        """
        The example's C{twisted/plugins/} module offers a L{LazyProtocol} named C{hello}.
        """
        found = [p for p in getPlugins(ICASProtocol, twisted.plugins) if p.name == "hello"]
        self.assertEqual(len(found), 1)
        self.assertIsInstance(found[0], LazyProtocol)
        self.assertEqual(found[0].fqn, "casd_hello.protocol.hello")

    def test_discoverProtocols(self):
        protocols = discoverProtocols()
        self.assertIs(protocols["hello"], self.hello())
        self.assertTrue(verifyObject(ICASProtocol, protocols["hello"]))
        # Beside casd's own, registered the same way.
        self.assertLessEqual({"imap", "pop3", "managesieve", "hello"}, set(protocols))


class NotOnPathTests(SynchronousTestCase):
    def test_absentWithoutThePackage(self):
        self.assertNotIn("hello", discoverProtocols())


class ConfigTests(ExampleOnPath, SynchronousTestCase):
    def parse(self, text):
        return parseConfig(text, "casd.toml", discoverProtocols().values())

    def test_section(self):
        config = self.parse(
            '[hello]\nenabled = true\ngreeting = "hi"\nmax_bad_commands = 2\n'
            '[[hello.listen]]\nendpoint = "tcp:7777"\n'
            '[backends.toy]\nhost = "toy.example"\n[backends.toy.hello]\nport = 7000\n'
        )
        section = config.protocols["hello"]
        self.assertTrue(section.enabled)
        self.assertEqual(section.greeting, "hi")
        self.assertEqual(section.max_bad_commands, 2)
        self.assertEqual([l.endpoint for l in section.listeners], ["tcp:7777"])
        self.assertEqual(config.backends["toy"].protocols["hello"].port, 7000)

    def test_offUnlessEnabled(self):
        section = self.parse("").protocols["hello"]
        self.assertFalse(section.enabled)
        self.assertEqual(section.listeners, ())

    def test_unknownKey(self):
        e = self.assertRaises(ConfigError, self.parse, '[hello]\ngreting = "typo"\n')
        self.assertEqual(e.key, "hello.greting")

    def test_checkConfigCommand(self):
        """
        An installed plugin is found by path alone: C{casd check-config} accepts a C{[hello]}
        section with the package on the path, and names it unknown without.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        path = os.path.join(directory, "casd.toml")
        with open(path, "w") as f:
            f.write('[hello]\nenabled = true\n[[hello.listen]]\nendpoint = "tcp:7777"\n')
        command = [sys.executable, "-m", "casd", "check-config", path]
        ok = subprocess.run(command, env=exampleEnvironment(), capture_output=True, text=True, timeout=60)
        self.assertEqual(ok.returncode, 0, ok.stderr)
        self.assertEqual(ok.stdout.strip(), f"{path}: OK")
        env = dict(os.environ, PYTHONPATH=ROOT)
        bad = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        self.assertEqual(bad.returncode, 1)
        self.assertIn("hello: unknown section", bad.stderr)


class TranscriptTests(ExampleOnPath, SynchronousTestCase):
    """
    The example through casd.testing, as its own tests do; and those tests, run as its author
    would run them.
    """

    def test_transcript(self):
        hello = self.hello()
        reactor = MemoryReactorClock()
        context = makeContext(
            reactor,
            users={"alice": "secret"},
            config='[routing]\ndefault_backend = "toy"\n[backends.toy]\nhost = "192.0.2.1"\n'
            "[hello]\nenabled = true\n[[hello.listen]]\nendpoint = \"tcp:7110\"\ntrusted = true\n",
            protocols=[hello],
        )
        server, transport = connectFrontend(hello, context)
        self.assertEqual(transport.value(), b"+HELLO casd ready\r\n")
        transport.clear()
        server.dataReceived(b"NOPE\r\nLOGIN alice secret\r\n")
        backend = ScriptedBackend(
            reactor, [(b"", b"+HELLO x\r\n"), (b"LOGIN alice secret\r\n", b"+OK\r\n")]
        ).run()
        self.assertEqual(transport.value(), b"-ERR Unknown command.\r\n+OK logged in\r\n")
        server.dataReceived(b"anything\r\n")
        self.assertEqual(backend.received(), b"anything\r\n")

    def test_examplesOwnTests(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        r = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "casd_hello"],
            cwd=directory,
            env=exampleEnvironment(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)
        self.assertRegex(r.stdout, r"PASSED \(successes=\d+\)")


class RealSocketTests(ExampleOnPath, TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_session(self):
        """
        casd with the plugin enabled from its configuration, in front of the toy HELLO server:
        a client logs in and talks to the server through the relay.
        """
        from casd_hello.toyserver import ToyHelloServer

        toy = yield serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(
            Factory.forProtocol(ToyHelloServer)
        )
        self.addCleanup(toy.stopListening)
        port = freePort()
        directory = os.path.abspath(self.mktemp())
        users = os.path.join(directory, "users")
        os.makedirs(directory)
        with open(users, "w") as f:
            f.write("alice:{PLAIN}secret\n")
        node = CASNode(
            os.path.join(directory, "cas"),
            f"""
[server]
trusted_networks = ["127.0.0.0/8"]
[auth]
users_file = "{users}"
[routing]
default_backend = "toy"
[backends.toy]
host = "127.0.0.1"
[backends.toy.hello]
port = {toy.getHost().port}
[imap]
enabled = false
[hello]
enabled = true
greeting = "casd says hello"
[[hello.listen]]
endpoint = "tcp:{port}:interface=127.0.0.1"
""",
        ).start(reactor)
        self.addCleanup(node.stop)
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def session():
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            f = s.makefile("rb")
            lines = [f.readline()]
            s.sendall(b"LOGIN alice secret\r\nhow are you\r\nQUIT\r\n")
            while True:
                line = f.readline()
                if not line:
                    break
                lines.append(line)
            s.close()
            return lines

        lines = yield threads.deferToThread(session)
        self.assertEqual(
            lines,
            [
                b"+HELLO casd says hello\r\n",
                b"+OK logged in\r\n",
                b"alice said: how are you\r\n",
                b"+BYE\r\n",
            ],
        )
        sessions = []
        for _ in range(100):
            sessions = [e for e in events if e.get("log_namespace") == "casd.session"]
            if sessions:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual([(e["protocol"], e["user"]) for e in sessions], [("hello", "alice")])


class TutorialTests(SynchronousTestCase):
    """
    The tutorial shows the example's code: every block marked C{file=PATH} is a piece of that
    file, and together, in order, they are the whole file.
    """

    def test_codeBlocksAreTheExample(self):
        with open(TUTORIAL) as f:
            text = f.read()
        pieces = {}
        for m in re.finditer(r"```\w* file=(\S+)\n(.*?)```", text, re.S):
            pieces.setdefault(m.group(1), []).append(m.group(2))
        self.assertIn("casd_hello/protocol.py", pieces)
        self.assertIn("twisted/plugins/casd_hello_plugin.py", pieces)
        self.assertIn("casd_hello/test/test_protocol.py", pieces)
        for path, parts in pieces.items():
            with open(os.path.join(EXAMPLE, path)) as f:
                self.assertEqual("".join(parts), f.read(), path)


class ScriptedBackendTests(SynchronousTestCase):
    """
    The stub backend of L{casd.testing}, on casd's own POP3.
    """

    CONFIG = (
        '[routing]\ndefault_backend = "mbx"\n[backend]\nconnect_retry_time = 0.0\n'
        '[backends.mbx]\nhost = "192.0.2.10"\n'
        '[backends.mbx.pop3]\ntls = "none"\n[pop3]\nenabled = true\n'
        '[[pop3.listen]]\nendpoint = "tcp:1110"\ntrusted = true\n'
    )

    def setUp(self):
        from protocols.pop3 import pop3

        self.reactor = MemoryReactorClock()
        context = makeContext(self.reactor, users={"alice": "secret"}, config=self.CONFIG)
        self.server, self.transport = connectFrontend(pop3, context)
        self.server.dataReceived(b"USER alice\r\nPASS secret\r\n")

    def test_mismatch(self):
        backend = ScriptedBackend(self.reactor, [(b"", b"+OK hi\r\n"), (b"USER bob\r\n", b"+OK\r\n")])
        e = self.assertRaises(ScriptMismatch, backend.run)
        self.assertIn("step 2", str(e))
        self.assertIn("USER alice", str(e))
        self.assertEqual(backend.steps, 1)

    def test_patternMustMatchWhole(self):
        backend = ScriptedBackend(self.reactor, [(b"", b"+OK hi\r\n"), (re.compile(b"USER"), b"")])
        self.assertRaises(ScriptMismatch, backend.run)

    def test_pattern(self):
        backend = ScriptedBackend(self.reactor, [(b"", b"+OK hi\r\n"), (re.compile(b"USER \\w+\r\n"), b"")])
        backend.run()
        self.assertEqual(backend.steps, 2)

    def test_close(self):
        ScriptedBackend(self.reactor, [(b"", CLOSE)]).run()
        self.assertIn(b"-ERR [SYS/TEMP]", self.transport.value())

    def test_acceptBackendIsTheDialogue(self):
        from protocols.pop3 import POP3Backend

        dialogue, transport = acceptBackend(self.reactor)
        self.assertIsInstance(dialogue, POP3Backend)
