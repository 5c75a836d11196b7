"""
Coverage-guided fuzzing (atheris, libFuzzer) of every target in L{tests.fuzz.targets.TARGETS},
bounded: each runs a few seconds from its committed seed corpus (C{tests/fuzz/corpus/NAME/}), the
whole step well under two minutes.  A crash fails the test with the target's log and the input.

C{CASD_FUZZ_SECONDS} sets the seconds per target (default 3); longer campaigns: docs/fuzzing.md.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

import tests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))


class AtherisTests(TestCase):
    timeout = 300

    def test_everyTargetBounded(self):
        import atheris  # noqa: F401 -- a missing fuzzer is a failure, not a skip

        seconds = os.environ.get("CASD_FUZZ_SECONDS", "3")
        artifacts = os.path.abspath(self.mktemp())
        os.makedirs(artifacts)
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.fuzz.run",
                "--all",
                seconds,
                "-timeout=20",
                "-rss_limit_mb=2048",
                f"-artifact_prefix={artifacts}/",
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=280,
        )
        output = run.stdout.decode("utf-8", "replace")
        summary = [line for line in output.splitlines() if ": ok, " in line or "FAILED" in line]
        crashes = sorted(os.listdir(artifacts))
        self.assertEqual(
            (run.returncode, crashes),
            (0, []),
            "\n".join(line for line in output.splitlines() if not line.startswith("INFO: Instrumenting")),
        )
        from tests.fuzz.targets import TARGETS

        self.assertEqual(len(summary), len(TARGETS), output[-3000:])
