# -*- test-case-name: tests.test_smtpfilters -*-
"""
The filters of casd's SMTP front door: who may connect (allow and deny networks, per-address
connection and rate limits, DNS block lists with bounded time and a cache, and the resolver
they ask), who may send (blocked senders, an address a user owns), which recipients are taken
(accepted domains, the recipient look-up cache) and how much an authenticated user may send
(per-user limits as a policy).

State lives in this node's memory, per listener set of one protocol: limits are per node.
"""

from __future__ import annotations

from collections import deque

from twisted.internet import defer
from twisted.logger import Logger

from casd.auth.cache import CachingChecker
from casd.net import parseAddress
from casd.session.clientinfo import isTrusted

#: Addresses tracked for rate limits before old entries are swept.
MAX_TRACKED = 10000
#: The window of C{connection_rate_limit} and C{user_messages_per_hour}, in seconds.
RATE_WINDOW = 60.0
HOUR = 3600.0


class Verdict:
    """
    What L{ConnectionFilter.admit} decided.
    """

    ALLOW = "allow"  # on the allow list: no further checks
    ACCEPT = "accept"
    DENY = "deny"
    THROTTLE = "throttle"


def dnsblName(host: str, zone: str) -> str | None:
    """
    The name to look up for C{host} in C{zone}: reversed octets (IPv4) or nibbles (IPv6).
    """
    ip = parseAddress(host)
    if ip is None:
        return None
    if ip.version == 4:
        labels = str(ip).split(".")
    else:
        labels = list(ip.exploded.replace(":", ""))
    return ".".join(reversed(labels)) + "." + zone.strip(".")


class ConnectionFilter:
    """
    Connection filtering for one SMTP listener set.

    @ivar resolver: an L{twisted.internet.interfaces.IResolver} for DNSBL look-ups, made on
        first use (tests set their own).
    """

    log = Logger()

    def __init__(self, section, clock, resolverFactory=None) -> None:
        self.section = section
        self.clock = clock
        self.resolverFactory = resolverFactory
        self.resolver = None
        self.open: dict[str, int] = {}
        self._recent: dict[str, deque] = {}
        self._cache: dict[str, tuple[float, str | None]] = {}

    def admit(self, host: str) -> str:
        """
        Decide about a new connection from C{host} and count it when it is let in.

        @return: a L{Verdict}; for C{ALLOW} and C{ACCEPT} the caller must call L{closed}.
        """
        s = self.section
        if s.allow_networks and isTrusted(host, s.allow_networks):
            self.open[host] = self.open.get(host, 0) + 1
            return Verdict.ALLOW
        if s.deny_networks and isTrusted(host, s.deny_networks):
            return Verdict.DENY
        if (
            s.max_connections_per_address
            and self.open.get(host, 0) >= s.max_connections_per_address
        ):
            return Verdict.THROTTLE
        if s.connection_rate_limit and not self._withinRate(host, s.connection_rate_limit):
            return Verdict.THROTTLE
        self.open[host] = self.open.get(host, 0) + 1
        return Verdict.ACCEPT

    def closed(self, host: str) -> None:
        left = self.open.get(host, 0) - 1
        if left > 0:
            self.open[host] = left
        else:
            self.open.pop(host, None)

    def _withinRate(self, host: str, limit: int) -> bool:
        now = self.clock.seconds()
        if len(self._recent) > MAX_TRACKED:
            for key in [k for k, q in self._recent.items() if not q or q[-1] <= now - RATE_WINDOW]:
                del self._recent[key]
        times = self._recent.setdefault(host, deque())
        while times and times[0] <= now - RATE_WINDOW:
            times.popleft()
        if len(times) >= limit:
            return False
        times.append(now)
        return True

    # -- DNS block lists ---------------------------------------------------------------------

    def listed(self, host: str):
        """
        Ask the configured block lists about C{host}, all at once, within C{dnsbl_timeout}
        seconds; an answer that does not come in time counts as "not listed" (the check must
        never hold mail back).

        @return: a L{Deferred} firing with the zone that lists C{host}, or C{None}.
        """
        zones = self.section.dnsbl_zones
        if not zones:
            return defer.succeed(None)
        now = self.clock.seconds()
        cached = self._cache.get(host)
        if cached is not None and cached[0] > now:
            return defer.succeed(cached[1])
        if self.resolver is None:
            self.resolver = self.resolverFactory()
        queries = []
        for zone in zones:
            name = dnsblName(host, zone)
            if name is None:
                continue
            d = self.resolver.lookupAddress(name, timeout=(self.section.dnsbl_timeout,))
            d.addCallback(self._isListed, zone)
            d.addErrback(lambda f: None)
            queries.append(d)
        if not queries:
            return defer.succeed(None)
        done = defer.Deferred()
        left = [len(queries)]

        def answered(zone):
            left[0] -= 1
            if done.called:
                return
            if zone is not None or not left[0]:
                timer.cancel()
                self._remember(host, zone)
                done.callback(zone)

        def expired():
            self.log.info("DNSBL look-up of {host} took too long: not listed", host=host)
            done.callback(None)
            for d in queries:
                d.cancel()

        timer = self.clock.callLater(self.section.dnsbl_timeout, expired)
        for d in queries:
            d.addCallback(answered)
        return done

    def _remember(self, host: str, zone: str | None) -> None:
        now = self.clock.seconds()
        if len(self._cache) > MAX_TRACKED:
            self._cache = {k: v for k, v in self._cache.items() if v[0] > now}
        self._cache[host] = (now + self.section.dnsbl_cache_ttl, zone)

    @staticmethod
    def _isListed(result, zone):
        answers = result[0]
        for rr in answers:
            payload = rr.payload
            address = getattr(payload, "dottedQuad", None)
            if address is not None and address().startswith("127."):
                return zone
        return None


def senderBlocked(address: str, blocked) -> bool:
    """
    Whether a sender matches C{blocked_senders}: C{user@domain} exactly, C{@domain} or
    C{domain} for one domain, C{.domain} for its subdomains.
    """
    if not address or not blocked:
        return False
    address = address.lower()
    domain = address.rpartition("@")[2]
    for entry in blocked:
        entry = entry.lower()
        if entry.startswith("."):
            if domain.endswith(entry):
                return True
        elif "@" in entry[1:]:
            if address == entry:
                return True
        elif domain == entry.lstrip("@"):
            return True
    return False


def policyInt(user, key: str, default: int) -> int:
    """
    A whole-number policy attribute of C{user} (e.g. C{smtp_max_recipients}), else C{default}.
    """
    policy = getattr(user, "policy", ()) or ()
    items = policy.items() if hasattr(policy, "items") else policy
    for item in items:
        if isinstance(item, tuple) and len(item) == 2 and item[0] == key:
            v = item[1]
            try:
                return max(0, int(v))
            except (TypeError, ValueError):
                return default
    return default


class SendingLimits:
    """
    Per-user sending limits for submission: messages an hour, counted when a backend accepted
    them.  The default is C{user_messages_per_hour}; the user's C{smtp_messages_per_hour}
    policy attribute overrides it (0: no limit).
    """

    def __init__(self, section, clock) -> None:
        self.section = section
        self.clock = clock
        self._sent: dict[str, deque] = {}

    def _limit(self, user) -> int:
        return policyInt(user, "smtp_messages_per_hour", self.section.user_messages_per_hour)

    def _times(self, user) -> deque:
        now = self.clock.seconds()
        times = self._sent.setdefault(user.login, deque())
        while times and times[0] <= now - HOUR:
            times.popleft()
        return times

    def mayStart(self, user) -> bool:
        limit = self._limit(user)
        return not limit or len(self._times(user)) < limit

    def sent(self, user) -> None:
        if self._limit(user):
            self._times(user).append(self.clock.seconds())
            if len(self._sent) > MAX_TRACKED:
                self._sent = {k: q for k, q in self._sent.items() if q}


def ownsAddress(user, sender) -> bool:
    """
    Whether the envelope sender C{sender} is C{user}'s own address (C{enforce_sender}).
    """
    own = user.address or (user.login if "@" in user.login else "")
    return bool(own) and sender.address.lower() == own.lower()


def acceptedDomain(domain: str, domains) -> bool:
    """
    Whether C{domain} is one casd accepts mail for: listed, or below a listed C{.domain}.
    """
    for entry in domains:
        entry = entry.lower()
        if domain == entry or entry.startswith(".") and domain.endswith(entry):
            return True
    return False


def hostPort(text: str, defaultPort: int = 53) -> tuple[str, int]:
    """
    C{host:port}, C{[v6]:port} or a bare host, as a C{(host, port)} pair.
    """
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        return text.strip("[]"), defaultPort
    return host.strip("[]"), int(port)


def dnsblResolverFactory(servers, reactor):
    """
    @param servers: C{dnsbl_servers}: C{address:port} strings; empty for C{/etc/resolv.conf}.
    @return: a callable making the DNSBL resolver on first use.
    """

    def resolver():
        from twisted.names import client

        addresses = [hostPort(s) for s in servers]
        if addresses:
            return client.Resolver(servers=addresses, reactor=reactor)
        return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)

    return resolver


class RecipientCache:
    """
    Port 25's recipient look-ups, remembered for C{recipient_cache_ttl} seconds (found or
    unknown) instead of the credential cache's C{cache_ttl}: a mailbox deleted from the
    directory stops receiving mail within that time, and a recipient looked up within it is
    still accepted while the directory does not answer.  Failed look-ups are never remembered.
    """

    def __init__(self, clock, ttl: float, maxSize: int = MAX_TRACKED) -> None:
        self.clock = clock
        self.ttl = ttl
        self.maxSize = maxSize
        self._entries: dict[str, tuple[float, object]] = {}

    def lookup(self, directory, address: str):
        """
        @param directory: the L{casd.interfaces.IUserDirectory} to ask on a miss; a credential
            cache in front of it is bypassed (its entries live C{cache_ttl}).
        @return: a L{Deferred} firing with the user record or C{None}.
        """
        key = address.lower()
        now = self.clock.seconds()
        entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return defer.succeed(entry[1])
        if isinstance(directory, CachingChecker):
            directory = directory.checker

        def found(user):
            if self.ttl > 0:
                if len(self._entries) >= self.maxSize:
                    self._sweep()
                self._entries[key] = (self.clock.seconds() + self.ttl, user)
            return user

        return defer.maybeDeferred(directory.lookup, address).addCallback(found)

    def _sweep(self) -> None:
        now = self.clock.seconds()
        self._entries = {k: e for k, e in self._entries.items() if e[0] > now}
        while len(self._entries) >= self.maxSize:
            self._entries.pop(next(iter(self._entries)))
