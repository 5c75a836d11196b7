"""
Tests for L{casd.service.sessioncounts}: the per-session metrics as plain counters render the same
exposition as C{prometheus_client}'s own metric objects, at a few calls per session.
"""

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.failures import AuthenticationFailed

from casd.service.metrics import _DURATION_BUCKETS, _LOGIN_BUCKETS, Metrics, resultLabel
from casd.testing import makeContext
from tests.support.calls import pythonCalls

EVENTS = [
    dict(protocol="imap", result="proxy(client closed)", bytesIn=26, bytesOut=363, duration=0.002),
    dict(protocol="imap", result="logout", bytesIn=10, bytesOut=0, duration=0.1),
    dict(protocol="pop3", result="AuthenticationFailed", bytesIn=0, bytesOut=0, duration=12.0),
    dict(protocol="imap", result="proxy, 2 message(s)", bytesIn=7, bytesOut=9, duration=99999.0),
    dict(protocol="smtp-x", result="line too long", bytesIn=-1, bytesOut=None, duration="bad"),
    dict(protocol="imap", result="logout", bytesIn=1, bytesOut=2, duration=1.0),
]
OPENED = ["imap", "imap", "pop3", "nope"]
#: (seconds the verdict took, whether it was a success)
LOGINS = [(0.001, True), (0.3, True), (0.003, False), (100.0, True)]
CLOSED = ["imap", "nope"]


def reference(protocols):
    """
    What prometheus_client's own Counter, Gauge and Histogram render for L{EVENTS}.
    """
    r = CollectorRegistry()
    connections = Counter("casd_connections", "Client connections accepted, by protocol.", ["protocol"], registry=r)
    sessions = Counter("casd_sessions", "Sessions ended, by protocol and result (the protocol log's result field).",
                       ["protocol", "result"], registry=r)
    active = Gauge("casd_sessions_active", "Client connections open now, by protocol.", ["protocol"], registry=r)
    relayed = Counter("casd_relayed_bytes",
                      "Bytes relayed, by protocol and direction (in: from clients, out: to clients).",
                      ["protocol", "direction"], registry=r)
    durations = Histogram("casd_session_duration_seconds", "Session durations, by protocol.", ["protocol"],
                          buckets=_DURATION_BUCKETS, registry=r)
    logins = Histogram("casd_login_seconds",
                       "Time from credentials received to the authentication verdict, by outcome.",
                       ["outcome"], buckets=_LOGIN_BUCKETS, registry=r)
    for took, ok in LOGINS:
        logins.labels("success" if ok else "failure").observe(took)
    for name in protocols:
        active.labels(name).set(0)
    bounded = lambda p: p if p in protocols else "other"  # noqa: E731
    for p in OPENED:
        connections.labels(bounded(p)).inc()
        active.labels(bounded(p)).inc()
    for p in CLOSED:
        active.labels(bounded(p)).dec()
    for e in EVENTS:
        p = bounded(e["protocol"])
        sessions.labels(p, resultLabel(e["result"])).inc()
        relayed.labels(p, "in").inc(max(0, int(e["bytesIn"] or 0)))
        relayed.labels(p, "out").inc(max(0, int(e["bytesOut"] or 0)))
        if isinstance(e["duration"], (int, float)) and e["duration"] >= 0:
            durations.labels(p).observe(e["duration"])
    return generate_latest(r).decode()


def normalised(text):
    """
    The exposition with the C{_created} times (when a label set was first counted) left out,
    its samples sorted within each metric.
    """
    text = re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", text)
    blocks, current = [], []
    for line in text.splitlines():
        if line.startswith("# HELP") and current:
            blocks.append(current)
            current = []
        current.append(line)
    blocks.append(current)
    return sorted([b[:2] + sorted(b[2:]) for b in blocks])


class SessionCountsTests(SynchronousTestCase):
    def setUp(self):
        self.context = makeContext(MemoryReactorClock(), users={"alice": "secret"})
        self.metrics = Metrics(self.context, ["imap", "pop3"])

    def feed(self):
        for p in OPENED:
            self.metrics.connectionOpened(p)
        for p in CLOSED:
            self.metrics.connectionClosed(p)
        for e in EVENTS:
            self.metrics.observe(dict(e, log_namespace="casd.session", user="alice"))
        self.assertEqual(self.metrics.clock.seconds(), 0)
        for took, ok in LOGINS:
            self.metrics.loginFinished(-took, None if ok else Failure(AuthenticationFailed("no")))

    def test_sameExposition(self):
        """
        The per-session families are what prometheus_client's own metric objects render: names,
        help, types, labels, buckets, values, C{_created} samples.
        """
        self.feed()
        mine = generate_latest(self.metrics.registry).decode()
        wanted = normalised(reference({"imap", "pop3"}))
        got = [b for b in normalised(mine) if any(b[0] == w[0] for w in wanted)]
        self.assertEqual(got, wanted)
        self.assertNotIn("alice", mine)

    def test_activeSessions(self):
        self.feed()
        self.assertEqual(self.metrics.activeSessions(), {"imap": 1, "pop3": 1})

    def test_fewCallsPerSession(self):
        """
        A session costs the metrics a handful of calls: the observer and the histogram's
        bisection; opening and closing a connection, one call each; a login's verdict, the
        clock, the histogram and the minute's list.
        """
        self.feed()
        event = dict(EVENTS[0], log_namespace="casd.session")
        for f, args, most in ((self.metrics.observe, (event,), 4),
                              (self.metrics.connectionOpened, ("imap",), 1),
                              (self.metrics.connectionClosed, ("imap",), 1),
                              (self.metrics.loginFinished, (self.metrics.clock.seconds(),), 7)):
            self.assertLessEqual(pythonCalls(f, *args), most, f)
