# -*- test-case-name: tests.integration.test_tap -*-
"""
The composition root: C{twistd cas} options and the service tree.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

import casd
from casd.auth.assembly import AuthResourcesService, buildAuthentication
from casd.pool.connector import BackendConnector
from casd.config import ConfigError, loadConfig
from casd.service.context import CASContext
from casd.service.discovery import discoverProtocols
from casd.session.protolog import SessionLog
from casd.service.proxyproto import listenerEndpoint
from casd.routing.router import defaultRouter
from casd.tls import ClientTLS, ServerTLS

log = Logger()

DEMO_CONFIG = os.path.join(os.path.dirname(casd.__file__), "demo", "data", "casd.toml")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run casd, the Client Access Server.  Give --config FILE (a TOML file, see"
        " docs/configuration.md), or --demo for the embedded demo defaults."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
        [
            "workers",
            "w",
            1,
            "Worker processes sharing the listening sockets (use one per core; see"
            " casd/service/workers.py).",
            int,
        ],
    ]
    optFlags = [
        [
            "demo",
            None,
            "Run on the embedded defaults: demo users and an in-process demo mailbox backend"
            " (demo only; mail is kept in memory).",
        ]
    ]

    def postOptions(self) -> None:
        if self["demo"] and self["config"]:
            raise usage.UsageError("give --config or --demo, not both")
        path = DEMO_CONFIG if self["demo"] else self["config"]
        if not path:
            raise usage.UsageError("--config FILE is required (or --demo)")
        if self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")
        if self["workers"] > 1 and self["demo"]:
            # The demo backend keeps mail in one process's memory.
            raise usage.UsageError("--workers is not available with --demo")
        try:
            self.protocols = discoverProtocols()
            self.config = loadConfig(path, self.protocols.values())
        except ConfigError as e:
            # One line, no traceback, non-zero exit.
            raise SystemExit(f"casd: configuration error: {e}")


class _ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


def buildContext(config, protocols, reactor, runInThread):
    """
    Assemble the shared context from a validated configuration.

    @param runInThread: C{callable(f, *args) -> Deferred}: where password hashes are verified.
    @raise ConfigError: when a file the configuration names is unusable.
    """
    # Users file, then LDAP, chained, cached, with the login penalty (casd/auth/assembly.py).
    authenticator, directory, checkers = buildAuthentication(config, reactor, runInThread)
    try:
        clientTLS = ClientTLS(config.backend.ca_file)
    except (OSError, ValueError) as e:
        raise ConfigError(config.path, "backend.ca_file", f"expected PEM certificates ({e})") from None
    return CASContext(
        reactor=reactor,
        config=config,
        authenticator=authenticator,
        router=defaultRouter(config),
        connector=BackendConnector.fromConfig(reactor, config, clientTLS),
        serverTLS=ServerTLS(config.tls, config.path),
        clientTLS=clientTLS,
        sessionLog=SessionLog(),
        protocols=dict(protocols),
        directory=directory,
    ), checkers


def makeService(options, reactor=None, adopted=None) -> service.MultiService:
    """
    Build the service tree: one listening service per listener of each enabled protocol, the
    hashing thread pool and, in demo mode, the demo mailbox backend.  With C{--workers N}
    (N > 1), the parent's tree instead: L{casd.service.workers.WorkerPool}.

    @param adopted: in a worker process, listener name -> a reactor whose C{listen*} adopts the
        socket the parent bound (L{casd.service.worker.adoptingReactors}).
    """
    if reactor is None:
        from twisted.internet import reactor
    if adopted is None and options.get("workers", 1) > 1:
        from casd.service.workers import makeParentService

        return makeParentService(options, reactor)
    config = options.config
    top = service.MultiService()
    pool = ThreadPool(minthreads=1, maxthreads=config.auth.hash_threads, name="casd-auth")
    _ThreadPoolService(pool).setServiceParent(top)

    def runInThread(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    try:
        context, checkers = buildContext(config, options.protocols, reactor, runInThread)
    except ConfigError as e:
        raise SystemExit(f"casd: configuration error: {e}")

    AuthResourcesService(checkers).setServiceParent(top)
    _addRouting(top, context, reactor)
    if config.demo.enabled:
        _addDemo(top, config, checkers[0], reactor)

    for name, section in config.protocols.items():
        if not section.enabled:
            continue
        descriptor = options.protocols[name]
        for listener in section.listeners:
            factory = descriptor.buildFactory(context, section, listener)
            if listener.wrapTLS:
                factory = TLSMemoryBIOFactory(context.serverTLS.options, False, factory)
            listenReactor = adopted[listener.name] if adopted is not None else reactor
            endpoint, factory = listenerEndpoint(listenReactor, listener.endpoint, factory)
            svc = StreamServerEndpointService(endpoint, factory)
            svc._raiseSynchronously = True
            svc.setName(listener.name)
            svc.setServiceParent(top)
            log.info(
                "{protocol} listener {name} on {endpoint} (tls={tls}, trusted={trusted})",
                protocol=name,
                name=listener.name,
                endpoint=listener.endpoint,
                tls=listener.tls,
                trusted=listener.trusted,
            )
    return top


def _addRouting(top, context, reactor) -> None:
    """
    The backend health checker and the SIGHUP reload of the routing and backend sections.
    """
    from casd.service.reload import ReloadService
    from casd.pool.health import HealthChecker

    checker = HealthChecker(reactor, context.connector, context.config, context.protocols)
    checker.setServiceParent(top)
    ReloadService(reactor, context, checker).setServiceParent(top)


def _addDemo(top, config, checker, reactor) -> None:
    from casd.demo import backend as demo

    store = demo.DemoMailStore()
    for kind, port, build in (
        ("imap", config.demo.imap_port, demo.demoIMAPFactory),
        ("pop3", config.demo.pop3_port, demo.demoPOP3Factory),
    ):
        endpoint = serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1")
        svc = StreamServerEndpointService(endpoint, build(checker, store, reactor))
        svc._raiseSynchronously = True
        svc.setName(f"demo-{kind}")
        svc.setServiceParent(top)
    log.warn(
        "DEMO backend running in-process on 127.0.0.1 (imap {imap}, pop3 {pop3}): mail is kept in"
        " memory and lost on exit; not for production",
        imap=config.demo.imap_port,
        pop3=config.demo.pop3_port,
    )
