"""
Turning per-run figures into C{bench/RESULTS.md}: medians, and ratios casd / nginx taken run by
run (the same run, so the same machine load) before the median.
"""

from __future__ import annotations

import math
import os
import platform
import re
import statistics
import subprocess
import sys

from bench.servers import ROOT

#: (phase, key, heading, format) of each column.
COLUMNS = {
    "login": [
        ("rate", "sessions/s", "{:.0f}"),
        ("p50", "p50 ms", "{:.1f}"),
        ("p99", "p99 ms", "{:.1f}"),
        ("errors", "errors", "{:.0f}"),
        ("cpuMs", "proxy CPU ms/session", "{:.3f}"),
        ("companionCpuMs", "+ auth_http CPU ms/session", "{:.3f}"),
    ],
    "bulk": [
        ("mbps", "MB/s", "{:.0f}"),
        ("cpuPerGB", "proxy CPU s/GB", "{:.3f}"),
        ("errors", "errors", "{:.0f}"),
    ],
    "idle": [
        ("sessions", "sessions held", "{:.0f}"),
        ("rssPerConn", "proxy RSS KiB/connection", "{:.1f}"),
        ("errors", "errors", "{:.0f}"),
    ],
}

TITLES = {
    "login": "Login storm (connect, log in, SELECT/STAT, log out; concurrency 50)",
    "bulk": "Bulk relay (FETCH/RETR of 1 MiB messages)",
    "idle": "Idle (authenticated sessions held in IDLE)",
}


def _median(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return statistics.median(values) if values else None


def _fmt(fmt, value):
    return "n/a" if value is None else fmt.format(value)


def brief(phase: str, r: dict) -> str:
    if phase == "login":
        return (
            f"{r['sessions']} sessions, {r['rate']:.0f}/s, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms,"
            f" {r['errors']} errors, CPU {r['cpuMs']:.3f} ms/session"
            + (f" (+auth_http {r['companionCpuMs']:.3f})" if r.get("companionCpuMs") is not None else "")
            + (f" {r['errorKinds']}" if r["errors"] else "")
        )
    if phase == "bulk":
        return f"{r['bytes'] / 1e6:.0f} MB, {r['mbps']:.0f} MB/s, CPU {r['cpuPerGB']:.3f} s/GB, {r['errors']} errors" + (
            f" {r['errorKinds']}" if r["errors"] else ""
        )
    return (
        f"{r['sessions']} held ({r['alive']} alive at release), RSS {r['rssPerConn']:.1f} KiB/conn,"
        f" {r['errors']} errors" + (f" {r['errorKinds']}" if r["errors"] else "")
    )


def ratio(results, key, phase, proto, tls, num="casd", den="nginx"):
    """
    The median over runs of C{num}'s figure divided by C{den}'s in the same run.
    """
    a = results.get((phase, proto, tls, num), [])
    b = results.get((phase, proto, tls, den), [])
    values = []
    for x, y in zip(a, b):
        if x.get(key) is not None and y.get(key):
            values.append(x[key] / y[key])
    return _median(values)


def _run(args) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout + out.stderr).strip()


def _python() -> str:
    """
    The interpreter's version, and whether it is the system's (Debian's build) or another.
    """
    where = "the system's python3" if sys.base_prefix in ("/usr", "/usr/local") else "not the system's python3"
    return f"{platform.python_version()} ({where})"


def versions() -> list[tuple[str, str]]:
    import twisted

    nginx = re.search(r"nginx/(\S+)", _run(["nginx", "-v"]))
    haproxy = re.search(r"version (\S+)", _run(["haproxy", "-v"]))
    dovecot = _run(["dovecot", "--version"]).split()[0:1]
    commit = _run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"])
    try:
        import uvloop

        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return [
        ("casd", f"{commit}{' + local changes' if dirty else ''}"),
        ("nginx", nginx.group(1) if nginx else "?"),
        ("HAProxy", haproxy.group(1) if haproxy else "?"),
        ("Dovecot", dovecot[0] if dovecot else "?"),
        ("Python", _python()),
        ("Twisted", twisted.__version__),
        ("uvloop (load generator)", uv),
        ("kernel", platform.release()),
        ("CPU", f"{cpu}, {os.cpu_count()} cores"),
    ]


def render(results, params, stamp, targets, protocols, casdProtocols) -> str:
    names = [t.name for t in targets]
    out = [
        "# casd benchmark results",
        "",
        f"Run {stamp:%Y-%m-%d %H:%M} UTC by `bench/run{' --quick' if params.quick else ''}`."
        " Figures are medians over runs; **casd/nginx** is the median of the per-run ratios"
        " (both measured in the same run). CPU is user+system time of the proxy's processes"
        " from `/proc/<pid>/stat`; MB = 10^6 bytes, GB = 10^9 bytes.",
        "",
        "## Versions",
        "",
        "| component | version |",
        "|---|---|",
    ]
    out += [f"| {k} | {v} |" for k, v in versions()]
    out += ["", "## Parameters", "", "| parameter | value |", "|---|---|"]
    out += [f"| {k} | {v} |" for k, v in params.describe()]
    if "pop3" not in casdProtocols:
        out += [
            "",
            "POP3: casd's `pop3` protocol was not discovered (no `protocols/pop3.py`, or a stale installed plugin module), so the"
            " POP3 rows are not measured; the harness runs them as soon as casd's `pop3` protocol"
            " is discovered (or with `--protocols imap,pop3` for nginx and HAProxy alone).",
        ]
    for phase in ("login", "bulk", "idle"):
        for proto in protocols:
            for tls in (False, True):
                rows = [(n, results.get((phase, proto, tls, n))) for n in names]
                rows = [(n, r) for n, r in rows if r]
                if not rows:
                    continue
                cols = COLUMNS[phase]
                out += [
                    "",
                    f"## {proto.upper()}{' over TLS' if tls else ''}: {TITLES[phase]}",
                    "",
                    "| target | " + " | ".join(c[1] for c in cols) + " |",
                    "|---" * (len(cols) + 1) + "|",
                ]
                for n, runs in rows:
                    cells = [_fmt(fmt, _median([r.get(key) for r in runs])) for key, _, fmt in cols]
                    out.append(f"| {n} | " + " | ".join(cells) + " |")
                if any(n == "casd" for n, _ in rows) and any(n == "nginx" for n, _ in rows):
                    cells = []
                    for key, _, fmt in cols:
                        value = None if key in ("errors", "sessions", "companionCpuMs") else ratio(results, key, phase, proto, tls)
                        cells.append("" if value is None else f"{value:.2f}x")
                    out.append("| **casd/nginx** | " + " | ".join(cells) + " |")
                if phase == "login" and any(n == "casd" for n, _ in rows) and any(n == "nginx" for n, _ in rows):
                    # nginx delegates authentication to auth_http: count it in for a whole login.
                    a = results.get((phase, proto, tls, "casd"), [])
                    b = results.get((phase, proto, tls, "nginx"), [])
                    whole = _median(
                        [x["cpuMs"] / (y["cpuMs"] + (y.get("companionCpuMs") or 0.0)) for x, y in zip(a, b) if y.get("cpuMs")]
                    )
                    out.append(
                        "| **casd/(nginx+auth_http)** | | | | | " + _fmt("{:.2f}x", whole) + " | |"
                    )
                if phase == "login" and any(n == "casd-2w" for n, _ in rows):
                    value = ratio(results, "rate", phase, proto, tls, "casd-2w", "casd")
                    cpu = ratio(results, "cpuMs", phase, proto, tls, "casd-2w", "casd")
                    out.append(
                        f"| **casd-2w/casd** | {_fmt('{:.2f}x', value)} | | | | {_fmt('{:.2f}x', cpu)} | |"
                    )
    out += _targets(results, protocols)
    out += ["", "## Per-run figures", "", "```"]
    for (phase, proto, tls, name), runs in sorted(results.items(), key=lambda kv: tuple(map(str, kv[0]))):
        for i, r in enumerate(runs):
            out.append(f"{phase:5} {proto}{'+tls' if tls else '    '} {name:9} run {i + 1}: {brief(phase, r)}")
    out += ["```", ""]
    return "\n".join(out)


#: The issue's targets: (label, phase, key, comparison, bound).
TARGETS = (
    ("CPU per proxied IMAP login <= 2x nginx's", "login", "cpuMs", "<=", 2.0),
    ("relay MB/s >= 0.9x nginx's", "bulk", "mbps", ">=", 0.9),
    ("relay CPU per GB <= 1.5x nginx's", "bulk", "cpuPerGB", "<=", 1.5),
    ("RSS per idle proxied connection <= 3x nginx's", "idle", "rssPerConn", "<=", 3.0),
)


def _targets(results, protocols) -> list[str]:
    out = [
        "",
        "## Targets (casd/nginx, same run)",
        "",
        "| target | plain | over TLS |",
        "|---|---|---|",
    ]
    for label, phase, key, op, bound in TARGETS:
        cells = []
        for tls in (False, True):
            value = ratio(results, key, phase, "imap", tls)
            if value is None:
                cells.append("n/a")
                continue
            met = value <= bound if op == "<=" else value >= bound
            cells.append(f"{value:.2f}x {'met' if met else '**missed**'}")
        out.append(f"| {label} | {cells[0]} | {cells[1]} |")
    out += [
        "",
        "The targets are set for plain IMAP; the TLS column is for information. Where a target"
        " is missed, [`bench/PROFILE.md`](PROFILE.md) gives the profile that says why and what"
        " was tried.",
    ]
    return out



#: The part of C{bench/RESULTS.md} that L{render} writes; what follows it (sections written by
#: the other benchmarks of C{bench/} or by hand) is kept when a run rewrites the file.
BEGIN, END = "<!-- bench.run begin -->", "<!-- bench.run end -->"


def writeBlock(path: str, text: str, begin: str = BEGIN, end: str = END) -> None:
    """
    Put C{text} into the file C{path} between the markers C{begin} and C{end}, keeping whatever
    the file holds outside them; a file without the markers gets the block appended.
    """
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    try:
        with open(path) as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    if begin in current and end in current:
        before, rest = current.split(begin, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        current = before + block + ("\n" + after if after else "")
    else:
        current = (current.rstrip("\n") + "\n\n" if current.strip() else "") + block
    with open(path, "w") as f:
        f.write(current)


def writeResults(path: str, text: str) -> None:
    """
    Write a run's rendered C{text} to C{path} (see L{writeBlock}).
    """
    writeBlock(path, text)
