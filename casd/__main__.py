# -*- test-case-name: tests.integration.test_tap -*-
"""
C{python -m casd}: the C{casd} command (L{casd.cli.commands}).
"""

from casd.cli.commands import main

if __name__ == "__main__":
    raise SystemExit(main())
