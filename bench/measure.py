"""
What the benchmark reads from /proc: CPU time and resident memory of a set of processes.

CPU is C{utime + stime} from C{/proc/<pid>/stat} (clock ticks, all threads, including threads
that have exited); memory is C{VmRSS} from C{/proc/<pid>/status}.
"""

from __future__ import annotations

import os

TICK = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    return text.rsplit(")", 1)[1].split()


def cpuSeconds(pid: int) -> float:
    """
    @return: user + system CPU seconds of C{pid} (0 when it is gone).
    """
    fields = _stat(pid)
    if fields is None:
        return 0.0
    # After the name: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) * TICK


def children(pid: int) -> list[int]:
    """
    @return: the direct children of C{pid}.
    """
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        result = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                fields = _stat(int(name))
                if fields is not None and int(fields[1]) == pid:
                    result.append(int(name))
        return result


def tree(pid: int) -> list[int]:
    """
    @return: C{pid} and all its descendants.
    """
    result, todo = [], [pid]
    while todo:
        p = todo.pop()
        result.append(p)
        todo.extend(children(p))
    return result


def rssBytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class ProcessGroup:
    """
    The processes of one server under test: a root PID and, when asked, its descendants (nginx
    workers, casd workers).
    """

    def __init__(self, rootPid: int, withChildren: bool = True) -> None:
        self.rootPid = rootPid
        self.withChildren = withChildren

    def pids(self) -> list[int]:
        return tree(self.rootPid) if self.withChildren else [self.rootPid]

    def cpu(self) -> dict[int, float]:
        return {p: cpuSeconds(p) for p in self.pids()}

    def rss(self) -> int:
        return sum(rssBytes(p) for p in self.pids())


def cpuDelta(before: dict[int, float], after: dict[int, float]) -> float:
    """
    CPU spent between two L{ProcessGroup.cpu} samples; a process that appeared in between counts
    from zero.
    """
    return sum(t - before.get(p, 0.0) for p, t in after.items())
