# -*- test-case-name: tests.test_cycles -*-
"""
A finished proxied session leaves nothing for the garbage collector: its objects are freed by
reference counting as soon as both connections are gone (L{casd.session.relay.Relay._release},
L{casd.pool.tcpclient.LeanConnector.connectionLost}, the backend dialogue's outcome), which is
what lets casd raise the collector's threshold (L{casd.service.gctune}).

Real loopback sockets: casd's IMAP and POP3 frontends in this process, the demo mailbox backend
behind them, Python's C{imaplib} and C{poplib} as clients.  The collector keeps whatever it finds
unreachable during the session (C{gc.DEBUG_SAVEALL}); no object of casd's may be among it.
"""

from __future__ import annotations

import gc
import imaplib
import poplib

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer, reactor, task
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from casd.demo.backend import DemoMailStore, demoIMAPFactory, demoPOP3Factory
from casd.testing import makeContext
from tests.test_demo import _Tracked

TIMEOUT = 20

CONFIG = """
[server]
trusted_networks = ["127.0.0.0/8"]

[routing]
default_backend = "demo"

[backends.demo]
host = "127.0.0.1"

[backends.demo.imap]
port = {imap}
tls = "none"

[backends.demo.pop3]
port = {pop3}
tls = "none"

[imap]
[[imap.listen]]
endpoint = "tcp:0:interface=127.0.0.1"
name = "imap-cycles"

[pop3]
enabled = true
[[pop3.listen]]
endpoint = "tcp:0:interface=127.0.0.1"
name = "pop3-cycles"
"""


def _ours(objects) -> list[str]:
    """
    The type names of casd's (and its protocols') objects among C{objects}.
    """
    names = []
    for o in objects:
        module = getattr(type(o), "__module__", "") or ""
        if module.startswith(("casd.", "protocols.")):
            names.append(f"{module}.{type(o).__qualname__}")
    return sorted(names)


class SessionCycleTests(unittest.TestCase):
    """
    Proxied sessions through casd's frontends to the demo backend, then the collector's view.
    """

    @defer.inlineCallbacks
    def setUp(self):
        store = DemoMailStore()
        checker = InMemoryUsernamePasswordDatabaseDontUse(alice=b"secret")
        self.backends = {
            "imap": _Tracked(demoIMAPFactory(checker, store, reactor)),
            "pop3": _Tracked(demoPOP3Factory(checker, store, reactor)),
        }
        ports = {}
        for name, factory in self.backends.items():
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(self._stop, port, factory)
            ports[name] = port.getHost().port
        context = makeContext(reactor, users={"alice": "secret"}, config=CONFIG.format(**ports))
        self.fronts = {}
        self.frontPorts = {}
        for name in ("imap", "pop3"):
            section = context.config.protocols[name]
            factory = context.protocols[name].buildFactory(context, section, section.listeners[0])
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.fronts[name] = factory
            self.frontPorts[name] = port.getHost().port
        yield None

    @defer.inlineCallbacks
    def _stop(self, port, factory):
        yield port.stopListening()
        yield factory.closeAll()

    @defer.inlineCallbacks
    def _closed(self, name):
        """
        Wait until casd's frontend and the backend have both seen the session's end.
        """
        for _ in range(500):
            if not self.fronts[name].sessions and not self.backends[name].protocols:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail(f"the {name} session did not end")

    @defer.inlineCallbacks
    def _collected(self, name, client, sessions=3):
        """
        Run C{sessions} sessions of C{client} (in a thread), one after another, with the
        collector keeping what it finds.

        @return: the type names of casd's objects the collector found unreachable.
        """
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for _ in range(sessions):
                result = yield deferToThread(client)
                yield self._closed(name)
            gc.collect()
            found = _ours(gc.garbage)
        finally:
            gc.set_debug(0)
            del gc.garbage[:]
        defer.returnValue((result, found))

    @defer.inlineCallbacks
    def test_imapSessionLeavesNoCycle(self):
        """
        An IMAP login, a command and the logout through casd: none of casd's objects is left for
        the collector, and the session did go through to the backend.
        """
        port = self.frontPorts["imap"]

        def client():
            imap = imaplib.IMAP4("127.0.0.1", port, timeout=TIMEOUT)
            try:
                imap.login("alice", "secret")
                return imap.select("INBOX")
            finally:
                imap.logout()

        selected, found = yield self._collected("imap", client)
        self.assertEqual(selected[0], "OK")
        self.assertEqual(found, [])

    @defer.inlineCallbacks
    def test_pop3SessionLeavesNoCycle(self):
        """
        A POP3 login, C{STAT} and C{QUIT} through casd: none of casd's objects is left for the
        collector.
        """
        port = self.frontPorts["pop3"]

        def client():
            pop = poplib.POP3("127.0.0.1", port, timeout=TIMEOUT)
            try:
                pop.user("alice")
                pop.pass_("secret")
                return pop.stat()
            finally:
                pop.quit()

        stat, found = yield self._collected("pop3", client)
        self.assertGreaterEqual(stat[0], 1)
        self.assertEqual(found, [])
