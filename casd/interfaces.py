# -*- test-case-name: tests.test_plugin -*-
"""
The seams of casd: every interface between the core and its plugins lives here.
"""

from attrs import frozen
from zope.interface import Attribute, Interface


class ICASProtocol(Interface):
    """
    The descriptor of one client protocol (IMAP, POP3, ...), found with
    L{twisted.plugin.getPlugins}.  It is what nginx's C{ngx_mail_protocol_t} is to nginx: a name, a
    configuration schema, default listeners, a factory builder and the protocol's wording of the
    shared failures.  The built-in protocols are registered exactly as a third-party one is.

    This interface is part of casd's public plugin API, all of which a protocol module imports
    from L{casd.plugin} (whose L{casd.plugin.ProtocolDescriptor} provides this interface),
    together with what L{buildFactory} receives (L{casd.service.context.CASContext},
    L{casd.config.ProtocolSection}, L{casd.config.ListenerConfig}) and the fakes of
    L{casd.testing}; C{docs/writing-a-protocol-plugin.md} lists that surface and builds a plugin
    with it.  It changes only compatibly: a new attribute here gets a default in the core first.

    Optional attributes (read with C{getattr} and a default, so that C{verifyObject} passes for a
    plugin written before them):

      - C{alpnProtocols}: C{tuple} of C{str}, the protocol's ALPN ids (RFC 7301), preferred
        first, e.g. C{("imap",)}.  A TLS client offering ALPN ids none of which is here is
        refused with the C{no_application_protocol} alert (the ALPACA countermeasure); a client
        without ALPN is served.  Default C{()}: the listener ignores the client's ALPN, as a
        server without ALPN support does (L{casd.tls.alpnProtocolsOf}).
      - C{tlsClientCAFile}: a callable of the protocol's configuration section returning the
        path of a PEM file of CAs, or C{""}.  With a path, the protocol's TLS listeners ask
        clients for a certificate issued by one of those CAs, without requiring one and letting
        any certificate through: the protocol judges what it proves (the HTTP front end's
        C{cert} logon does).  Default: no certificate is asked for (L{casd.tls.clientCAFileOf}).
    """

    name = Attribute(
        "C{str}: the protocol's short name; also its configuration section C{[NAME]}."
    )
    description = Attribute("C{str}: one line for humans.")
    defaultListeners = Attribute(
        "C{tuple} of L{casd.config.ListenerConfig}-shaped C{dict}s used when the section lists none."
    )
    defaultBackendPort = Attribute(
        "C{int}: the port of this protocol on a backend server when its configuration names none."
    )
    defaultBackendTLS = Attribute(
        "C{str}: C{'none'}, C{'starttls'} or C{'implicit'}: the backend TLS mode when none is named."
    )
    healthProbe = Attribute(
        "A L{HealthProbe}: how the health checker tells a healthy backend of this"
        " protocol (the start of its greeting, e.g. C{b'* OK'}; a request to send first, for"
        " HTTP), or C{None} to check only that backends accept connections."
    )
    settings = Attribute(
        "C{tuple} of L{casd.config.Setting}: the protocol's own keys in its section, beside the"
        " keys every protocol has (C{enabled}, C{listen}, limits and timeouts).  A setting may"
        " re-declare a common key to change its default: POP3 and ManageSieve declare C{enabled}"
        " with C{False}, so that a node opens their ports only when asked to."
    )

    def buildFactory(context, section, listener):
        """
        Build the server factory for one listener.

        @param context: the shared L{casd.service.context.CASContext} (portal, router, pool, TLS, log).
        @param section: the validated L{casd.config.ProtocolSection} of this protocol.
        @param listener: the L{casd.config.ListenerConfig} this factory serves.
        @return: an L{twisted.internet.interfaces.IProtocolFactory}.
        """


class IMailboxUser(Interface):
    """
    The avatar of an authenticated user: what the rest of the session needs to know about them.
    """

    login = Attribute("C{str}: the name the user logged in with, as the directory canonicalised it.")
    address = Attribute("C{str}: the canonical e-mail address, or C{''} when unknown.")
    backendLogin = Attribute("C{str}: the login name to present to the mailbox server.")
    mailHost = Attribute("C{str}: the mailbox server or group named by the directory, or C{''}.")
    site = Attribute("C{str}: the user's site, or C{''}.")
    policy = Attribute("C{Mapping[str, str]}: per-user policy attributes.")


class IUserRecordChecker(Interface):
    """
    A L{twisted.cred.checkers.ICredentialsChecker} whose avatar IDs are L{casd.auth.UserRecord}
    values rather than bare names, so that the directory attributes read while verifying the
    password travel to the realm without a second look-up.
    """


class ILocator(Interface):
    """
    One link of the routing chain: finds where a user's mailbox lives.
    """

    def locate(user, protocol):
        """
        @param user: the L{IMailboxUser}.
        @param protocol: the protocol's L{ICASProtocol} descriptor (its C{name}, default backend
            port and TLS mode).
        @return: a L{casd.routing.router.Route}, or C{None} for "not mine" (the next locator is asked), or a
            L{Deferred} of either.  Raise or fail with L{casd.failures.BackendUnavailable} for
            "mine, but unavailable".
        """


class IUserDirectory(Interface):
    """
    Look-ups without a password: who is this address (SMTP recipients, C{casd locate}).
    """

    def lookup(name):
        """
        @param name: a login or an e-mail address.
        @return: a L{Deferred} firing with the L{casd.auth.UserRecord}, or C{None} when the
            directory does not know the name; failing with
            L{casd.failures.DirectoryUnavailable} when it cannot answer.
        """


@frozen
class HealthProbe:
    """
    A protocol's active health check (what nginx's and HAProxy's protocol checks do): connect,
    send C{send} if any, expect the first line to start with C{expect} (ASCII case ignored), then
    say C{quit} and close.

    @ivar expect: the start of a healthy greeting, e.g. C{b"* OK"} (IMAP), C{b"+OK"} (POP3),
        C{b"220"} (SMTP), C{b"HTTP/1.1 200"} (HTTP).
    @ivar send: bytes sent before reading, e.g. an HTTP request; empty for greeting protocols.
    @ivar quit: bytes sent after a good greeting so the server logs a clean goodbye.
    """

    expect: bytes
    send: bytes = b""
    quit: bytes = b""

class ISharedState(Interface):
    """
    The state an array of casd nodes shares: login penalties and lockouts, per-user session
    counts, rate counters.  L{casd.state.local.LocalState} keeps it in this node's memory (the
    default, and the fallback); L{casd.state.redis.RedisState} keeps it in Redis, where every
    operation is one atomic round trip.  Keys are opaque strings the caller has already made
    unreadable (L{casd.state.keys.KeyMaker}): no user name, address, password or cookie reaches
    the store.  Every method returns a L{Deferred}.
    """

    def loginFailed(userKey, addressKey, digest):
        """
        Count a failed login for a user and (unless C{addressKey} is C{None}) an address; a
        repeat of a recent C{digest} (the same wrong password again) does not count.

        @return: a L{Deferred} firing with a L{casd.state.PenaltyReply}.
        """

    def loginSucceeded(userKey, addressKey):
        """
        A login succeeded: clear the user's and address's failures, unless one is locked out.

        @return: a L{Deferred} firing with a L{casd.state.PenaltyReply} (its lockouts say
            whether the login must still be refused).
        """

    def acquire(key, limit, token):
        """
        Take one of C{limit} slots under C{key} (a user's sessions) for C{token}.

        @return: a L{Deferred} firing with C{True} when taken, C{False} when all are in use.
        """

    def release(key, token):
        """
        Give C{token}'s slot under C{key} back.

        @return: a L{Deferred} firing with C{None}.
        """

    def hit(key, window):
        """
        Count one event under C{key} in the current window of C{window} seconds.

        @return: a L{Deferred} firing with the events counted in this window, this one included.
        """

    def revoke(key, expiresAt):
        """
        Remember C{key} (a revoked token's opaque key) until C{expiresAt} (POSIX time).

        @return: a L{Deferred} firing with C{None}.
        """

    def isRevoked(key):
        """
        @return: a L{Deferred} firing with C{True} when C{key} was revoked and has not expired.
        """


class IRevocationSet(Interface):
    """
    Tokens revoked before their natural end (a forms cookie after logoff), shared by the array.

    The local in-memory implementation is L{protocols.http.cookies.MemoryRevocationSet}; a
    Redis-backed one lives in C{casd/state/}.  Token IDs are random, carry no secret and no user
    name; an entry may be forgotten once C{expiresAt} has passed, because the token is refused
    for its age by then anyway.
    """

    def add(tokenId, expiresAt):
        """
        Revoke C{tokenId}.

        @param tokenId: the token's ID (C{str}).
        @param expiresAt: POSIX time after which the entry is no longer needed.
        @return: a L{Deferred} firing with C{None} once the revocation is recorded.
        """

    def contains(tokenId):
        """
        @param tokenId: the token's ID (C{str}).
        @return: a L{Deferred} firing with C{True} when C{tokenId} is revoked, else C{False}.
        """
