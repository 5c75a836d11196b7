"""
casd's server TLS on real sockets: ALPN (the protocol's ids accepted, none accepted, a foreign
one refused with the C{no_application_protocol} alert) and session resumption (TLS 1.2 and 1.3),
for implicit TLS and STARTTLS, with Python's C{ssl} and C{openssl s_client} as clients.
"""

import os
import socket
import ssl
import subprocess

from twisted.internet import defer, threads
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase

from casd.config import parseConfig
from casd.tls import ALPNRefused, ServerTLS, alpnProtocolsOf, alpnSelector
from tests.support.casdnode import CASNode
from tests.support.certs import CertificateAuthority
from tests.support.procs import freePort

#: Which listener of the node below is which: name -> (port key, STARTTLS dialect or None).
LISTENERS = ("imaps", "imap", "pop3", "sieve", "submissions", "smtp")

CONFIG = """
[auth]
users_file = "users"

[tls]
certificate = "{cert}"
key = "{key}"

[routing]
default_backend = "mbx"

[backends.mbx]
host = "127.0.0.1"

[health]
enabled = false

[imap]
[[imap.listen]]
endpoint = "tcp:{imaps}:interface=127.0.0.1"
tls = "implicit"
[[imap.listen]]
endpoint = "tcp:{imap}:interface=127.0.0.1"

[pop3]
enabled = true
[[pop3.listen]]
endpoint = "tcp:{pop3}:interface=127.0.0.1"

[managesieve]
enabled = true
[[managesieve.listen]]
endpoint = "tcp:{sieve}:interface=127.0.0.1"

[submission]
enabled = true
[[submission.listen]]
endpoint = "tcp:{submissions}:interface=127.0.0.1"
tls = "implicit"

[smtp]
enabled = true
[[smtp.listen]]
endpoint = "tcp:{smtp}:interface=127.0.0.1"
"""


def _readReply(sock, done) -> bytes:
    """
    Read until C{done(lastLine)} says the reply is complete.
    """
    data = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return data
        data += chunk
        if data.endswith(b"\r\n") and done(data[:-2].rsplit(b"\r\n", 1)[-1]):
            return data


def _readLine(sock) -> bytes:
    return _readReply(sock, lambda last: True)


def _smtpReply(sock) -> bytes:
    return _readReply(sock, lambda last: last[3:4] != b"-")


def _sieveReply(sock) -> bytes:
    return _readReply(sock, lambda last: last.startswith((b"OK", b"NO", b"BYE")))


def starttls(kind: str, sock) -> None:
    """
    Speak C{kind}'s plaintext preamble on C{sock} up to the point where TLS starts.
    """
    if kind == "imap":
        _readLine(sock)
        sock.sendall(b"s STARTTLS\r\n")
        assert _readLine(sock).startswith(b"s OK"), kind
    elif kind == "pop3":
        _readLine(sock)
        sock.sendall(b"STLS\r\n")
        assert _readLine(sock).startswith(b"+OK"), kind
    elif kind == "sieve":
        _sieveReply(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert _sieveReply(sock).startswith(b"OK"), kind
    elif kind == "smtp":
        _smtpReply(sock)
        sock.sendall(b"EHLO client.example\r\n")
        _smtpReply(sock)
        sock.sendall(b"STARTTLS\r\n")
        assert _smtpReply(sock).startswith(b"220"), kind
    else:
        raise ValueError(kind)


#: Listener -> how TLS starts: None (implicit) or the STARTTLS dialect; and the protocol's ALPN id.
KINDS = {
    "imaps": (None, "imap"),
    "imap": ("imap", "imap"),
    "pop3": ("pop3", "pop3"),
    "sieve": ("sieve", "managesieve"),
    "submissions": (None, "smtp"),
    "smtp": ("smtp", "smtp"),
}


class TLSNodeMixin:
    """
    One casd with an implicit-TLS and a STARTTLS listener of each kind.
    """

    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.ca = CertificateAuthority.create(self.directory)
        cert, key = self.ca.issue(["mail.example.com", "127.0.0.1"], "server")
        self.ports = {name: freePort() for name in LISTENERS}
        os.makedirs(os.path.join(self.directory, "node"))
        with open(os.path.join(self.directory, "node", "users"), "w") as f:
            f.write("alice:{PLAIN}pw\n")
        self.node = CASNode(
            os.path.join(self.directory, "node"), CONFIG.format(cert=cert, key=key, **self.ports)
        ).start()
        self.addCleanup(self.node.stop)

    def clientContext(self, alpn=None, version=None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca.caPath)
        context.check_hostname = False
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        if version is not None:
            context.minimum_version = context.maximum_version = version
        return context

    def handshake(self, listener: str, context: ssl.SSLContext, session=None):
        """
        Connect to C{listener}, start TLS as its protocol does, read one reply over TLS (so that
        TLS 1.3 tickets have arrived).

        @return: the C{SSLSocket}, closed.
        """
        dialect, _ = KINDS[listener]
        raw = socket.create_connection(("127.0.0.1", self.ports[listener]), timeout=10)
        try:
            if dialect is not None:
                starttls(dialect, raw)
            tls = context.wrap_socket(raw, server_hostname="mail.example.com", session=session)
            if dialect is None:
                tls.recv(4096)  # the greeting
            elif dialect == "smtp":
                tls.sendall(b"EHLO client.example\r\n")
                _smtpReply(tls)
            else:
                tls.sendall(b"x NOOP\r\n" if dialect == "imap" else b"NOOP\r\n")
                tls.recv(4096)
            return tls
        finally:
            raw.close()

    def inThread(self, f, *args):
        return threads.deferToThread(f, *args)


class ALPNTests(TLSNodeMixin, TestCase):
    """
    Every kind of TLS listener: the protocol's ALPN id is selected, a client without ALPN is
    served, a foreign id (C{http/1.1}: the ALPACA attack) is refused.
    """

    @defer.inlineCallbacks
    def test_matchingSelected(self):
        for listener, (_, alpnId) in KINDS.items():
            tls = yield self.inThread(self.handshake, listener, self.clientContext(["http/1.1", alpnId]))
            self.assertEqual(tls.selected_alpn_protocol(), alpnId, listener)

    @defer.inlineCallbacks
    def test_noALPNServed(self):
        for listener in KINDS:
            tls = yield self.inThread(self.handshake, listener, self.clientContext())
            self.assertIsNone(tls.selected_alpn_protocol(), listener)
            self.assertIn(tls.version(), ("TLSv1.2", "TLSv1.3"))

    @defer.inlineCallbacks
    def test_foreignRefused(self):
        for listener in KINDS:
            for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                context = self.clientContext(["http/1.1", "h2"], version)
                e = yield self.assertFailure(
                    self.inThread(self.handshake, listener, context), ssl.SSLError
                )
                self.assertIn("no application protocol", str(e).lower(), (listener, version))

    @defer.inlineCallbacks
    def test_otherProtocolsIdRefused(self):
        """
        Cross-protocol: POP3's id on the IMAP port is as foreign as HTTP's.
        """
        e = yield self.assertFailure(
            self.inThread(self.handshake, "imaps", self.clientContext(["pop3"])), ssl.SSLError
        )
        self.assertIn("no application protocol", str(e).lower())

    def s_client(self, listener, alpn, starttls=None):
        args = [
            "openssl", "s_client", "-connect", f"127.0.0.1:{self.ports[listener]}",
            "-servername", "mail.example.com", "-CAfile", self.ca.caPath, "-alpn", alpn,
        ]
        if starttls:
            args += ["-starttls", starttls]
        done = subprocess.run(args, input=b"", capture_output=True, timeout=20)
        return done.stdout.decode("utf-8", "replace") + done.stderr.decode("utf-8", "replace")

    @defer.inlineCallbacks
    def test_opensslClient(self):
        cases = [("imaps", None, "imap"), ("imap", "imap", "imap"), ("pop3", "pop3", "pop3"),
                 ("sieve", "sieve", "managesieve"), ("smtp", "smtp", "smtp"),
                 ("submissions", None, "smtp")]
        for listener, dialect, alpnId in cases:
            out = yield self.inThread(self.s_client, listener, alpnId, dialect)
            self.assertIn(f"ALPN protocol: {alpnId}", out, listener)
            out = yield self.inThread(self.s_client, listener, "http/1.1", dialect)
            self.assertIn("no application protocol", out, listener)
            self.assertNotIn("ALPN protocol:", out, listener)


class ResumptionTests(TLSNodeMixin, TestCase):
    """
    A reconnecting client resumes its TLS session instead of a full handshake: TLS 1.2 (session
    id, and ticket) and TLS 1.3 (ticket), implicit TLS and STARTTLS.
    """

    def resumes(self, listener, version, tickets=True):
        context = self.clientContext(version=version)
        if not tickets:
            context.options |= ssl.OP_NO_TICKET
        first = self.handshake(listener, context)
        self.assertFalse(first.session_reused)
        self.assertIsNotNone(first.session)
        second = self.handshake(listener, context, session=first.session)
        return second.session_reused

    @defer.inlineCallbacks
    def test_resumed(self):
        for listener in ("imaps", "imap", "pop3", "smtp"):
            for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
                reused = yield self.inThread(self.resumes, listener, version)
                self.assertTrue(reused, (listener, version))

    @defer.inlineCallbacks
    def test_sessionIdResumed(self):
        """
        TLS 1.2 without tickets: the server's session cache.
        """
        reused = yield self.inThread(self.resumes, "imaps", ssl.TLSVersion.TLSv1_2, False)
        self.assertTrue(reused)

    @defer.inlineCallbacks
    def test_notAcrossProtocols(self):
        """
        A session made on the IMAP port does not resume on the POP3 port: each protocol has its
        own session id context.
        """

        def crossed():
            context = self.clientContext(version=ssl.TLSVersion.TLSv1_2)
            first = self.handshake("imaps", context)
            return self.handshake("pop3", context, session=first.session).session_reused

        self.assertFalse((yield self.inThread(crossed)))


class _Greeter(Protocol):
    def connectionMade(self):
        self.transport.write(b"hello\r\n")


class ReloadTests(SynchronousTestCase):
    """
    L{ServerTLS.reload}: new certificates for new connections, through the options a listener
    keeps; an unusable file changes nothing.
    """

    def setUp(self):
        import shutil

        from casd.config import TLSConfig

        directory = os.path.abspath(self.mktemp())
        self.cas = [CertificateAuthority.create(os.path.join(directory, f"ca{i}"), name=f"CA {i}") for i in (1, 2)]
        self.cert, self.key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")

        def install(ca):
            cert, key = ca.issue(["127.0.0.1"], "front")
            shutil.copy(cert, self.cert)
            shutil.copy(key, self.key)

        self.install = install
        install(self.cas[0])
        self.config = TLSConfig(certificate=self.cert, key=self.key, minimumVersion="TLSv1.2", sni=())

    def issuer(self, options):
        from OpenSSL import SSL

        connection = SSL.Connection(options.getContext(), None)
        return connection.get_certificate().get_issuer().CN

    def test_reloadReachesKeptOptions(self):
        class IMAP:
            name = "imap"
            alpnProtocols = ("imap",)

        tls = ServerTLS(self.config)
        kept = tls.optionsFor(IMAP())
        before = self.issuer(kept)
        self.install(self.cas[1])
        self.assertTrue(tls.reload(self.config))
        self.assertNotEqual(self.issuer(kept), before)
        self.assertIs(tls.optionsFor(IMAP()), kept)

    def test_sameDescriptorAfterReload(self):
        """
        A listener's descriptor (asked at each STARTTLS) gets the same options, reloaded, and
        another descriptor of the same protocol the same ones too.
        """

        class IMAP:
            name = "imap"
            alpnProtocols = ("imap",)

        descriptor = IMAP()
        tls = ServerTLS(self.config)
        kept = tls.optionsFor(descriptor)
        self.assertIs(tls.optionsFor(descriptor), kept)
        before = self.issuer(tls.optionsFor(descriptor))
        self.install(self.cas[1])
        self.assertTrue(tls.reload(self.config))
        self.assertIs(tls.optionsFor(descriptor), kept)
        self.assertNotEqual(self.issuer(tls.optionsFor(descriptor)), before)
        self.assertIs(tls.optionsFor(IMAP()), kept)

    def test_unusableKeyChangesNothing(self):
        """
        A key file that does not parse is a one-line L{ConfigError}, at start and on reload.
        """
        from casd.config import ConfigError

        tls = ServerTLS(self.config)
        before = self.issuer(tls.options)
        with open(self.key, "w") as f:
            f.write("not a key\n")
        self.assertRaises(ConfigError, tls.reload, self.config)
        self.assertRaises(ConfigError, ServerTLS, self.config)
        self.assertEqual(self.issuer(tls.options), before)


    def test_clientCertificatesAsked(self):
        """
        With a client CA file, the protocol's context asks for a certificate without requiring
        one, names that file's CAs to the client, and is kept apart from the protocol's context
        without one; the CA file is read again at a reload; an unusable one is a L{ConfigError}.
        """
        from OpenSSL import SSL

        from casd.config import ConfigError

        class HTTP:
            name = "http"

        tls = ServerTLS(self.config)
        plain = tls.optionsFor(HTTP())
        asking = tls.optionsFor(HTTP(), self.cas[1].caPath)
        self.assertEqual(plain.getContext().get_verify_mode(), SSL.VERIFY_NONE)
        self.assertEqual(asking.getContext().get_verify_mode(), SSL.VERIFY_PEER | SSL.VERIFY_CLIENT_ONCE)
        names = SSL.Connection(asking.getContext(), None).get_client_ca_list()
        self.assertEqual([n.CN for n in names], ["CA 2"])
        self.assertIs(tls.optionsFor(HTTP(), self.cas[1].caPath), asking)
        with open(self.cas[1].caPath, "w") as f:
            f.write("not a certificate\n")
        self.assertRaises(ConfigError, tls.reload, self.config)
        self.assertRaises(ConfigError, tls.optionsFor, HTTP(), self.key)

    def test_clientCAFileOf(self):
        """
        A protocol without C{tlsClientCAFile} asks for no certificate; the HTTP front end asks
        when a vdir accepts C{cert}.
        """
        from casd.config import Values
        from casd.tls import clientCAFileOf
        from protocols.http import http

        self.assertEqual(clientCAFileOf(object(), None), "")
        section = Values({"vdir": [Values({"auth": ("basic",)})], "client_ca_file": "cas.pem"})
        self.assertEqual(clientCAFileOf(http, section), "")
        section = Values({"vdir": [Values({"auth": ("basic",)}), Values({"auth": ("Forms", "CERT")})], "client_ca_file": "cas.pem"})
        self.assertEqual(clientCAFileOf(http, section), "cas.pem")


class ContextTests(SynchronousTestCase):
    def test_selector(self):
        select = alpnSelector((b"imap",))
        self.assertEqual(select(None, [b"http/1.1", b"imap"]), b"imap")
        self.assertRaises(ALPNRefused, select, None, [b"http/1.1"])

    def test_noIdsIgnoresALPN(self):
        """
        A plugin that declares no ALPN ids: the client's ALPN is ignored, not refused.
        """
        from OpenSSL import SSL

        select = alpnSelector(())
        self.assertIs(select(None, [b"http/1.1"]), SSL.NO_OVERLAPPING_PROTOCOLS)

    def test_alpnProtocolsOf(self):
        class Old:
            name = "old"

        class New:
            name = "new"
            alpnProtocols = ("new", "new/2")

        self.assertEqual(alpnProtocolsOf(Old()), ())
        self.assertEqual(alpnProtocolsOf(New()), (b"new", b"new/2"))

    def test_builtinsDeclare(self):
        from protocols.imap import imap
        from protocols.managesieve import managesieve
        from protocols.pop3 import pop3
        from protocols.smtpmx import smtp
        from protocols.submission import submission

        self.assertEqual(
            [alpnProtocolsOf(p) for p in (imap, pop3, managesieve, smtp, submission)],
            [(b"imap",), (b"pop3",), (b"managesieve",), (b"smtp",), (b"smtp",)],
        )


class PluginWithoutALPNTests(TestCase):
    """
    A listener of a plugin that predates C{alpnProtocols} serves a client offering any ALPN.
    """

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        self.ca = CertificateAuthority.create(directory)
        cert, key = self.ca.issue(["mail.example.com"], "server")
        config = parseConfig(f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n', "casd.toml", [])

        class Old:
            name = "old"

        from twisted.internet import reactor

        options = ServerTLS(config.tls).optionsFor(Old())
        factory = TLSMemoryBIOFactory(options, False, Factory.forProtocol(_Greeter))
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_anyALPNServed(self):
        def connect():
            context = ssl.create_default_context(cafile=self.ca.caPath)
            context.check_hostname = False
            context.set_alpn_protocols(["http/1.1"])
            raw = socket.create_connection(("127.0.0.1", self.port.getHost().port), timeout=10)
            with context.wrap_socket(raw) as tls:
                return tls.recv(100), tls.selected_alpn_protocol()

        greeting, selected = yield threads.deferToThread(connect)
        self.assertEqual((greeting, selected), (b"hello\r\n", None))


class TicketKeyFileTests(SynchronousTestCase):
    """
    The C{[tls] ticket_keys} file: one 80-byte key a line in hex, first encrypting; bad files
    are one configuration error line that quotes no key.
    """

    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_keys(self):
        from casd.ticketkeys import readKeyFile

        first, second = os.urandom(80), os.urandom(80)
        keys = readKeyFile(self.write(f"# rotated 2026-12-01\n{first.hex()}\n\n{second.hex().upper()}\n"))
        self.assertEqual([(k.name, k.hmac, k.aes) for k in keys],
                         [(first[:16], first[16:48], first[48:]), (second[:16], second[16:48], second[48:])])
        self.assertNotIn(first[:16].hex(), repr(keys[0]))

    def test_badFiles(self):
        from casd.ticketkeys import TicketKeyError, readKeyFile

        secret = os.urandom(40).hex()
        for text, fragment in [
            ("", "at least one key"),
            (secret + "\n", "line 1: expected 160 hexadecimal digits"),
            ("zz" * 80 + "\n", "line 1: expected 160"),
            (("ab" * 80 + "\n") * 2, "same name"),
        ]:
            e = self.assertRaises(TicketKeyError, readKeyFile, self.write(text))
            self.assertIn(fragment, str(e))
            self.assertNotIn(secret, str(e))
        self.assertRaises(TicketKeyError, readKeyFile, self.mktemp())

    def test_configurationError(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca = CertificateAuthority.create(directory)
        cert, key = ca.issue(["mail.example.com"], "server")
        secret = os.urandom(40).hex()
        keys = self.write(secret + "\n")
        from casd.config import ConfigError

        e = self.assertRaises(
            ConfigError,
            parseConfig,
            f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\nticket_keys = "{keys}"\n',
            "casd.toml",
            [],
        )
        self.assertEqual(e.key, "tls.ticket_keys")
        self.assertNotIn(secret, str(e))
        self.assertNotIn("\n", str(e))

    def test_reachable(self):
        """
        With the cryptography wheels casd is tested on (x86-64 Linux, whose extension module
        keeps its symbol table), the ticket key callback is reachable: this fails loudly when a
        cryptography release changes that, rather than leaving resumption silently per-process.
        """
        from casd.ticketkeys import installable

        self.assertIsNone(installable())


class _Backend(Protocol):
    def connectionMade(self):
        self.transport.write(b"* OK backend\r\n")


class _Recorder(Protocol):
    def __init__(self, done):
        self.done = done
        self.received = b""

    def dataReceived(self, data):
        self.received += data
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.done.callback((self.received, reason))


class BackendCertificateTests(TestCase):
    """
    casd's client TLS towards backends refuses a certificate without a usable subjectAltName,
    even one issued by a trusted CA: Twisted's own check logs it as a critical traceback and lets
    the handshake go on (so a certificate for any other name would be accepted).
    """

    def backendWith(self, sans, commonName="mbx.test"):
        import datetime

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
        from twisted.internet import reactor
        from twisted.internet.ssl import PrivateCertificate

        directory = os.path.abspath(self.mktemp())
        self.ca = CertificateAuthority.create(directory)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, commonName)]))
            .issuer_name(self.ca.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=5))
        )
        if sans:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), critical=False
            )
        cert = builder.sign(self.ca._key, hashes.SHA256())
        pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        options = PrivateCertificate.loadPEM(pem).options()
        port = reactor.listenSSL(0, Factory.forProtocol(_Backend), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @defer.inlineCallbacks
    def connect(self, port, name):
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
        from twisted.logger import LogLevel, globalLogPublisher

        from casd.tls import ClientTLS

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        done = defer.Deferred()
        endpoint = wrapClientTLS(
            ClientTLS(self.ca.caPath).optionsFor(name), TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        )
        yield endpoint.connect(Factory.forProtocol(lambda: _Recorder(done)))
        received, reason = yield done
        loud = [e for e in events if e.get("log_level") >= LogLevel.error or e.get("log_failure")]
        return received, reason, loud

    @defer.inlineCallbacks
    def test_noSubjectAltNameRefused(self):
        from casd.tls import BackendCertificateError

        port = self.backendWith([], commonName="mbx.test")
        received, reason, loud = yield self.connect(port, "mbx.test")
        self.assertEqual(received, b"")
        self.assertTrue(reason.check(BackendCertificateError))
        self.assertIn("not usable for 'mbx.test'", reason.getErrorMessage())
        self.assertEqual(loud, [])

    @defer.inlineCallbacks
    def test_goodCertificateAccepted(self):
        port = self.backendWith(["mbx.test"])
        received, reason, loud = yield self.connect(port, "mbx.test")
        self.assertEqual((received, loud), (b"* OK backend\r\n", []))

    @defer.inlineCallbacks
    def test_wrongNameRefused(self):
        from casd.tls import BackendCertificateError

        port = self.backendWith(["other.test"])
        received, reason, loud = yield self.connect(port, "mbx.test")
        self.assertEqual(received, b"")
        self.assertTrue(reason.check(BackendCertificateError))
        self.assertEqual(loud, [])


class SNITests(TestCase):
    """
    A client asking for a C{[[tls.sni]]} name gets that certificate, under the same ALPN rule
    and resumption as the default one.
    """

    def setUp(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(directory, "node"))
        self.ca = CertificateAuthority.create(directory)
        cert, key = self.ca.issue(["mail.example.com"], "default")
        otherCert, otherKey = self.ca.issue(["mail.example.org"], "other")
        with open(os.path.join(directory, "node", "users"), "w") as f:
            f.write("alice:{PLAIN}pw\n")
        self.port = freePort()
        config = (
            f'[auth]\nusers_file = "users"\n[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
            f'[[tls.sni]]\nnames = ["mail.example.org"]\ncertificate = "{otherCert}"\nkey = "{otherKey}"\n'
            '[routing]\ndefault_backend = "mbx"\n[backends.mbx]\nhost = "127.0.0.1"\n'
            "[health]\nenabled = false\n"
            f'[[imap.listen]]\nendpoint = "tcp:{self.port}:interface=127.0.0.1"\ntls = "implicit"\n'
        )
        self.node = CASNode(os.path.join(directory, "node"), config).start()
        self.addCleanup(self.node.stop)

    def connect(self, context, name, session=None):
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        with context.wrap_socket(raw, server_hostname=name, session=session) as tls:
            tls.recv(100)
            subject = dict(x[0] for x in tls.getpeercert()["subject"])["commonName"]
            return tls.selected_alpn_protocol(), tls.session_reused, tls.session, subject

    @defer.inlineCallbacks
    def test_sniName(self):
        def scenario():
            context = ssl.create_default_context(cafile=self.ca.caPath)
            context.set_alpn_protocols(["imap"])
            first = self.connect(context, "mail.example.org")
            second = self.connect(context, "mail.example.org", first[2])
            refusing = ssl.create_default_context(cafile=self.ca.caPath)
            refusing.set_alpn_protocols(["http/1.1"])
            try:
                self.connect(refusing, "mail.example.org")
                refused = None
            except ssl.SSLError as e:
                refused = str(e)
            return first[0], first[3], second[1], refused

        selected, subject, reused, refused = yield threads.deferToThread(scenario)
        self.assertEqual((selected, subject, reused), ("imap", "mail.example.org", True))
        self.assertIn("no application protocol", refused.lower())


class SNIConfigTests(SynchronousTestCase):
    def test_tableAndArray(self):
        """
        C{[[tls.sni]]} (an array of tables, as documented) and a single C{[tls.sni]} table (as
        the documentation once showed) both give one SNI certificate.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        ca = CertificateAuthority.create(directory)
        cert, key = ca.issue(["mail.example.com"], "default")
        other, otherKey = ca.issue(["mail.example.org"], "other")
        base = f'[tls]\ncertificate = "{cert}"\nkey = "{key}"\n'
        entry = f'names = ["Mail.Example.org"]\ncertificate = "{other}"\nkey = "{otherKey}"\n'
        for header in ("[[tls.sni]]", "[tls.sni]"):
            config = parseConfig(base + header + "\n" + entry, "casd.toml", [])
            self.assertEqual([s.names for s in config.tls.sni], [("mail.example.org",)], header)
