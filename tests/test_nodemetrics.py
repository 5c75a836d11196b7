"""
Tests for L{casd.service.nodemetrics}: the workers' metric families merged into the node's.
"""

import json

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from casd.service.metrics import Metrics
from casd.service.nodemetrics import NodeCollector, familiesOf, growing, mergeFamilies
from casd.testing import makeContext


def session(protocol="imap", result="proxy", bytesIn=10, bytesOut=100, duration=2.0):
    return dict(log_namespace="casd.session", protocol=protocol, result=result, bytesIn=bytesIn,
                bytesOut=bytesOut, duration=duration)


def parse(families) -> dict:
    """
    Render C{families} as C{/metrics} does and read the text back as Prometheus would.

    @return: C{(sample name, sorted labels)} -> value.
    """
    text = generate_latest(NodeCollector(families)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class MergeTests(SynchronousTestCase):
    def setUp(self):
        self.workers = []
        for _ in range(2):
            reactor = MemoryReactorClock()
            metrics = Metrics(makeContext(reactor, users={"alice": "pw"}), ["imap", "pop3"])
            self.workers.append(metrics)

    def families(self):
        # Through JSON, as they travel from the workers to the parent.
        return [json.loads(json.dumps(familiesOf(m.registry))) for m in self.workers]

    def test_countersAndCountsSummed(self):
        """
        Sessions, bytes, connections, open sessions and the histograms' buckets, counts and sums
        are the workers' added up.
        """
        one, two = self.workers
        for _ in range(3):
            one.observe(session())
        two.observe(session(bytesIn=5, duration=100.0))
        two.observe(session(protocol="pop3", result="logout"))
        one.connectionOpened("imap")
        two.connectionOpened("imap")
        two.connectionOpened("imap")
        two.connectionClosed("imap")
        node = parse(mergeFamilies(self.families()))
        self.assertEqual(node["casd_sessions_total", (("protocol", "imap"), ("result", "proxy"))], 4)
        self.assertEqual(node["casd_sessions_total", (("protocol", "pop3"), ("result", "logout"))], 1)
        self.assertEqual(node["casd_relayed_bytes_total", (("direction", "in"), ("protocol", "imap"))], 35)
        self.assertEqual(node["casd_connections_total", (("protocol", "imap"),)], 3)
        self.assertEqual(node["casd_sessions_active", (("protocol", "imap"),)], 2)
        self.assertEqual(node["casd_session_duration_seconds_count", (("protocol", "imap"),)], 4)
        self.assertEqual(node["casd_session_duration_seconds_sum", (("protocol", "imap"),)], 106.0)
        self.assertEqual(node["casd_session_duration_seconds_bucket", (("le", "10.0"), ("protocol", "imap"))], 3)
        self.assertEqual(node["casd_session_duration_seconds_bucket", (("le", "+Inf"), ("protocol", "imap"))], 4)

    def test_gaugesThatAreNotCounts(self):
        """
        The version is 1, not the number of workers; the start time and each C{_created} are the
        earliest; a backend member is UP when a worker sees it UP.
        """
        one, two = self.workers
        one.observe(session())
        two.observe(session())
        one.up.set(1000.0)
        two.up.set(900.0)
        families = self.families()
        for family in families[1]:
            if family[0] == "casd_sessions":
                for sample in family[4]:
                    if sample[0] == "casd_sessions_created":
                        sample[2] = 5.0
        node = parse(mergeFamilies(families))
        self.assertEqual([v for (name, _), v in node.items() if name == "casd_info"], [1.0])
        self.assertEqual(node["casd_start_time_seconds", ()], 900.0)
        self.assertEqual(node["casd_sessions_created", (("protocol", "imap"), ("result", "proxy"))], 5.0)
        self.assertEqual(node["casd_draining", ()], 0)
        up = [
            [["casd_backend_up", "gauge", "up", "", [["casd_backend_up", {"backend": "b"}, value]]]]
            for value in (0, 1, 0)
        ]
        self.assertEqual(mergeFamilies(up)[0][4], [["casd_backend_up", {"backend": "b"}, 1]])

    def test_histogramGroupedByLabelSet(self):
        """
        A label set only one worker has is rendered whole, its buckets before its count and sum,
        not after the other label set's samples (which Prometheus would refuse).
        """
        one, two = self.workers
        one.observe(session(protocol="imap"))
        two.observe(session(protocol="pop3"))
        merged = mergeFamilies(self.families())
        (durations,) = [f for f in merged if f[0] == "casd_session_duration_seconds"]
        protocols = [s[1]["protocol"] for s in durations[4]]
        self.assertEqual(protocols, sorted(protocols))
        imap = [s[0] for s in durations[4] if s[1]["protocol"] == "imap"]
        self.assertEqual(imap[-3:], ["casd_session_duration_seconds_count", "casd_session_duration_seconds_sum",
                                     "casd_session_duration_seconds_created"])
        buckets = [float(s[1]["le"]) for s in durations[4] if s[0].endswith("_bucket") and s[1]["protocol"] == "imap"]
        self.assertEqual(buckets, sorted(buckets))

    def test_typeMismatchKeepsTheFirst(self):
        first = [["x", "counter", "x", "", [["x_total", {}, 2]]]]
        second = [["x", "gauge", "x", "", [["x", {}, 7]]]]
        self.assertEqual(mergeFamilies([first, second]), first)

    def test_growing(self):
        """
        What is kept of a worker that ended: its counters and histograms, without their
        C{_created} samples; no gauge.
        """
        self.workers[0].observe(session())
        self.workers[0].connectionOpened("imap")
        kept = growing(self.families()[0])
        names = {f[0] for f in kept}
        self.assertIn("casd_sessions", names)
        self.assertIn("casd_session_duration_seconds", names)
        self.assertNotIn("casd_sessions_active", names)
        self.assertNotIn("casd_info", names)
        self.assertFalse([s for f in kept for s in f[4] if s[0].endswith("_created")])
        # Kept and live merged: the node's count does not fall back.
        self.workers[1].observe(session())
        node = parse(mergeFamilies([kept, self.families()[1]]))
        self.assertEqual(node["casd_sessions_total", (("protocol", "imap"), ("result", "proxy"))], 2)
