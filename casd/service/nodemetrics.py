# -*- test-case-name: tests.test_nodemetrics -*-
"""
The node's metrics under C{--workers N}: each worker sends its metric families to the parent as
plain JSON-able lists (L{familiesOf}), and the parent merges them into the node's
(L{mergeFamilies}) and renders them (L{NodeCollector}).

A family is C{[name, type, help, unit, samples]}, a sample C{[name, labels, value]}.  Merging
adds the values of the same sample (same name and labels) across workers: counters, histograms
and gauges that are counts (open sessions, cache entries, penalties).  The few gauges that are
not counts say how the node's value is made (L{GAUGE_RULES}), and C{_created} samples take the
earliest.
"""

from __future__ import annotations

import operator

from prometheus_client.metrics_core import Metric

#: Gauges that are not counts -> how the node's value is made from its workers' values.
GAUGE_RULES = {
    # The node runs casd's version if any worker does; started when its first worker did.
    "casd_info": max,
    "casd_start_time_seconds": min,
    # A member is UP for the node when a worker can reach it (each worker checks it).
    "casd_backend_up": max,
    "casd_draining": max,
    # The shared state is available to the node only when it is to every worker.
    "casd_shared_state_available": min,
}

#: Families whose values only grow while a process lives: kept for a worker that ended.
_GROWING = frozenset(("counter", "histogram", "summary"))

#: Sample suffixes in the order Prometheus expects within one label set of a histogram.
_SUFFIX_ORDER = {"_bucket": 0, "_count": 1, "_sum": 2, "_gcount": 1, "_gsum": 2, "_created": 3}


def familiesOf(registry) -> list:
    """
    @param registry: a L{prometheus_client.CollectorRegistry} (or any object with C{collect()}).
    @return: its families as JSON-able lists (exemplars and timestamps left out).
    """
    return [
        [family.name, family.type, family.documentation, family.unit,
         [[sample.name, dict(sample.labels), sample.value] for sample in family.samples]]
        for family in registry.collect()
    ]


def _combiner(name: str, kind: str, sampleName: str):
    if sampleName.endswith("_created"):
        return min
    if kind == "gauge":
        return GAUGE_RULES.get(name, operator.add)
    if kind in ("info", "stateset"):
        return max
    return operator.add


def mergeFamilies(sources) -> list:
    """
    @param sources: lists of families (L{familiesOf}), one per worker.
    @return: the merged families, in the order first met; within a family, the samples grouped
        by label set (a histogram's buckets, then its count and sum).  A family whose type
        differs between sources keeps the first type met, and the samples of that type only.
    """
    merged: dict = {}
    for families in sources:
        for name, kind, text, unit, samples in families:
            entry = merged.get(name)
            if entry is None:
                entry = merged[name] = [name, kind, text, unit, {}]
            elif entry[1] != kind:
                continue
            values = entry[4]
            for sampleName, labels, value in samples:
                key = (sampleName, tuple(sorted(labels.items())))
                if key in values:
                    values[key] = _combiner(name, kind, sampleName)(values[key], value)
                else:
                    values[key] = value
    return [
        [name, kind, text, unit, [[s, dict(labels), v] for (s, labels), v in sorted(values.items(), key=_sampleOrder)]]
        for name, kind, text, unit, values in merged.values()
    ]


def _sampleOrder(item):
    (sampleName, labels), _ = item
    group = tuple(pair for pair in labels if pair[0] != "le")
    suffix = next((order for suffix, order in _SUFFIX_ORDER.items() if sampleName.endswith(suffix)), 0)
    le = next((float(value) for key, value in labels if key == "le"), 0.0)
    return (group, suffix, le, sampleName)


def growing(families) -> list:
    """
    @return: the families whose values only grow (counters, histograms), without their
        C{_created} samples: what the parent keeps of a worker that ended, so that the node's
        counters do not fall back when it does.
    """
    return [
        [name, kind, text, unit, [s for s in samples if not s[0].endswith("_created")]]
        for name, kind, text, unit, samples in families
        if kind in _GROWING
    ]


class NodeCollector:
    """
    Renders families (L{mergeFamilies}) through C{prometheus_client.generate_latest}.
    """

    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        for name, kind, text, unit, samples in self.families:
            metric = Metric(name, text, kind, unit)
            for sampleName, labels, value in samples:
                metric.add_sample(sampleName, labels, value)
            yield metric
