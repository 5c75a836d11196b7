"""
The test support's in-process casd node (L{tests.support.casdnode}): a node that cannot start
(a port taken meanwhile) leaves nothing running behind it.
"""

from __future__ import annotations

import os
import socket
import threading

from twisted.internet.error import CannotListenError
from twisted.trial import unittest

from tests.support import procs
from tests.support.casdnode import startDemoNode


class FailedStartTests(unittest.TestCase):
    def test_portTakenLeavesNothingRunning(self):
        """
        When a listener cannot bind, the node stops what it started: no thread of its auth pool
        (not daemon threads: they would keep the test process from exiting) and no listener or
        timer (trial would report the reactor unclean).
        """
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        real = procs.freePort
        first = iter([taken.getsockname()[1]])
        self.patch(procs, "freePort", lambda: next(first, None) or real())
        before = set(threading.enumerate())
        self.assertRaises(CannotListenError, startDemoNode, self, os.path.abspath(self.mktemp()))
        left = [t.name for t in set(threading.enumerate()) - before if t.is_alive() and not t.daemon]
        self.assertEqual(left, [])
