# -*- test-case-name: tests.test_http_site,tests.test_http_front -*-
"""
Virtual directories: the C{[[http.vdir]]} tables and the matching of a request path to one.

A virtual directory is a path prefix (C{/owa}, C{/EWS}, C{/Microsoft-Server-ActiveSync}, C{/dav},
...) with everything casd needs to serve it: the accepted authentication methods, the backend group
and the path prefix there, how the user's identity reaches the backend, the timeouts and the body
limit.  Matching is a pure function of the path: a path no vdir claims gets 404 before any
directory look-up.
"""

from __future__ import annotations

from typing import Iterable

from attrs import field, frozen

from casd.config import ConfigError, Setting

#: The authentication methods a vdir may accept (C{basic} here; C{forms} and C{cert} plug in
#: through L{protocols.http.auth.IHTTPCredentialSource}).
AUTH_METHODS = ("basic", "forms", "cert", "none")

#: How the user's identity reaches the backend.
IDENTITIES = ("passthrough", "header", "master", "none")

VDIR_SETTINGS = (
    Setting("path", "str", "", "Path prefix, e.g. \"/EWS\" (required); matched per path segment."),
    Setting(
        "case_insensitive",
        "bool",
        True,
        "Match C{path} ignoring case (IIS and Exchange do; C{/ews} is C{/EWS}).",
    ),
    Setting(
        "backend",
        "str",
        "",
        "Backend server or group for this vdir; empty: the router decides ([routing]).",
    ),
    Setting(
        "backend_path",
        "str",
        "",
        "Path prefix on the backend that replaces C{path}; empty keeps C{path}.",
    ),
    Setting(
        "auth",
        "strlist",
        ("basic",),
        "Accepted authentication methods, in the order tried: basic, forms, cert, or none"
        " (anonymous: proxied without a user, routed to C{backend}).",
    ),
    Setting(
        "realm",
        "str",
        "casd",
        "The Basic realm announced in C{WWW-Authenticate}.",
    ),
    Setting(
        "identity",
        "choice",
        "passthrough",
        "How the user reaches the backend: the client's C{Authorization} passed through, a"
        " trusted C{header} set by casd, C{master} credentials with the user in C{header}, or"
        " none.",
        choices=IDENTITIES,
    ),
    Setting(
        "identity_header",
        "str",
        "X-Remote-User",
        "The trusted identity header (e.g. x-webobjects-remote-user for SOGo); always removed"
        " from client requests.",
    ),
    Setting(
        "identity_value",
        "choice",
        "login",
        "What the identity header carries: the backend login or the e-mail address.",
        choices=("login", "address"),
    ),
    Setting(
        "master_user",
        "str",
        "",
        "With C{identity = \"master\"}: the Basic user casd logs in to the backend as.",
    ),
    Setting(
        "master_password_file",
        "path",
        "",
        "With C{identity = \"master\"}: the file holding the master password (never logged).",
    ),
    Setting(
        "idle_timeout",
        "float",
        120.0,
        "Seconds without a byte either way during a request (body, backend reply) before it is"
        " cut (504 when nothing was answered yet).",
        minimum=0.001,
    ),
    Setting(
        "long_poll_timeout",
        "float",
        0.0,
        "When not 0: the idle limit of this vdir's requests instead of C{idle_timeout}, for long"
        " polls (ActiveSync Ping up to 3540 s: use 3660; RPC_IN_DATA/RPC_OUT_DATA channels).",
        minimum=0,
    ),
    Setting(
        "max_body_size",
        "int",
        100 * 1024 * 1024,
        "Largest request body in bytes (413 beyond it); 0: unlimited (Outlook Anywhere's 1 GB"
        " channels).",
        minimum=0,
    ),
    Setting(
        "site_redirect",
        "choice",
        "302",
        "How a user of a site whose [sites.NAME] says redirect is sent there: C{302} to its"
        " C{redirect_url} plus the request path (browsers, /owa), C{451} with C{X-MS-Location}"
        " (ActiveSync), or C{none} (503).  A site that says proxy is proxied to its casd.",
        choices=("302", "451", "none"),
    ),
)


@frozen
class VirtualDirectory:
    """
    One validated C{[[http.vdir]]}.

    @ivar path: the prefix, without a trailing slash (C{"/EWS"}), or C{""} for the root.
    @ivar auth: the accepted methods in the order tried.
    @ivar identity: C{passthrough}, C{header}, C{master} or C{none}.
    @ivar identityHeader: the trusted header's name as bytes; removed from every client request.
    @ivar masterPassword: never logged, never in C{repr}.
    @ivar timeout: the idle limit of a request: C{long_poll_timeout} when set, else
        C{idle_timeout}.
    """

    path: str
    caseInsensitive: bool = True
    backend: str = ""
    backendPath: str = ""
    auth: tuple[str, ...] = ("basic",)
    realm: str = "casd"
    identity: str = "passthrough"
    identityHeader: bytes = b"X-Remote-User"
    identityValue: str = "login"
    masterUser: str = ""
    masterPassword: bytes = field(default=b"", repr=False)
    idleTimeout: float = 120.0
    longPollTimeout: float = 0.0
    maxBodySize: int = 100 * 1024 * 1024
    siteRedirect: str = "302"

    @property
    def timeout(self) -> float:
        return self.longPollTimeout or self.idleTimeout

    @property
    def name(self) -> str:
        """
        The vdir's name in logs: its path, C{/} for the root.
        """
        return self.path or "/"

    def backendPathFor(self, path: bytes) -> bytes:
        """
        The path to request from the backend for a client's C{path} in this vdir (query
        included): the vdir's prefix swapped for C{backendPath}.
        """
        if not self.backendPath:
            return path
        rest = path[len(self.path) :]
        prefix = self.backendPath.rstrip("/").encode("utf-8")
        if not rest.startswith(b"/") and not rest.startswith(b"?"):
            rest = b"/" + rest if rest else b""
        return (prefix + rest) or b"/"


def _normalisePrefix(path: str) -> str:
    return "/" + path.strip("/") if path.strip("/") else ""


def vdirFromValues(configPath: str, where: str, values) -> VirtualDirectory:
    """
    Build a L{VirtualDirectory} from its validated table.

    @raise ConfigError: on a missing path, an unknown method, a header identity without a header
        name or master credentials without a user.
    """
    if not values.path.startswith("/"):
        raise ConfigError(configPath, f"{where}.path", "expected a path starting with \"/\"")
    methods = tuple(m.lower() for m in values.auth)
    for m in methods:
        if m not in AUTH_METHODS:
            raise ConfigError(
                configPath, f"{where}.auth", f"unknown method {m!r} (expected: {', '.join(AUTH_METHODS)})"
            )
    if not methods:
        raise ConfigError(configPath, f"{where}.auth", "expected at least one method")
    if "none" in methods and len(methods) > 1:
        raise ConfigError(configPath, f"{where}.auth", "\"none\" excludes every other method")
    header = values.identity_header.strip()
    if values.identity in ("header", "master") and not header:
        raise ConfigError(configPath, f"{where}.identity_header", "expected a header name")
    if any(c in header for c in ":\r\n ") :
        raise ConfigError(configPath, f"{where}.identity_header", "expected a header name")
    password = b""
    if values.identity == "master":
        if not values.master_user:
            raise ConfigError(configPath, f"{where}.master_user", "expected the master user's name")
        try:
            with open(values.master_password_file, "rb") as f:
                password = f.readline().rstrip(b"\r\n")
        except OSError as e:
            raise ConfigError(
                configPath, f"{where}.master_password_file", f"cannot read it ({e.strerror})"
            ) from None
    if "none" in methods and not values.backend:
        raise ConfigError(configPath, f"{where}.backend", "an anonymous vdir needs a backend")
    return VirtualDirectory(
        path=_normalisePrefix(values.path),
        caseInsensitive=values.case_insensitive,
        backend=values.backend,
        backendPath=(_normalisePrefix(values.backend_path) or "/") if values.backend_path else "",
        auth=methods,
        realm=values.realm,
        identity=values.identity,
        identityHeader=header.encode("ascii"),
        identityValue=values.identity_value,
        masterUser=values.master_user,
        masterPassword=password,
        idleTimeout=values.idle_timeout,
        longPollTimeout=values.long_poll_timeout,
        maxBodySize=values.max_body_size,
        siteRedirect=values.site_redirect,
    )


def _segmentPrefix(path: bytes, prefix: bytes) -> bool:
    """
    Whether C{prefix} is C{path}'s leading run of whole segments (C{/EWS} matches C{/EWS},
    C{/EWS/x} and C{/EWS?q}, not C{/EWSx}).
    """
    if not prefix:
        return True
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or path[len(prefix)] in b"/?"


class VdirTable:
    """
    The vdirs of one listener, matched longest prefix first.

    @ivar vdirs: every L{VirtualDirectory}, in configuration order.
    """

    def __init__(self, vdirs: Iterable[VirtualDirectory]) -> None:
        self.vdirs = tuple(vdirs)
        self._ordered = sorted(self.vdirs, key=lambda v: -len(v.path))
        # (prefix as matched, case-insensitive?, vdir), longest first: encoded once.
        self._prefixes = [
            (v.path.encode("utf-8").lower() if v.caseInsensitive else v.path.encode("utf-8"),
             v.caseInsensitive, v)
            for v in self._ordered
        ]

    def match(self, path: bytes) -> VirtualDirectory | None:
        """
        @param path: the request target as sent (C{/EWS/Exchange.asmx?x=1}); only origin-form
            targets match.
        @return: the vdir claiming C{path}, or C{None} (404, no directory look-up).
        """
        if not path.startswith(b"/"):
            return None
        lowered = path.lower()
        for prefix, caseInsensitive, vdir in self._prefixes:
            if _segmentPrefix(lowered if caseInsensitive else path, prefix):
                return vdir
        return None

    def clientPath(self, vdir: VirtualDirectory, path: bytes) -> bytes:
        """
        C{path} with the vdir's prefix spelled as configured (a case-insensitive match of
        C{/ews/x} becomes C{/EWS/x}), so that the backend sees one spelling.
        """
        n = len(vdir.path)
        return vdir.path.encode("utf-8") + path[n:]

    def __len__(self) -> int:
        return len(self.vdirs)


def readVdirs(configPath: str, tables) -> VdirTable:
    """
    @param tables: the validated C{[[http.vdir]]} values (L{casd.config.Values}).
    @raise ConfigError: on an invalid vdir or two vdirs with the same path.
    """
    vdirs, seen = [], set()
    for i, values in enumerate(tables):
        where = f"http.vdir[{i}]"
        vdir = vdirFromValues(configPath, where, values)
        key = vdir.path.lower()
        if key in seen:
            raise ConfigError(configPath, f"{where}.path", f"{vdir.path!r} is already a vdir")
        seen.add(key)
        vdirs.append(vdir)
    return VdirTable(vdirs)
