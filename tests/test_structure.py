"""
How the code is laid out, checked: no import cycle between txcluster's
modules, no class much over 400 lines, no module that imports the global
reactor as it is imported (twistd imports plugins before it installs
C{--reactor}), and Twisted's privates used only in C{_twistedcompat}.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import txcluster

PACKAGE = os.path.dirname(os.path.abspath(txcluster.__file__))

#: The longest a class may be, in lines.
LONGEST_CLASS = 420


def modules() -> dict:
    """
    Every module of the package: its dotted name, and its parsed source.
    """
    found = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py"):
            dotted = "txcluster" if name == "__init__.py" else f"txcluster.{name[:-3]}"
            with open(os.path.join(PACKAGE, name), encoding="utf-8") as f:
                found[dotted] = ast.parse(f.read(), name)
    return found


def imported(tree: ast.Module, own: set) -> set:
    """
    The package's modules C{tree} imports, anywhere in it (lazy imports in
    functions count: they are cycles too, only later).
    """
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n in own}


class StructureTests(SynchronousTestCase):
    def test_noImportCycle(self) -> None:
        """
        No module of the package imports, directly or through others, a
        module that imports it (C{txcluster/__init__} re-exports names
        lazily and is left out).
        """
        trees = modules()
        own = set(trees) - {"txcluster"}
        graph = {name: imported(tree, own) - {name} for name, tree in trees.items() if name in own}
        cycles = []

        def visit(name, path):
            for other in sorted(graph[name]):
                if other in path:
                    cycles.append(path[path.index(other) :] + [other])
                elif other not in done:
                    visit(other, path + [other])
            done.add(name)

        done: set = set()
        for name in sorted(graph):
            if name not in done:
                visit(name, [name])
        self.assertEqual(cycles, [])

    def test_noLongClasses(self) -> None:
        """
        No class is much longer than 400 lines.
        """
        long = []
        for name, tree in modules().items():
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > LONGEST_CLASS:
                    long.append((name, node.name, node.end_lineno - node.lineno + 1))
        self.assertEqual(long, [])

    def test_noGlobalReactorOnImport(self) -> None:
        """
        No module imports the global reactor at module level.
        """
        offenders = []
        for name, tree in modules().items():
            for node in tree.body:
                if isinstance(node, ast.ImportFrom) and node.module == "twisted.internet":
                    if any(a.name == "reactor" for a in node.names):
                        offenders.append(name)
        self.assertEqual(offenders, [])

    def test_twistedPrivatesInOneModule(self) -> None:
        """
        Only C{_twistedcompat} reaches for Twisted's private attributes (an
        underscore name on something imported from Twisted, or a private
        attribute AMP or the reactor's transports define).
        """
        privates = {
            "_Binding",
            "_descriptors",
            "_outstandingRequests",
            "_commandDispatch",
            "_MAX_KEY_LENGTH",
            "_transportPeer",
            "_transportHost",
            "_sendmsgQueue",
            "_writeSomeDataBase",
            "_fromConnectedSocket",
            "_fromListeningDescriptor",
            "_tempDataLen",
            "_bindPath",
            "_shouldShutdown",
            "_type",
            "_reusePort",
        }
        users = []
        for name, tree in modules().items():
            if name == "txcluster._twistedcompat":
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr in privates:
                    users.append((name, node.attr, node.lineno))
                elif isinstance(node, ast.alias) and node.name in privates:
                    users.append((name, node.name, 0))
        self.assertEqual(users, [])
