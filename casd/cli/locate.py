# -*- test-case-name: tests.integration.test_locate -*-
"""
C{casd locate USER}: the route casd would take for a user, and why.

    $ casd locate --config /etc/casd/casd.toml alice
    user      alice (address alice@example.com, mailhost dag1)
    node      site east
    route     mailbox servers, group dag1
    why       mailhost attribute: group dag1 (rendezvous hashing)
    members   in the order tried:
      1. mbx2(10.0.1.12:143) starttls   UP
      2. mbx1(10.0.1.11:143) starttls   draining
    proxy TTL 4

The user is looked up in the configured directory (users file, LDAP) without a password, and
routed by the same router a running node uses.  A running node also knows which members its
health checks found DOWN; C{--check} probes each member once, now, to show the same.
"""

from __future__ import annotations

import sys

from twisted.internet import defer

from casd.failures import BackendUnavailable, CASFailure


def addLocateCommand(sub) -> None:
    """
    Register C{casd locate} with the C{casd} command's sub-parsers.
    """
    p = sub.add_parser("locate", help="print the route casd would take for a user, and why")
    p.add_argument("user", help="a login or an e-mail address")
    p.add_argument("-c", "--config", required=True, help="the TOML configuration file")
    p.add_argument("-p", "--protocol", default="imap", help="the protocol to route (default imap)")
    p.add_argument("--check", action="store_true", help="probe each member now and show its health")
    p.set_defaults(func=locateCommand)


def locateCommand(args) -> int:
    from twisted.internet.task import react

    from casd.config import ConfigError, loadConfig
    from casd.service.discovery import discoverProtocols

    protocols = discoverProtocols()
    try:
        config = loadConfig(args.config, protocols.values())
    except ConfigError as e:
        print(f"casd: configuration error: {e}", file=sys.stderr)
        return 1
    if args.protocol not in protocols:
        print(f"casd: unknown protocol {args.protocol!r} (one of {', '.join(protocols)})", file=sys.stderr)
        return 2

    @defer.inlineCallbacks
    def run(reactor):
        from casd.service.tap import buildContext

        try:
            context, _ = buildContext(config, protocols, reactor, _noHashing)
        except ConfigError as e:
            print(f"casd: configuration error: {e}", file=sys.stderr)
            return 1
        code, text = yield describeRoute(context, args.user, args.protocol, check=args.check)
        sys.stdout.write(text)
        return code

    codes = []
    try:
        react(lambda reactor: run(reactor).addCallback(codes.append))
    except SystemExit:
        pass
    return codes[0] if codes else 1


def _noHashing(f, *args):
    # casd locate never verifies a password.
    return defer.maybeDeferred(f, *args)


@defer.inlineCallbacks
def describeRoute(context, name: str, protocolName: str = "imap", check: bool = False):
    """
    Route C{name} as a running node would and say how and why.

    @param context: a L{casd.service.context.CASContext}.
    @param check: probe each member now (else only drains are known).
    @return: a L{Deferred} firing with C{(exit code, text)}: 0 when there is a route, 1 when
        the user would get a temporary failure (or is unknown).
    """
    from casd.auth import UserRecord
    from casd.pool.health import probeMember
    from casd.routing.router import Redirected

    config = context.config
    protocol = context.protocols[protocolName]
    lines = []

    def add(label, text=""):
        lines.append(f"{label:<9} {text}".rstrip())

    try:
        user = yield context.directory.lookup(name)
    except CASFailure as e:
        return 1, f"directory unavailable: {e}\n"
    if user is None:
        add("user", f"{name}: not in the directory (routed as a bare login below)")
        user = UserRecord(login=name)
    else:
        details = [
            f"{label} {value}"
            for label, value in (
                ("backend login", getattr(user, "backendLogin", "")),
                ("address", user.address),
                ("mailhost", user.mailHost),
                ("site", user.site),
            )
            if value
        ]
        add("user", user.login + (f" ({', '.join(details)})" if details else ""))
    add("node", f"site {config.server.site}" if config.server.site else "no site (sites are not used)")
    try:
        route = yield context.router.locate(user, protocol)
    except Redirected as e:
        add("route", f"redirect to {e.url}")
        add("why", str(e))
        return 0, "\n".join(lines) + "\n"
    except BackendUnavailable as e:
        add("route", "none: the client gets a temporary failure")
        add("why", str(e))
        return 1, "\n".join(lines) + "\n"
    kind = f"site {route.site}'s casd" if route.kind == "cas" else "mailbox servers"
    add("route", f"{kind}, {'group' if route.group in config.groups else 'server'} {route.group}")
    add("why", route.reason)
    add("members", "in the order tried:")
    connector = context.connector
    for i, target in enumerate(route.targets, 1):
        state = connector.state(target)
        if check and state != "draining":
            reason = yield probeMember(
                context.reactor,
                connector.endpointFor(target, config.health.timeout),
                getattr(protocol, "healthProbe", None),
                config.health.timeout,
            )
            state = "UP (checked now)" if reason is None else f"DOWN (checked now: {reason})"
        elif state == "UP":
            state = "not checked (--check probes it now)"
        lines.append(f"  {i}. {target.describe()} {target.tls:<8}  {state}")
    add("proxy TTL", str(route.proxyTTL))
    return 0, "\n".join(lines) + "\n"
