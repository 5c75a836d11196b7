# -*- test-case-name: tests.integration.test_tap -*-
"""
The composition root: C{twistd cas} options and the service tree.
"""

from __future__ import annotations

import os
import signal
import types

import attr

from twisted.application import service
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

import casd
from casd.auth.assembly import AuthResourcesService, buildAuthentication
from casd.pool.connector import BackendConnector
from casd.config import ConfigError, loadConfig
from casd.service.context import CASContext
from casd.service.discovery import discoverProtocols
from casd.service.node import NodeService
from casd.service.gctune import refreeze, tuneAllocator, tuneCollector
from casd.service.leanaccept import leanAccept
from casd.service.leanloop import leanLoop
from casd.service.leanpoll import leanDispatch
from casd.service.logs import MainLogRoot
from casd.session.protolog import SessionLog
from casd.service.proxyproto import listenerEndpoint
from casd.routing.router import defaultRouter
from casd.state.keys import SecretError
from casd.state.service import StateService
from casd.tls import ClientTLS, ServerTLS, clientCAFileOf
from casd.tlslayer import TLSFactory

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
            if self["demo"] and "http" in self.protocols:
                self.config = _demoConfig(self.protocols)
            else:
                self.config = loadConfig(path, self.protocols.values())
        except ConfigError as e:
            # One line, no traceback, non-zero exit.
            raise SystemExit(f"casd: configuration error: {e}")


def _demoConfig(protocols):
    """
    The demo configuration with its HTTPS listener, for which a new demo certificate is made
    (L{casd.demo.web}).
    """
    from casd.config import parseConfig
    from casd.demo.web import demoConfigText

    with open(DEMO_CONFIG, encoding="utf-8") as f:
        base = f.read()
    port = parseConfig(base, DEMO_CONFIG, protocols.values()).demo.http_port
    text, caPath = demoConfigText(base, port)
    log.warn("DEMO certificate authority for https://127.0.0.1:8443/: {ca}", ca=caPath)
    return parseConfig(text, DEMO_CONFIG, protocols.values())


class _ThreadPoolService(service.Service):
    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


def buildContext(config, protocols, reactor, runInThread, state=None):
    """
    Assemble the shared context from a validated configuration.

    @param runInThread: C{callable(f, *args) -> Deferred}: where password hashes are verified.
    @param state: the L{StateService} (C{[state]}), or C{None}.
    @raise ConfigError: when a file the configuration names is unusable.
    """
    # Users file, then LDAP, chained, cached, with the login penalty (casd/auth/assembly.py).
    authenticator, directory, checkers = buildAuthentication(
        config, reactor, runInThread, state=state
    )
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
        state=state,
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

        leanDispatch(reactor)  # the process's own reactor: casd.service.leanpoll
        leanAccept(reactor)  # its TCP listening ports: casd.service.leanaccept
        leanLoop(reactor)  # and its main loop: casd.service.leanloop
        tuneCollector(reactor)  # and its garbage collector: casd.service.gctune
        tuneAllocator()  # and its memory allocator (the same module)
    if adopted is None and options.get("workers", 1) > 1:
        from casd.service.workers import makeParentService

        top = makeParentService(options, reactor)
        if options.config.admin.listen:
            _addNodeAdmin(top, options, reactor)
        return top
    config = options.config
    # Under twistd, the root hands twistd casd's text observer for its log (casd.service.logs).
    top = MainLogRoot(getattr(options, "parent", None), reactor)
    context, checkers = _addCore(top, options, reactor)
    # A worker keeps its metrics and answers its parent (casd.service.control); the parent
    # serves the admin listener for the node.
    context, metrics = _addOperations(top, context, checkers, reactor, serveAdmin=adopted is None)
    if config.demo.enabled:
        _addDemo(top, config, checkers[0], reactor)

    sessionSets = []
    for name, section in config.protocols.items():
        if not section.enabled:
            continue
        descriptor = options.protocols[name]
        for listener in section.listeners:
            try:
                factory = descriptor.buildFactory(context, section, listener)
            except ConfigError as e:
                raise SystemExit(f"casd: configuration error: {e}")
            if isinstance(getattr(factory, "sessions", None), set):
                sessionSets.append(factory.sessions)
            if listener.wrapTLS:
                # The protocol's own contexts: its ALPN ids, its session id context.
                try:
                    tlsOptions = context.serverTLS.optionsFor(descriptor, clientCAFileOf(descriptor, section))
                except ConfigError as e:
                    raise SystemExit(f"casd: configuration error: {e}")
                factory = TLSFactory(tlsOptions, False, factory)
            if metrics is not None:
                factory = metrics.counting(factory, name)
            listenReactor = adopted[listener.name] if adopted is not None else reactor
            endpoint, factory = listenerEndpoint(listenReactor, listener, factory)
            if listener.tls == "implicit" and not listener.wrapTLS:
                log.warn(
                    "listener {name}: an ssl: endpoint is Twisted's own TLS (its own certificate"
                    " arguments, no ALPN policy, no shared ticket keys); use tcp: with tls ="
                    " \"implicit\"",
                    name=listener.name,
                )
            svc = StreamServerEndpointService(endpoint, factory)
            svc._raiseSynchronously = True
            svc.setName(listener.name)
            svc.setServiceParent(top)
            log.info(
                "{protocol} listener {name} on {endpoint} (tls={tls}, trusted={trusted}{proxy})",
                protocol=name,
                name=listener.name,
                endpoint=listener.endpoint,
                tls=listener.tls,
                trusted=listener.trusted,
                proxy=(
                    f", PROXY from {', '.join(map(str, listener.proxyTrusted))},"
                    f" others: {listener.proxyUntrusted}"
                    if listener.proxyProtocol
                    else ""
                ),
            )
    NodeService(reactor, context.node, config.server.shutdown_grace, sessionSets).setServiceParent(top)
    return top


def _addCore(top, options, reactor):
    """
    The hashing thread pool, the shared state, the login path and its resources, under C{top}.

    @return: C{(context, checkers)} (L{buildContext}).
    """
    config = options.config
    pool = ThreadPool(minthreads=1, maxthreads=config.auth.hash_threads, name="casd-auth")
    _ThreadPoolService(pool).setServiceParent(top)

    def runInThread(f, *args):
        return deferToThreadPool(reactor, pool, f, *args)

    try:
        state = _buildState(config, reactor)
        context, checkers = buildContext(config, options.protocols, reactor, runInThread, state)
    except ConfigError as e:
        raise SystemExit(f"casd: configuration error: {e}")
    state.setServiceParent(top)
    AuthResourcesService(checkers).setServiceParent(top)
    return context, checkers


def _addNodeAdmin(top, options, reactor) -> None:
    """
    The admin listener of C{--workers N}, in the parent: one per node, answering for the node
    from its workers' figures (L{casd.service.nodeadmin}); its Basic auth through the parent's
    own portal, cache and penalty.
    """
    from casd.service.nodeadmin import NodeView
    from casd.service.reload import ReloadService

    context, checkers = _addCore(top, options, reactor)
    pool = top.getServiceNamed("workers")
    # The parent's own reload, on the SIGHUP the pool forwards to the workers: the drain the
    # file says, the admin users' passwords, the admin listener's certificate.
    hooks = [lambda new: _applyDrain(pool.node, new)] + [
        (lambda new, checker=checker: checker.reload())
        for checker in checkers
        if hasattr(checker, "reload") and hasattr(checker, "path")
    ]
    _applyDrain(pool.node, context.config)
    reload = ReloadService(reactor, context, hooks=hooks, signals=_FORWARDED)
    reload.setServiceParent(top)
    pool.onReload.append(reload.reload)
    view = NodeView(pool, context.config, _listenersOf(context.config), reactor)
    _addAdminListener(top, context, view, reactor)


#: The parent's C{signal} module for its L{ReloadService}: C{SIGHUP} is the worker pool's, which
#: calls the reload itself.
_FORWARDED = types.SimpleNamespace(
    SIGHUP=signal.SIGHUP, signal=lambda number, handler: None, getsignal=lambda number: None
)


def _listenersOf(config) -> list:
    return [
        {"name": listener.name, "protocol": name, "endpoint": listener.endpoint, "tls": listener.tls}
        for name, section in config.protocols.items()
        if section.enabled
        for listener in section.listeners
    ]


def _addAdminListener(top, context, view, reactor) -> None:
    from casd.service.admin import buildAdminSite

    config = context.config
    site = buildAdminSite(config, context.authenticator, view)
    factory = site
    if config.admin.tls == "implicit":
        factory = TLSFactory(context.serverTLS.optionsFor(_ADMIN_TLS), False, site)
    svc = StreamServerEndpointService(serverFromString(reactor, config.admin.listen), factory)
    svc._raiseSynchronously = True
    svc.setName("admin")
    svc.setServiceParent(top)
    log.info("admin listener on {endpoint} (tls={tls})", endpoint=config.admin.listen, tls=config.admin.tls)


def _buildState(config, reactor) -> StateService:
    """
    The shared state C{[state]} configures (casd/state/).
    """
    try:
        return StateService(config, reactor)
    except SecretError as e:
        raise ConfigError(config.path, "state.secret_file", str(e)) from None


def _addOperations(top, context, checkers, reactor, serveAdmin=True):
    """
    The backend health checker, the SIGHUP reload, the node's drain state, casd's own log file
    and the admin listener (metrics, health, status, dashboard); C{top.adminView} is what the
    admin pages of this process show (L{casd.service.admin.LocalView}).

    @param serveAdmin: whether this process serves the admin listener (not a worker of
        C{--workers N}: its parent does, from the workers' figures).
    @return: C{(context, metrics)}: the context the listeners use (with the L{Metrics} in it when
        the admin listener is on) and those metrics, or C{None}.
    """
    from casd.service.admin import LocalView

    from casd.pool.health import HealthChecker
    from casd.service.reload import ReloadService

    config = context.config
    hooks = [lambda new: _applyDrain(context.node, new), refreeze]
    _applyDrain(context.node, config)
    if config.log.file:
        from casd.service.logs import LogFileService

        logfile = LogFileService(reactor, config.log.file, config.log.format)
        logfile.setServiceParent(top)
        hooks.append(lambda new: logfile.reopen())
    for checker in checkers:
        if hasattr(checker, "reload") and hasattr(checker, "path"):
            hooks.append(lambda new, checker=checker: checker.reload())
    checker = HealthChecker(reactor, context.connector, config, context.protocols)
    checker.setServiceParent(top)
    ReloadService(reactor, context, checker, hooks=hooks).setServiceParent(top)
    if not config.admin.listen:
        top.adminView = LocalView(context, context.node, None, [])
        return context, None
    from casd.service.metrics import Metrics, MetricsService

    enabled = [name for name, section in config.protocols.items() if section.enabled]
    metrics = Metrics(context, enabled)
    metrics.draining = lambda: context.node.draining
    context = attr.evolve(context, metrics=metrics)
    metrics.context = context
    context.authenticator.metrics = metrics
    MetricsService(metrics).setServiceParent(top)
    top.adminView = LocalView(context, context.node, metrics, _listenersOf(config))
    if serveAdmin:
        _addAdminListener(top, context, top.adminView, reactor)
    return context, metrics


#: How the admin listener's TLS is told apart: its session id context and its ALPN id.
_ADMIN_TLS = types.SimpleNamespace(name="admin", alpnProtocols=("http/1.1",))


def _applyDrain(node, config) -> None:
    # The file is the source of truth: a reload applies its value, ending a SIGUSR1 drain too.
    if config.server.drain:
        node.drain("configuration")
    else:
        node.resume("configuration")


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
    if "http" in config.protocols and config.protocols["http"].enabled:
        from casd.demo.web import demoWebFactory

        endpoint = serverFromString(reactor, f"tcp:{config.demo.http_port}:interface=127.0.0.1")
        svc = StreamServerEndpointService(endpoint, demoWebFactory(store, reactor))
        svc._raiseSynchronously = True
        svc.setName("demo-http")
        svc.setServiceParent(top)
    log.warn(
        "DEMO backend running in-process on 127.0.0.1 (imap {imap}, pop3 {pop3}, http {http}):"
        " mail is kept in memory and lost on exit; not for production",
        imap=config.demo.imap_port,
        pop3=config.demo.pop3_port,
        http=config.demo.http_port,
    )
