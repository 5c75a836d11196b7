"""
Tests for L{bench.report.writeBlock}: a benchmark rewrites its own block of C{bench/RESULTS.md}
and keeps everything else.
"""

from __future__ import annotations

from twisted.trial import unittest

from bench import report


class WriteBlockTests(unittest.TestCase):
    def setUp(self):
        self.path = self.mktemp()

    def read(self):
        with open(self.path) as f:
            return f.read()

    def test_newFile(self):
        """
        A missing file gets the block alone.
        """
        report.writeResults(self.path, "# run\n")
        self.assertEqual(self.read(), f"{report.BEGIN}\n# run\n{report.END}\n")

    def test_keepsOtherSections(self):
        """
        Rewriting replaces only what is between the markers: hand-written sections before and
        after it, and another benchmark's block, stay.
        """
        with open(self.path, "w") as f:
            f.write(f"intro\n{report.BEGIN}\nold run\n{report.END}\n\n## by hand\nkept\n")
        report.writeBlock(self.path, "http figures", "<!-- h begin -->", "<!-- h end -->")
        report.writeResults(self.path, "new run")
        text = self.read()
        self.assertNotIn("old run", text)
        self.assertEqual(
            text,
            f"intro\n{report.BEGIN}\nnew run\n{report.END}\n\n## by hand\nkept\n\n"
            "<!-- h begin -->\nhttp figures\n<!-- h end -->\n",
        )
