# -*- test-case-name: tests.test_plugin -*-
"""
Protocol discovery: every L{ICASProtocol} provider in any C{twisted/plugins/} module on the path.
"""

from __future__ import annotations

from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted.plugin import IPlugin, getPlugins
from twisted.python.reflect import namedAny

from casd.interfaces import ICASProtocol


@implementer(IPlugin, ICASProtocol)
class LazyProtocol:
    """
    A descriptor that imports its protocol module only when it is used, so that C{twistd --help}
    (which loads every plugin module) stays cheap.

    @param fqn: the fully-qualified name of the real descriptor, e.g. C{"protocols.imap.imap"}.
    """

    def __init__(self, name: str, description: str, fqn: str) -> None:
        self.name = name
        self.description = description
        self.fqn = fqn
        self._loaded = None

    def load(self):
        if self._loaded is None:
            self._loaded = namedAny(self.fqn)
        return self._loaded

    def __getattr__(self, attr):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self.load(), attr)

    def __repr__(self) -> str:
        return f"<LazyProtocol {self.name} -> {self.fqn}>"


def discoverProtocols(package=None) -> dict:
    """
    @param package: the plugin package to search; C{twisted.plugins} by default.
    @return: name -> descriptor, every protocol found.
    @raise ValueError: when two plugins claim the same name.
    """
    if package is None:
        import twisted.plugins as package
    found = {}
    for p in getPlugins(ICASProtocol, package):
        real = p.load() if isinstance(p, LazyProtocol) else p
        verifyObject(ICASProtocol, real)
        if p.name in found and found[p.name] is not real:
            raise ValueError(f"two plugins provide the protocol {p.name!r}")
        found[p.name] = real
    return found
