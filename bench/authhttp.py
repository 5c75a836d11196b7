"""
The C{auth_http} server for nginx's mail proxy: checks C{Auth-User}/C{Auth-Pass} and answers with
the backend's address.  asyncio on uvloop, one tiny parse per request, so that it is never the
bottleneck (its CPU is reported beside nginx's).

    python -m bench.authhttp PORT USERS_FILE IMAP_PORT [POP3_PORT]
    python -m bench.authhttp --ldap URL --base DN [--bind-dn DN --bind-password-file PATH]
        [--ca-file PEM] [--filter TEMPLATE] [--pool-size N] PORT - IMAP_PORT [POP3_PORT]

Without C{--ldap}, C{USERS_FILE} holds C{user:password} lines (clear text: this is a benchmark),
loaded once into a dictionary.

With C{--ldap}, every request is checked against an LDAP directory the way casd's LDAP checker
(L{casd.auth.ldap}) does it, with the same connections: one search connection bound as the
service account (searches pipelined on it), C{--pool-size} connections for the users' binds (one
bind in flight each), StartTLS on each C{ldap://} connection (unless C{--no-starttls}); a login is
a search for the user's entry (C{--filter}, C{{login}} replaced by the escaped login, at most one
entry, the account's status checked) and then a bind as that entry's DN with the password.
python-ldap (OpenLDAP's C library) is driven asynchronously from the asyncio loop: the operations
are sent without waiting and their results read when a connection's socket is readable, so one
process serves many requests at once without threads.  nginx caches nothing: every request is a
search and a bind.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
from urllib.parse import unquote

try:
    import ldap
    from ldap.filter import escape_filter_chars
except ImportError:  # only --ldap needs it (bench/run installs it)
    ldap = None


def _answer(lines: list[bytes]) -> bytes:
    return b"HTTP/1.0 200 OK\r\n" + b"".join(l + b"\r\n" for l in lines) + b"\r\n"


#: The answer to a wrong password or an unknown or disabled user.
REFUSED = _answer([b"Auth-Status: Invalid login or password", b"Auth-Wait: 0"])

#: The answer when the directory cannot tell (nginx closes the session with this message).
UNAVAILABLE = _answer([b"Auth-Status: Temporary server problem, try again later"])


class AuthProtocol(asyncio.Protocol):
    """
    One C{auth_http} request (nginx sends one per connection, HTTP/1.0).

    @cvar users: C{user: password} when the passwords come from a file.
    @cvar ports: C{Auth-Protocol: backend port}.
    @cvar directory: the L{LDAPDirectory} when the passwords are checked against LDAP.
    """

    users: dict[bytes, bytes] = {}
    ports: dict[bytes, bytes] = {}
    directory: LDAPDirectory | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" not in self.buffer:
            if len(self.buffer) > 16384:
                self.transport.close()
            return
        headers = {}
        for line in self.buffer.split(b"\r\n")[1:]:
            name, sep, value = line.partition(b":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        self.buffer = b""
        user = unquote(headers.get(b"auth-user", b"").decode()).encode()
        password = unquote(headers.get(b"auth-pass", b"").decode()).encode()
        protocol = headers.get(b"auth-protocol", b"imap")
        if not password or protocol not in self.ports:
            self._reply(REFUSED)
        elif self.directory is not None:
            asyncio.ensure_future(self._checkLDAP(user, password, self.ports[protocol]))
        elif self.users.get(user) == password:
            self._reply(_accepted(self.ports[protocol]))
        else:
            self._reply(REFUSED)

    async def _checkLDAP(self, user: bytes, password: bytes, port: bytes) -> None:
        try:
            ok = await self.directory.check(user.decode("utf-8", "replace"), password)
        except Exception:
            self._reply(UNAVAILABLE)
            return
        self._reply(_accepted(port) if ok else REFUSED)

    def _reply(self, data: bytes) -> None:
        self.transport.write(data)
        self.transport.close()


def _accepted(port: bytes) -> bytes:
    return _answer([b"Auth-Status: OK", b"Auth-Server: 127.0.0.1", b"Auth-Port: " + port])


# -- LDAP ---------------------------------------------------------------------------------------


class _Channel:
    """
    One LDAP connection driven from the asyncio loop: operations are sent with python-ldap's
    asynchronous calls, which return a message id; L{wait} gives a future of the result, set when
    the socket is readable and the result complete.
    """

    def __init__(self, loop, connection) -> None:
        self.loop = loop
        self.connection = connection
        self.pending: dict[int, asyncio.Future] = {}
        self.dead = False
        self.fd = connection.fileno()
        loop.add_reader(self.fd, self._readable)

    def wait(self, msgid: int) -> asyncio.Future:
        future = self.loop.create_future()
        self.pending[msgid] = future
        return future

    def _readable(self) -> None:
        while True:
            try:
                kind, data, msgid, _ = self.connection.result3(ldap.RES_ANY, 1, 0)
            except ldap.SERVER_DOWN as e:
                self.close(e)
                return
            except ldap.LDAPError as e:
                info = e.args[0] if e.args and isinstance(e.args[0], dict) else {}
                future = self.pending.pop(info.get("msgid"), None)
                if future is None:
                    self.close(e)
                    return
                if not future.done():
                    future.set_exception(e)
                continue
            if kind is None:
                return
            future = self.pending.pop(msgid, None)
            if future is not None and not future.done():
                future.set_result(data)

    def close(self, reason: Exception | None = None) -> None:
        if self.dead:
            return
        self.dead = True
        self.loop.remove_reader(self.fd)
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(reason or ConnectionError("LDAP connection closed"))
        try:
            self.connection.unbind_ext()
        except Exception:
            pass


class LDAPDirectory:
    """
    Search-then-bind against an LDAP directory, with casd's LDAP checker's connections (see the
    module's docstring).
    """

    def __init__(
        self,
        loop,
        url: str,
        base: str,
        filter: str,
        attributes: list[str],
        bindDN: str = "",
        bindPassword: bytes = b"",
        caFile: str = "",
        startTLS: bool = True,
        poolSize: int = 4,
        statusAttribute: str = "",
        disabledValues: tuple[str, ...] = ("disabled",),
    ) -> None:
        self.loop = loop
        self.url = url
        self.base = base
        self.filter = filter
        self.attributes = attributes
        self.bindDN = bindDN
        self.bindPassword = bindPassword
        self.caFile = caFile
        self.startTLS = startTLS
        self.statusAttribute = statusAttribute
        self.disabledValues = {v.lower().encode() for v in disabledValues}
        self.search = self._open(serviceBind=True)
        self.idle = collections.deque(self._open(serviceBind=False) for _ in range(poolSize))
        self.waiters: collections.deque = collections.deque()

    def _open(self, serviceBind: bool) -> _Channel:
        """
        Connect (blocking: at start, and again after a connection was lost), StartTLS, and bind
        as the service account or anonymously (what casd does before a bind connection's first
        user bind).
        """
        connection = ldap.initialize(self.url)
        connection.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        connection.set_option(ldap.OPT_REFERRALS, 0)
        if self.caFile:
            connection.set_option(ldap.OPT_X_TLS_CACERTFILE, self.caFile)
        connection.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        connection.set_option(ldap.OPT_X_TLS_NEWCTX, 0)
        if self.startTLS and self.url.startswith("ldap://"):
            connection.start_tls_s()
        if serviceBind and self.bindDN:
            connection.simple_bind_s(self.bindDN, self.bindPassword)
        else:
            connection.simple_bind_s("", b"")
        return _Channel(self.loop, connection)

    async def check(self, login: str, password: bytes) -> bool:
        """
        @return: whether C{password} is C{login}'s (an unknown or disabled user: C{False}).
        @raise ldap.LDAPError: when the directory cannot tell.
        """
        if not login or not password:
            return False
        if self.search.dead:
            self.search = self._open(serviceBind=True)
        search = self.search
        msgid = search.connection.search_ext(
            self.base,
            ldap.SCOPE_SUBTREE,
            self.filter.replace("{login}", escape_filter_chars(login)),
            self.attributes,
            sizelimit=2,
        )
        try:
            entries = await search.wait(msgid)
        except ldap.SIZELIMIT_EXCEEDED:
            return False  # several entries: refused, as casd refuses them
        entries = [(dn, attributes) for dn, attributes in entries if dn]
        if len(entries) != 1:
            return False
        dn, attributes = entries[0]
        if self.statusAttribute:
            values = {v.lower() for v in attributes.get(self.statusAttribute, ())}
            if values & self.disabledValues:
                return False
        channel = await self._acquire()
        try:
            await channel.wait(channel.connection.simple_bind(dn, password))
        except (ldap.INVALID_CREDENTIALS, ldap.UNWILLING_TO_PERFORM, ldap.INAPPROPRIATE_AUTH):
            return False
        finally:
            self._release(channel)
        return True

    def _acquire(self) -> asyncio.Future:
        future = self.loop.create_future()
        if self.idle:
            future.set_result(self.idle.popleft())
        else:
            self.waiters.append(future)
        return future

    def _release(self, channel: _Channel) -> None:
        if channel.dead:
            channel = self._open(serviceBind=False)
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(channel)
                return
        self.idle.append(channel)


# -- the command --------------------------------------------------------------------------------


def _arguments(argv):
    parser = argparse.ArgumentParser(prog="python -m bench.authhttp", description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int, help="the port to listen on (127.0.0.1)")
    parser.add_argument("users", help="the user:password file; '-' with --ldap")
    parser.add_argument("imap_port")
    parser.add_argument("pop3_port", nargs="?")
    ldap = parser.add_argument_group("LDAP (instead of the users file)")
    ldap.add_argument("--ldap", metavar="URL", help="ldap://HOST:PORT/ or ldaps://HOST:PORT/")
    ldap.add_argument("--base", metavar="DN", default="")
    ldap.add_argument("--bind-dn", metavar="DN", default="", help="the service account that searches")
    ldap.add_argument("--bind-password-file", metavar="PATH", help="its password (first line)")
    ldap.add_argument("--ca-file", metavar="PEM", default="")
    ldap.add_argument("--no-starttls", action="store_true")
    ldap.add_argument(
        "--filter",
        default="(&(objectClass=inetOrgPerson)(|(uid={login})(mail={login})))",
        help="{login} is replaced by the escaped login",
    )
    ldap.add_argument("--attributes", default="uid,mail,mailHost,accountStatus")
    ldap.add_argument("--status-attribute", default="accountStatus")
    ldap.add_argument("--pool-size", type=int, default=4, help="bind connections (casd's default)")
    args = parser.parse_args(argv)
    if args.ldap and not args.base:
        parser.error("--ldap needs --base")
    if args.ldap and ldap is None:
        parser.error("--ldap needs python-ldap (pip install python-ldap)")
    return args


def main(argv=None) -> None:
    args = _arguments(sys.argv[1:] if argv is None else argv)
    AuthProtocol.ports = {b"imap": args.imap_port.encode()}
    if args.pop3_port:
        AuthProtocol.ports[b"pop3"] = args.pop3_port.encode()
    if not args.ldap:
        users = {}
        with open(args.users, "rb") as f:
            for line in f:
                name, _, password = line.rstrip(b"\r\n").partition(b":")
                users[name] = password
        AuthProtocol.users = users
    bindPassword = b""
    if args.bind_password_file:
        with open(args.bind_password_file, "rb") as f:
            lines = f.read().splitlines()
        bindPassword = lines[0] if lines else b""

    async def serve():
        loop = asyncio.get_running_loop()
        if args.ldap:
            AuthProtocol.directory = LDAPDirectory(
                loop,
                args.ldap,
                args.base,
                args.filter,
                [a for a in args.attributes.split(",") if a],
                args.bind_dn,
                bindPassword,
                args.ca_file,
                not args.no_starttls,
                args.pool_size,
                args.status_attribute,
            )
        server = await loop.create_server(AuthProtocol, "127.0.0.1", args.port, backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())


if __name__ == "__main__":
    main()
