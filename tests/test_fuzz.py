"""
Property tests (hypothesis) of every parser in L{tests.fuzz.targets.TARGETS}: no input, random or
built from the parser's own grammar, lets an exception escape or a traceback be logged; and the
properties that make a parser safe (an LDAP filter built from any login matches exactly that
login; a SASL PLAIN message decodes to what was encoded; a quoted string reads back as itself).

Settings that cannot flake: a fixed derandomized seed, no deadline, bounded examples, no example
database.  Coverage-guided fuzzing of the same targets: C{tests/test_fuzz_atheris.py}.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz.targets import TARGETS

STABLE = settings(
    derandomize=True,
    deadline=None,
    database=None,
    max_examples=120,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def grammarInputs(tokens) -> st.SearchStrategy:
    """
    Inputs made of a grammar's tokens and random bytes between them.
    """
    piece = st.one_of(st.sampled_from(tokens), st.binary(max_size=6)) if tokens else st.binary(max_size=6)
    return st.lists(piece, max_size=40).map(b"".join)


def _targetTests(target):
    @STABLE
    @given(st.binary(max_size=300))
    def test_randomBytes(self, data):
        target.run(data)

    @STABLE
    @given(grammarInputs(target.tokens))
    def test_grammarInputs(self, data):
        target.run(data)

    def test_seeds(self):
        for seed in target.seeds:
            target.run(seed)

    return {"test_randomBytes": test_randomBytes, "test_grammarInputs": test_grammarInputs, "test_seeds": test_seeds}


# One TestCase per target, named after it (tests.test_fuzz.Fuzz_imap, ...).
for _name, _target in TARGETS.items():
    _class = "Fuzz_" + _name.replace("-", "_")
    globals()[_class] = type(_class, (SynchronousTestCase,), _targetTests(_target))
del _name, _target, _class


# -- properties ---------------------------------------------------------------------------------

logins = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60)


def text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


class LDAPTemplateProperties(SynchronousTestCase):
    @STABLE
    @given(logins)
    def test_filterMatchesExactlyTheLogin(self, login):
        """
        Whatever the login (parentheses, stars, backslashes, NUL-free text), the filter built
        from C{(uid={login})} is one equality match whose value is the login: no injection.
        """
        from ldaptor.protocols import pureldap
        from ldaptor.ldapfilter import parseFilter

        from casd.auth.ldapfilter import FilterTemplate, checkLogin

        if checkLogin(login) is not None:
            return
        built = FilterTemplate("(uid={login})").build(login)
        self.assertIsInstance(built, pureldap.LDAPFilter_equalityMatch)
        self.assertEqual(text(built.assertionValue.value), login)
        # The text form (what a log shows, what slapd parses) reads back as the same match.
        again = parseFilter(built.asText())
        self.assertIsInstance(again, pureldap.LDAPFilter_equalityMatch)
        self.assertEqual(text(again.assertionValue.value), login)

    @STABLE
    @given(logins)
    def test_structureKept(self, login):
        from ldaptor.protocols import pureldap

        from casd.auth.ldapfilter import FilterTemplate, checkLogin

        if checkLogin(login) is not None:
            return
        built = FilterTemplate("(&(objectClass=inetOrgPerson)(|(uid={user})(mail={login})))").build(login)
        self.assertIsInstance(built, pureldap.LDAPFilter_and)
        inner = list(built)[1]
        self.assertIsInstance(inner, pureldap.LDAPFilter_or)
        self.assertEqual(text(list(inner)[1].assertionValue.value), login)

    @STABLE
    @given(logins)
    def test_dnValueEscaped(self, login):
        """
        The DN built for a direct bind has exactly the template's RDNs, the first holding the
        user part of the login.
        """
        from ldaptor.protocols.ldap.distinguishedname import DistinguishedName

        from casd.auth.ldapfilter import DNTemplate, checkLogin, loginValues

        if checkLogin(login) is not None:
            return
        dn = DNTemplate("uid={user},ou=people,dc=example,dc=com").build(login)
        parsed = DistinguishedName(dn)
        self.assertEqual(len(parsed.listOfRDNs), 4)
        (first,) = parsed.listOfRDNs[0].attributeTypesAndValues
        self.assertEqual(first.attributeType, "uid")
        self.assertEqual(first.value, loginValues(login)["user"])


class SASLProperties(SynchronousTestCase):
    names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)

    @STABLE
    @given(names.filter(bool), names, st.binary(max_size=60).filter(lambda b: b"\x00" not in b))
    def test_plainRoundTrip(self, authcid, authzid, password):
        from base64 import b64decode

        from casd.auth.sasl import SASLExchange, encodePlain

        exchange = SASLExchange("PLAIN")
        creds = exchange.start(SASLExchange.decodeInitial(encodePlain(authcid, password, authzid)))
        self.assertEqual((creds.username, creds.password), (authcid, password))
        self.assertEqual(creds.authzid, "" if authzid in ("", authcid) else authzid)
        self.assertTrue(b64decode(encodePlain(authcid, password, authzid)))


class StringGrammarProperties(SynchronousTestCase):
    @STABLE
    @given(st.binary(max_size=80).filter(lambda b: not set(b) & {0, 10, 13}))
    def test_quotedReadsBack(self, value):
        from protocols.stringgrammar import quote, tokenize

        self.assertEqual(tokenize(quote(value)), [value])


class FoundByFuzzing(SynchronousTestCase):
    """
    The inputs the fuzzers found that raised out of a parser, now answered properly.
    """

    def test_imapNonASCIICommand(self):
        """
        A command word with a byte above 127 is a syntax error (BAD), not a traceback.
        """
        from twisted.internet.testing import MemoryReactorClock

        from casd.testing import connectFrontend, makeContext
        from protocols.imap import imap

        context = makeContext(MemoryReactorClock(), users={"alice": "pw"})
        server, transport = connectFrontend(imap, context)
        transport.clear()
        server.dataReceived(b"a LOG\xf9N alice pw\r\n")
        self.assertTrue(transport.value().startswith(b"a BAD "), transport.value())
        self.assertFalse(transport.disconnecting)

    def test_proxyHeaderNotText(self):
        """
        A PROXY v1 header whose address is not text, or whose port is not a number, closes the
        connection like any invalid header; nothing reaches the protocol behind.
        """
        from twisted.internet.address import IPv4Address
        from twisted.internet.protocol import Factory, Protocol
        from twisted.internet.testing import MemoryReactorClock, StringTransport

        from ipaddress import ip_network

        from casd.service.proxyproto import ProxyProtocolFactory

        for header in (
            b"PROXY TCP6 \xb2\x01 ::1 40000 143\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 4301\na\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 x 143\r\n",
        ):
            made = []
            factory = ProxyProtocolFactory(
                Factory.forProtocol(Protocol), MemoryReactorClock(), trusted=(ip_network("127.0.0.0/8"),)
            )
            factory.wrappedFactory.buildProtocol = lambda addr: made.append(addr) or Protocol()
            protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
            transport = StringTransport()
            protocol.makeConnection(transport)
            protocol.dataReceived(header)
            self.assertTrue(transport.disconnecting, header)
