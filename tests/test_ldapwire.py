"""
Tests for L{casd.auth.ldapwire}: the replies of a login decoded exactly as ldaptor decodes them,
everything else left to ldaptor, malformed input refused; its requests encoded to ldaptor's very
bytes; the search collected without L{LDAPEntry}; and ldaptor's client fed through it byte by
byte.
"""

from __future__ import annotations

from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from ldaptor.protocols import pureber, pureldap
from ldaptor.protocols.ldap import ldaperrors
from ldaptor.protocols.ldap.ldapclient import LDAPClient

from casd.auth import ldapwire
from casd.auth.ldapclient import _Client
from casd.auth.ldapfilter import FilterTemplate

DN = b"uid=alice,ou=people,dc=example,dc=com"
BASE = "ou=people,dc=example,dc=com"


def wire(value, id=7, controls=None) -> bytes:
    return pureldap.LDAPMessage(value, id=id, controls=controls).toWire()


def ldaptorDecode(data: bytes):
    message, used = pureber.berDecodeObject(LDAPClient.berdecoder, data)
    assert used == len(data)
    return message


def fields(message):
    return (type(message).__name__, message.id, message.controls, type(message.value).__name__, vars(message.value))


#: Replies ldapwire decodes itself.
DECODED = {
    "bind OK": pureldap.LDAPBindResponse(resultCode=0),
    "bind refused": pureldap.LDAPBindResponse(resultCode=49, errorMessage="invalid credentials"),
    "bind matched DN": pureldap.LDAPBindResponse(resultCode=32, matchedDN="ou=people,dc=example,dc=com"),
    "entry": pureldap.LDAPSearchResultEntry(
        objectName=DN,
        attributes=[("uid", ["alice"]), ("mail", ["alice@example.com", "a@example.com"]), ("cn", [])],
    ),
    "entry without attributes": pureldap.LDAPSearchResultEntry(objectName=DN, attributes=[]),
    "large entry (multi-byte lengths)": pureldap.LDAPSearchResultEntry(
        objectName=DN, attributes=[("description", ["x" * 300, "y" * 70000])]
    ),
    "search done": pureldap.LDAPSearchResultDone(resultCode=0),
    "size limit": pureldap.LDAPSearchResultDone(resultCode=4, errorMessage="size limit exceeded"),
    "StartTLS answer": pureldap.LDAPExtendedResponse(resultCode=0, responseName=pureldap.LDAPStartTLSRequest.oid),
    "extended without a name": pureldap.LDAPExtendedResponse(resultCode=2, errorMessage="unsupported"),
}


class DecodeTests(SynchronousTestCase):
    def test_sameAsLdaptor(self):
        """
        Every reply of a login decodes to the very objects ldaptor's decoder gives, message id
        included (large ids too).
        """
        for name, value in DECODED.items():
            for id in (1, 7, 300, 2**31 - 1):
                data = wire(value, id=id)
                ours = ldapwire.decodeResponse(data)
                self.assertIsNotNone(ours, name)
                self.assertEqual(fields(ours), fields(ldaptorDecode(data)), name)

    def test_leftToLdaptor(self):
        """
        Replies with controls, referrals, SASL credentials or an extended response's value, search
        references and other operations are not decoded here (C{None}: ldaptor decodes them).
        """
        others = [
            wire(pureldap.LDAPBindResponse(resultCode=0), controls=[(b"1.2.3", None, None)]),
            wire(pureldap.LDAPBindResponse(resultCode=14, serverSaslCreds=b"challenge")),
            # A search done with a referral (ldaptor cannot encode one).
            b"\x30\x18\x02\x01\x07\x65\x13\x0a\x01\x0a\x04\x00\x04\x00\xa3\x0a\x04\x08ldap://x",
            wire(pureldap.LDAPSearchResultReference(uris=[pureldap.LDAPString("ldap://other/")])),
            wire(pureldap.LDAPExtendedResponse(resultCode=0, responseName=b"1.2.3", response=b"value")),
            wire(pureldap.LDAPModifyResponse(resultCode=0)),
        ]
        for data in others:
            self.assertIsNone(ldapwire.decodeResponse(data), data)

    def test_malformed(self):
        """
        Bytes that are not one well-formed LDAPMessage raise L{ValueError}, never anything else.
        """
        good = wire(DECODED["entry"])
        bad = [
            b"\x30\x00",  # empty
            b"\x04\x03abc",  # not a SEQUENCE
            good[:-1],  # truncated
            good + b"\x00",  # more than one message
            b"\x30\x03\x04\x01\x07",  # the id is not an INTEGER
            b"\x30\x03\x02\x00\x61",  # an empty id
            b"\x30\x05\x02\x01\x07\x61\x05",  # an operation longer than the message
            b"\x30\x80\x02\x01\x07\x00\x00",  # indefinite length
            b"\x30\x06\x02\x01\x07\x61\x01\x04",  # a result without a code
            b"\x30\x0b\x02\x01\x07\x61\x06\x0a\x01\x00\x02\x01\x00",  # matchedDN not a string
            b"\x30\x09\x02\x01\x07\x64\x04\x04\x00\x04\x00",  # attributes not a SEQUENCE
            b"\x30\x0b\x02\x01\x07\x64\x06\x04\x00\x30\x02\x04\x00",  # an attribute not a SEQUENCE
            b"\x30\x0b\x02\x01\x07\x7f\x81\x01\x00",  # a multi-byte tag
            b"\x30\x8a\x02\x01\x07",  # a ten-byte length
        ]
        for data in bad:
            self.assertRaises(ValueError, ldapwire.decodeResponse, data)

    def test_messageSize(self):
        """
        The size of the first message is known as soon as its header is in: C{None} before;
        L{ValueError} for what is not a definite-length SEQUENCE.
        """
        small = wire(DECODED["bind OK"])
        large = wire(DECODED["large entry (multi-byte lengths)"])
        self.assertEqual(ldapwire.messageSize(small + b"\x30"), len(small))
        self.assertEqual(large[1], 0x83)
        self.assertEqual(ldapwire.messageSize(large[:5]), len(large))
        self.assertIsNone(ldapwire.messageSize(large[:1]))
        self.assertIsNone(ldapwire.messageSize(large[:4]))
        self.assertRaises(ValueError, ldapwire.messageSize, b"\x04\x01a")
        self.assertRaises(ValueError, ldapwire.messageSize, b"\x30\x80")


class EncodeTests(SynchronousTestCase):
    def test_bindRequest(self):
        """
        A bind request is encoded as ldaptor encodes it: anonymous, a user, long and non-ASCII
        values (multi-byte lengths).
        """
        for dn, password in (
            ("", b""),
            (DN.decode(), b"secret"),
            ("cn=" + "x" * 200 + ",dc=example,dc=com", b"p" * 300),
            ("uid=jos\u00e9,ou=people,dc=example,dc=com", "m\u00f8t de passe".encode()),
        ):
            self.assertEqual(
                ldapwire.bindRequest(dn, password).toWire(),
                pureldap.LDAPBindRequest(dn=dn, auth=password).toWire(),
            )

    def test_searchRequest(self):
        """
        A search request is encoded as ldaptor encodes it, for every scope and a range of limits.
        """
        filter = pureldap.LDAPFilter_and(
            [
                pureldap.LDAPFilter_equalityMatch(
                    attributeDesc=pureldap.LDAPAttributeDescription("objectClass"),
                    assertionValue=pureldap.LDAPAssertionValue("inetOrgPerson"),
                ),
                pureldap.LDAPFilter_present("uid"),
            ]
        )
        for scope in (0, 1, 2):
            for sizeLimit, timeLimit in ((0, 1), (2, 10), (127, 128), (255, 256), (70000, 2**31 - 1)):
                for attributes in (["1.1"], ["uid", "mail", "mailHost", "accountStatus"]):
                    ours = ldapwire.searchRequest(BASE, scope, sizeLimit, timeLimit, filter, attributes)
                    theirs = pureldap.LDAPSearchRequest(
                        baseObject=BASE,
                        scope=scope,
                        derefAliases=pureldap.LDAP_DEREF_neverDerefAliases,
                        sizeLimit=sizeLimit,
                        timeLimit=timeLimit,
                        typesOnly=0,
                        filter=filter,
                        attributes=attributes,
                    )
                    self.assertEqual(ours.toWire(), theirs.toWire(), (scope, sizeLimit, timeLimit))

    def test_filterTemplate(self):
        """
        L{FilterTemplate.wire} gives the encoding of L{FilterTemplate.build}'s filter, for every
        kind of filter and logins holding filter syntax, non-ASCII text and long values.
        """
        templates = [
            "(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))",
            "(|(uid={user})(mail={login})(o={domain})(cn=*{user}*))",
            "(&(!(accountStatus=disabled))(sn>={user})(sn<={user}z)(cn~={user}))",
            "(&(cn=a*{user}*b*c)(cn=*{domain})(cn={user}*)(mail=*))",
            "(&(uid={login})(objectClass=*)(cn:dn:=x)(cn:caseExactMatch:=y))",
        ]
        logins = ["alice", "bob@example.org", "a)(uid=*", "x\\y*", "jos\u00e9@exampl\u00e9.fr", "l" * 200]
        for text in templates:
            template = FilterTemplate(text)
            for login in logins:
                self.assertEqual(template.wire(login), template.build(login).toWire(), (text, login))

    def test_sentAsOperation(self):
        """
        ldaptor's client sends an encoded request in a message of its own, with a message id.
        """
        client = _Client()
        transport = StringTransport()
        client.makeConnection(transport)
        d = client.send(ldapwire.bindRequest(DN.decode(), b"secret"))
        message = ldaptorDecode(transport.value())
        self.assertEqual((message.value.dn, message.value.auth), (DN, b"secret"))
        client.dataReceived(wire(pureldap.LDAPBindResponse(resultCode=0), id=message.id))
        self.assertEqual(self.successResultOf(d).resultCode, 0)


class ClientTests(SynchronousTestCase):
    """
    casd's ldaptor client reading through L{ldapwire}.
    """

    def setUp(self):
        self.client = _Client()
        self.transport = StringTransport()
        self.client.makeConnection(self.transport)

    def lastRequestID(self) -> int:
        data = self.transport.value()
        self.transport.clear()
        return ldaptorDecode(data).id

    def feed(self, data: bytes, piecewise: bool = True) -> None:
        if piecewise:
            for i in range(len(data)):
                self.client.dataReceived(data[i : i + 1])
        else:
            self.client.dataReceived(data)

    def test_bindPiecewise(self):
        """
        A reply delivered one byte at a time answers its request once it is whole.
        """
        d = self.client.send(pureldap.LDAPBindRequest(dn=DN, auth=b"secret"))
        reply = wire(DECODED["bind refused"], id=self.lastRequestID())
        self.feed(reply[:-1])
        self.assertNoResult(d)
        self.feed(reply[-1:])
        answer = self.successResultOf(d)
        self.assertEqual((answer.resultCode, answer.errorMessage), (49, b"invalid credentials"))

    def search(self):
        request = ldapwire.searchRequest(BASE, 2, 2, 10, pureldap.LDAPFilter_present("uid"), ["uid"])
        d = ldapwire.search(self.client, request)
        return d, self.lastRequestID()

    def test_searchCollects(self):
        """
        L{ldapwire.search} gives the entries when the search ends with success or its size
        limit; references are skipped; replies may arrive together in one read.
        """
        for code in (0, 4):
            d, id = self.search()
            entry = DECODED["entry"]
            data = (
                wire(entry, id=id)
                + wire(pureldap.LDAPSearchResultReference(uris=[pureldap.LDAPString("ldap://x/")]), id=id)
                + wire(entry, id=id)
                + wire(pureldap.LDAPSearchResultDone(resultCode=code), id=id)
            )
            self.feed(data, piecewise=False)
            entries = self.successResultOf(d)
            expected = [(b"uid", [b"alice"]), (b"mail", [b"alice@example.com", b"a@example.com"]), (b"cn", [])]
            self.assertEqual([(e.objectName, e.attributes) for e in entries], [(DN, expected)] * 2)
            self.assertEqual(self.client.onwire, {})

    def test_searchRefused(self):
        """
        Another result fails the search with ldaptor's exception for it.
        """
        d, id = self.search()
        self.feed(wire(pureldap.LDAPSearchResultDone(resultCode=32, errorMessage="no such object"), id=id))
        failure = self.failureResultOf(d, ldaperrors.LDAPNoSuchObject)
        self.assertEqual(failure.value.resultCode, 32)

    def test_searchLost(self):
        """
        A connection lost under the search fails it.
        """
        d, _ = self.search()
        self.client.connectionLost(Failure(ConnectionError("gone")))
        self.failureResultOf(d, ConnectionError)

    def test_unexpectedReplyDropsConnection(self):
        """
        A reply the search cannot take, or a malformed one, drops the connection and fails what
        was in flight.
        """
        replies = (
            lambda id: wire(pureldap.LDAPBindResponse(resultCode=0), id=id),  # not a search reply
            lambda id: b"\x30\x03\x02\x00\x61",  # malformed
        )
        for reply in replies:
            self.setUp()
            d, id = self.search()
            self.feed(reply(id), piecewise=False)
            self.assertTrue(self.transport.disconnecting)
            self.client.connectionLost(Failure(ConnectionError("aborted")))
            self.failureResultOf(d)
