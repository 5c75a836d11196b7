"""
Cyclic garbage per session: what a profiled casd leaves for the garbage collector.

A session whose objects are tied into reference cycles is freed only by a collector pass, and
the passes cost CPU in proportion to the objects they walk (casd/service/gctune.py).  With
C{bench.callcount --garbage}, casd's process collects, then keeps every object a pass finds
unreachable (C{gc.DEBUG_SAVEALL}) from L{bench.callcount.START} to L{bench.callcount.STOP}, and
writes what it kept: the count per type, and the cycles (strongly connected components of the
references among those objects) with their edges, the most frequent first.
"""

from __future__ import annotations

import collections
import gc
import json

#: The environment variable that asks the profiled casd for the report (its path).
GARBAGE_ENV = "CASD_CALLCOUNT_GARBAGE"


def start() -> None:
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)


def stop(path: str) -> None:
    """
    Collect, write the report to C{path} (JSON, written whole then renamed), forget the garbage.
    """
    gc.collect()
    try:
        kept = list(gc.garbage)
        report = {
            "objects": len(kept),
            "types": collections.Counter(_name(o) for o in kept).most_common(40),
            "cycles": _cycles(kept),
        }
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    with open(path + ".part", "w") as f:
        json.dump(report, f)
    import os

    os.replace(path + ".part", path)


def _name(o) -> str:
    kind = type(o)
    if kind.__name__ == "method":
        return f"method {type(o.__self__).__qualname__}.{o.__func__.__name__}"
    if kind.__name__ == "function":
        return f"function {o.__qualname__}"
    return f"{kind.__module__}.{kind.__qualname__}"


def _label(source, target) -> str:
    if isinstance(source, dict):
        for key, value in source.items():
            if value is target:
                return f"[{key!r}]"
    if getattr(source, "__dict__", None) is target:
        return ".__dict__"
    for slot in getattr(type(source), "__slots__", ()):
        if getattr(source, slot, None) is target:
            return "." + slot
    for attribute in ("__self__", "__func__", "cell_contents", "__closure__"):
        if getattr(source, attribute, None) is target:
            return "." + attribute
    if isinstance(source, (list, tuple)):
        for i, value in enumerate(source):
            if value is target:
                return f"[{i}]"
    return " ->"


def stronglyConnected(edges: dict) -> list:
    """
    The cycles of a directed graph: its strongly connected components of more than one node, or
    of one node that points to itself (Tarjan's algorithm, iterative: no recursion limit).

    @param edges: node -> the nodes it points to; nodes not in C{edges} are ignored.
    @return: the components, each a list of nodes.
    """
    index: dict = {}
    low: dict = {}
    stack: list = []
    onStack: set = set()
    components = []
    for root in edges:
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            node, at = work.pop()
            if at == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                onStack.add(node)
            descended = False
            successors = edges[node]
            for k in range(at, len(successors)):
                nxt = successors[k]
                if nxt not in edges:
                    continue
                if nxt not in index:
                    work.append((node, k + 1))
                    work.append((nxt, 0))
                    descended = True
                    break
                if nxt in onStack:
                    low[node] = min(low[node], index[nxt])
            if descended:
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    onStack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in successors:
                    components.append(component)
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def _cycles(kept: list, most: int = 12) -> list:
    """
    The reference cycles among C{kept} (L{stronglyConnected}), grouped by the types they hold.
    """
    objects = {id(o): o for o in kept}
    edges = {i: [id(r) for r in gc.get_referents(o) if id(r) in objects] for i, o in objects.items()}
    components = stronglyConnected(edges)
    shapes = collections.Counter()
    example = {}
    for component in components:
        shape = tuple(sorted(_name(objects[i]) for i in component))
        shapes[shape] += 1
        example.setdefault(shape, component)
    cycles = []
    for shape, count in shapes.most_common(most):
        members = set(example[shape])
        cycles.append({
            "count": count,
            "edges": [
                f"{_name(objects[i])}{_label(objects[i], objects[j])} {_name(objects[j])}"
                for i in members
                for j in edges[i]
                if j in members
            ],
        })
    return cycles


def render(report: dict, per: float, unit: str) -> str:
    """
    The report as text, counts per C{unit} (C{per} of them counted).
    """
    lines = [f"cyclic garbage: {report['objects'] / per:.1f} objects per {unit}"]
    lines += [f"{count / per:8.2f}  {name}" for name, count in report["types"][:20]]
    for cycle in report["cycles"]:
        lines.append(f"-- {cycle['count'] / per:.2f} cycles per {unit}:")
        lines += [f"     {edge}" for edge in cycle["edges"]]
    return "\n".join(lines)
