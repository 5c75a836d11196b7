"""
Coverage-guided fuzzing of one target of L{tests.fuzz.targets.TARGETS} with atheris (libFuzzer).

    python -m tests.fuzz.run --list
    python -m tests.fuzz.run TARGET [LIBFUZZER OPTIONS] [CORPUS DIRECTORIES]
    python -m tests.fuzz.run --all SECONDS [LIBFUZZER OPTIONS]
    python -m tests.fuzz.run --write-seeds

C{--all} fuzzes every target for SECONDS each, one after the other, in children forked from one
instrumented process (instrumenting takes seconds; the suite's bounded run,
C{tests/test_fuzz_atheris.py}, uses it); it exits non-zero when any target crashed.

Without corpus directories, a target runs from its committed seeds in
C{tests/fuzz/corpus/TARGET/} and writes what it finds to a scratch directory; pass a writable
directory first to keep new inputs (libFuzzer writes to the first one).  A crash (an exception
escaping the parser, or an error logged) stops the run with the input saved as C{crash-*}; run
C{python -m tests.fuzz.run TARGET crash-...} to replay it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "corpus")

#: The code whose coverage guides the fuzzer.
INSTRUMENTED = ["casd", "protocols", "twisted.protocols.haproxy", "ldaptor.protocols.ldap.ldapfilter"]


def writeSeeds() -> None:
    """
    Write each target's seed inputs to its corpus directory (files named by content).
    """
    from tests.fuzz.targets import TARGETS

    for name, target in TARGETS.items():
        directory = os.path.join(CORPUS, name)
        os.makedirs(directory, exist_ok=True)
        for seed in target.seeds:
            path = os.path.join(directory, hashlib.sha1(seed).hexdigest())
            with open(path, "wb") as f:
                f.write(seed)
        print(f"{name}: {len(os.listdir(directory))} inputs in {os.path.relpath(directory)}")


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    if argv[1] == "--write-seeds":
        writeSeeds()
        return
    if argv[1] == "--list":
        from tests.fuzz.targets import TARGETS

        print("\n".join(TARGETS))
        return
    if argv[1] == "--all":
        raise SystemExit(fuzzAll(argv[0], float(argv[2]), argv[3:]))
    name, rest = argv[1], argv[2:]
    targets = instrumented([name])
    options = [a for a in rest if a.startswith("-")]
    paths = [a for a in rest if not a.startswith("-")]
    fuzz(argv[0], targets[name], options, paths)


def instrumented(names=None) -> dict:
    """
    Import the targets (all, or those called C{names}) and their parsers with coverage
    instrumentation.
    """
    import atheris

    with atheris.instrument_imports(include=INSTRUMENTED):
        from tests.fuzz.targets import TARGETS

        for name in names or TARGETS:
            if name not in TARGETS:
                raise SystemExit(f"unknown target {name!r}; one of: {', '.join(TARGETS)}")
            # The targets import their parsers lazily: import them now, instrumented.
            for seed in TARGETS[name].seeds:
                TARGETS[name].run(seed)
    return TARGETS


def fuzz(program: str, target, options: list[str], paths: list[str]) -> None:
    """
    Fuzz C{target} in this process, from its committed corpus when no C{paths} are given.
    """
    import atheris

    if not paths:
        scratch = tempfile.mkdtemp(prefix=f"casd-fuzz-{target.name}-")
        paths = [scratch, os.path.join(CORPUS, target.name)]
    atheris.Setup([program] + options + paths, target.run)
    atheris.Fuzz()


def fuzzAll(program: str, seconds: float, options: list[str]) -> int:
    """
    Fuzz every target for C{seconds}, each in a child of this (instrumented) process.

    @return: the number of targets that crashed.
    """
    targets = instrumented()
    logs = tempfile.mkdtemp(prefix="casd-fuzz-logs-")
    if not any(o.startswith("-artifact_prefix=") for o in options):
        options = options + [f"-artifact_prefix={logs}/"]
    failed = []
    for name, target in targets.items():
        log = os.path.join(logs, f"{name}.log")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            try:
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                fuzz(program, target, [f"-max_total_time={max(1, int(seconds))}"] + options, [])
            finally:
                os._exit(70)
        _, status = os.waitpid(pid, 0)
        with open(log, errors="replace") as f:
            text = f.read()
        done = [line for line in text.splitlines() if line.startswith("Done ")]
        code = os.waitstatus_to_exitcode(status)
        if code == 0 and done:
            print(f"{name}: ok, {done[-1][5:]}")
        else:
            failed.append(name)
            print(f"{name}: FAILED (exit {code}), log {log}:\n{text[-6000:]}")
    print(f"{len(targets) - len(failed)} of {len(targets)} targets without a crash")
    return len(failed)


if __name__ == "__main__":
    main(sys.argv)
