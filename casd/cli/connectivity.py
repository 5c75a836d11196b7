# -*- test-case-name: tests.integration.test_operations -*-
"""
C{casd test-connectivity USER}: the whole path a user's client takes, step by step, with timings
(in the spirit of Exchange's C{Test-ImapConnectivity} and friends).

    $ casd test-connectivity -c /etc/casd/casd.toml alice --protocol imap --password-file pw
    config     /etc/casd/casd.toml                          ok      3.1 ms
    directory  alice (address alice@example.com)            ok      4.0 ms
    route      mailbox servers, group dag1                  ok      0.2 ms
    backend    mbx1(10.0.1.11:143) starttls: greeting       ok     12.5 ms
    connect    127.0.0.1:143 (listener imap-143)            ok      0.4 ms
    tls        STARTTLS, TLSv1.3                            ok      5.3 ms
    login      alice through casd to the mailbox server     ok     48.0 ms
    command    EXAMINE INBOX: 3 messages                    ok      6.1 ms
    logout                                                  ok      0.9 ms

The directory look-up, the route and a probe of each member are made as a running node makes
them; then the command logs in through one of this node's own listeners with a real client
(imaplib, poplib, smtplib, http.client), so the user's credentials travel the same path as a
client's, and runs a harmless command (for HTTP, a GET of a vdir that takes Basic
authentication).  Nothing is changed and no mail is sent.  The exit status is non-zero
when a step fails; the password is never printed.
"""

from __future__ import annotations

import getpass
import imaplib
import poplib
import re
import smtplib
import socket
import ssl
import sys
import time

from twisted.internet import defer

#: The client each protocol's test uses, and the step it ends with.
PROTOCOLS = ("imap", "pop3", "smtp", "submission", "http")


class StepFailed(Exception):
    """
    A step of the test failed; its message says why.
    """


class Report:
    """
    The steps, as they are printed.
    """

    def __init__(self, out=sys.stdout) -> None:
        self.out = out
        self.failed = False

    def step(self, name: str, detail: str, ok: bool, seconds: float) -> None:
        self.failed |= not ok
        self.out.write(f"{name:<10} {detail:<52} {'ok' if ok else 'FAILED':<6} {seconds * 1000:8.1f} ms\n")
        self.out.flush()

    def run(self, name: str, detail: str, f, *args):
        """
        Run one step; print it; raise L{StepFailed} when it fails.
        """
        started = time.monotonic()
        try:
            result = f(*args)
        except (StepFailed, OSError, ssl.SSLError, imaplib.IMAP4.error, poplib.error_proto,
                smtplib.SMTPException, EOFError) as e:
            self.step(name, f"{detail}: {_describe(e)}", False, time.monotonic() - started)
            raise StepFailed(str(e)) from None
        text = result if isinstance(result, str) else detail
        self.step(name, text, True, time.monotonic() - started)
        return result


def _describe(e: Exception) -> str:
    text = str(e) or type(e).__name__
    return re.sub(r"\s+", " ", text)[:200]


def addConnectivityCommand(sub) -> None:
    p = sub.add_parser(
        "test-connectivity", help="run a user's whole path (directory, route, backend, login) and time each step"
    )
    p.add_argument("user", help="the login to test")
    p.add_argument("-c", "--config", required=True, help="the TOML configuration file")
    p.add_argument("-p", "--protocol", default="imap", choices=PROTOCOLS, help="the protocol to test (default imap)")
    p.add_argument("--password-file", help="a file whose first line is the password (else it is asked for)")
    p.add_argument("--host", help="connect to this name instead of the listener's address (its certificate is then verified)")
    p.add_argument("--listener", help="the name of the listener to use (default: the first that fits)")
    p.add_argument("--path", help="HTTP: the path to GET (default: the first vdir taking Basic authentication)")
    p.set_defaults(func=connectivityCommand)


def connectivityCommand(args) -> int:
    from casd.config import ConfigError, loadConfig
    from casd.service.discovery import discoverProtocols

    report = Report()
    started = time.monotonic()
    protocols = discoverProtocols()
    try:
        config = loadConfig(args.config, protocols.values())
    except ConfigError as e:
        report.step("config", _describe(e), False, time.monotonic() - started)
        return 1
    report.step("config", args.config, True, time.monotonic() - started)
    section = config.protocols.get(args.protocol)
    if section is None or not section.enabled or not section.listeners:
        print(f"casd: {args.protocol} is not enabled on this node", file=sys.stderr)
        return 2
    password = _readPassword(args)
    if not _checkRoute(config, protocols, args, report):
        return 1
    try:
        listener = _pickListener(section, args.listener)
        args.starttls = listener.tls == "starttls" and config.tls.enabled
        args.section = section
        CLIENTS[args.protocol](report, listener, args, password)
    except StepFailed:
        return 1
    return 1 if report.failed else 0


def _readPassword(args) -> str:
    if args.password_file:
        with open(args.password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return getpass.getpass(f"Password for {args.user}: ")


def _checkRoute(config, protocols, args, report) -> bool:
    """
    The directory look-up, the route and a probe of each member, as a running node makes them.
    """
    from twisted.internet.task import react

    from casd.cli.locate import _noHashing
    from casd.failures import BackendUnavailable, CASFailure
    from casd.pool.health import probeMember
    from casd.routing.router import Redirected
    from casd.service.tap import buildContext

    outcome = []

    @defer.inlineCallbacks
    def run(reactor):

        context, _ = buildContext(config, protocols, reactor, _noHashing)
        protocol = protocols[args.protocol]
        t = time.monotonic()
        try:
            user = yield context.directory.lookup(args.user)
        except CASFailure as e:
            report.step("directory", f"unavailable: {e}", False, time.monotonic() - t)
            return
        if user is None:
            report.step("directory", f"{args.user}: not found", False, time.monotonic() - t)
            return
        extra = f" (address {user.address})" if user.address else ""
        report.step("directory", f"{user.login}{extra}", True, time.monotonic() - t)
        t = time.monotonic()
        try:
            route = yield context.router.locate(user, protocol)
        except Redirected as e:
            report.step("route", f"redirect to {e.url}", True, time.monotonic() - t)
            outcome.append(True)
            return
        except BackendUnavailable as e:
            report.step("route", f"none: {e}", False, time.monotonic() - t)
            return
        report.step("route", f"{'casd of site ' + route.site if route.kind == 'cas' else 'mailbox servers'}, {route.group}",
                    True, time.monotonic() - t)
        anyUp = False
        for target in route.targets:
            t = time.monotonic()
            reason = yield probeMember(
                reactor,
                context.connector.endpointFor(target, config.health.timeout),
                getattr(protocol, "healthProbe", None),
                config.health.timeout,
            )
            ok = reason is None
            anyUp |= ok
            detail = f"{target.describe()} {target.tls}" + ("" if ok else f": {reason}")
            # One member down is not a failure of the path while another takes the session.
            report.step("backend", detail, ok or len(route.targets) > 1, time.monotonic() - t)
        if not anyUp:
            report.failed = True
            return
        outcome.append(True)

    try:
        react(run)
    except SystemExit:
        pass
    return bool(outcome) and not report.failed


def _pickListener(section, name):
    for listener in section.listeners:
        if name and listener.name != name:
            continue
        if listener.endpoint.startswith("haproxy:") and not name:
            continue
        return listener
    raise StepFailed(f"no listener to connect to (named {name!r})" if name else
                     "every listener expects a PROXY header: give --listener")


def _address(listener, host):
    """
    @return: C{(host, port, implicitTLS)} for a client of C{listener}.
    """
    parts = listener.endpoint.split(":")
    kind = parts[0]
    if kind == "haproxy":
        parts = parts[1:]
        kind = parts[0]
    port = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    interface = ""
    for part in parts[2:]:
        if part.startswith("interface="):
            interface = part.split("=", 1)[1]
    if not host:
        host = interface if interface not in ("", "0.0.0.0", "::") else "127.0.0.1"
    return host, port, kind == "ssl" or listener.tls == "implicit"


def _tlsContext(verify: bool) -> ssl.SSLContext:
    if verify:
        return ssl.create_default_context()
    # Testing this node itself by address: its certificate names a host, not 127.0.0.1.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _tlsDetail(sock, how: str) -> str:
    version = sock.version() if hasattr(sock, "version") else "?"
    return f"{how}, {version}"


def _imap(report, listener, args, password):
    host, port, implicit = _address(listener, args.host)
    context = _tlsContext(bool(args.host))
    where = f"{host}:{port} (listener {listener.name})"
    if implicit:
        client = report.run("connect", where, lambda: imaplib.IMAP4_SSL(host, port, ssl_context=context, timeout=30))
        report.step("tls", _tlsDetail(client.sock, "implicit TLS"), True, 0.0)
    else:
        client = report.run("connect", where, lambda: imaplib.IMAP4(host, port, timeout=30))
        if args.starttls:
            report.run("tls", "STARTTLS", lambda: (client.starttls(context), _tlsDetail(client.sock, "STARTTLS"))[1])
    try:
        report.run("login", f"{args.user} through casd to the mailbox server",
                   lambda: _ok(client.login(args.user, password)))
        report.run("command", "EXAMINE INBOX", lambda: f"EXAMINE INBOX: {_ok(client.select('INBOX', readonly=True))} messages")
    finally:
        try:
            report.run("logout", "", lambda: _ok(client.logout()) and "")
        except StepFailed:
            pass


def _ok(reply):
    typ, data = reply
    if typ not in ("OK", "BYE"):
        raise StepFailed(b" ".join(d for d in data if isinstance(d, bytes)).decode("utf-8", "replace"))
    first = data[0] if data else b""
    return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)


def _pop3(report, listener, args, password):
    host, port, implicit = _address(listener, args.host)
    context = _tlsContext(bool(args.host))
    where = f"{host}:{port} (listener {listener.name})"
    if implicit:
        client = report.run("connect", where, lambda: poplib.POP3_SSL(host, port, context=context, timeout=30))
        report.step("tls", _tlsDetail(client.sock, "implicit TLS"), True, 0.0)
    else:
        client = report.run("connect", where, lambda: poplib.POP3(host, port, timeout=30))
        if args.starttls:
            report.run("tls", "STLS", lambda: (client.stls(context), _tlsDetail(client.sock, "STLS"))[1])
    report.run("login", f"{args.user} through casd to the mailbox server",
               lambda: (client.user(args.user), client.pass_(password))[1].decode("utf-8", "replace")[:52])
    report.run("command", "STAT", lambda: "STAT: %d messages, %d bytes" % client.stat())
    report.run("logout", "", lambda: client.quit().decode("utf-8", "replace")[:52])


def _smtp(report, listener, args, password):
    host, port, implicit = _address(listener, args.host)
    context = _tlsContext(bool(args.host))
    where = f"{host}:{port} (listener {listener.name})"
    if implicit:
        client = report.run("connect", where, lambda: smtplib.SMTP_SSL(host, port, context=context, timeout=30))
    else:
        client = report.run("connect", where, lambda: smtplib.SMTP(host, port, timeout=30))
    report.run("command", "EHLO", lambda: "EHLO: %d %s" % (client.ehlo(socket.getfqdn())[0], "ok"))
    if not implicit and args.starttls:
        report.run("tls", "STARTTLS", lambda: (client.starttls(context=context), client.ehlo(), _tlsDetail(client.sock, "STARTTLS"))[2])
    if args.protocol == "submission":
        report.run("login", f"{args.user} through casd to the mailbox server",
                   lambda: "AUTH: %d" % client.login(args.user, password)[0])
    report.run("command", "RSET (no mail is sent)", lambda: "RSET: %d" % client.rset()[0])
    report.run("logout", "", lambda: "QUIT: %d" % client.quit()[0])


def _http(report, listener, args, password):
    import base64
    import http.client

    host, port, implicit = _address(listener, args.host)
    path = args.path or _basicVdir(args.section)
    if path is None:
        raise StepFailed("no [[http.vdir]] takes Basic authentication: give --path")
    where = f"{host}:{port} (listener {listener.name})"
    if implicit:
        context = _tlsContext(bool(args.host))
        client = http.client.HTTPSConnection(host, port, timeout=30, context=context)
    else:
        client = http.client.HTTPConnection(host, port, timeout=30)
    report.run("connect", where, client.connect)
    if implicit:
        report.step("tls", _tlsDetail(client.sock, "implicit TLS"), True, 0.0)
    token = base64.b64encode(f"{args.user}:{password}".encode("utf-8")).decode("ascii")

    def get():
        client.request("GET", path, headers={"Authorization": f"Basic {token}", "Host": args.host or host})
        response = client.getresponse()
        response.read()
        if response.status == 401:
            raise StepFailed(f"GET {path}: 401, the credentials were refused")
        if response.status >= 500:
            raise StepFailed(f"GET {path}: {response.status} {response.reason}")
        return f"GET {path}: {response.status} {response.reason}"

    report.run("login", f"GET {path} as {args.user}", get)
    report.run("logout", "", lambda: (client.close(), "")[1])


def _basicVdir(section):
    for vdir in getattr(section, "vdir", ()):
        if "basic" in vdir.auth:
            return vdir.path.rstrip("/") + "/"
    return None


CLIENTS = {"imap": _imap, "pop3": _pop3, "smtp": _smtp, "submission": _smtp, "http": _http}
