"""
The pins on the pieces of Twisted that casd repeats (casd.pinned).
"""

import hashlib
import inspect

from twisted.trial.unittest import SynchronousTestCase

from casd.pinned import sourceMatches, sourceSha256


def one():
    return 1


def two():
    return 2


class PinnedTests(SynchronousTestCase):
    def test_hashOfTheSourcesInOrder(self):
        expected = hashlib.sha256(
            (inspect.getsource(one) + inspect.getsource(two)).encode("utf-8")
        ).hexdigest()
        self.assertEqual(sourceSha256(lambda: (one, two)), expected)
        self.assertTrue(sourceMatches(expected, lambda: (one, two)))
        self.assertFalse(sourceMatches(expected, lambda: (two, one)))

    def test_missingIsNoMatch(self):
        """
        A piece missing (another Twisted) or without source is no match, not an error.
        """

        class Bare:
            pass

        self.assertIsNone(sourceSha256(lambda: (one, Bare.missing)))
        self.assertIsNone(sourceSha256(lambda: (len,)))
        self.assertFalse(sourceMatches("0" * 64, lambda: (one, Bare.missing)))
