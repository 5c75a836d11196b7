"""
The fuzz targets: every parser casd exposes to input it does not control, in one table.

Each L{FuzzTarget} takes arbitrary bytes and raises only on a bug: the parser's own, documented
refusal (a L{casd.config.ConfigError}, a protocol's error reply, L{ProtocolViolation}...) is
caught, anything else escapes; and for the protocol sessions, an error or critical log event (a
traceback logged by Twisted or by casd) counts as an escape too.  The same table drives the
hypothesis tests (C{tests/test_fuzz.py}, in the trial suite), the bounded atheris runs of the
suite (C{tests/test_fuzz_atheris.py}) and longer campaigns (C{python -m tests.fuzz.run}).

Adding a parser is one entry in L{TARGETS}: a name, a function of C{bytes}, the tokens its
grammar is made of (hypothesis builds inputs from them) and a few seed inputs (written to
C{tests/fuzz/corpus/NAME/} by C{python -m tests.fuzz.run --write-seeds}).
"""

from __future__ import annotations

import ipaddress
from typing import Callable

from attrs import frozen

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from casd.auth import UserRecord


class EscapedError(AssertionError):
    """
    A parser let an exception escape, or logged an error or a traceback.
    """


@frozen
class FuzzTarget:
    """
    One parser under fuzzing.

    @ivar name: the target's name (and its corpus directory's).
    @ivar run: C{run(data: bytes) -> None}; raises only on a bug.
    @ivar tokens: the pieces of its grammar, for grammar-aware generated inputs.
    @ivar seeds: valid and near-valid inputs: the start of the atheris corpus.
    """

    name: str
    run: Callable[[bytes], None]
    tokens: tuple[bytes, ...] = ()
    seeds: tuple[bytes, ...] = ()


# -- the protocol sessions, before login -------------------------------------------------------

#: Every protocol on one configuration: a trusted listener (plaintext login allowed, as behind a
#: TLS-terminating balancer) and a backend per protocol that the harness refuses or answers.
SESSION_CONFIG = """
[server]
hostname = "cas.example.net"

[auth]
failure_delay = 0.5

[routing]
default_backend = "mbx"

[backend]
reply_timeout = 5.0
connect_retry_time = 0.0

[backends.mbx]
host = "192.0.2.10"
[backends.mbx.imap]
tls = "none"
[backends.mbx.pop3]
tls = "none"
[backends.mbx.managesieve]
tls = "none"
[backends.mbx.smtp]
tls = "none"
[backends.mbx.submission]
tls = "none"

[imap]
max_line_length = 300
max_literal_size = 200
[[imap.listen]]
endpoint = "tcp:1143"
trusted = true

[pop3]
enabled = true
max_line_length = 300
[[pop3.listen]]
endpoint = "tcp:1110"
trusted = true

[managesieve]
enabled = true
max_line_length = 300
max_literal_size = 200
[[managesieve.listen]]
endpoint = "tcp:4190"
trusted = true

[smtp]
enabled = true
accepted_domains = ["example.com"]
max_line_length = 300
message_size_limit = 2000
max_recipients = 3
[[smtp.listen]]
endpoint = "tcp:2525"

[submission]
enabled = true
[[submission.listen]]
endpoint = "tcp:2587"
trusted = true
"""

USERS = {
    "alice": ("pw", UserRecord(login="alice", address="alice@example.com")),
    "bob@example.com": ("pw2", UserRecord(login="bob@example.com", address="bob@example.com")),
}

class _LogWatch:
    """
    Collects error and critical log events (a logged traceback among them) while a target runs.
    """

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        if event.get("log_failure") is not None or event.get("log_level") in (
            LogLevel.error,
            LogLevel.critical,
        ):
            self.events.append(event)

    def __enter__(self):
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc) -> None:
        globalLogPublisher.removeObserver(self)
        if exc[0] is None and self.events:
            from twisted.logger import formatEvent

            event = self.events[0]
            failure = event.get("log_failure")
            detail = failure.getTraceback() if failure is not None else ""
            raise EscapedError(f"logged: {formatEvent(event)}\n{detail}")


_protocols: dict = {}


def protocols() -> dict:
    """
    casd's protocol descriptors, discovered once per process (plugin discovery is slow).
    """
    if not _protocols:
        from casd.service.discovery import discoverProtocols

        _protocols.update(discoverProtocols())
    return _protocols


_config: list = []


def _context(reactor):
    from casd.config import parseConfig
    from casd.testing import makeContext

    if not _config:
        _config.append(parseConfig(SESSION_CONFIG, "fuzz.toml", protocols().values()))
    # A fresh context (fresh penalty, cache and pool state) on a fresh reactor for each input;
    # the configuration, frozen, parsed once.
    return makeContext(reactor, users=USERS, config=_config[0], protocols=protocols())


def _chunks(data: bytes) -> list[bytes]:
    # A 0xFF byte splits the input into separate reads: the same bytes in other TCP segments.
    return [c for c in data.split(b"\xff")] if b"\xff" in data else [data]


def sessionTarget(protocolName: str, backendReplies: bytes = b"") -> Callable[[bytes], None]:
    """
    A target that feeds bytes to a new client session of C{protocolName}, lets every timer
    fire, has each backend connection either refused or answered with C{backendReplies}, and
    closes the session.

    @param backendReplies: what a backend says when the session opens one; empty: refused.
    """

    def run(data: bytes) -> None:
        from casd.testing import acceptBackend, connectFrontend, failBackend

        descriptor = protocols()[protocolName]
        reactor = MemoryReactorClock()
        with _LogWatch():
            context = _context(reactor)
            server, transport = connectFrontend(descriptor, context, 0, ("127.0.0.1", 40000))
            handled = 0
            for chunk in _chunks(data):
                if not transport.connected or transport.disconnecting:
                    break
                server.dataReceived(chunk)
                handled = _serveBackends(reactor, handled, backendReplies, acceptBackend, failBackend)
                reactor.advance(0.6)
                handled = _serveBackends(reactor, handled, backendReplies, acceptBackend, failBackend)
            for _ in range(4):
                reactor.advance(60)
                handled = _serveBackends(reactor, handled, backendReplies, acceptBackend, failBackend)
            server.connectionLost(Failure(ConnectionDone()))

    return run


def _serveBackends(reactor, handled, replies, acceptBackend, failBackend) -> int:
    while handled < len(reactor.tcpClients):
        if replies:
            dialogue, transport = acceptBackend(reactor, handled)
            for chunk in _chunks(replies):
                if dialogue.transport is None or transport.disconnecting:
                    break
                dialogue.dataReceived(chunk)
        else:
            failBackend(reactor, index=handled)
        handled += 1
    return handled


def backendTarget(protocolName: str, login: bytes) -> Callable[[bytes], None]:
    """
    A target whose bytes are a backend's side of the login dialogue: the client logs in with
    C{login}, the backend answers the fuzz input.
    """

    def run(data: bytes) -> None:
        sessionTarget(protocolName, backendReplies=data or b"\r\n")(login)

    return run


# -- the grammars, called directly -----------------------------------------------------------------


def imapGrammar(data: bytes) -> None:
    from protocols import imapgrammar as g
    from protocols.stringgrammar import GrammarError, tokenize

    for line in data.split(b"\n"):
        g.capabilitiesIn(line)
        try:
            g.splitTag(line)
        except GrammarError:
            pass
        try:
            g.parseList(tokenize(line))
        except GrammarError:
            pass


def sieveStrings(data: bytes) -> None:
    from protocols import stringgrammar as g

    try:
        g.tokenize(data)
    except g.GrammarError:
        pass


def smtpGrammar(data: bytes) -> None:
    from protocols import smtpgrammar as g

    for line in data.split(b"\n"):
        line = line.rstrip(b"\r")
        verb, rest = g.splitCommand(line)
        for keyword, nullAllowed in ((b"FROM:", True), (b"TO:", False)):
            for utf8 in (False, True):
                try:
                    g.parsePathArgument(rest, keyword, utf8, nullAllowed, b"501 5.1.3 Bad address")
                except g.SMTPSyntaxError:
                    pass
        try:
            g.parseParameters(rest, b"501 5.5.4 Invalid parameters")
        except g.SMTPSyntaxError:
            pass
        g.validHeloName(rest)
    parser = g.ReplyParser()
    for line in data.split(b"\n"):
        try:
            reply = parser.feed(line.rstrip(b"\r"))
        except g.ReplySyntaxError:
            parser = g.ReplyParser()
            continue
        if reply is not None:
            g.enhancedCode(reply)
            g.ehloKeywords(reply)
            reply.sanitised().render()


def sasl(data: bytes) -> None:
    from casd.auth.sasl import SASLCancelled, SASLExchange, parsePlain
    from casd.failures import ProtocolViolation

    try:
        parsePlain(data)
    except ProtocolViolation:
        pass
    for mechanism in ("PLAIN", "LOGIN"):
        exchange = SASLExchange(mechanism)
        lines = data.split(b"\n")
        try:
            step = exchange.start(SASLExchange.decodeInitial(lines[0]) if lines[0] else None)
            for line in lines[1:]:
                if not isinstance(step, bytes):
                    break
                step = exchange.respond(exchange.decode(line))
        except (ProtocolViolation, SASLCancelled):
            pass


_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


def proxyHeader(data: bytes) -> None:
    from casd.service.proxyproto import ProxyProtocolFactory
    from twisted.internet.protocol import Factory, Protocol

    received: list = []

    class Inner(Protocol):
        def dataReceived(self, chunk):
            received.append(chunk)

    reactor = MemoryReactorClock()
    with _LogWatch():
        factory = ProxyProtocolFactory(Factory.forProtocol(Inner), reactor, trusted=_LOOPBACK)
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        for chunk in _chunks(data):
            if transport.disconnecting:
                break
            protocol.dataReceived(chunk)
        reactor.advance(60)
        protocol.connectionLost(Failure(ConnectionDone()))


def ldapTemplates(data: bytes) -> None:
    from casd.auth.ldapfilter import DNTemplate, FilterTemplate, TemplateError, checkLogin

    template, _, login = data.partition(b"\x00")
    text = template.decode("utf-8", "replace")
    name = login.decode("utf-8", "replace")
    for kind in (FilterTemplate, DNTemplate):
        try:
            built = kind(text)
        except TemplateError:
            continue
        if checkLogin(name) is None:
            result = built.build(name)
            if kind is FilterTemplate:
                result.asText()
    # The configured templates, with a fuzzed login: the common case.
    if checkLogin(name) is None:
        FilterTemplate("(&(objectClass=inetOrgPerson)(|(uid={user})(mail={login})))").build(name).asText()
        DNTemplate("uid={user},ou={domain},dc=example,dc=com").build(name)


def configLoader(data: bytes) -> None:
    from casd.config import ConfigError, parseConfig

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return  # loadConfig refuses it before parsing
    try:
        parseConfig(text, "fuzz/casd.toml", protocols().values())
    except ConfigError:
        pass


# -- the table --------------------------------------------------------------------------------

IMAP_TOKENS = (
    b"a ", b"b ", b"LOGIN", b"AUTHENTICATE", b"PLAIN", b"LOGIN ", b"CAPABILITY", b"ID", b"NOOP",
    b"STARTTLS", b"LOGOUT", b"alice", b"pw", b'"', b"\\", b"{3}", b"{3+}", b"{999999999}", b"(",
    b")", b"NIL", b" ", b"\r\n", b"\n", b"*", b"=", b"AGFsaWNlAHB3", b"\x00", b"\xc3\xa9", b"\xff",
)
POP3_TOKENS = (
    b"USER ", b"PASS ", b"AUTH ", b"PLAIN", b"LOGIN", b"CAPA", b"STLS", b"QUIT", b"APOP ", b"alice",
    b"pw", b" ", b"\r\n", b"\n", b"*", b"=", b"AGFsaWNlAHB3", b"YWxpY2U=", b"\x00", b"\xff",
)
SIEVE_TOKENS = (
    b"AUTHENTICATE ", b'"PLAIN"', b'"LOGIN"', b"CAPABILITY", b"STARTTLS", b"LOGOUT", b"NOOP",
    b'"', b"\\", b"{3}", b"{3+}", b"{99999}", b" ", b"\r\n", b'"AGFsaWNlAHB3"', b"\x00", b"\xff",
)
SMTP_TOKENS = (
    b"EHLO ", b"HELO ", b"x.example", b"MAIL FROM:", b"RCPT TO:", b"<alice@example.com>", b"<>",
    b"<@a,@b:c@example.com>", b"DATA", b"\r\n.\r\n", b"RSET", b"QUIT", b"AUTH PLAIN ", b"AUTH LOGIN",
    b"AGFsaWNlAHB3", b"SIZE=", b"BODY=8BITMIME", b"SMTPUTF8", b"XCLIENT", b" ", b"\r\n", b'"',
    b"\\", b"\xc3\xa9", b"\x00", b"\xff",
)
IMAP_LOGIN = b"a LOGIN alice pw\r\n"
POP3_LOGIN = b"USER alice\r\nPASS pw\r\n"
SIEVE_LOGIN = b'AUTHENTICATE "PLAIN" "AGFsaWNlAHB3"\r\n'
SUBMISSION_LOGIN = b"EHLO x.example\r\nAUTH PLAIN AGFsaWNlAHB3\r\n"

# -- the HTTPS front end and Autodiscover --------------------------------------------------------

# The HTTP front end's unit-test configuration: one vdir, a backend that never answers.
from tests.test_http_site import CONFIG as HTTP_CONFIG  # noqa: E402

HTTP_TOKENS = (
    b"GET ", b"POST ", b"OPTIONS ", b"RPC_IN_DATA ", b"/EWS/", b"/owa/", b"/autodiscover/autodiscover.xml",
    b" HTTP/1.1\r\n", b" HTTP/1.0\r\n", b"Host: h\r\n", b"Content-Length: ", b"Transfer-Encoding: chunked\r\n",
    b"Authorization: Basic YWxpY2U6c2VjcmV0\r\n", b"Cookie: __Host-casd=", b"X-AnchorMailbox: ",
    b"Expect: 100-continue\r\n", b"\r\n", b"\n", b" ", b"\t", b"0\r\n\r\n", b"5\r\nhello\r\n", b"\x00",
)


class _TCPLikeTransport(StringTransport):
    """
    A L{StringTransport} that, like Twisted's TCP transport, lets a producer be unregistered
    twice (an HTTP channel answering 400 does so).
    """

    def unregisterProducer(self):
        if self.producer is not None:
            super().unregisterProducer()


def httpRequests(data: bytes) -> None:
    """
    Bytes from a client on the HTTP front end's connection (request line, headers, bodies,
    pipelining, smuggling attempts), with a backend that never answers.
    """
    from casd.testing import makeContext
    from protocols.http import http

    reactor = MemoryReactorClock()
    with _LogWatch():
        context = makeContext(reactor, users={"alice": "secret"}, config=HTTP_CONFIG)
        section = context.config.protocols["http"]
        peer = IPv4Address("TCP", "198.51.100.7", 40000)
        client = http.buildFactory(context, section, section.listeners[0]).buildProtocol(peer)
        transport = _TCPLikeTransport(hostAddress=IPv4Address("TCP", "127.0.0.1", 443), peerAddress=peer)
        client.makeConnection(transport)
        for chunk in _chunks(data):
            if transport.disconnecting:
                break
            client.dataReceived(chunk)
            reactor.advance(0)
        if transport.disconnecting:
            # What the reactor does next for a closing connection.
            client.connectionLost(Failure(ConnectionDone()))
            reactor.advance(120)
        else:
            reactor.advance(120)
            client.connectionLost(Failure(ConnectionDone()))


def autodiscoverXML(data: bytes) -> None:
    """
    A request body for Outlook's POX, the mobilesync schema and the SOAP service: their parsers
    refuse with the protocol's own errors, nothing else.
    """
    from protocols.http.autodiscover import pox, soap

    try:
        pox.parseRequest(data)
    except pox.PoxError:
        pass
    try:
        soap.parseRequest(data)
    except (soap.SoapFault, soap.InvalidRequest):
        pass


XML_TOKENS = (
    b"<?xml version=\"1.0\"?>", b"<!DOCTYPE x [<!ENTITY a \"b\">]>", b"&a;", b"<Autodiscover", b"</Autodiscover>",
    b' xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"',
    b' xmlns="http://schemas.microsoft.com/exchange/autodiscover/mobilesync/requestschema/2006"',
    b"<Request>", b"</Request>", b"<EMailAddress>", b"</EMailAddress>", b"<LegacyDN>", b"alice@example.com",
    b"<AcceptableResponseSchema>", b"</AcceptableResponseSchema>",
    b"http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a",
    b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/">', b"<s:Body>", b"</s:Body>",
    b"</s:Envelope>", b'<a:GetUserSettingsRequestMessage xmlns:a="http://schemas.microsoft.com/exchange/2010/Autodiscover">',
    b"<a:Mailbox>", b"</a:Mailbox>", b"<", b">", b"/", b'"', b"\x00", b"\xff",
)


TARGETS: dict[str, FuzzTarget] = {
    t.name: t
    for t in (
        FuzzTarget(
            "imap",
            sessionTarget("imap"),
            IMAP_TOKENS,
            (
                IMAP_LOGIN,
                b"a CAPABILITY\r\nb ID (\"name\" \"x\")\r\nc LOGIN {5}\r\nalice {2}\r\npw\r\n",
                b"a AUTHENTICATE PLAIN\r\nAGFsaWNlAHB3\r\n",
                b"a AUTHENTICATE PLAIN AGFsaWNlAHB3\r\nb LOGOUT\r\n",
                b"a LOGIN {3+}\r\nbob \"p\\\"w\"\r\n",
            ),
        ),
        FuzzTarget(
            "pop3",
            sessionTarget("pop3"),
            POP3_TOKENS,
            (POP3_LOGIN, b"CAPA\r\nAUTH PLAIN\r\nAGFsaWNlAHB3\r\n", b"AUTH LOGIN YWxpY2U=\r\ncHc=\r\nQUIT\r\n"),
        ),
        FuzzTarget(
            "managesieve",
            sessionTarget("managesieve"),
            SIEVE_TOKENS,
            (SIEVE_LOGIN, b'CAPABILITY\r\nAUTHENTICATE "PLAIN" {12+}\r\nAGFsaWNlAHB3\r\n', b"LOGOUT\r\n"),
        ),
        FuzzTarget(
            "smtp",
            sessionTarget("smtp"),
            SMTP_TOKENS,
            (
                b"EHLO x.example\r\nMAIL FROM:<s@example.org> SIZE=10\r\nRCPT TO:<alice@example.com>\r\n"
                b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
                b"HELO x\r\nMAIL FROM:<>\r\nRCPT TO:<@a,@b:alice@example.com>\r\nRSET\r\n",
            ),
        ),
        FuzzTarget(
            "submission",
            sessionTarget("submission"),
            SMTP_TOKENS,
            (SUBMISSION_LOGIN, b"EHLO x\r\nAUTH LOGIN\r\nYWxpY2U=\r\ncHc=\r\nMAIL FROM:<alice@example.com>\r\n"),
        ),
        FuzzTarget(
            "imap-backend",
            backendTarget("imap", IMAP_LOGIN),
            IMAP_TOKENS + (b"* OK ", b"I OK", b"A OK", b"A NO", b"[CAPABILITY IMAP4rev1 ID]", b"* CAPABILITY "),
            (b"* OK [CAPABILITY IMAP4rev1 ID AUTH=PLAIN] ready\r\nI OK\r\nA OK [CAPABILITY IMAP4rev1] hi\r\n",),
        ),
        FuzzTarget(
            "pop3-backend",
            backendTarget("pop3", POP3_LOGIN),
            POP3_TOKENS + (b"+OK ", b"-ERR ", b"[XCLIENT]", b"[IN-USE]", b"[SYS/TEMP]"),
            (b"+OK [XCLIENT] Dovecot ready.\r\n+OK\r\n+OK Logged in.\r\n", b"+OK\r\n-ERR [AUTH] no\r\n"),
        ),
        FuzzTarget(
            "smtp-backend",
            backendTarget("submission", SUBMISSION_LOGIN + b"MAIL FROM:<alice@example.com>\r\n"),
            SMTP_TOKENS + (b"220 ", b"250-", b"250 ", b"235 ", b"451 ", b"535 ", b"XCLIENT ADDR NAME"),
            (b"220 mbx ESMTP\r\n250-mbx\r\n250-XCLIENT ADDR NAME\r\n250 AUTH PLAIN\r\n220 mbx\r\n"
             b"250-mbx\r\n250 AUTH PLAIN\r\n235 ok\r\n250 ok\r\n",),
        ),
        FuzzTarget(
            "imap-grammar",
            imapGrammar,
            IMAP_TOKENS,
            (b'a LOGIN "al\\"ice" {3}\r\n', b"* OK [CAPABILITY IMAP4rev1 ID] hi", b'(("a" NIL) "b")'),
        ),
        FuzzTarget(
            "smtp-grammar",
            smtpGrammar,
            SMTP_TOKENS + (b"250-", b"250 ", b"421 4.4.2 x"),
            (b"MAIL FROM:<a@b.example> SIZE=1 BODY=8BITMIME\r\n250-x\r\n250-SIZE 10\r\n250 8BITMIME",),
        ),
        FuzzTarget(
            "sieve-strings",
            sieveStrings,
            SIEVE_TOKENS,
            (b'AUTHENTICATE "PLAIN" "x" {3+}', b'"a\\"b" {0}'),
        ),
        FuzzTarget(
            "sasl",
            sasl,
            (b"AGFsaWNlAHB3", b"YWxpY2U=", b"cHc=", b"=", b"*", b"\n", b"\x00", b"====", b" ", b"\xff"),
            (b"AGFsaWNlAHB3", b"\nYWxpY2U=\ncHc=", b"a\x00b\x00c", b"=\n*"),
        ),
        FuzzTarget(
            "proxy",
            proxyHeader,
            (b"PROXY ", b"TCP4 ", b"TCP6 ", b"UNKNOWN", b"192.0.2.1 ", b"::1 ", b"1234 ", b"\r\n",
             b"\r\n\r\n\x00\r\nQUIT\n", b"\x21", b"\x11", b"\x00\x0c", b"\x00\xff", b"\x7f\x00\x00\x01"),
            (
                b"PROXY TCP4 192.0.2.1 127.0.0.1 40000 143\r\na CAPABILITY\r\n",
                b"PROXY TCP6 2001:db8::1 ::1 40000 143\r\n",
                b"PROXY UNKNOWN\r\n",
                b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\xc0\x00\x02\x01\x7f\x00\x00\x01\x9c\x40\x00\x8f",
            ),
        ),
        FuzzTarget(
            "http",
            httpRequests,
            HTTP_TOKENS,
            (
                b"GET /EWS/x HTTP/1.1\r\nHost: h\r\nAuthorization: Basic YWxpY2U6c2VjcmV0\r\n\r\n",
                b"POST /EWS/ HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                b"GET /owa/healthcheck.htm HTTP/1.1\r\nHost: h\r\n\r\nGET /nope HTTP/1.1\r\nHost: h\r\n\r\n",
            ),
        ),
        FuzzTarget(
            "autodiscover-xml",
            autodiscoverXML,
            XML_TOKENS,
            (
                b'<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">'
                b"<Request><EMailAddress>alice@example.com</EMailAddress><AcceptableResponseSchema>"
                b"http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
                b"</AcceptableResponseSchema></Request></Autodiscover>",
                b'<!DOCTYPE x [<!ENTITY a "b">]><x>&a;</x>',
                b'<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"><s:Body>'
                b'<a:GetUserSettingsRequestMessage xmlns:a="http://schemas.microsoft.com/exchange/2010/Autodiscover">'
                b"<a:Request><a:Users><a:User><a:Mailbox>alice@example.com</a:Mailbox></a:User></a:Users>"
                b"</a:Request></a:GetUserSettingsRequestMessage></s:Body></s:Envelope>",
            ),
        ),
        FuzzTarget(
            "ldap-templates",
            ldapTemplates,
            (b"(", b")", b"&", b"|", b"!", b"=", b"*", b"uid", b"{login}", b"{user}", b"{domain}",
             b"\x00", b"@", b"\\", b"\\2a", b",", b"ou=", b"\xc3\xa9", b"{", b"}"),
            (
                b"(uid={user})\x00alice@example.com",
                b"(&(objectClass=*)(|(mail={login})(uid={user}*)))\x00*)(uid=*",
                b"uid={user},dc={domain}\x00a,b+c=d@ex\\ample",
            ),
        ),
        FuzzTarget(
            "config",
            configLoader,
            (b"[imap]\n", b"[[imap.listen]]\n", b'endpoint = "tcp:1143"\n', b"[backends.m]\n",
             b'host = "192.0.2.1"\n', b'protocols = ["imap"]\n', b"[groups.g]\n", b'members = ["m"]\n',
             b"[routing]\n", b'default_backend = "m"\n', b"[tls]\n", b"[[tls.sni]]\n", b"[auth]\n",
             b"cache_ttl = -1\n", b"= ", b'"', b"[", b"]", b"\n", b"1e999", b"true"),
            (
                b'[routing]\ndefault_backend = "m"\n[backends.m]\nhost = "192.0.2.1"\n'
                b'protocols = ["imap", "pop3"]\n[imap]\n[[imap.listen]]\nendpoint = "tcp:1143"\n',
                b'[groups.g]\nmembers = ["m", "n"]\nbalance = "hash"\n[health]\ninterval = 0\n',
                b"[auth]\ncache_ttl = 5\ncache_during_outage = false\n[backend]\nconnect_retry_time = 1e999\n",
            ),
        ),
    )
}
