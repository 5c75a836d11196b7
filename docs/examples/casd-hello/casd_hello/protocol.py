"""
HELLO: a tiny line protocol proxied by casd, the example of docs/writing-a-protocol-plugin.md.

    S: +HELLO casd ready
    C: LOGIN alice secret
    S: +OK logged in
    ...from here on, bytes relayed to the user's HELLO server...
"""

from casd.plugin import AuthenticationFailed, BackendUnavailable, DirectoryUnavailable, Throttled
from casd.plugin import PrivacyRequired, HealthProbe, Setting
from casd.plugin import BackendDialogue, FrontendProtocol, ProtocolDescriptor


class HelloServer(FrontendProtocol):
    """
    The client side of a HELLO session until login: its grammar and its words.
    """

    failures = (
        (AuthenticationFailed, b"-ERR bad credentials"),
        (DirectoryUnavailable, b"-ERR directory unavailable, try again later"),
        (BackendUnavailable, b"-ERR server unavailable, try again later"),
        (Throttled, b"-ERR too busy, try again later"),
        (PrivacyRequired, b"-ERR use TLS first"),
    )
    internalFailure = b"-ERR internal error"

    def greet(self):
        self.send(b"+HELLO " + self.section.greeting.encode("utf-8") + b"\r\n")

    def replyOk(self, token, text):
        self.send(b"+OK " + text + b"\r\n")

    def replyNo(self, token, text):
        self.send(b"-ERR " + text + b"\r\n")

    def lineReceived(self, line):
        command, _, rest = line.partition(b" ")
        self.dispatch(command, rest)

    def unauth_QUIT(self, rest):
        self.send(b"+BYE\r\n")
        self.close("logout")

    def unauth_LOGIN(self, rest):
        user, _, password = rest.partition(b" ")
        self.passwordLogin(None, user, password)

    def loginSucceeded(self, token, dialogue):
        self.replyOk(None, b"logged in")

    def makeDialogue(self, target, user, credentials):
        return HelloBackend(target, self.client, user, credentials, self.context)


class HelloBackend(BackendDialogue):
    """
    Log in to a HELLO server: read its greeting, send LOGIN, expect +OK.
    """

    def dialogue(self):
        self.expectLine(self.greeting)

    def greeting(self, line):
        if not line.startswith(b"+HELLO"):
            raise self.fail("unexpected greeting")
        user, password, _ = self.loginIdentity()
        if any(c in password for c in b"\r\n"):
            raise self.fail("password cannot travel in a LOGIN line", authFailed=True)
        self.command(b"LOGIN " + user.encode("utf-8") + b" " + password, self.loginReply)

    def loginReply(self, line):
        if not line.startswith(b"+OK"):
            raise self.fail("refused the login", authFailed=True)
        self.succeed()


hello = ProtocolDescriptor(
    name="hello",
    description="HELLO: the example protocol of the plugin tutorial",
    server=HelloServer,
    defaultListeners=({"endpoint": "tcp:7110", "tls": "starttls"},),
    defaultBackendPort=7110,
    healthProbe=HealthProbe(expect=b"+HELLO", quit=b"QUIT\r\n"),
    settings=(
        Setting("enabled", "bool", False, "Serve HELLO (off unless set)."),
        Setting("greeting", "str", "casd ready", "The text of the greeting line."),
    ),
)
