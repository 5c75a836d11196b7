# -*- test-case-name: tests.test_metrics -*-
"""
The per-session metrics (connections, open sessions, sessions ended, bytes relayed, session
durations, login latencies) as plain counters, a few dictionary operations per session, rendered as Prometheus
families at scrape time: the same names, labels, help texts and samples as C{prometheus_client}'s
C{Counter}, C{Gauge} and C{Histogram} give (C{_total}, C{_created}, C{_bucket}, C{_count},
C{_sum}), without their per-update Python calls (label look-up, lock, checks).

Updated from the reactor thread only (the session line's observer, the listening factories).
"""

from __future__ import annotations

import bisect
import time

from prometheus_client import metrics as _prometheusMetrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


class _Counts(dict):
    """
    Label values -> value, with the time each label set was first counted (C{_created}).
    """

    def __init__(self, now) -> None:
        super().__init__()
        self.created: dict = {}
        self.now = now

    def __missing__(self, key):
        self.created[key] = self.now()
        self[key] = 0
        return 0


class PlainHistogram(dict):
    """
    A histogram by one label: label value -> C{[count per bucket..., count, sum]} (the bucket
    counts not cumulative), with the time each label value was first observed.
    """

    def __init__(self, name: str, text: str, label: str, buckets, now=time.time) -> None:
        super().__init__()
        self.name = name
        self.text = text
        self.label = label
        self.buckets = tuple(buckets)
        self.created: dict = {}
        self.now = now

    def observe(self, key: str, value: float) -> None:
        try:
            counts = self[key]
        except KeyError:
            counts = self[key] = [0] * (len(self.buckets) + 3)
            self.created[key] = self.now()
        # The first bucket whose bound is >= the value ("le"); past the last: +Inf.
        counts[bisect.bisect_left(self.buckets, value)] += 1
        counts[-2] += 1
        counts[-1] += value

    def family(self, created: bool) -> HistogramMetricFamily:
        histogram = HistogramMetricFamily(self.name, self.text, labels=[self.label])
        for key, counts in sorted(self.items()):
            cumulative, buckets = 0, []
            for bound, count in zip(self.buckets + (float("inf"),), counts):
                cumulative += count
                buckets.append((floatToGoString(bound), cumulative))
            histogram.add_metric([key], buckets, counts[-1])
            if created:
                histogram.samples.append(Sample(self.name + "_created", {self.label: key}, self.created[key]))
        return histogram


class SessionCounts:
    """
    The counters, and a collector (L{collect}) for a C{CollectorRegistry}.

    @ivar connections: protocol -> connections accepted.
    @ivar active: protocol -> connections open now.
    @ivar sessions: C{(protocol, result)} -> sessions ended.
    @ivar bytes: C{(protocol, direction)} -> bytes relayed.
    @ivar durations: the session durations by protocol (a L{PlainHistogram}).
    @ivar logins: the login latencies by outcome (a L{PlainHistogram}).
    """

    def __init__(self, durationBuckets, loginBuckets, now=time.time) -> None:
        self.connections = _Counts(now)
        self.active: dict = {}
        self.sessions = _Counts(now)
        self.bytes = _Counts(now)
        self.durations = PlainHistogram(
            "casd_session_duration_seconds", "Session durations, by protocol.", "protocol", durationBuckets, now
        )
        self.logins = PlainHistogram(
            "casd_login_seconds", "Time from credentials received to the authentication verdict, by outcome.",
            "outcome", loginBuckets, now,
        )

    def describe(self):
        return []

    def collect(self):
        created = getattr(_prometheusMetrics, "_use_created", True)
        yield self._counter(
            "casd_connections", "Client connections accepted, by protocol.", ["protocol"], self.connections,
            created, single=True,
        )
        yield self._counter(
            "casd_sessions", "Sessions ended, by protocol and result (the protocol log's result field).",
            ["protocol", "result"], self.sessions, created,
        )
        active = GaugeMetricFamily("casd_sessions_active", "Client connections open now, by protocol.",
                                   labels=["protocol"])
        for protocol, value in sorted(self.active.items()):
            active.add_metric([protocol], value)
        yield active
        yield self._counter(
            "casd_relayed_bytes", "Bytes relayed, by protocol and direction (in: from clients, out: to clients).",
            ["protocol", "direction"], self.bytes, created,
        )
        yield self.durations.family(created)
        yield self.logins.family(created)

    @staticmethod
    def _counter(name, text, labels, counts: _Counts, created: bool, single: bool = False):
        family = CounterMetricFamily(name, text, labels=labels)
        for key, value in sorted(counts.items()):
            family.add_metric([key] if single else list(key), value,
                              created=counts.created[key] if created else None)
        return family
