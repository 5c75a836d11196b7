"""
Password hashes in Dovecot's notation (checked against Dovecot's own doveadm both ways), the users
file (format, errors, reload on change) and C{casd hash-password}.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from casd.auth import UnknownUser, UserRecord
from casd.auth.hashing import SCHEMES, UnknownScheme, makeHash, splitScheme, verify
from casd.auth.usersfile import UsersFileChecker, UsersFileError, parseUsers
from casd.auth.sasl import Credentials
from tests.support.procs import requireBinary

#: Schemes a users file may use in production (PLAIN/CLEAR are for tests).
STRONG = ("BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "ARGON2ID", "SSHA", "SSHA256", "SSHA512")


def doveadm(*args) -> str:
    binary = requireBinary("doveadm", [("/usr/bin/doveadm", "dovecot-core")])
    result = subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"doveadm {args[:2]} failed: {result.stderr}")
    return result.stdout.strip()


class HashingTests(SynchronousTestCase):
    def test_roundTrip(self):
        for scheme in STRONG + ("PLAIN",):
            stored = makeHash(scheme, "pässword 1".encode(), rounds=4 if scheme == "BLF-CRYPT" else None)
            self.assertTrue(stored.startswith("{" + scheme + "}"), stored)
            self.assertTrue(verify(stored, "pässword 1".encode()), scheme)
            self.assertFalse(verify(stored, b"password 1"), scheme)
            self.assertFalse(verify(stored, b""), scheme)

    def test_saltedDifferently(self):
        for scheme in STRONG:
            self.assertNotEqual(makeHash(scheme, b"x", rounds=4 if scheme == "BLF-CRYPT" else None),
                                makeHash(scheme, b"x", rounds=4 if scheme == "BLF-CRYPT" else None))

    def test_dovecotHashesVerify(self):
        """
        Hashes made by Dovecot's doveadm verify in casd (so a Dovecot passwd-file can be reused).
        """
        for scheme in ("BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "ARGON2ID", "SSHA", "SSHA512"):
            stored = doveadm("pw", "-s", scheme, "-p", "dove pw")
            self.assertTrue(verify(stored, b"dove pw"), stored[:20])
            self.assertFalse(verify(stored, b"dove pw!"), stored[:20])

    def test_casdHashesVerifyInDovecot(self):
        for scheme in ("BLF-CRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "ARGON2ID", "SSHA"):
            stored = makeHash(scheme, b"casd pw", rounds=5 if scheme == "BLF-CRYPT" else None)
            self.assertIn("(verified)", doveadm("pw", "-t", stored, "-p", "casd pw"), scheme)

    def test_bareCryptPrefixes(self):
        self.assertEqual(splitScheme("$6$salt$hash")[0], "SHA512-CRYPT")
        self.assertEqual(splitScheme("$2y$05$abc")[0], "BLF-CRYPT")
        self.assertRaises(UnknownScheme, splitScheme, "secret-in-clear")
        e = self.assertRaises(UnknownScheme, splitScheme, "{MD5}secret-hash-value")
        self.assertNotIn("secret", str(e))

    def test_noDeprecatedModules(self):
        """
        SHA-crypt needs neither the stdlib's deprecated C{crypt} (gone in Python 3.13) nor
        passlib: importing and using the module raises no warning turned into an error.
        """
        code = (
            "import sys; from casd.auth.hashing import makeHash, verify; "
            "h = makeHash('SHA512-CRYPT', b'pw'); assert verify(h, b'pw') and not verify(h, b'x'); "
            "assert 'crypt' not in sys.modules and 'passlib' not in sys.modules, sys.modules.keys()"
        )
        result = subprocess.run(
            [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, timeout=60
        )
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_schemes(self):
        for scheme in ("BLF-CRYPT", "BCRYPT", "SHA512-CRYPT", "SHA256-CRYPT", "ARGON2ID", "SSHA", "PLAIN"):
            self.assertIn(scheme, SCHEMES)


class UsersFileFormatTests(SynchronousTestCase):
    def test_fields(self):
        users = parseUsers(
            "# comment\n\n"
            "alice:{PLAIN}a:mailhost=mbx1 site=dc1 address=alice@example.com backend_login=a1 quota=5G\n"
            "bob:{PLAIN}b::::::mailhost=mbx2 disabled=yes\n"
            "carol:{PLAIN}c\n",
            "users",
        )
        self.assertEqual(
            users["alice"][1],
            UserRecord("alice", "alice@example.com", "a1", "mbx1", "dc1", False, [("quota", "5G")]),
        )
        self.assertEqual((users["bob"][1].mailHost, users["bob"][1].disabled), ("mbx2", True))
        self.assertEqual(users["carol"][1], UserRecord("carol"))

    def test_errorsNameTheLineNeverTheHash(self):
        for text, words in [
            ("alice\n", "users:1: expected login:{SCHEME}hash"),
            ("# x\nalice:clear-secret-pw\n", "users:2: unknown password scheme"),
            ("alice:{NOPE}secret-hash-x\n", "users:1: unknown password scheme {NOPE}"),
            ("alice:{PLAIN}a:mailhost\n", "expected key=value"),
            ("alice:{PLAIN}a\nALICE:{PLAIN}b\n", "users:2: duplicate login"),
        ]:
            e = self.assertRaises(UsersFileError, parseUsers, text, "users")
            self.assertIn(words, str(e))
            self.assertNotIn("secret", str(e))


class UsersFileCheckerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.path = os.path.abspath(self.mktemp())
        self.write(f"alice:{makeHash('SSHA', b'alice-pw')}:address=alice@example.com\n")
        self.checker = UsersFileChecker(self.path, lambda f, *a: defer.maybeDeferred(f, *a), self.clock)
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def write(self, text):
        with open(self.path + ".new", "w") as f:
            f.write(text)
        os.replace(self.path + ".new", self.path)

    def check(self, user, password):
        out = []
        self.checker.requestAvatarId(Credentials(user, password)).addBoth(out.append)
        return out[0]

    def test_checks(self):
        self.assertEqual(self.check("ALICE", b"alice-pw").login, "alice")
        self.assertIsInstance(self.check("alice", b"wrong").value, UnauthorizedLogin)
        self.assertNotIsInstance(self.check("alice", b"wrong").value, UnknownUser)
        self.assertIsInstance(self.check("bob", b"x").value, UnknownUser)

    def test_lookup(self):
        out = []
        self.checker.lookup("Alice@Example.com").addCallback(out.append)
        self.checker.lookup("nobody").addCallback(out.append)
        self.assertEqual([r and r.login for r in out], ["alice", None])

    def test_reloadedWhenChanged(self):
        self.assertIsInstance(self.check("bob", b"bob-pw").value, UnknownUser)
        self.write(f"alice:{makeHash('SSHA', b'new-pw')}\nbob:{makeHash('SHA512-CRYPT', b'bob-pw')}\n")
        # Looked at no more than once a second.
        self.clock.advance(0.5)
        self.assertIsInstance(self.check("bob", b"bob-pw").value, UnknownUser)
        self.clock.advance(0.6)
        self.assertEqual(self.check("bob", b"bob-pw").login, "bob")
        self.assertEqual(self.check("alice", b"new-pw").login, "alice")
        self.assertIn("reloaded: 2 users", "\n".join(formatEvent(e) for e in self.logged))

    def test_badEditKeepsThePreviousTable(self):
        self.write("alice:not-a-hash-secret\n")
        self.clock.advance(1.1)
        self.assertEqual(self.check("alice", b"alice-pw").login, "alice")
        text = "\n".join(formatEvent(e) for e in self.logged)
        self.assertIn("users file not reloaded, keeping the previous one", text)
        self.assertNotIn("not-a-hash-secret", text)

    def test_clearPasswordsWarned(self):
        self.write("alice:{PLAIN}alice-clear-pw\nbob:{CLEAR}b\n")
        UsersFileChecker(self.path, None, self.clock)
        text = "\n".join(formatEvent(e) for e in self.logged)
        self.assertIn("2 passwords stored in clear ({PLAIN}): for tests only", text)
        self.assertNotIn("alice-clear-pw", text)

    def test_badFileAtStart(self):
        self.write("alice:{PLAIN}a\nalice:{PLAIN}b\n")
        self.assertRaises(UsersFileError, UsersFileChecker, self.path, None, self.clock)


class HashPasswordCommandTests(SynchronousTestCase):
    def command(self, *args, stdin="s3cret\n"):
        return subprocess.run(
            [sys.executable, "-m", "casd", "hash-password", *args],
            input=stdin, capture_output=True, text=True, timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )

    def test_hashPassword(self):
        for scheme in ("SHA512-CRYPT", "ARGON2ID", "BLF-CRYPT"):
            result = self.command("--scheme", scheme)
            self.assertEqual(result.returncode, 0, result.stderr)
            stored = result.stdout.strip()
            self.assertTrue(stored.startswith("{" + scheme + "}"))
            self.assertTrue(verify(stored, b"s3cret"))
            self.assertNotIn("s3cret", result.stdout + result.stderr)

    def test_refusals(self):
        self.assertEqual(self.command(stdin="\n").returncode, 1)
        self.assertEqual(self.command("--scheme", "MD5").returncode, 2)
