# -*- test-case-name: tests.test_metrics -*-
"""
What a node is doing, as numbers: the Prometheus metrics behind the admin listener's C{/metrics},
C{/status} and dashboard.

Three sources, none of them on a relay path:
  - the end-of-session events of the protocol log (namespace C{casd.session}), observed like any
    other log observer, so that sessions of worker processes count too once their events reach
    the parent;
  - the shared login path (L{casd.auth.authenticator.Authenticator}), which reports each login's
    outcome and latency;
  - counters the core already keeps (credential cache, penalty, LDAP pool, backend members),
    read at scrape time by a collector.

No label carries a user name, an address or any other unbounded value: protocols, results,
failure kinds and the configured backend names only.
"""

from __future__ import annotations

import re
import time

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.service import Service
from twisted.logger import globalLogPublisher
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import casd
from casd.service.sessioncounts import SessionCounts

#: Session results as the protocol log words them, folded into a bounded label set.
_LOGIN_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_DURATION_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 14400.0)

#: Failure classes -> the C{reason} label of C{casd_auth_failures_total}.
FAILURE_REASONS = {
    "AuthenticationFailed": "bad_credentials",
    "DirectoryUnavailable": "directory_unavailable",
    "Throttled": "throttled",
    "PolicyRefused": "policy",
}


def _bounded(value: str, allowed: set, other: str = "other") -> str:
    return value if value in allowed else other


class Metrics:
    """
    The node's metrics, in their own L{CollectorRegistry}.

    @ivar registry: what C{/metrics} renders.
    @ivar startedAt: wall-clock time the node started.
    """

    def __init__(self, context, protocols, clock=None, registry: CollectorRegistry | None = None) -> None:
        """
        @param context: the running L{casd.service.context.CASContext}.
        @param protocols: the names of this node's protocols: the only C{protocol} label values.
        @param clock: an L{IReactorTime} (for the login rate over the last minute).
        """
        self.context = context
        self.protocols = set(protocols)
        self.clock = clock or context.reactor
        self.registry = registry or CollectorRegistry()
        self.startedAt = time.time()
        self.draining = lambda: False
        r = self.registry
        # The per-session counters: plain counts, rendered at scrape time.
        self.counts = SessionCounts(_DURATION_BUCKETS, _LOGIN_BUCKETS)
        r.register(self.counts)
        self.authFailures = Counter(
            "casd_auth_failures", "Failed logins, by reason.", ["reason"], registry=r
        )
        self.tlsFailures = Counter(
            "casd_tls_handshake_failures",
            "Client TLS handshakes that failed, by protocol.",
            ["protocol"],
            registry=r,
        )
        self.info = Gauge("casd_info", "This node's casd version.", ["version"], registry=r)
        self.info.labels(casd.__version__ if hasattr(casd, "__version__") else "0").set(1)
        self.up = Gauge("casd_start_time_seconds", "When this node started (Unix time).", registry=r)
        self.up.set(self.startedAt)
        r.register(_CoreCollector(self))
        self._recent: list[tuple[float, bool]] = []
        for name in self.protocols:
            self.counts.active[name] = 0
        #: Session results -> their label (bounded).
        self._resultLabels: dict = {}

    # -- sources ------------------------------------------------------------------------------

    def connectionOpened(self, protocol: str) -> None:
        if protocol not in self.protocols:
            protocol = "other"
        counts = self.counts
        counts.connections[protocol] += 1
        active = counts.active
        active[protocol] = active[protocol] + 1 if protocol in active else 1

    def connectionClosed(self, protocol: str) -> None:
        if protocol not in self.protocols:
            protocol = "other"
        active = self.counts.active
        active[protocol] = active[protocol] - 1 if protocol in active else -1

    def tlsFailed(self, protocol: str) -> None:
        self.tlsFailures.labels(_bounded(protocol, self.protocols)).inc()

    def observe(self, event: dict) -> None:
        """
        A log observer: counts the end-of-session events (namespace C{casd.session}).
        """
        # Subscripts and "in" rather than event.get: no call for the events of other namespaces.
        if "result" not in event or "log_namespace" not in event or event["log_namespace"] != "casd.session":
            return
        protocol = event["protocol"] if "protocol" in event else ""
        if type(protocol) is not str or protocol not in self.protocols:
            protocol = _bounded(str(protocol), self.protocols)
        result = event["result"]
        labels = self._resultLabels
        if type(result) is str and result in labels:
            label = labels[result]
        else:
            label = resultLabel(result)
            # The first 256 results met (a few in practice: "proxy(client closed)", "logout", ...).
            if len(labels) < 256 and type(result) is str:
                labels[result] = label
        counts = self.counts
        counts.sessions[protocol, label] += 1
        bytesIn = int((event["bytesIn"] if "bytesIn" in event else 0) or 0)
        bytesOut = int((event["bytesOut"] if "bytesOut" in event else 0) or 0)
        counts.bytes[protocol, "in"] += bytesIn if bytesIn > 0 else 0
        counts.bytes[protocol, "out"] += bytesOut if bytesOut > 0 else 0
        duration = event["duration"] if "duration" in event else None
        if type(duration) in (int, float) and duration >= 0:
            counts.durations.observe(protocol, duration)

    def loginFinished(self, started: float, failure=None) -> None:
        """
        Called by the authenticator when a login's verdict is known.

        @param started: C{clock.seconds()} when the credentials arrived.
        @param failure: C{None} on success, else the L{Failure}.
        """
        now = self.clock.seconds()
        if failure is None:
            self.counts.logins.observe("success", now - started)
        else:
            reason = FAILURE_REASONS.get(type(failure.value).__name__, "other")
            self.authFailures.labels(reason).inc()
            self.counts.logins.observe("failure", now - started)
        recent = self._recent
        recent.append((now, failure is None))
        if len(recent) > 4096 or (recent and recent[0][0] < now - 60):
            self._recent = [r for r in recent if r[0] >= now - 60][-4096:]

    def counting(self, factory, protocol: str) -> CountingFactory:
        """
        @return: C{factory}, counting the connections it accepts for C{protocol}.
        """
        return CountingFactory(factory, self, protocol)

    # -- views --------------------------------------------------------------------------------

    def loginRate(self) -> dict:
        """
        @return: logins and failures of the last 60 seconds.
        """
        now = self.clock.seconds()
        recent = [ok for when, ok in self._recent if when >= now - 60]
        return {"logins": sum(recent), "failures": len(recent) - sum(recent), "window": 60}

    def activeSessions(self) -> dict:
        active = self.counts.active
        return {name: int(active.get(name, 0)) for name in sorted(self.protocols)}


_WORD = re.compile(r"[a-z_]{1,40}")


def resultLabel(result) -> str:
    """
    The C{result} label of a session: the protocol log's result without its detail
    (C{"proxy(backend lost)"} -> C{proxy}, C{"proxy, 2 message(s)"} -> C{proxy}), lower case.
    """
    head = re.split(r"[(,:]", str(result or ""), maxsplit=1)[0].strip().lower().replace(" ", "_")
    return head if _WORD.fullmatch(head) else "other"


class _CoreCollector:
    """
    Reads the counters the core keeps at scrape time.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        context = self.metrics.context
        cache = _findCache(context)
        if cache is not None:
            stats = cache.stats()
            hits = CounterMetricFamily(
                "casd_credential_cache_lookups", "Credential cache look-ups, by outcome.", labels=["outcome"]
            )
            for key, outcome in (("hits", "hit"), ("negativeHits", "negative_hit"), ("misses", "miss"),
                                 ("coalesced", "coalesced")):
                hits.add_metric([outcome], stats.get(key, 0))
            yield hits
            yield GaugeMetricFamily("casd_credential_cache_entries", "Entries in the credential cache.",
                                    value=stats.get("size", 0))
        penalty = getattr(context.authenticator, "penalty", None)
        if penalty is not None:
            stats = penalty.stats()
            g = GaugeMetricFamily("casd_penalties", "Login penalties in force, by kind.", labels=["kind"])
            for key, kind in (("addresses", "address"), ("users", "user"),
                              ("lockedAddresses", "locked_address"), ("lockedUsers", "locked_user")):
                g.add_metric([kind], stats.get(key, 0))
            yield g
        up = GaugeMetricFamily(
            "casd_backend_up", "Whether a backend member is UP (1) or DOWN (0).", labels=["backend", "address"]
        )
        sessions = GaugeMetricFamily(
            "casd_backend_sessions", "Relayed sessions on a backend member.", labels=["backend", "address"]
        )
        for member in list(context.connector.members.values()):
            labels = [member.target.server, f"{member.target.host}:{member.target.port}"]
            up.add_metric(labels, 1 if member.up else 0)
            sessions.add_metric(labels, len(member.sessions))
        yield up
        yield sessions
        yield GaugeMetricFamily("casd_draining", "Whether this node is draining (1) or not (0).",
                                value=1 if self.metrics.draining() else 0)
        stats = getattr(getattr(context, "state", None), "stats", None)
        if stats is not None:
            available = GaugeMetricFamily(
                "casd_shared_state_available",
                "Whether the shared state answers (1), or decisions fall back to this node's memory (0).",
                labels=["backend"],
            )
            available.add_metric([stats.backend], 1 if stats.available else 0)
            yield available
            for name, value, text in (
                ("outages", stats.outages, "Outages of the shared state since start."),
                ("fallbacks", stats.fallbacks, "Decisions taken locally because the shared state did not answer in time."),
                ("calls", stats.calls, "Calls sent to the shared state."),
                ("late_replies", stats.lateReplies, "Shared-state replies that came after a local decision."),
            ):
                yield CounterMetricFamily(f"casd_shared_state_{name}", text, value=value)


def _findCache(context):
    """
    The L{casd.auth.cache.CredentialCache} behind the portal, if there is one.
    """
    portal = getattr(context.authenticator, "portal", None)
    for checker in getattr(portal, "checkers", {}).values() if portal is not None else ():
        cache = getattr(checker, "cache", None)
        if cache is not None and hasattr(cache, "stats"):
            return cache
    return None


class MetricsService(Service):
    """
    Observes the log (the end-of-session events) while the node runs.
    """

    def __init__(self, metrics: Metrics, publisher=None) -> None:
        self.metrics = metrics
        self.publisher = publisher if publisher is not None else globalLogPublisher

    def startService(self) -> None:
        super().startService()
        self.publisher.addObserver(self.metrics.observe)

    def stopService(self) -> None:
        super().stopService()
        self.publisher.removeObserver(self.metrics.observe)


class CountingFactory:
    """
    A listening factory that counts the connections it accepts and sees close, then gets out of
    the way: the protocol it builds is the wrapped factory's own, unwrapped (no per-event cost).
    """

    def __init__(self, factory, metrics: Metrics, protocol: str) -> None:
        self._factory = factory
        self._metrics = metrics
        self._protocol = protocol

    def buildProtocol(self, addr):
        p = self._factory.buildProtocol(addr)
        if p is not None:
            self._metrics.connectionOpened(self._protocol)
            lost = p.connectionLost
            metrics, name = self._metrics, self._protocol

            def connectionLost(reason, lost=lost):
                metrics.connectionClosed(name)
                if _isTLSFailure(reason):
                    metrics.tlsFailed(name)
                return lost(reason)

            p.connectionLost = connectionLost
        return p

    def __getattr__(self, name):
        return getattr(self._factory, name)


try:
    from OpenSSL.SSL import Error as _TLSError
except ImportError:  # pragma: no cover
    _TLSError = None


def _isTLSFailure(reason) -> bool:
    # What Failure.check(Error) answers, without its calls: the value is an instance of the type.
    return _TLSError is not None and isinstance(getattr(reason, "value", None), _TLSError)
