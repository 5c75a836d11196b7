"""
A toy HELLO server to try the plugin against: C{python -m casd_hello.toyserver PORT}.  It knows
one user, alice with password secret, and after login echoes every line.
"""

import sys

from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

USERS = {b"alice": b"secret"}


class ToyHelloServer(LineOnlyReceiver):
    user = None

    def connectionMade(self):
        self.sendLine(b"+HELLO toy server")

    def lineReceived(self, line):
        if self.user is None:
            command, _, rest = line.partition(b" ")
            user, _, password = rest.partition(b" ")
            if command == b"LOGIN" and USERS.get(user) == password:
                self.user = user
                self.sendLine(b"+OK welcome " + user)
            else:
                self.sendLine(b"-ERR no")
        elif line == b"QUIT":
            self.sendLine(b"+BYE")
            self.transport.loseConnection()
        else:
            self.sendLine(self.user + b" said: " + line)


def main(port):
    from twisted.internet import endpoints, reactor

    endpoints.serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1").listen(
        Factory.forProtocol(ToyHelloServer)
    )
    reactor.run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
