"""
The LDAP checker and its connection pool against ldaptor's in-memory server, over iosim on a
MemoryReactorClock: search-then-bind, direct bind, attributes, escaping, timeouts, garbage,
dropped connections, failover, StartTLS, one bind in flight per connection.
"""

from __future__ import annotations

import io

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer, protocol
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import components
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from ldaptor import inmemory, interfaces as ldapinterfaces
from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldapserver

from casd.auth import UnknownUser, UserRecord
from casd.auth.ldap import AttributeMap, LDAPChecker, SettingProblem, checkSettings
from casd.auth.ldapclient import (
    DirectoryEntry,
    IDirectoryClient,
    LDAPConnectionPool,
    LDAPURL,
    PoolSettings,
)
from casd.auth.ldapfilter import (
    DNTemplate,
    FilterTemplate,
    TemplateError,
    checkLogin,
    escapeDNValue,
    escapeFilterValue,
    filterText,
)
from casd.config import LDAP_SETTINGS, Values
from casd.failures import DirectoryUnavailable
from casd.interfaces import IUserDirectory
from casd.auth.sasl import Credentials
from tests.support.slapd import SERVICE_PASSWORD, USERS, fixtureLDIF, serviceDN, userDN

BASE = "ou=people,dc=example,dc=com"
FILTER = "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))"
ATTRIBUTES = AttributeMap(
    login="uid",
    address="mail",
    mailHost="mailHost",
    site="mailRoutingSite",
    status="accountStatus",
    policy=(("name", "cn"), ("surname", "sn")),
)


def loadTree(extra: str = ""):
    """
    The slapd fixture's entries (the same LDIF) as an ldaptor in-memory tree.
    """
    result = []
    text = "version: 1\n\n" + fixtureLDIF() + "\n" + extra + "\n"
    inmemory.fromLDIFFile(io.BytesIO(text.encode())).addBoth(result.append)
    if isinstance(result[0], Failure):
        result[0].raiseException()
    return result[0]


class _ServerFactory(protocol.ServerFactory):
    def __init__(self, root, protocolClass) -> None:
        self.root = root
        self.protocol = protocolClass
        self.requests: list = []
        self.connections: list = []

    def buildProtocol(self, addr):
        p = protocol.ServerFactory.buildProtocol(self, addr)
        self.connections.append(p)
        return p


components.registerAdapter(lambda f: f.root, _ServerFactory, ldapinterfaces.IConnectedLDAPEntry)


class RecordingServer(ldapserver.LDAPServer):
    """
    ldaptor's server, recording every request (and which connection it came on).
    """

    def handle(self, msg):
        self.factory.requests.append((self, msg.value))
        return super().handle(msg)

    def requests(self, kind):
        return [r for c, r in self.factory.requests if c is self and isinstance(r, kind)]


class StartTLSServer(RecordingServer):
    """
    Answers StartTLS, then switches its (iosim) transport to "TLS".
    """

    def extendedRequest_startTLS(self, value, reply):
        reply(pureldap.LDAPStartTLSResponse(resultCode=0))
        # iosim's pretend TLS completes only when the server's side is ready to send first.
        self.transport.startTLS(FakeTLSOptions("server"), beNormal=False)
        return None

    extendedRequest_startTLS.oid = pureldap.LDAPStartTLSRequest.oid


class InjectingServer(RecordingServer):
    """
    Answers StartTLS with a plaintext "bind succeeded" behind the answer, as a man in the middle
    would.
    """

    def extendedRequest_startTLS(self, value, reply):
        reply(pureldap.LDAPStartTLSResponse(resultCode=0))
        self.transport.write(pureldap.LDAPMessage(pureldap.LDAPBindResponse(resultCode=0), id=999).toWire())
        return None

    extendedRequest_startTLS.oid = pureldap.LDAPStartTLSRequest.oid


class HoldingServer(RecordingServer):
    """
    Holds bind answers until the test releases them; records the most binds ever outstanding
    on one connection.
    """

    def connectionMade(self):
        super().connectionMade()
        self.held: list = []
        self.maxOutstanding = 0

    def handle_LDAPBindRequest(self, request, controls, reply):
        if b"ou=people" not in request.dn:
            return super().handle_LDAPBindRequest(request, controls, reply)
        d = defer.Deferred()
        self.held.append(d)
        self.maxOutstanding = max(self.maxOutstanding, len([h for h in self.held if not h.called]))
        d.addCallback(lambda _: super(HoldingServer, self).handle_LDAPBindRequest(request, controls, reply))
        return d


class SilentServer(protocol.Protocol):
    """
    Accepts and never answers.
    """

    received = b""

    def dataReceived(self, data):
        self.received += data


class GarbageServer(protocol.Protocol):
    """
    Answers anything with an LDAP message that has no operation in it.
    """

    reply = b"\x30\x03\x02\x01\x05"

    def dataReceived(self, data):
        self.transport.write(self.reply)


class NoiseServer(GarbageServer):
    """
    Answers anything with bytes that are no BER element ldaptor knows (it would print and skip
    them).
    """

    reply = b"\xff\x05garbage and more garbage"


class TruncatedServer(GarbageServer):
    """
    Answers the start of a message that never ends: only a timeout ends the wait.
    """

    reply = b"\x30\x84\x00\x00\x10\x00\x02\x01"


class FakeTLSOptions:
    """
    Stands for an C{IOpenSSLClientConnectionCreator} in iosim's pretend TLS.
    """

    def __init__(self, name, verifies=True):
        self.name = name
        self.verifies = verifies

    def iosimVerify(self, other):
        return self.verifies


class LDAPNetwork:
    """
    LDAP servers on a L{MemoryReactorClock}: connection attempts to a served port are completed
    over iosim, those to a refused port fail, any other stays pending (a black hole).
    """

    def __init__(self, reactor) -> None:
        self.reactor = reactor
        self.factories: dict[int, _ServerFactory] = {}
        self.refused: set[int] = set()
        self.pumps: list = []

    def serve(self, port, root=None, protocolClass=RecordingServer) -> _ServerFactory:
        factory = _ServerFactory(root if root is not None else loadTree(), protocolClass)
        self.factories[port] = factory
        self.refused.discard(port)
        return factory

    def down(self, port) -> None:
        self.factories.pop(port, None)
        self.refused.add(port)

    def _complete(self) -> bool:
        moved = False
        for info in list(self.reactor.tcpClients):
            host, port, factory = info[:3]
            if port not in self.factories and port not in self.refused:
                continue
            index = self.reactor.tcpClients.index(info)
            del self.reactor.tcpClients[index]
            connector = self.reactor.connectors.pop(index)
            moved = True
            if port in self.refused:
                factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
                continue
            address = IPv4Address("TCP", host, port)
            client = factory.buildProtocol(address)
            server = self.factories[port].buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
            self.pumps.append(
                iosim.connect(
                    server,
                    iosim.makeFakeServer(server),
                    client,
                    iosim.makeFakeClient(client),
                    greet=False,
                    clock=self.reactor,
                )
            )
        return moved

    def flush(self) -> None:
        for _ in range(200):
            moved = self._complete()
            for pump in self.pumps:
                moved = pump.flush() or moved
            if not moved:
                return
        raise AssertionError("the LDAP network never settled")

    def dropAll(self, port=None) -> None:
        """
        The server closes its connections (an idle timeout, a restart).
        """
        for p, factory in self.factories.items():
            if port is None or p == port:
                for server in factory.connections:
                    server.transport.loseConnection()
        self.flush()


def resultOf(d):
    """
    The result of a fired Deferred: the value, or the Failure (consumed, so asking twice is
    fine).
    """
    if not hasattr(d, "_testResult"):
        out = []
        d.addBoth(out.append)
        if not out:
            raise AssertionError("the Deferred has not fired")
        d._testResult = out[0]
    return d._testResult


def describe(f):
    """
    A filter as the server decoded it, as nested tuples of bytes: its structure, values apart.
    """
    if isinstance(f, (pureldap.LDAPFilter_and, pureldap.LDAPFilter_or)):
        return ("&" if isinstance(f, pureldap.LDAPFilter_and) else "|", [describe(c) for c in f])
    if isinstance(f, pureldap.LDAPFilter_equalityMatch):
        return ("=", _bytes(f.attributeDesc.value), _bytes(f.assertionValue.value))
    return (type(f).__name__,)


def _bytes(v):
    return v if isinstance(v, bytes) else v.encode()


def expected(login):
    v = login.encode()
    return ("&", [("=", b"objectClass", b"inetOrgPerson"), ("|", [("=", b"uid", v), ("=", b"mail", v)])])


class _Harness:
    port = 389

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.net = LDAPNetwork(self.reactor)
        self.tlsNames: list[str] = []
        self.verifies = True
        self.logged: list = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def tlsOptions(self, name):
        self.tlsNames.append(name)
        return FakeTLSOptions(name, self.verifies)

    def makePool(self, urls=None, **kw) -> LDAPConnectionPool:
        settings = dict(
            urls=tuple(LDAPURL.parse(u) for u in (urls or [f"ldap://127.0.0.1:{self.port}/"])),
            tlsOptions=self.tlsOptions,
            startTLS=False,
            connectTimeout=3.0,
            timeout=5.0,
            bindDN=serviceDN(),
            bindPassword=SERVICE_PASSWORD.encode(),
            poolSize=2,
        )
        settings.update(kw)
        self.pool = LDAPConnectionPool(self.reactor, PoolSettings(**settings))
        return self.pool

    def makeChecker(self, pool=None, attributes=ATTRIBUTES, dnTemplate=None, filter=FILTER):
        return LDAPChecker(
            pool or self.makePool(),
            BASE,
            FilterTemplate(filter),
            attributes,
            "sub",
            DNTemplate(dnTemplate) if dnTemplate else None,
        )

    def login(self, checker, user, password):
        if isinstance(password, str):
            password = password.encode()
        d = checker.requestAvatarId(Credentials(user, password))
        self.net.flush()
        return resultOf(d)

    def logText(self) -> str:
        from twisted.logger import formatEvent

        return "\n".join(formatEvent(e) for e in self.logged)

    def requests(self, kind, port=None):
        factory = self.net.factories[port or self.port]
        return [r for c, r in factory.requests if isinstance(r, kind)]


class FilterTests(SynchronousTestCase):
    """
    Filters and DNs built from templates: the login is only ever a value.
    """

    def test_injectionIsAValue(self):
        template = FilterTemplate(FILTER)
        for login, text in [
            ("*", r"(&(objectClass=inetOrgPerson)(|(uid=\2a)(mail=\2a)))"),
            ("a)(uid=*", r"(&(objectClass=inetOrgPerson)(|(uid=a\29\28uid=\2a)(mail=a\29\28uid=\2a)))"),
            ("x\\y", r"(&(objectClass=inetOrgPerson)(|(uid=x\5cy)(mail=x\5cy)))"),
            ("n\x00ul", r"(&(objectClass=inetOrgPerson)(|(uid=n\00ul)(mail=n\00ul)))"),
        ]:
            built = template.build(login)
            self.assertEqual(filterText(built), text)
            # On the wire the login is one octet string inside an equality match: the structure
            # is the template's whatever the login holds.
            orFilter = list(built)[1]
            self.assertIsInstance(orFilter, pureldap.LDAPFilter_or)
            self.assertEqual(
                [type(f) for f in orFilter], [pureldap.LDAPFilter_equalityMatch] * 2
            )
            self.assertEqual([f.assertionValue.value for f in orFilter], [login, login])

    def test_placeholders(self):
        template = FilterTemplate("(|(uid={user})(mail={login})(o={domain})(cn=*{user}*))")
        self.assertEqual(
            filterText(template.build("bob@example.org")),
            "(|(uid=bob)(mail=bob@example.org)(o=example.org)(cn=*bob*))",
        )
        self.assertEqual(filterText(template.build("bob")), "(|(uid=bob)(mail=bob)(o=)(cn=*bob*))")

    def test_badTemplates(self):
        for text, words in [
            ("(uid=alice)", "no {login}"),
            ("(uid={name})", "unknown placeholder"),
            ("({login}=x)", "attribute name"),
            ("(uid={login}", "expected an LDAP filter"),
            ("(uid={login)", "unbalanced"),
        ]:
            e = self.assertRaises(TemplateError, FilterTemplate, text)
            self.assertIn(words, str(e))

    def test_escapeFilterValue(self):
        self.assertEqual(escapeFilterValue("a*b(c)d\\e\x00f\r\n"), r"a\2ab\28c\29d\5ce\00f\0d\0a")
        self.assertEqual(escapeFilterValue("jürgen"), "jürgen")

    def test_dnTemplateEscapes(self):
        template = DNTemplate("uid={user},ou=people,dc=example,dc=com")
        self.assertEqual(template.build("alice"), "uid=alice,ou=people,dc=example,dc=com")
        self.assertEqual(
            template.build("x,ou=admins"), r"uid=x\,ou\=admins,ou=people,dc=example,dc=com"
        )
        self.assertEqual(escapeDNValue(' #a+b"c<d>;e '), r'\ #a\+b\"c\<d\>\;e\ ')

    def test_checkLogin(self):
        self.assertIsNone(checkLogin("alice@example.com"))
        self.assertIsNone(checkLogin("a)(uid=*"))
        self.assertEqual(checkLogin(""), "empty login")
        self.assertEqual(checkLogin("a\x00b"), "control character in login")
        self.assertEqual(checkLogin("a\r\nb"), "control character in login")
        self.assertEqual(checkLogin("a" * 257), "overlong login")

    def test_url(self):
        self.assertEqual(LDAPURL.parse("ldap://h/"), LDAPURL("ldap", "h", 389))
        self.assertEqual(LDAPURL.parse("ldaps://h"), LDAPURL("ldaps", "h", 636))
        self.assertEqual(LDAPURL.parse("LDAP://[::1]:1389/"), LDAPURL("ldap", "::1", 1389))
        self.assertEqual(str(LDAPURL("ldap", "::1", 1389)), "ldap://[::1]:1389/")
        for bad in ["http://h/", "ldap://", "ldap://h:99999/", "ldap://h/dc=x?uid", "h:389"]:
            self.assertRaises(ValueError, LDAPURL.parse, bad)


class CheckerTests(_Harness, SynchronousTestCase):
    """
    Search-then-bind and direct bind against ldaptor's in-memory server.
    """

    def setUp(self):
        super().setUp()
        self.factory = self.net.serve(self.port)

    def test_interfaces(self):
        checker = self.makeChecker()
        verifyObject(IUserDirectory, checker)
        verifyObject(IDirectoryClient, checker.client)

    def test_searchThenBind(self):
        """
        The service account searches with the escaped filter, the user binds with their DN, and
        the routing and policy attributes read in the same search land on the record.
        """
        record = self.login(self.makeChecker(), "alice@example.com", USERS["alice"])
        self.assertEqual(
            record,
            UserRecord(
                login="alice",
                address="alice@example.com",
                mailHost="mail1.example.com",
                site="site-a",
                disabled=False,
                policy=[("name", "Alice Example"), ("surname", "Example")],
            ),
        )
        binds = self.requests(pureldap.LDAPBindRequest)
        self.assertEqual(
            [b.dn for b in binds], [serviceDN().encode(), b"", userDN("alice").encode()]
        )
        [search] = self.requests(pureldap.LDAPSearchRequest)
        self.assertEqual(describe(search.filter), expected("alice@example.com"))
        self.assertEqual(search.baseObject, BASE.encode())
        self.assertEqual(search.sizeLimit, 2)
        self.assertEqual(
            sorted(search.attributes),
            sorted([b"uid", b"mail", b"mailHost", b"mailRoutingSite", b"accountStatus", b"cn", b"sn"]),
        )

    def test_wrongPassword(self):
        result = self.login(self.makeChecker(), "alice", "nope")
        self.assertIsInstance(result.value, UnauthorizedLogin)
        self.assertNotIsInstance(result.value, UnknownUser)
        self.assertIn("invalid credentials", str(result.value))

    def test_unknownUser(self):
        result = self.login(self.makeChecker(), "mallory", "x")
        self.assertIsInstance(result.value, UnknownUser)
        self.assertEqual(
            [b.dn for b in self.requests(pureldap.LDAPBindRequest)], [serviceDN().encode()]
        )

    def test_disabled(self):
        record = self.login(self.makeChecker(), "carol", USERS["carol"])
        self.assertTrue(record.disabled)

    def test_statusRules(self):
        entry = DirectoryEntry("uid=x", {"accountstatus": ("Active",), "useraccountcontrol": ("514",)})
        self.assertFalse(AttributeMap(status="accountStatus").disabled(entry))
        self.assertTrue(AttributeMap(status="accountStatus", enabledValues=("enabled",)).disabled(entry))
        self.assertFalse(AttributeMap(status="accountStatus", enabledValues=("ACTIVE",)).disabled(entry))
        ad = AttributeMap(status="userAccountControl", disabledBitmask=2)
        self.assertTrue(ad.disabled(entry))
        self.assertFalse(ad.disabled(DirectoryEntry("uid=x", {"useraccountcontrol": ("512",)})))
        self.assertTrue(ad.disabled(DirectoryEntry("uid=x", {"useraccountcontrol": ("junk",)})))

    def test_injectionAttempts(self):
        """
        Logins built to widen the filter match nothing; the filter the server received holds
        them as escaped values; and no user bind is ever attempted.
        """
        checker = self.makeChecker()
        logins = ["*", "a*", "alice)(uid=*", "*)(|(uid=*", "alice)(|(objectClass=*", "alice\\"]
        for login in logins:
            result = self.login(checker, login, "x")
            self.assertIsInstance(result.value, UnknownUser, login)
        received = [describe(s.filter) for s in self.requests(pureldap.LDAPSearchRequest)]
        self.assertEqual(received, [expected(login) for login in logins])
        userBinds = [b for b in self.requests(pureldap.LDAPBindRequest) if b.dn not in (b"", serviceDN().encode())]
        self.assertEqual(userBinds, [])

    def test_badLoginsNeverReachTheDirectory(self):
        checker = self.makeChecker()
        for login in ["", "a\x00b", "a\r\nuid=x", "x" * 300]:
            result = self.login(checker, login, "pw")
            self.assertIsInstance(result.value, UnknownUser)
        self.assertEqual(self.factory.requests, [])

    def test_emptyPasswordNeverBinds(self):
        """
        An empty password would be an unauthenticated bind, which some servers accept.
        """
        result = self.login(self.makeChecker(), "alice", b"")
        self.assertIsInstance(result.value, UnauthorizedLogin)
        self.assertEqual(self.factory.requests, [])

    def test_ambiguous(self):
        tree = loadTree(
            "dn: uid=alice2,ou=people,dc=example,dc=com\nobjectClass: inetOrgPerson\nuid: alice2\n"
            "cn: A\nsn: B\nmail: alice@example.com\nuserPassword: x\n"
        )
        self.net.serve(self.port, tree)
        result = self.login(self.makeChecker(), "alice@example.com", USERS["alice"])
        self.assertIsInstance(result.value, UnauthorizedLogin)
        self.assertIn("several directory entries", self.logText())
        # Only the service account bound: no user bind for an ambiguous login.
        self.assertEqual(
            [b.dn for b in self.requests(pureldap.LDAPBindRequest)], [serviceDN().encode()]
        )

    def test_directBind(self):
        """
        With a DN template there is no search as the service account: the user binds, then reads
        their own entry.
        """
        checker = self.makeChecker(dnTemplate="uid={user},ou=people,dc=example,dc=com")
        record = self.login(checker, "bob", USERS["bob"])
        self.assertEqual((record.login, record.mailHost), ("bob", "mail2.example.com"))
        binds = [b.dn for b in self.requests(pureldap.LDAPBindRequest)]
        self.assertEqual(binds, [b"", userDN("bob").encode()])
        [search] = self.requests(pureldap.LDAPSearchRequest)
        self.assertEqual((search.baseObject, search.scope), (userDN("bob").encode(), 0))
        result = self.login(checker, "bob", "wrong")
        self.assertIsInstance(result.value, UnauthorizedLogin)

    def test_lookup(self):
        checker = self.makeChecker()
        d = checker.lookup("bob@example.com")
        self.net.flush()
        self.assertEqual(resultOf(d).login, "bob")
        d = checker.lookup("nobody@example.com")
        self.net.flush()
        self.assertIsNone(resultOf(d))
        d = checker.lookup("*")
        self.net.flush()
        self.assertIsNone(resultOf(d))
        self.assertEqual(
            [b.dn for b in self.requests(pureldap.LDAPBindRequest)], [serviceDN().encode()]
        )

    def test_lookupFilter(self):
        """
        Look-ups may use their own filter (recipient aliases, say); logins keep theirs.
        """
        checker = LDAPChecker(
            self.makePool(), BASE, FilterTemplate("(uid={login})"), ATTRIBUTES,
            lookupFilter=FilterTemplate("(|(mail={login})(cn={login}))"),
        )
        d = checker.lookup("Bob Example")
        self.net.flush()
        self.assertEqual(resultOf(d).login, "bob")
        self.assertIsInstance(self.login(checker, "bob@example.com", USERS["bob"]).value, UnknownUser)
        self.assertEqual(
            [describe(s.filter) for s in self.requests(pureldap.LDAPSearchRequest)],
            [
                ("|", [("=", b"mail", b"Bob Example"), ("=", b"cn", b"Bob Example")]),
                ("=", b"uid", b"bob@example.com"),
            ],
        )

    def test_serviceAccountRefused(self):
        """
        A wrong service password is directory trouble, not the user's bad password.
        """
        checker = self.makeChecker(self.makePool(bindPassword=b"wrong"))
        result = self.login(checker, "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)
        self.assertIn("refused the service account's bind (result 49", str(result.value))

    def test_searchBaseMissing(self):
        checker = LDAPChecker(self.makePool(), "ou=nowhere,dc=example,dc=com", FilterTemplate(FILTER), ATTRIBUTES)
        result = self.login(checker, "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)

    def test_bindTroubleIsNotABadPassword(self):
        class Busy(RecordingServer):
            def handle_LDAPBindRequest(self, request, controls, reply):
                if request.dn == userDN("alice").encode():
                    return pureldap.LDAPBindResponse(resultCode=51)
                return super().handle_LDAPBindRequest(request, controls, reply)

        self.net.serve(self.port, protocolClass=Busy)
        result = self.login(self.makeChecker(), "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)
        self.assertIn("result 51", str(result.value))

    def test_secretsNeverShown(self):
        """
        Neither the service password nor a user's password appears in a repr, an error or the
        log, whatever happens.
        """
        pool = self.makePool()
        checker = self.makeChecker(pool)
        self.login(checker, "alice", USERS["alice"])
        self.login(checker, "alice", "wrong-pw-x")
        self.net.dropAll()
        self.net.serve(self.port, protocolClass=GarbageServer)
        failure = self.login(checker, "bob", USERS["bob"])
        self.assertIsInstance(failure.value, DirectoryUnavailable)
        texts = [repr(pool.settings), repr(pool), str(failure.value), self.logText()]
        texts += [repr(r) for c, r in self.factory.requests]
        for text in texts:
            for secret in (SERVICE_PASSWORD, USERS["alice"], "wrong-pw-x", USERS["bob"]):
                self.assertNotIn(secret, text)


class PoolTests(_Harness, SynchronousTestCase):
    """
    Connections: timeouts, garbage, replacement, failover, TLS, the bind pool.
    """

    def test_searchConnectionShared(self):
        """
        Logins share one search connection (bound once as the service account) and reuse the
        bind connections.
        """
        self.net.serve(self.port)
        checker = self.makeChecker()
        for user in ["alice", "bob", "alice", "bob"]:
            self.assertEqual(self.login(checker, user, USERS[user]).login, user)
        binds = [b.dn for b in self.requests(pureldap.LDAPBindRequest)]
        self.assertEqual(binds.count(serviceDN().encode()), 1)
        self.assertEqual(len(self.net.factories[self.port].connections), 2)
        self.assertEqual(self.pool.stats["connects"], 2)

    def test_oneBindInFlightPerConnection(self):
        """
        Three logins at once with two bind connections: never two binds outstanding on one
        connection; the third waits for a free one.
        """
        factory = self.net.serve(self.port, protocolClass=HoldingServer)
        checker = self.makeChecker()
        ds = [
            checker.requestAvatarId(Credentials(u, USERS[u].encode())) for u in ["alice", "bob", "alice"]
        ]
        self.net.flush()
        servers = [c for c in factory.connections if c.held]
        self.assertEqual(len(servers), 2)
        self.assertEqual([len(s.held) for s in servers], [1, 1])
        for _ in range(3):
            for s in factory.connections:
                for h in list(s.held):
                    if not h.called:
                        h.callback(None)
            self.net.flush()
        self.assertEqual([resultOf(d).login for d in ds], ["alice", "bob", "alice"])
        self.assertEqual(max(s.maxOutstanding for s in factory.connections), 1)
        self.assertEqual(len(factory.connections), 3)  # search + 2 bind connections

    def test_bindQueueTimeout(self):
        self.net.serve(self.port, protocolClass=HoldingServer)
        checker = self.makeChecker(self.makePool(poolSize=1, timeout=5.0))
        first = checker.requestAvatarId(Credentials("alice", USERS["alice"].encode()))
        second = checker.requestAvatarId(Credentials("bob", USERS["bob"].encode()))
        self.net.flush()
        self.reactor.advance(5.1)
        self.net.flush()
        self.assertIsInstance(resultOf(first).value, DirectoryUnavailable)
        self.assertIsInstance(resultOf(second).value, DirectoryUnavailable)
        self.assertIn("busy", str(resultOf(second).value))
        self.assertEqual(self.pool.stats["timeouts"], 1)

    def test_searchTimeout(self):
        """
        A server that accepts but never answers: the login fails temporarily after the timeout
        and the connection is dropped.
        """
        self.net.serve(self.port, protocolClass=SilentServer)
        checker = self.makeChecker()
        d = checker.requestAvatarId(Credentials("alice", b"pw"))
        self.net.flush()
        self.reactor.advance(4.9)
        self.net.flush()
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.net.flush()
        failure = resultOf(d)
        self.assertIsInstance(failure.value, DirectoryUnavailable)
        self.assertIn("timed out after 5 s", str(failure.value))
        [pump] = self.net.pumps
        self.assertTrue(pump.clientIO.disconnected)

    def test_userBindTimeout(self):
        factory = self.net.serve(self.port, protocolClass=HoldingServer)
        checker = self.makeChecker()
        d = checker.requestAvatarId(Credentials("alice", USERS["alice"].encode()))
        self.net.flush()
        self.reactor.advance(5.1)
        self.net.flush()
        self.assertIsInstance(resultOf(d).value, DirectoryUnavailable)
        self.assertEqual(self.pool.stats["timeouts"], 1)
        # The timed-out connection is gone; the next login opens a fresh one.
        factory.protocol = RecordingServer
        self.assertEqual(self.login(checker, "alice", USERS["alice"]).login, "alice")

    def test_connectTimeout(self):
        """
        A black-holed server: the connection attempt is bounded.
        """
        checker = self.makeChecker(self.makePool(connectTimeout=3.0))
        d = checker.requestAvatarId(Credentials("alice", b"pw"))
        self.reactor.advance(2.9)
        self.assertNoResult(d)
        self.reactor.advance(0.2)
        self.assertIsInstance(resultOf(d).value, DirectoryUnavailable)
        self.assertIn("no answer within 3 s", str(resultOf(d).value))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)

    def test_garbage(self):
        self.net.serve(self.port, protocolClass=GarbageServer)
        result = self.login(self.makeChecker(), "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)
        self.assertIn("malformed or unexpected LDAP reply", self.logText())
        self.assertTrue(all(p.clientIO.disconnected for p in self.net.pumps))

    def test_noise(self):
        self.net.serve(self.port, protocolClass=NoiseServer)
        result = self.login(self.makeChecker(), "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)
        self.assertIn("malformed or unexpected LDAP reply (ValueError)", self.logText())

    def test_truncated(self):
        """
        A message that never completes: the operation's timeout ends the wait.
        """
        self.net.serve(self.port, protocolClass=TruncatedServer)
        d = self.makeChecker().requestAvatarId(Credentials("alice", b"pw"))
        self.net.flush()
        self.assertNoResult(d)
        self.reactor.advance(5.1)
        self.net.flush()
        self.assertIsInstance(resultOf(d).value, DirectoryUnavailable)

    def test_droppedConnectionsReplaced(self):
        """
        The server closes idle connections (or restarted): the next login is served on new
        connections, without an error.
        """
        factory = self.net.serve(self.port)
        checker = self.makeChecker()
        self.assertEqual(self.login(checker, "alice", USERS["alice"]).login, "alice")
        self.net.dropAll()
        self.assertEqual(self.login(checker, "alice", USERS["alice"]).login, "alice")
        self.assertEqual(len(factory.connections), 4)

    def test_droppedUnderOperationRetriedOnce(self):
        """
        A reused connection found dead under an operation is replaced once, transparently.
        """
        self.net.serve(self.port)
        pool = self.makePool()
        checker = self.makeChecker(pool)
        self.assertEqual(self.login(checker, "alice", USERS["alice"]).login, "alice")
        # The connections die without the client noticing (no FIN seen yet).
        for connection in [pool._search] + pool._idle:
            connection.client.transport.disconnecting = True
        self.assertEqual(self.login(checker, "bob", USERS["bob"]).login, "bob")
        self.assertGreaterEqual(pool.stats["retries"], 1)

    def test_directoryDownThenBack(self):
        self.net.serve(self.port)
        checker = self.makeChecker()
        self.assertEqual(self.login(checker, "alice", USERS["alice"]).login, "alice")
        self.net.dropAll()
        self.net.down(self.port)
        result = self.login(checker, "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)
        self.assertIn("no LDAP server usable", str(result.value))
        self.net.serve(self.port)
        self.assertEqual(self.login(checker, "alice", USERS["alice"]).login, "alice")

    def test_failover(self):
        """
        The first URL refuses connections: the second serves, and the dead one is tried only
        after it for C{downRetry} seconds.
        """
        self.net.down(1389)
        self.net.serve(2389)
        pool = self.makePool(urls=["ldap://127.0.0.1:1389/", "ldap://127.0.0.1:2389/"], downRetry=30.0)
        checker = self.makeChecker(pool)
        self.assertEqual(self.login(checker, "alice", USERS["alice"]).login, "alice")
        # The search connection tried 1389 first; the bind connection, opened next, went to
        # 2389 first since 1389 is known to be down.
        self.assertEqual(pool.stats["connectFailures"], 1)
        self.net.dropAll()
        self.reactor.advance(29)
        self.assertEqual(self.login(checker, "bob", USERS["bob"]).login, "bob")
        self.assertEqual(pool.stats["connectFailures"], 1)
        self.net.dropAll()
        self.reactor.advance(2)
        # 30 s later 1389 is tried first again (it may be back).
        self.assertEqual(self.login(checker, "bob", USERS["bob"]).login, "bob")
        self.assertEqual(pool.stats["connectFailures"], 2)
        self.assertIn("ldap://127.0.0.1:1389/ unusable", self.logText())

    def test_failoverOnTimeout(self):
        self.net.serve(2389)
        pool = self.makePool(urls=["ldap://127.0.0.1:1389/", "ldap://127.0.0.1:2389/"])
        checker = self.makeChecker(pool)
        d = checker.requestAvatarId(Credentials("alice", USERS["alice"].encode()))
        self.reactor.advance(3.1)
        self.net.flush()
        self.assertEqual(resultOf(d).login, "alice")

    def test_startTLS(self):
        """
        StartTLS is negotiated before any bind, with the options for the URL's host; the
        service password only travels after it.
        """
        self.net.serve(self.port, protocolClass=StartTLSServer)
        checker = self.makeChecker(self.makePool(startTLS=True))
        self.assertEqual(self.login(checker, "alice", USERS["alice"]).login, "alice")
        self.assertEqual(self.tlsNames, ["127.0.0.1", "127.0.0.1"])
        factory = self.net.factories[self.port]
        self.assertEqual(len(factory.connections), 2)
        for server in factory.connections:
            first = [r for c, r in factory.requests if c is server][0]
            self.assertEqual(first.requestName, pureldap.LDAPStartTLSRequest.oid)

    def test_startTLSCertificateRefused(self):
        """
        The certificate does not verify: the connection is dropped, no bind reaches the server,
        and the login fails temporarily.
        """
        self.verifies = False
        factory = self.net.serve(self.port, protocolClass=StartTLSServer)
        result = self.login(self.makeChecker(self.makePool(startTLS=True)), "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)
        self.assertEqual(
            [r.requestName for c, r in factory.requests], [pureldap.LDAPStartTLSRequest.oid]
        )

    def test_startTLSInjection(self):
        """
        Plaintext behind the StartTLS answer is refused, not read as if it came through TLS.
        """
        factory = self.net.serve(self.port, protocolClass=InjectingServer)
        result = self.login(self.makeChecker(self.makePool(startTLS=True)), "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)
        self.assertIn("sent data behind its StartTLS answer", self.logText())
        self.assertEqual(
            [r.requestName for c, r in factory.requests], [pureldap.LDAPStartTLSRequest.oid]
        )

    def test_startTLSRefused(self):
        """
        A server without StartTLS: no bind (no password in clear), a temporary failure.
        """
        factory = self.net.serve(self.port)
        result = self.login(self.makeChecker(self.makePool(startTLS=True)), "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)
        self.assertIn("refused StartTLS", str(result.value))
        self.assertEqual(
            [r.requestName for c, r in factory.requests], [pureldap.LDAPStartTLSRequest.oid]
        )

    def test_noDelay(self):
        """
        LDAP requests go out at once (no Nagle delay behind an unacknowledged one).
        """
        from twisted.internet.testing import StringTransport

        from casd.auth.ldapclient import _Client

        class Transport(StringTransport):
            noDelay = None

            def setTcpNoDelay(self, enabled):
                self.noDelay = enabled

        transport = Transport()
        _Client().makeConnection(transport)
        self.assertIs(transport.noDelay, True)

    def test_close(self):
        factory = self.net.serve(self.port)
        pool = self.makePool()
        checker = self.makeChecker(pool)
        self.login(checker, "alice", USERS["alice"])
        d = pool.close()
        self.net.flush()
        resultOf(d)
        self.assertTrue(all(p.clientIO.disconnected for p in self.net.pumps))
        self.assertEqual(len([r for c, r in factory.requests if isinstance(r, pureldap.LDAPUnbindRequest)]), 2)
        result = self.login(checker, "alice", USERS["alice"])
        self.assertIsInstance(result.value, DirectoryUnavailable)


class SettingsTests(SynchronousTestCase):
    def values(self, **kw):
        base = {s.key: s.default for s in LDAP_SETTINGS}
        base.update(urls=("ldap://127.0.0.1/",), base_dn=BASE)
        base.update(kw)
        return Values(base)

    def test_problems(self):
        checkSettings(self.values())
        for kw, key in [
            (dict(urls=("ftp://x/",)), "urls"),
            (dict(base_dn=""), "base_dn"),
            (dict(base_dn="people"), "base_dn"),
            (dict(bind_dn="cn=x"), "bind_password_file"),
            (dict(filter="(uid=x)"), "filter"),
            (dict(dn_template="uid=x"), "dn_template"),
            (dict(lookup_filter="(mail=x)"), "lookup_filter"),
            (dict(policy_attributes=("a=",)), "policy_attributes"),
        ]:
            e = self.assertRaises(SettingProblem, checkSettings, self.values(**kw))
            self.assertEqual(e.key, key)
