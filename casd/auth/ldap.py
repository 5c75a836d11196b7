# -*- test-case-name: tests.test_ldap -*-
"""
The LDAP checker: passwords verified by the organisation's directory (OpenLDAP, Active Directory).

Search-then-bind (the default): the service account searches C{base_dn} with the configured
filter, reading the routing attributes in the same search; exactly one entry must match; the
password is then verified by a bind as that entry's DN.  Direct bind (C{dn_template} set): the
user's DN is built from the login, the password verified by binding as it, and the user's own entry
read with the user's rights.

The checker speaks to the directory only through L{IDirectoryClient}
(L{casd.auth.ldapclient.LDAPConnectionPool} on ldaptor).  It never reports directory trouble as a
bad password: an unreachable, slow or confused directory fails the login with
L{DirectoryUnavailable}, so clients say "try again later" instead of asking for the password again.
"""

from __future__ import annotations

from attrs import frozen
from zope.interface import implementer

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger

from casd.auth import UnknownUser, UserRecord
from casd.auth.ldapclient import (
    INVALID_CREDENTIALS,
    SCOPES,
    SUCCESS,
    DirectoryEntry,
    LDAPConnectionPool,
    LDAPURL,
    PoolSettings,
)
from casd.auth.ldapfilter import DNTemplate, FilterTemplate, checkLogin
from casd.auth.ldapsettings import SettingProblem, checkSettings, parsePolicy
from casd.failures import DirectoryUnavailable
from casd.interfaces import IUserDirectory, IUserRecordChecker
from casd.tls import ClientTLS

#: Bind results that mean "these credentials are refused"; any other failure is the directory's
#: trouble (busy, unavailable, unwilling, a protocol error), a temporary failure.
REFUSED = {48: "inappropriate authentication", INVALID_CREDENTIALS: "invalid credentials"}


@frozen
class AttributeMap:
    """
    Which directory attributes become which parts of the L{UserRecord}.  An empty name means "not
    read".

    @ivar disabledValues: status values (any case) that disable the account.
    @ivar enabledValues: when not empty, a status value outside it disables the account.
    @ivar disabledBitmask: when not 0, the status is an integer (AD's C{userAccountControl}) and
        any of these bits disables the account.
    @ivar policy: C{(policy key, attribute)} pairs.
    """

    login: str = "uid"
    address: str = "mail"
    backendLogin: str = ""
    mailHost: str = "mailHost"
    site: str = ""
    status: str = ""
    disabledValues: tuple[str, ...] = ("disabled",)
    enabledValues: tuple[str, ...] = ()
    disabledBitmask: int = 0
    policy: tuple[tuple[str, str], ...] = ()

    @property
    def requested(self) -> tuple[str, ...]:
        names = [self.login, self.address, self.backendLogin, self.mailHost, self.site, self.status]
        names += [attribute for _, attribute in self.policy]
        seen, out = set(), []
        for name in names:
            if name and name.lower() not in seen:
                seen.add(name.lower())
                out.append(name)
        return tuple(out)

    def disabled(self, entry: DirectoryEntry) -> bool:
        if not self.status:
            return False
        values = entry.values(self.status)
        if self.disabledBitmask:
            for value in values:
                try:
                    if int(value) & self.disabledBitmask:
                        return True
                except ValueError:
                    return True  # not the integer it should be: fail closed
            return False
        lowered = {v.lower() for v in values}
        if self.enabledValues:
            return not (lowered & {v.lower() for v in self.enabledValues})
        return bool(lowered & {v.lower() for v in self.disabledValues})

    def record(self, login: str, entry: DirectoryEntry) -> UserRecord:
        policy = []
        for key, attribute in self.policy:
            values = entry.values(attribute)
            if values:
                policy.append((key, ",".join(values)))
        return UserRecord(
            login=entry.first(self.login) or login,
            address=entry.first(self.address),
            backendLogin=entry.first(self.backendLogin),
            mailHost=entry.first(self.mailHost),
            site=entry.first(self.site),
            disabled=self.disabled(entry),
            policy=policy,
        )


@implementer(ICredentialsChecker, IUserRecordChecker, IUserDirectory)
class LDAPChecker:
    """
    Verifies passwords against an LDAP directory and reads the user's routing attributes.

    @ivar client: the L{casd.auth.ldapclient.IDirectoryClient}.
    """

    credentialInterfaces = (IUsernamePassword,)
    log = Logger()

    def __init__(
        self,
        client,
        baseDN: str,
        filter: FilterTemplate,
        attributes: AttributeMap = AttributeMap(),
        scope: str = "sub",
        dnTemplate: DNTemplate | None = None,
        lookupFilter: FilterTemplate | None = None,
    ) -> None:
        """
        @param filter: finds the entry of a login (search-then-bind; look-ups too unless
            C{lookupFilter} is given).
        @param dnTemplate: when given, logins bind directly as this DN (no search).
        @param lookupFilter: finds the entry of a name in look-ups without a password.
        """
        self.client = client
        self.baseDN = baseDN
        self.filter = filter
        self.attributes = attributes
        self.scope = SCOPES[scope]
        self.dnTemplate = dnTemplate
        self.lookupFilter = lookupFilter or filter

    def close(self):
        """
        Close the directory connections (at shutdown).
        """
        return self.client.close()

    def _refused(self, code: int, message: str, login: str) -> None:
        if code == SUCCESS:
            return
        if code in REFUSED:
            detail = f" ({message})" if message else ""
            raise UnauthorizedLogin(f"wrong password: {REFUSED[code]}{detail}")
        raise DirectoryUnavailable(f"the directory answered the bind of {login!r} with result {code}")

    def _find(self, login: str, filter: FilterTemplate | None = None) -> defer.Deferred:
        """
        @return: a L{Deferred} firing with the one L{DirectoryEntry} C{login} names, C{None} when
            none does, C{False} when several do.
        """
        filter = filter or self.filter
        try:
            encoded = filter.wire(login)
        except Exception:
            return defer.fail()
        d = self.client.search(self.baseDN, self.scope, encoded, self.attributes.requested, sizeLimit=2)
        return d.addCallback(self._one, login)

    def _one(self, entries, login: str):
        if len(entries) > 1:
            self.log.warn(
                "login {login!r} matches several directory entries ({dns}): refused; make the"
                " filter select one entry",
                login=login,
                dns=", ".join(e.dn for e in entries[:2]),
            )
            return False
        return entries[0] if entries else None

    def requestAvatarId(self, credentials) -> defer.Deferred:
        # Callbacks, not inlineCallbacks: this runs for every login the cache does not answer.
        login = credentials.username
        problem = checkLogin(login)
        if problem:
            return defer.fail(UnknownUser(problem))
        # An empty password would make the bind "unauthenticated", which some servers accept:
        # the classic LDAP login bypass.  Never send one.
        if not credentials.password:
            return defer.fail(UnauthorizedLogin("empty password"))
        if self.dnTemplate is not None:
            return self._bindDirectly(login, credentials.password)
        return self._find(login).addCallback(self._bindFound, login, credentials.password)

    def _bindFound(self, entry, login: str, password: bytes):
        if entry is None:
            raise UnknownUser("unknown user")
        if entry is False:
            raise UnauthorizedLogin("login matches several directory entries")
        return self.client.bind(entry.dn, password).addCallback(self._bound, login, entry)

    def _bound(self, answer, login: str, entry: DirectoryEntry) -> UserRecord:
        code, message = answer
        self._refused(code, message, login)
        return self.attributes.record(login, entry)

    @defer.inlineCallbacks
    def _bindDirectly(self, login: str, password: bytes):
        dn = self.dnTemplate.build(login)
        code, message, entry = yield self.client.bindAndRead(dn, password, self.attributes.requested)
        self._refused(code, message, login)
        if entry is None:
            self.log.warn("{dn} bound but could not read its own entry: no routing attributes", dn=dn)
            entry = DirectoryEntry(dn)
        return self.attributes.record(login, entry)

    @defer.inlineCallbacks
    def lookup(self, name: str):
        """
        L{IUserDirectory}: the record of a login or address, found with the search filter.
        """
        if checkLogin(name):
            return None
        entry = yield self._find(name, self.lookupFilter)
        if not entry:
            return None
        return self.attributes.record(name, entry)


# -- configuration ---------------------------------------------------------------------------


def readSecret(path: str) -> bytes:
    """
    A password from a file: its first line, without the line end.
    """
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    return lines[0] if lines else b""


def checkerFromConfig(values, clock, endpointFor=None) -> LDAPChecker:
    """
    Build the LDAP checker from the validated C{[ldap]} section.

    @param endpointFor: for tests: C{callable(LDAPURL) -> IStreamClientEndpoint}.
    @raise SettingProblem: when a file it names is unusable.
    """
    checkSettings(values)
    try:
        tls = ClientTLS(values.ca_file)
    except (OSError, ValueError) as e:
        raise SettingProblem("ca_file", f"expected PEM certificates ({e})") from None
    password = b""
    if values.bind_dn:
        try:
            password = readSecret(values.bind_password_file)
        except OSError as e:
            raise SettingProblem("bind_password_file", f"cannot read it ({e.strerror})") from None
    settings = PoolSettings(
        urls=tuple(LDAPURL.parse(u) for u in values.urls),
        tlsOptions=tls.optionsFor,
        startTLS=values.starttls,
        connectTimeout=values.connect_timeout,
        timeout=values.timeout,
        bindDN=values.bind_dn,
        bindPassword=password,
        poolSize=values.pool_size,
        downRetry=values.retry_down_after,
    )
    attributes = AttributeMap(
        login=values.login_attribute,
        address=values.address_attribute,
        backendLogin=values.backend_login_attribute,
        mailHost=values.mailhost_attribute,
        site=values.site_attribute,
        status=values.status_attribute,
        disabledValues=tuple(values.disabled_values),
        enabledValues=tuple(values.enabled_values),
        disabledBitmask=values.disabled_bitmask,
        policy=parsePolicy(values.policy_attributes),
    )
    return LDAPChecker(
        LDAPConnectionPool(clock, settings, endpointFor),
        values.base_dn,
        FilterTemplate(values.filter),
        attributes,
        values.scope,
        DNTemplate(values.dn_template) if values.dn_template else None,
        FilterTemplate(values.lookup_filter) if values.lookup_filter else None,
    )
