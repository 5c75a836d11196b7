# -*- test-case-name: tests.test_config,tests.integration.test_locate -*-
"""
The C{casd} command: operator tools beside C{twistd cas}.

    casd hash-password [--scheme SCHEME]     print a users-file hash for a password read from stdin
    casd config-reference                    print the configuration reference (Markdown)
    casd check-config FILE                   validate a configuration file
    casd locate -c FILE USER [--check]       print the route casd would take for USER, and why
"""

from __future__ import annotations

import argparse
import getpass
import sys


def hashPassword(args) -> int:
    from casd.auth.hashing import SCHEMES, makeHash

    if args.scheme.upper() not in SCHEMES:
        print(f"casd: unknown scheme {args.scheme!r} (one of {', '.join(SCHEMES)})", file=sys.stderr)
        return 2
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("casd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("casd: refusing an empty password", file=sys.stderr)
        return 1
    print(makeHash(args.scheme, password.encode("utf-8"), rounds=args.rounds))
    return 0


def configReference(args) -> int:
    from casd.config.reference import configurationReference

    sys.stdout.write(configurationReference())
    return 0


def checkConfig(args) -> int:
    from casd.config import ConfigError, loadConfig
    from casd.service.discovery import discoverProtocols

    try:
        loadConfig(args.file, discoverProtocols().values())
    except ConfigError as e:
        print(f"casd: configuration error: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: OK")
    return 0


def buildParser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="casd", description="casd operator tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("hash-password", help="hash a password for the users file (read from stdin)")
    p.add_argument("--scheme", default="BLF-CRYPT", help="BLF-CRYPT (default), SHA512-CRYPT, ARGON2ID, ...")
    p.add_argument("--rounds", type=int, default=None, help="cost/rounds for the scheme")
    p.set_defaults(func=hashPassword)
    p = sub.add_parser("config-reference", help="print the configuration reference")
    p.set_defaults(func=configReference)
    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument("file")
    p.set_defaults(func=checkConfig)
    from casd.cli.locate import addLocateCommand

    addLocateCommand(sub)
    # Further commands register here, one function each (see e.g. casd locate).
    return parser


def main(argv=None) -> int:
    args = buildParser().parse_args(argv)
    return args.func(args)

