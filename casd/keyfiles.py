# -*- test-case-name: tests.test_tls,tests.test_http_cookies,tests.test_http_front -*-
"""
Key files shared by the nodes of an array (TLS ticket keys, forms-cookie keys, routing-cookie
keys): one key a line, blank lines and C{#} comments ignored.  Each kind decodes its own lines;
reading them is done once, here.  A key never appears in an error message.
"""

from __future__ import annotations


def keyLines(path: str, error: type[Exception]) -> list[tuple[int, str]]:
    """
    @return: C{(line number, text)} of each key line of the file at C{path}.
    @raise error: (the caller's error class) when the file cannot be read as ASCII text.
    """
    try:
        with open(path, encoding="ascii") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read it ({getattr(e, 'strerror', None) or 'not ASCII text'})") from None
    result = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if line and not line.startswith("#"):
            result.append((number, line))
    return result
