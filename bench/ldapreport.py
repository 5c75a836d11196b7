"""
The report of L{bench.login_storm_ldap}: the Markdown section it prints and writes into
C{bench/RESULTS.md}, the versions it names, and C{--callcount}'s listing.
"""

from __future__ import annotations

import json
import os
import re
import statistics

from bench.servers import ROOT

#: Where the run's section goes in C{bench/RESULTS.md}.
BEGIN, END = "<!-- bench.ldap begin -->", "<!-- bench.ldap end -->"

def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _f(fmt, value):
    return "n/a" if value is None else fmt.format(value)


def _ratios(results, phase, numerator, denominator):
    """
    The median of per-run ratios (the same run, so the same machine load).
    """
    pairs = zip(results.get(("casd", phase), []), results.get(("nginx", phase), []))
    values = [numerator(a) / denominator(b) for a, b in pairs if denominator(b)]
    return _median(values)


def render(report: dict) -> str:
    results = {(r["target"], r["phase"]): [] for r in report["runs"]}
    for r in report["runs"]:
        results[(r["target"], r["phase"])].append(r)
    runs = report["parameters"]["runs"]
    p = report["parameters"]
    out = [
        "## Login storm against slapd: casd's LDAP checker beside nginx + auth_http",
        "",
        f"Run {report['stamp']} by `python -m bench.login_storm_ldap --users {p['users']}"
        f" --concurrency {p['concurrency']} --warm-rounds {p['warmRounds']} --runs {runs}`;"
        f" medians of {runs} run{'s' if runs > 1 else ''}.  One private slapd (OpenLDAP, mdb,"
        " StartTLS with a private CA) holds the users; a stub IMAP backend accepts any login, so"
        " the figures are the proxies' and the directory's.  **casd**: the LDAP checker (one"
        " search connection bound as a service account, 4 bind connections, StartTLS), the"
        " credential cache at its defaults.  **nginx**: the mail proxy (one worker) with"
        " `auth_http` answered by `bench/authhttp.py --ldap` (asyncio on uvloop, python-ldap),"
        " which does what casd's checker does on the same kind of connections: search the"
        " user's entry as the service account, then bind as the user.  A session: connect,"
        " `LOGIN`, tagged OK, `LOGOUT`.  **cold**: each user once, casd's cache empty (casd"
        f" restarted before each run, then {p['primers']} logins by other users open its directory"
        " connections); **warm**: every user again in each of"
        f" {p['warmRounds']} rounds, in random order.  nginx has no credential cache: its warm"
        " phase is the same work as its cold one (every login a search and a bind).  CPU is"
        " user+system time per session from `/proc`; slapd's binds and searches are counted"
        f" from its stats log.  Load average (1 min) {p['loadBefore']:.1f} before and"
        f" {p['loadAfter']:.1f} after, on {report['cpus']} CPUs shared with other work: compare"
        " within a run.",
        "",
        "| proxy | phase | sessions/s | p50 ms | p99 ms | errors | proxy CPU ms/session |"
        " auth_http CPU ms/session | slapd CPU ms/session | user binds/session |"
        " searches/session |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for target in ("casd", "nginx"):
        for phase in ("cold", "warm"):
            rs = results.get((target, phase))
            if not rs:
                continue
            label = phase
            if target == "nginx" and phase == "warm":
                label = "warm (no cache: same work as cold)"

            def med(key, rs=rs):
                return _median([key(r) for r in rs])

            per = lambda name, r: r["slapd"][name] / max(r["ok"], 1)  # noqa: E731
            out.append(
                f"| {target} | {label} | {_f('{:.0f}', med(lambda r: r['sessionsPerSecond']))}"
                f" | {_f('{:.1f}', med(lambda r: r['latencyMs']['p50']))}"
                f" | {_f('{:.1f}', med(lambda r: r['latencyMs']['p99']))}"
                f" | {sum(r['errors'] for r in rs)}"
                f" | {_f('{:.3f}', med(lambda r: r['cpuMs']))}"
                f" | {_f('{:.3f}', med(lambda r: r['companionCpuMs'])) if target == 'nginx' else ''}"
                f" | {_f('{:.3f}', med(lambda r: r['slapdCpuMs']))}"
                f" | {_f('{:.2f}', med(lambda r: per('userBinds', r)))}"
                f" | {_f('{:.2f}', med(lambda r: per('searches', r)))} |"
            )
    if any(t == "casd" for t, _ in results) and any(t == "nginx" for t, _ in results):
        proxy = lambda r: r["cpuMs"]  # noqa: E731
        withAuth = lambda r: r["cpuMs"] + (r["companionCpuMs"] or 0.0)  # noqa: E731
        whole = lambda r: withAuth(r) + r["slapdCpuMs"]  # noqa: E731
        out += [
            "",
            "| casd / nginx, CPU per session (median of per-run ratios) | cold | warm |",
            "|---|---|---|",
        ]
        for label, num, den in (
            ("proxy alone: casd / nginx", proxy, proxy),
            ("proxy with its authentication: casd / (nginx + auth_http)", proxy, withAuth),
            ("the whole login: (casd + slapd) / (nginx + auth_http + slapd)", whole, whole),
        ):
            cells = [_f("{:.2f}x", _ratios(results, phase, num, den)) for phase in ("cold", "warm")]
            out.append(f"| {label} | {cells[0]} | {cells[1]} |")
    out += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"]) + ".", "", "Per-run figures:", "", "```"]
    for r in report["runs"]:
        out.append(
            f"run {r['run']} {r['target']:5} {r['phase']}: {r['ok']}/{r['sessions']} sessions,"
            f" {r['sessionsPerSecond']:.0f}/s, p50 {r['latencyMs']['p50']} ms, p99 {r['latencyMs']['p99']} ms,"
            f" {r['errors']} errors, CPU {r['cpuMs']:.3f} ms/session"
            + (f" (+auth_http {r['companionCpuMs']:.3f})" if r["companionCpuMs"] is not None else "")
            + f", slapd {r['slapdCpuMs']:.3f} ms/session, {r['slapd']['userBinds']} binds,"
            f" {r['slapd']['searches']} searches, load {r['loadAverage']}"
            + (f" {r['firstErrors']}" if r["errors"] else "")
        )
    out += ["```", ""]
    return "\n".join(out)


def versions() -> list[tuple[str, str]]:
    from bench import report

    keep = {"casd", "nginx", "Python", "Twisted", "CPU"}
    out = [(k, v) for k, v in report.versions() if k in keep]
    slapd = re.search(r"slapd (\d+\.\d+\.\d+)", report._run(["/usr/sbin/slapd", "-VV"]))
    out.append(("OpenLDAP slapd", slapd.group(1) if slapd else "?"))
    try:
        import ldap

        out.append(("python-ldap (auth_http)", ldap.__version__))
    except ImportError:
        out.append(("python-ldap (auth_http)", "not installed"))
    return out


def printCalls(profiles, top: int) -> None:
    """
    Calls per login in each phase (the profile is cumulative: warm is the difference), and the
    functions called most per cold login, with their calls per warm login beside.
    """
    (cold, coldSessions), (warm, warmSessions) = profiles["cold"], profiles["warm"]
    warmCalls = warm.total_calls - cold.total_calls
    print(
        json.dumps(
            {
                "coldCallsPerLogin": round(cold.total_calls / coldSessions, 1),
                "warmCallsPerLogin": round(warmCalls / warmSessions, 1),
            }
        )
    )
    coldStats = cold.stats
    warmStats = warm.stats

    def package(path):
        if path.startswith(ROOT) and "site-packages" not in path:
            return os.path.relpath(path, ROOT).split(os.sep)[0] + "/" + os.path.basename(path)
        if "site-packages/" in path:
            return path.rsplit("site-packages/", 1)[-1].split("/")[0]
        return "builtins" if path == "~" else "stdlib"

    groups: dict[str, list[float]] = {}
    for key, (_, calls, *_rest) in warmStats.items():
        coldCalls = coldStats.get(key, (0, 0))[1]
        sums = groups.setdefault(package(key[0]), [0.0, 0.0])
        sums[0] += coldCalls / coldSessions
        sums[1] += (calls - coldCalls) / warmSessions
    print("   cold    warm  calls per login by where the function lives")
    for name, (c, w) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:15]:
        print(f"{c:7.1f} {w:7.1f}  {name}")
    rows = sorted(coldStats.items(), key=lambda kv: -kv[1][1])[:top]
    print("   cold    warm  function (calls per login)")
    for key, (_, calls, *_rest) in rows:
        path, line, name = key
        extra = (warmStats.get(key, (0, calls))[1] - calls) / warmSessions
        where = os.path.relpath(path, ROOT) if path.startswith(ROOT) else path.rsplit("site-packages/", 1)[-1]
        print(f"{calls / coldSessions:7.2f} {extra:7.2f}  {where}:{line}({name})")
