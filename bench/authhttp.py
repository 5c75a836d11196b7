"""
The C{auth_http} server for nginx's mail proxy: checks C{Auth-User}/C{Auth-Pass} against a
dictionary loaded once and answers with the backend's address.  asyncio on uvloop, one tiny
parse per request, so that it is never the bottleneck (its CPU is reported beside nginx's).

    python -m bench.authhttp PORT USERS_FILE IMAP_PORT [POP3_PORT]

C{USERS_FILE} holds C{user:password} lines (clear text: this is a benchmark).
"""

from __future__ import annotations

import asyncio
import sys
from urllib.parse import unquote


def _answer(lines: list[bytes]) -> bytes:
    return b"HTTP/1.0 200 OK\r\n" + b"".join(l + b"\r\n" for l in lines) + b"\r\n"


class AuthProtocol(asyncio.Protocol):
    users: dict[bytes, bytes] = {}
    ports: dict[bytes, bytes] = {}

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
        user = unquote(headers.get(b"auth-user", b"").decode()).encode()
        password = unquote(headers.get(b"auth-pass", b"").decode()).encode()
        protocol = headers.get(b"auth-protocol", b"imap")
        if password and self.users.get(user) == password and protocol in self.ports:
            reply = _answer([b"Auth-Status: OK", b"Auth-Server: 127.0.0.1", b"Auth-Port: " + self.ports[protocol]])
        else:
            reply = _answer([b"Auth-Status: Invalid login or password", b"Auth-Wait: 0"])
        self.transport.write(reply)
        self.transport.close()


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    port, usersPath, imapPort = int(argv[0]), argv[1], argv[2]
    users = {}
    with open(usersPath, "rb") as f:
        for line in f:
            name, _, password = line.rstrip(b"\r\n").partition(b":")
            users[name] = password
    AuthProtocol.users = users
    AuthProtocol.ports = {b"imap": imapPort.encode()}
    if len(argv) > 3:
        AuthProtocol.ports[b"pop3"] = argv[3].encode()

    async def serve():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(AuthProtocol, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
