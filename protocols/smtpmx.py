# -*- test-case-name: tests.test_smtpmx -*-
"""
SMTP on port 25 (RFC 5321): mail from other servers, filtered (the pregreet test, DNS block
lists, accepted domains, the directory) and routed by recipient to the mailbox servers' SMTP,
never queued.  The transaction itself is L{protocols.smtp}'s.
"""

from __future__ import annotations

from twisted.internet import defer, task

from casd.plugin import CASFailure, DirectoryUnavailable, Setting
from protocols.smtp import SharedState, SMTPDescriptor, SMTPServer
from protocols.smtpfilters import RecipientCache, Verdict, acceptedDomain, dnsblResolverFactory
from protocols.smtpsettings import COMMON_SETTINGS

MX_SETTINGS = (
    Setting(
        "enabled",
        "bool",
        False,
        "Serve SMTP on port 25.  Off unless set, so that a configuration written before casd"
        " spoke SMTP opens no new port.",
    ),
    Setting(
        "accepted_domains",
        "strlist",
        (),
        "Domains casd takes mail for (C{.domain} for its subdomains); a recipient elsewhere gets"
        " C{554 5.7.1} (casd is never an open relay), an unknown one here C{550 5.1.1}.",
    ),
    Setting(
        "recipient_delimiter",
        "str",
        "",
        "Separates an address extension (C{user+tag@domain}): an unknown address is looked up"
        " again without it.",
    ),
    Setting(
        "recipient_cache_ttl",
        "float",
        60.0,
        "Seconds a recipient look-up (found or unknown) is remembered, instead of [auth]"
        " C{cache_ttl}: a mailbox deleted from the directory stops receiving mail within this"
        " time, and a recipient looked up within it is accepted while the directory is down;"
        " 0 asks the directory for every recipient.",
        minimum=0,
    ),
    Setting(
        "pregreet_delay",
        "float",
        0.0,
        "Seconds casd waits, after a partial greeting, before the real one; a client that"
        " talks first is refused (Postfix postscreen's pregreet test); 0 turns it off.",
        minimum=0,
    ),
    Setting(
        "dnsbl_zones",
        "strlist",
        (),
        "DNS block lists asked about each client (e.g. C{zen.spamhaus.org}); a listed client"
        " is refused with C{554 5.7.1}.",
    ),
    Setting(
        "dnsbl_timeout",
        "float",
        2.0,
        "Seconds the DNSBL look-ups may take together; no answer in time means not listed.",
        minimum=0.001,
    ),
    Setting("dnsbl_cache_ttl", "float", 300.0, "Seconds a DNSBL answer is remembered.", minimum=0),
    Setting(
        "dnsbl_servers",
        "strlist",
        (),
        "DNS servers (C{address:port}) for the DNSBL look-ups; empty means C{/etc/resolv.conf}.",
    ),
)


class MXServer(SMTPServer):
    """
    One port-25 session: no AUTH; each recipient is checked (accepted domain, directory) and
    routed to its own mailbox server.
    """

    def connectionChecks(self, host: str, verdict: str):
        if verdict != Verdict.ACCEPT:
            return None
        checks = []
        if self.section.pregreet_delay:
            # A partial greeting, as Postfix's postscreen sends: a client that speaks before
            # the last line is a bot that does not wait for its turn.
            self.send(b"220-" + self.hostname + b" ESMTP\r\n")
            checks.append(task.deferLater(self.clock, self.section.pregreet_delay, lambda: None))
        if self.section.dnsbl_zones:
            checks.append(self.shared.filter.listed(host))
        if not checks:
            return None
        return defer.gatherResults(checks).addCallback(self._verdict)

    def _verdict(self, results):
        zone = next((r for r in results if r), None)
        if self._talkedEarly:
            return b"554 5.5.1 Error: SMTP protocol synchronization", "pregreet"
        if zone is not None:
            return (
                b"554 5.7.1 Service unavailable; client ["
                + self.client.peerHost.encode("ascii")
                + b"] blocked using "
                + zone.encode("ascii", "replace"),
                f"dnsbl {zone}",
            )
        return None

    @defer.inlineCallbacks
    def routeRecipient(self, rcpt):
        """
        Recipient filtering on port 25: an accepted domain, then the directory (through the
        recipient cache), then the router.
        """
        where = rcpt.path()
        domains = self.section.accepted_domains
        address = rcpt.address
        if not rcpt.domain and domains:
            address = f"{rcpt.local}@{domains[0]}"  # <Postmaster> without a domain
        elif not acceptedDomain(rcpt.domain, domains):
            # casd is never an open relay.
            return b"554 5.7.1 " + where + b": Relay access denied", True
        lookupFailed = b"451 4.3.0 " + where + b": Temporary lookup failure, try again later", False
        if self.context.directory is None:
            self.log.error("no directory to look recipients up in: every recipient is deferred")
            return lookupFailed
        try:
            found = yield self.locateRecipient(address, self._lookup)
            delimiter = self.section.recipient_delimiter
            if found is None and delimiter:
                local, _, domain = address.rpartition("@")
                base = local.split(delimiter, 1)[0]
                if base and base != local:
                    found = yield self.locateRecipient(f"{base}@{domain}", self._lookup)
        except DirectoryUnavailable:
            return lookupFailed
        except CASFailure:
            raise  # no route: the transaction core words it
        except Exception:
            self.log.failure("recipient look-up of {rcpt} failed", rcpt=address)
            return lookupFailed
        if found is None:
            return b"550 5.1.1 " + where + b": Recipient address rejected: User unknown", True
        return found[1]

    def _lookup(self, address: str):
        return self.shared.recipients.lookup(self.context.directory, address)


class MXShared(SharedState):
    """
    Port 25's shared state: the connection filter with its DNSBL resolver, the recipient cache.
    """

    def __init__(self, section, context) -> None:
        super().__init__(
            section, context, dnsblResolverFactory(section.dnsbl_servers, context.reactor)
        )
        self.recipients = RecipientCache(context.reactor, section.recipient_cache_ttl)


class MXDescriptor(SMTPDescriptor):
    def makeShared(self, section, context) -> MXShared:
        return MXShared(section, context)


smtp = MXDescriptor(
    name="smtp",
    description="SMTP (RFC 5321) on port 25: mail from other servers, filtered and routed by"
    " recipient to the mailbox servers' SMTP, never queued",
    server=MXServer,
    defaultListeners=({"endpoint": "tcp:25", "tls": "starttls"},),
    defaultBackendPort=25,
    settings=COMMON_SETTINGS + MX_SETTINGS,
)
