"""
A casd node running in the test process on the real reactor, from a TOML text.
"""

import os

from twisted.internet import defer, task

from casd.service.tap import Options, makeService


class CASNode:
    """
    @ivar service: the running service tree.
    @ivar path: the configuration file.
    """

    def __init__(self, directory: str, configText: str) -> None:
        self.directory = directory
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, "casd.toml")
        with open(self.path, "w") as f:
            f.write(configText)

    def start(self, reactor=None):
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        options = Options()
        options.parseOptions(["--config", self.path])
        self.options = options
        self.service = makeService(options, reactor)
        self.service.startService()
        return self

    def factories(self):
        for svc in self.service:
            factory = getattr(svc, "factory", None)
            if factory is not None:
                yield getattr(factory, "wrappedFactory", factory)

    def sessions(self):
        return [s for f in self.factories() for s in getattr(f, "sessions", ())]

    @defer.inlineCallbacks
    def stop(self, timeout: float = 10.0):
        """
        Stop listening, wait (bounded) for the sessions to end, then stop everything.
        """
        for _ in range(int(timeout / 0.02)):
            if not self.sessions():
                break
            yield task.deferLater(self.reactor, 0.02, lambda: None)
        for s in self.sessions():
            s.transport.abortConnection()
        yield self.service.stopService()
        # Let aborted connections and backend sockets finish closing.
        yield task.deferLater(self.reactor, 0.05, lambda: None)
