"""
HELLO: a tiny line protocol proxied by casd, the example of docs/writing-a-protocol-plugin.md.

    S: +HELLO casd ready
    C: LOGIN alice secret
    S: +OK logged in
    ...from here on, bytes relayed to the user's HELLO server...
"""

from zope.interface import implementer

from twisted.internet import defer
from twisted.plugin import IPlugin

from casd.session.dialogue import BackendDialogue
from casd.config import Setting
from casd.failures import (
    AuthenticationFailed,
    BackendUnavailable,
    DirectoryUnavailable,
    ProtocolViolation,
    Throttled,
)
from casd.session.frontend import FrontendFactory, FrontendProtocol
from casd.pool.health import HealthProbe
from casd.interfaces import ICASProtocol
from casd.auth.sasl import makeCredentials

FAILURES = (
    (AuthenticationFailed, b"-ERR bad credentials"),
    (DirectoryUnavailable, b"-ERR directory unavailable, try again later"),
    (BackendUnavailable, b"-ERR server unavailable, try again later"),
    (Throttled, b"-ERR too busy, try again later"),
)


class HelloServer(FrontendProtocol):
    """
    The client side of a HELLO session until login.
    """

    failures = FAILURES
    internalFailure = b"-ERR internal error"

    def greet(self):
        self.send(b"+HELLO " + self.section.greeting.encode("utf-8") + b"\r\n")

    def lineTooLong(self):
        self.send(b"-ERR line too long\r\n")
        self.close()

    def timedOut(self):
        self.send(b"-ERR too slow\r\n")
        self.close()

    def lineReceived(self, line):
        command, _, rest = line.partition(b" ")
        handler = getattr(self, "do_" + command.decode("ascii", "replace").upper(), None)
        if handler is None:
            if self.badCommand():
                self.send(b"-ERR too many errors\r\n")
                self.close("too many errors")
            else:
                self.send(b"-ERR unknown command\r\n")
            return
        handler(rest)

    def do_QUIT(self, rest):
        self.send(b"+BYE\r\n")
        self.close("logout")

    def do_LOGIN(self, rest):
        if not self.client.plaintextAllowed:
            self.send(b"-ERR use TLS first\r\n")
            return
        user, _, password = rest.partition(b" ")
        try:
            credentials = makeCredentials(user, password)
        except ProtocolViolation:
            self.loginFailed(None, AuthenticationFailed())
            return
        self.login(None, credentials)

    def loginSucceeded(self, token, dialogue):
        self.send(b"+OK logged in\r\n")

    def loginFailed(self, token, failure):
        self.send(self.renderFailure(failure) + b"\r\n")

    def makeDialogue(self, target, user, credentials):
        return HelloBackend(target, self.client, user, credentials, self.context)


class HelloBackend(BackendDialogue):
    """
    Log in to a HELLO server: read its greeting, send LOGIN, expect +OK.
    """

    @defer.inlineCallbacks
    def dialogue(self):
        greeting = yield self.readLine()
        if not greeting.startswith(b"+HELLO"):
            raise self.fail("unexpected greeting")
        user, password, _ = self.loginIdentity()
        if any(c in password for c in b"\r\n"):
            raise self.fail("password cannot travel in a LOGIN line", authFailed=True)
        self.sendLine(b"LOGIN " + user.encode("utf-8") + b" " + password)
        reply = yield self.readLine()
        if not reply.startswith(b"+OK"):
            raise self.fail("refused the login", authFailed=True)


@implementer(IPlugin, ICASProtocol)
class HelloProtocol:
    name = "hello"
    description = "HELLO: the example protocol of the plugin tutorial"
    defaultListeners = ({"endpoint": "tcp:7110", "tls": "starttls"},)
    defaultBackendPort = 7110
    defaultBackendTLS = "none"
    healthProbe = HealthProbe(expect=b"+HELLO", quit=b"QUIT\r\n")
    settings = (
        Setting("enabled", "bool", False, "Serve HELLO (off unless set)."),
        Setting("greeting", "str", "casd ready", "The text of the greeting line."),
    )

    def buildFactory(self, context, section, listener):
        return FrontendFactory(HelloServer, context, section, listener, self)


hello = HelloProtocol()
