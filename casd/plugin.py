# -*- test-case-name: tests.test_plugin -*-
"""
casd's public plugin API: the one import a client protocol needs.

    from casd.plugin import BackendDialogue, FrontendProtocol, HealthProbe, ProtocolDescriptor

A protocol is a L{FrontendProtocol} subclass (its grammar and its framing of replies), a
L{BackendDialogue} subclass (its login dialogue with a mailbox server) and a
L{ProtocolDescriptor} naming both, registered with a L{LazyProtocol} in the package's own
C{twisted/plugins/} module.  C{docs/writing-a-protocol-plugin.md} builds one; L{casd.testing}
has the fakes to test it.  Everything here changes only compatibly.
"""

from __future__ import annotations

from attrs import field, frozen
from zope.interface import implementer

from twisted.plugin import IPlugin

from casd.auth.sasl import MECHANISMS, SASLRefusal, encodePlain, makeCredentials
from casd.config.settings import ConfigError, Setting
from casd.failures import (
    AuthenticationFailed,
    BackendUnavailable,
    CASFailure,
    DirectoryUnavailable,
    PolicyRefused,
    PrivacyRequired,
    ProtocolViolation,
    Throttled,
)
from casd.interfaces import HealthProbe, ICASProtocol
from casd.service.discovery import LazyProtocol
from casd.session.dialogue import BackendDialogue, BackendTimeout
from casd.session.frontend import FrontendFactory, FrontendProtocol, Wording

__all__ = [
    "AuthenticationFailed",
    "BackendDialogue",
    "BackendTimeout",
    "BackendUnavailable",
    "CASFailure",
    "ConfigError",
    "DirectoryUnavailable",
    "FrontendFactory",
    "FrontendProtocol",
    "HealthProbe",
    "ICASProtocol",
    "LazyProtocol",
    "MECHANISMS",
    "PolicyRefused",
    "PrivacyRequired",
    "ProtocolDescriptor",
    "ProtocolViolation",
    "SASLRefusal",
    "Setting",
    "Throttled",
    "Wording",
    "encodePlain",
    "makeCredentials",
]


@implementer(IPlugin, ICASProtocol)
@frozen(eq=False)
class ProtocolDescriptor:
    """
    The descriptor of one client protocol (an L{ICASProtocol}): what it is called, where it
    listens and how its backends are reached, its settings, and the L{FrontendProtocol}
    subclass that serves each connection.

        hello = ProtocolDescriptor(
            name="hello",
            description="HELLO proxy",
            server=HelloServer,
            defaultListeners=({"endpoint": "tcp:7110", "tls": "starttls"},),
            defaultBackendPort=7110,
        )

    Subclass it only to check the configuration further when the factory is built
    (L{buildFactory}).

    @ivar server: the L{FrontendProtocol} subclass.
    @ivar alpnProtocols: the protocol's ALPN ids (C{str}, RFC 7301), preferred first, e.g.
        C{("imap",)}; C{()} declares none (see C{ICASProtocol}).
    """

    name: str
    description: str
    server: type
    defaultListeners: tuple
    defaultBackendPort: int
    defaultBackendTLS: str = "none"
    healthProbe: HealthProbe | None = None
    settings: tuple = field(default=(), converter=tuple)
    alpnProtocols: tuple = ()

    def buildFactory(self, context, section, listener):
        """
        @return: a L{FrontendFactory} of L{server} for C{listener}.
        """
        return FrontendFactory(self.server, context, section, listener, self)
