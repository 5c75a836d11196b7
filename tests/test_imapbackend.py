"""
The IMAP backend login: how the backend's greeting decides between the login pipelined behind
C{ID} (SASL-IR) and the one that waits for each reply.
"""

from base64 import b64encode

from twisted.trial.unittest import SynchronousTestCase

from casd.testing import acceptBackend
from tests.test_imap import IMAPTestMixin


class GreetingTests(IMAPTestMixin, SynchronousTestCase):
    def greetedBackend(self, greeting: bytes):
        """
        Start a login whose backend greets with C{greeting}.

        @return: the backend dialogue and its transport, holding what casd sent after the
            greeting.
        """
        self.connect(1)
        self.send(b"a LOGIN alice secret\r\n")
        backend, bt = acceptBackend(self.reactor)
        backend.dataReceived(greeting + b"\r\n")
        self.assertTrue(bt.value().startswith(b"I ID ("), greeting)
        return backend, bt

    def test_greetingWithoutSASLIR(self):
        """
        A backend whose greeting lists capabilities without SASL-IR gets ID, then AUTHENTICATE
        PLAIN, then the initial response after the continuation, each after the previous reply.
        """
        initial = b64encode(b"\x00alice@example.com\x00secret")
        for greeting in [
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] ready",
            b"* OK [CAPABILITY IMAP4rev1 SASL-IRX] ready",
        ]:
            backend, bt = self.greetedBackend(greeting)
            self.assertEqual(bt.value().count(b"\r\n"), 1, greeting)
            bt.clear()
            backend.dataReceived(b"* ID NIL\r\nI OK\r\n")
            self.assertEqual(bt.value(), b"A AUTHENTICATE PLAIN\r\n")
            bt.clear()
            backend.dataReceived(b"+ \r\n")
            self.assertEqual(bt.value(), initial + b"\r\n")
            backend.dataReceived(b"A OK [CAPABILITY IMAP4rev1] done\r\n")
            self.assertEqual(self.transport.value(), b"a OK [CAPABILITY IMAP4rev1] Logged in\r\n")

    def test_greetingWithSASLIROrNoCapabilities(self):
        """
        ID and AUTHENTICATE PLAIN with its initial response go out together when the greeting
        lists SASL-IR (in any case, anywhere in the list) or lists no capabilities at all.
        """
        for greeting in [
            b"* OK [CAPABILITY SASL-IR IMAP4rev1] ready",
            b"* OK [CAPABILITY IMAP4rev1 sasl-ir] ready",
            b"* ok [capability IMAP4rev1 LITERAL+ SASL-IR ID] ready",
            b"* OK ready",
            b"* OK [CAPABILITY] ready",
        ]:
            backend, bt = self.greetedBackend(greeting)
            lines = bt.value().split(b"\r\n")
            initial = b64encode(b"\x00alice@example.com\x00secret")
            self.assertEqual(lines[1:], [b"A AUTHENTICATE PLAIN " + initial, b""])
