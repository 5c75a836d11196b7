"""
The HELLO plugin, tested with casd's public fakes: no network, no directory, no real server.
"""

from zope.interface.verify import verifyObject

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.interfaces import ICASProtocol
from casd.testing import ScriptedBackend, connectFrontend, makeContext
from casd_hello.protocol import hello

CONFIG = """
[routing]
default_backend = "toy"

[backends.toy]
host = "192.0.2.1"

[hello]
enabled = true
greeting = "hi there"
[[hello.listen]]
endpoint = "tcp:7110"
trusted = true
"""


class HelloTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(
            self.reactor, users={"alice": "secret"}, config=CONFIG, protocols=[hello]
        )
        self.server, self.transport = connectFrontend(hello, self.context)

    def send(self, data):
        self.transport.clear()
        self.server.dataReceived(data)
        return self.transport.value()

    def test_descriptor(self):
        self.assertTrue(verifyObject(ICASProtocol, hello))

    def test_greeting(self):
        self.assertEqual(self.transport.value(), b"+HELLO hi there\r\n")

    def test_loginAndRelay(self):
        self.assertEqual(self.send(b"LOGIN alice secret\r\nECHO hi\r\n"), b"")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("192.0.2.1", 7110))
        backend = ScriptedBackend(
            self.reactor,
            [
                (b"", b"+HELLO toy server\r\n"),
                (b"LOGIN alice secret\r\n", b"+OK welcome alice\r\n"),
            ],
        ).run()
        self.assertEqual(self.transport.value(), b"+OK logged in\r\n")
        # The pipelined line went on to the server, and the relay runs both ways.
        self.assertEqual(backend.received(), b"ECHO hi\r\n")
        backend.send(b"alice said: ECHO hi\r\n")
        self.assertEqual(self.transport.value(), b"+OK logged in\r\nalice said: ECHO hi\r\n")

    def test_wrongPassword(self):
        self.send(b"LOGIN alice nope\r\n")
        self.reactor.advance(2)  # the failure delay (trusted clients get none)
        self.assertEqual(self.transport.value(), b"-ERR bad credentials\r\n")
        self.assertEqual(self.reactor.tcpClients, [])

    def test_serverRefuses(self):
        self.send(b"LOGIN alice secret\r\n")
        ScriptedBackend(
            self.reactor, [(b"", b"+HELLO toy\r\n"), (b"LOGIN alice secret\r\n", b"-ERR no\r\n")]
        ).run()
        self.assertEqual(self.transport.value(), b"-ERR bad credentials\r\n")

    def test_serverDown(self):
        self.send(b"LOGIN alice secret\r\n")
        ScriptedBackend(self.reactor, [(b"", b"* OK not hello\r\n")]).run()
        self.assertEqual(self.transport.value(), b"-ERR server unavailable, try again later\r\n")

    def test_unknownCommand(self):
        self.assertEqual(self.send(b"NOPE\r\n"), b"-ERR Unknown command.\r\n")

    def test_limitsComeFromTheCore(self):
        self.assertEqual(self.send(b"x" * 9000), b"-ERR Line too long.\r\n")
        self.assertTrue(self.transport.disconnecting)
