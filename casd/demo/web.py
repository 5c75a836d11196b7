"""
casd's in-process DEMO web backend and the demo's HTTPS certificate.  DEMO ONLY.

C{twistd -n cas --demo} serves HTTPS on 127.0.0.1:8443 in front of this backend, so that a newcomer
sees the HTTP path work (client -> casd -> backend) as the mail path does:

  - L{demoCertificates} makes a throw-away CA and a certificate for C{localhost} and
    C{127.0.0.1} at every start (the CA file's path is logged, for C{curl --cacert});
  - L{DemoWebPage} answers every request with the user's name and mailbox list from the demo
    mailbox store.  It trusts the C{X-Remote-User} header casd sets, so it listens on the
    loopback interface only and must never be reachable by clients.
"""

from __future__ import annotations

import datetime
import html
import ipaddress
import os
import tempfile

from twisted.web import resource, server

#: The demo's HTTP overlay: added to C{casd/demo/data/casd.toml} with the generated
#: certificate (C{{certificate}}, C{{key}}).
DEMO_HTTP = """
[tls]
certificate = "{certificate}"
key = "{key}"

[backends.demo.http]
port = {port}
tls = "none"

[http]
enabled = true

[[http.listen]]
endpoint = "tcp:8443:interface=127.0.0.1"
tls = "implicit"
name = "https-demo"

# Exchange Web Services style: Basic authentication on every request.
#   curl --cacert CA -u demo:demo https://127.0.0.1:8443/EWS/
[[http.vdir]]
path = "/EWS"
auth = ["basic"]
identity = "header"
realm = "casd demo"

# Outlook on the web style: forms login where available, else Basic.
[[http.vdir]]
path = "/owa"
auth = ["forms", "basic"]
identity = "header"
realm = "casd demo"
"""


def demoDirectory() -> str:
    """
    Where the demo keeps its certificate: C{$CASD_DEMO_DIR}, else a per-user directory under
    the system's temporary directory.
    """
    directory = os.environ.get("CASD_DEMO_DIR") or os.path.join(
        tempfile.gettempdir(), f"casd-demo-{os.getuid()}"
    )
    os.makedirs(directory, mode=0o700, exist_ok=True)
    return os.path.abspath(directory)


def demoCertificates(directory: str) -> tuple[str, str, str]:
    """
    Make a new demo CA and a server certificate it signs for C{localhost} and C{127.0.0.1}.

    @return: C{(caPath, certificatePath, keyPath)}.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=30)
    caKey = ec.generate_private_key(ec.SECP256R1())
    caName = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "casd DEMO CA (not for production)")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(caName)
        .issuer_name(caName)
        .public_key(caKey.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(caKey, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(caName)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(caKey, hashes.SHA256())
    )
    caPath = os.path.join(directory, "ca.pem")
    certPath = os.path.join(directory, "server.pem")
    keyPath = os.path.join(directory, "server.key")
    with open(caPath, "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(certPath, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(keyPath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return caPath, certPath, keyPath


def demoConfigText(baseText: str, httpPort: int) -> tuple[str, str]:
    """
    The demo configuration with its HTTPS part, after making a new certificate.

    @param baseText: the text of C{casd/demo/data/casd.toml}.
    @return: C{(text, caPath)}.
    """
    caPath, certPath, keyPath = demoCertificates(demoDirectory())
    overlay = DEMO_HTTP.format(
        certificate=certPath.replace("\\", "\\\\"), key=keyPath.replace("\\", "\\\\"), port=httpPort
    )
    return baseText + "\n" + overlay, caPath


class DemoWebPage(resource.Resource):
    """
    DEMO ONLY: every path shows the user casd names in C{X-Remote-User} and their demo mailboxes
    (as HTML for a browser, as text for anything else).  Without the header: 403.
    """

    isLeaf = True

    def __init__(self, store) -> None:
        super().__init__()
        self.store = store

    def render(self, request):
        users = request.requestHeaders.getRawHeaders(b"X-Remote-User")
        if not users or len(users) != 1:
            request.setResponseCode(403)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return b"casd demo web backend: no user (requests must come through casd)\n"
        user = users[0].decode("utf-8", "replace")
        account = self.store.accountFor(user)
        boxes = [
            (name, mbox.getMessageCount())
            for name, mbox in sorted(account.mailboxes.items())
            if not mbox.destroyed
        ]
        request.setHeader(b"Cache-Control", b"no-store")
        accept = b",".join(request.requestHeaders.getRawHeaders(b"Accept", []))
        if b"text/html" in accept:
            request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
            items = "".join(
                f"<li>{html.escape(n)}: {c} message{'s' if c != 1 else ''}</li>" for n, c in boxes
            )
            return (
                "<!doctype html><html lang=en><head><meta charset=utf-8>"
                "<title>casd demo mailbox</title></head><body>"
                "<p><strong>casd demo web backend: DEMO ONLY</strong></p>"
                f"<h1>Hello, {html.escape(user)}</h1><h2>Your mailboxes</h2><ul>{items}</ul>"
                "</body></html>\n"
            ).encode("utf-8")
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        lines = ["casd demo web backend (DEMO ONLY)", f"user: {user}", "mailboxes:"]
        lines += [f"  {n}: {c} message{'s' if c != 1 else ''}" for n, c in boxes]
        return ("\n".join(lines) + "\n").encode("utf-8")


def demoWebFactory(store, reactor=None) -> server.Site:
    """
    The demo web backend's factory (listen on the loopback interface only).
    """
    site = _QuietSite(DemoWebPage(store), reactor=reactor)
    site.displayTracebacks = False
    return site


class _QuietSite(server.Site):
    # casd's own access log already has a line for each request.
    def log(self, request):
        pass
