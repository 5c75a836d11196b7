# -*- test-case-name: tests.integration.test_tap -*-
"""
The shared context every protocol factory receives: the one place the core's services meet.
"""

from __future__ import annotations

from attrs import frozen

from casd.auth.authenticator import Authenticator
from casd.pool.connector import BackendConnector
from casd.config import CASConfig
from casd.session.protolog import SessionLog
from casd.routing.router import Router
from casd.tls import ClientTLS, ServerTLS


@frozen
class CASContext:
    """
    @ivar reactor: the reactor (injected, so tests pass a L{MemoryReactorClock}).
    @ivar config: the validated L{CASConfig}.
    @ivar authenticator: the shared login path.
    @ivar router: mailbox location.
    @ivar connector: opens backend sessions.
    @ivar serverTLS: certificates presented to clients.
    @ivar clientTLS: TLS options towards backends.
    @ivar sessionLog: the end-of-session log.
    @ivar protocols: name -> L{casd.interfaces.ICASProtocol}, every protocol of this process.
    @ivar directory: the first checker, for look-ups without a password (C{casd locate}, tests).
    """

    reactor: object
    config: CASConfig
    authenticator: Authenticator
    router: Router
    connector: BackendConnector
    serverTLS: ServerTLS
    clientTLS: ClientTLS
    sessionLog: SessionLog
    protocols: dict
    directory: object = None
