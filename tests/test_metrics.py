"""
Tests for L{casd.service.metrics}: what the admin listener's C{/metrics} counts, and that no label
carries a user or an address.
"""

from prometheus_client import generate_latest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from casd.auth.sasl import Credentials
from casd.failures import AuthenticationFailed, DirectoryUnavailable
from casd.service.metrics import Metrics, resultLabel
from casd.session.clientinfo import ClientInfo
from casd.testing import makeContext


def sample(metrics, name, labels=None):
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def client(host="198.51.100.7"):
    return ClientInfo("s1", "imap", "l", host, 4000, "127.0.0.1", 143, False, False)


class SessionEventTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, users={"alice": "secret"})
        self.metrics = Metrics(self.context, ["imap", "pop3"])

    def event(self, **fields):
        event = dict(
            log_namespace="casd.session",
            protocol="imap",
            result="proxy",
            bytesIn=10,
            bytesOut=2000,
            duration=3.5,
            user="alice",
            client="198.51.100.7:4000",
        )
        event.update(fields)
        return event

    def test_sessionCounted(self):
        """
        An end-of-session event counts one session by protocol and result, its bytes each way and
        its duration.
        """
        self.metrics.observe(self.event())
        self.metrics.observe(self.event(result="AuthenticationFailed", bytesIn=0, bytesOut=0))
        self.assertEqual(sample(self.metrics, "casd_sessions_total", {"protocol": "imap", "result": "proxy"}), 1)
        self.assertEqual(
            sample(self.metrics, "casd_sessions_total", {"protocol": "imap", "result": "authenticationfailed"}), 1
        )
        self.assertEqual(sample(self.metrics, "casd_relayed_bytes_total", {"protocol": "imap", "direction": "in"}), 10)
        self.assertEqual(sample(self.metrics, "casd_relayed_bytes_total", {"protocol": "imap", "direction": "out"}), 2000)
        self.assertEqual(sample(self.metrics, "casd_session_duration_seconds_count", {"protocol": "imap"}), 2)

    def test_otherEventsIgnored(self):
        """
        Only the protocol log's events count.
        """
        self.metrics.observe(self.event(log_namespace="casd.auth"))
        self.metrics.observe({"log_namespace": "casd.session"})
        self.assertEqual(sample(self.metrics, "casd_sessions_total", {"protocol": "imap", "result": "proxy"}), 0)

    def test_noUnboundedLabels(self):
        """
        A user name, a client address or an unknown protocol never becomes a label value.
        """
        self.metrics.observe(self.event(protocol="alice@example.com", result="proxy(alice 198.51.100.7)"))
        text = generate_latest(self.metrics.registry).decode()
        self.assertNotIn("alice", text)
        self.assertNotIn("198.51.100.7", text)
        self.assertEqual(sample(self.metrics, "casd_sessions_total", {"protocol": "other", "result": "proxy"}), 1)

    def test_resultLabel(self):
        self.assertEqual(resultLabel("proxy(backend lost)"), "proxy")
        self.assertEqual(resultLabel("proxy, 2 message(s)"), "proxy")
        self.assertEqual(resultLabel("line too long"), "line_too_long")
        self.assertEqual(resultLabel("x" * 80), "other")
        self.assertEqual(resultLabel(None), "other")
        self.assertEqual(resultLabel("a\nb"), "other")


class LoginTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.context = makeContext(self.reactor, users={"alice": "secret"})
        self.metrics = Metrics(self.context, ["imap"])
        self.context.authenticator.metrics = self.metrics

    def test_loginLatencyAndFailures(self):
        """
        Logins through the shared authenticator are timed; failures are counted by reason, and the
        dashboard's one-minute rate sees both.
        """
        ok = self.context.authenticator.login(Credentials("alice", b"secret"), client())
        self.assertEqual(self.successResultOf(ok).login, "alice")
        bad = self.context.authenticator.login(Credentials("alice", b"wrong"), client())
        self.reactor.advance(10)
        self.failureResultOf(bad, AuthenticationFailed)
        self.assertEqual(sample(self.metrics, "casd_login_seconds_count", {"outcome": "success"}), 1)
        self.assertEqual(sample(self.metrics, "casd_login_seconds_count", {"outcome": "failure"}), 1)
        self.assertEqual(sample(self.metrics, "casd_auth_failures_total", {"reason": "bad_credentials"}), 1)
        self.assertEqual(self.metrics.loginRate(), {"logins": 1, "failures": 1, "window": 60})
        self.reactor.advance(61)
        self.assertEqual(self.metrics.loginRate(), {"logins": 0, "failures": 0, "window": 60})
        text = generate_latest(self.metrics.registry)
        self.assertNotIn(b"secret", text)
        self.assertNotIn(b"wrong", text)

    def test_reasonOfTemporaryFailure(self):
        self.metrics.loginFinished(self.reactor.seconds(), Failure(DirectoryUnavailable("down")))
        self.assertEqual(sample(self.metrics, "casd_auth_failures_total", {"reason": "directory_unavailable"}), 1)

    def test_coreCounters(self):
        """
        The penalty's state is read at scrape time.
        """
        d = self.context.authenticator.login(Credentials("alice", b"wrong"), client())
        self.reactor.advance(10)
        self.failureResultOf(d)
        self.assertEqual(sample(self.metrics, "casd_penalties", {"kind": "address"}), 1)
        self.assertEqual(sample(self.metrics, "casd_draining"), 0)
        self.metrics.draining = lambda: True
        self.assertEqual(sample(self.metrics, "casd_draining"), 1)


class _Echo(Protocol):
    lost = None

    def connectionLost(self, reason):
        self.lost = reason


class CountingFactoryTests(SynchronousTestCase):
    def test_connectionsCountedAndProtocolUnwrapped(self):
        """
        The counting factory counts accepted and closed connections and returns the wrapped
        factory's own protocol, so that the session path pays nothing per event.
        """
        metrics = Metrics(makeContext(MemoryReactorClock()), ["imap"])
        inner = Factory.forProtocol(_Echo)
        factory = metrics.counting(inner, "imap")
        p = factory.buildProtocol(None)
        self.assertIsInstance(p, _Echo)
        p.makeConnection(StringTransport())
        self.assertEqual(sample(metrics, "casd_connections_total", {"protocol": "imap"}), 1)
        self.assertEqual(sample(metrics, "casd_sessions_active", {"protocol": "imap"}), 1)
        p.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(sample(metrics, "casd_sessions_active", {"protocol": "imap"}), 0)
        self.assertIsNotNone(p.lost)
        self.assertEqual(sample(metrics, "casd_tls_handshake_failures_total", {"protocol": "imap"}), 0)

    def test_tlsFailureCounted(self):
        from OpenSSL.SSL import Error

        metrics = Metrics(makeContext(MemoryReactorClock()), ["imap"])
        p = metrics.counting(Factory.forProtocol(_Echo), "imap").buildProtocol(None)
        p.makeConnection(StringTransport())
        p.connectionLost(Failure(Error([("SSL routines", "", "wrong version number")])))
        self.assertEqual(sample(metrics, "casd_tls_handshake_failures_total", {"protocol": "imap"}), 1)


class SharedStateMetricsTests(SynchronousTestCase):
    def test_stateStats(self):
        """
        The shared state's availability and fallbacks are exported, with the backend as label.
        """
        from attr import evolve

        from casd.state import StateStats

        class State:
            stats = StateStats(backend="redis", available=False, outages=1, fallbacks=7, calls=20)

        context = evolve(makeContext(MemoryReactorClock()), state=State())
        metrics = Metrics(context, ["imap"])
        self.assertEqual(sample(metrics, "casd_shared_state_available", {"backend": "redis"}), 0)
        self.assertEqual(sample(metrics, "casd_shared_state_fallbacks_total"), 7)
        self.assertEqual(sample(metrics, "casd_shared_state_outages_total"), 1)
        self.assertEqual(sample(metrics, "casd_shared_state_calls_total"), 20)
