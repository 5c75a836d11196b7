# -*- test-case-name: tests.test_imap,tests.test_pop3,tests.test_managesieve -*-
"""
One SASL driver for every client protocol (IMAP C{AUTHENTICATE}, POP3 and SMTP C{AUTH},
ManageSieve C{AUTHENTICATE}); each protocol frames the challenges and responses its way.
"""

from __future__ import annotations

from casd.auth.sasl import MECHANISMS, SASLCancelled, SASLExchange, SASLRefusal, encodeBase64
from casd.failures import AuthenticationFailed, PrivacyRequired, ProtocolViolation


class SASLDriver:
    """
    The SASL half of L{casd.session.frontend.FrontendProtocol} (a mixin of it): an exchange
    ends in C{login} with the credentials, or in L{saslFailed}.
    """

    _sasl: SASLExchange | None = None
    _saslToken = None

    def saslChallenge(self, token, challenge: bytes) -> None:
        """
        Send a SASL challenge, already base64-encoded, in the protocol's framing (C{+ ...} in
        IMAP and POP3, a string in ManageSieve).  The client's answer goes to L{saslResponse}.
        """
        raise NotImplementedError()

    def saslFailed(self, token, refusal: SASLRefusal) -> None:
        """
        A SASL exchange ended without credentials: say why in the protocol's L{wording} (bad
        base64 counts as an invalid command; a cancel is C{BAD} in IMAP, as RFC 3501 wants) or,
        for plaintext before TLS and malformed credentials, as a login failure.
        """
        w = self.wording
        if refusal is SASLRefusal.UNSUPPORTED:
            self.replyNo(token, w.saslUnsupported)
        elif refusal is SASLRefusal.PRIVACY_REQUIRED:
            self.loginFailed(token, PrivacyRequired())
        elif refusal is SASLRefusal.BAD_INITIAL:
            self.invalidCommand(token, w.saslBadInitial)
        elif refusal is SASLRefusal.BAD_RESPONSE:
            self.invalidCommand(token, w.saslBadResponse)
        elif refusal is SASLRefusal.CANCELLED:
            self.replyBad(token, w.saslCancelled)
        else:
            self.loginFailed(token, AuthenticationFailed())

    @property
    def saslInProgress(self) -> bool:
        """
        Whether a SASL exchange waits for the client's next response (see L{saslResponse}).
        """
        return self._sasl is not None

    def startSASL(self, token, mechanism, initial: bytes | None = None) -> None:
        """
        Begin a SASL exchange (IMAP C{AUTHENTICATE}, POP3 and SMTP C{AUTH}, ...).  It ends in
        L{login} with the credentials, or in L{saslFailed}; in between, L{saslChallenge} sends
        each challenge and the protocol hands each client response to L{saslResponse}.

        @param token: passed back to the hooks (e.g. the IMAP tag).
        @param mechanism: the mechanism name the client asked for (C{str} or C{bytes}).
        @param initial: the initial response as the client sent it (base64, C{=} for an empty
            one), or C{None}.
        """
        if isinstance(mechanism, bytes):
            mechanism = mechanism.decode("ascii", "replace")
        mechanism = mechanism.upper()
        if mechanism not in MECHANISMS:
            self.saslFailed(token, SASLRefusal.UNSUPPORTED)
            return
        if not self.client.plaintextAllowed:
            # PLAIN and LOGIN carry the password itself: only over TLS or from trusted clients.
            self.saslFailed(token, SASLRefusal.PRIVACY_REQUIRED)
            return
        exchange = SASLExchange(mechanism)
        try:
            decoded = SASLExchange.decodeInitial(initial) if initial is not None else None
        except ProtocolViolation:
            self.saslFailed(token, SASLRefusal.BAD_INITIAL)
            return
        self._saslStep(token, exchange, exchange.start, decoded)

    def saslResponse(self, response: bytes) -> None:
        """
        The client's response to the last challenge, unframed (the base64 text, or C{*}).
        """
        exchange, token = self._sasl, self._saslToken
        self._sasl = self._saslToken = None
        try:
            decoded = exchange.decode(response)
        except SASLCancelled:
            self.saslFailed(token, SASLRefusal.CANCELLED)
            return
        except ProtocolViolation:
            self.saslFailed(token, SASLRefusal.BAD_RESPONSE)
            return
        self._saslStep(token, exchange, exchange.respond, decoded)

    def abortSASL(self, refusal: SASLRefusal) -> None:
        """
        End the exchange in progress with L{saslFailed} (e.g. the client's response did not
        parse in the protocol's framing).
        """
        token = self._saslToken
        self._sasl = self._saslToken = None
        self.saslFailed(token, refusal)

    def _saslStep(self, token, exchange, step, data) -> None:
        try:
            result = step(data)
        except ProtocolViolation:
            self.saslFailed(token, SASLRefusal.MALFORMED)
            return
        if isinstance(result, bytes):
            self._sasl, self._saslToken = exchange, token
            self.saslChallenge(token, encodeBase64(result))
        else:
            self.login(token, result)
