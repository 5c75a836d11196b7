"""
The shape of the code base (issue 10): small modules, no import cycles in casd/, casd/ never
importing the protocols, every module naming its tests, and the protocol modules as small as
the plugin API lets them be.
"""

import ast
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from bench.garbage import stronglyConnected

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 700


def sources(*tops):
    for top in tops:
        for directory, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if name.endswith(".py"):
                    yield os.path.relpath(os.path.join(directory, name), ROOT)


def moduleName(path):
    name = path[:-3].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def imports(path, known):
    """
    The modules of C{known} that C{path} imports, anywhere in it (a function-level import is a
    dependency too).
    """
    with open(os.path.join(ROOT, path)) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name in known or name.split(".")[0] == "protocols":
                found.add(name)
    return found


def cycles(graph):
    """
    The strongly connected components of more than one module (L{bench.garbage.stronglyConnected}).
    """
    return sorted(sorted(c) for c in stronglyConnected({v: sorted(ws) for v, ws in graph.items()}))


def lineCount(path):
    with open(os.path.join(ROOT, path)) as f:
        return sum(1 for _ in f)


class LayoutTests(SynchronousTestCase):
    def test_modulesAreSmall(self):
        big = {p: n for p in sources("casd", "protocols") if (n := lineCount(p)) > MAX_LINES}
        self.assertEqual(big, {})

    def test_noImportCycles(self):
        paths = list(sources("casd"))
        known = {moduleName(p) for p in paths}
        graph = {moduleName(p): imports(p, known) - {moduleName(p)} for p in paths}
        self.assertEqual(cycles(graph), [])

    def test_coreNeverImportsProtocols(self):
        paths = list(sources("casd"))
        known = {moduleName(p) for p in paths}
        offenders = {
            p: sorted(i for i in imports(p, known) if i.split(".")[0] == "protocols")
            for p in paths
        }
        self.assertEqual({p: i for p, i in offenders.items() if i}, {})

    def test_everyModuleNamesItsTests(self):
        """
        Every module starts with a C{test-case-name} header naming test modules that exist.
        """
        problems = {}
        for path in sources("casd", "protocols"):
            with open(os.path.join(ROOT, path)) as f:
                first = f.readline()
            m = re.match(r"# -\*- test-case-name: (\S+) -\*-$", first)
            if m is None:
                problems[path] = "no test-case-name header"
                continue
            for name in m.group(1).split(","):
                if not os.path.exists(os.path.join(ROOT, *name.split(".")) + ".py"):
                    problems[path] = f"{name} does not exist"
        self.assertEqual(problems, {})

    def test_protocolsAreTheirGrammarAndWording(self):
        """
        With the plugin API (L{casd.plugin}), a protocol module is small, and the tutorial's
        plugin smaller still, with at most three import lines from casd.
        """
        self.assertLessEqual(lineCount("protocols/pop3.py"), 350)
        self.assertLessEqual(lineCount("protocols/managesieve.py"), 350)
        self.assertLessEqual(lineCount("protocols/imap.py") + lineCount("protocols/imapgrammar.py"), 550)
        tutorial = os.path.join("docs", "examples", "casd-hello", "casd_hello", "protocol.py")
        self.assertLessEqual(lineCount(tutorial), 90)
        with open(os.path.join(ROOT, tutorial)) as f:
            fromCasd = [line for line in f if re.match(r"(from|import) casd\b", line)]
        self.assertLessEqual(len(fromCasd), 3)
