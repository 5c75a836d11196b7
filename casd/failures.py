# -*- test-case-name: tests.test_auth -*-
"""
The shared failure vocabulary.

Every failure that a client can see travels as one of these exceptions; each protocol renders it
in its own words (see L{casd.interfaces.ICASProtocol} and the table in C{docs/architecture.md}).
Messages carried by these exceptions are safe to log: they never hold a secret.
"""


class CASFailure(Exception):
    """
    Base of the vocabulary.  C{str(failure)} is a short reason for the log, never shown verbatim
    to a client when it could help an attacker.
    """

    #: C{True} when the client should try again later (a temporary failure).
    temporary = False


class AuthenticationFailed(CASFailure):
    """
    The credentials were refused: unknown user, wrong password, disabled account.
    """


class DirectoryUnavailable(CASFailure):
    """
    The directory could not answer (down, slow, garbage); never reported as a bad password.
    """

    temporary = True


class BackendUnavailable(CASFailure):
    """
    No mailbox server could take the session (refused, timed out, misbehaved).
    """

    temporary = True


class Throttled(CASFailure):
    """
    A limit was hit (connections, rate, per-user sessions).
    """

    temporary = True


class PolicyRefused(CASFailure):
    """
    The user is known and the password right, but policy refuses this access.
    """


class PrivacyRequired(CASFailure):
    """
    Plaintext authentication was attempted before TLS on an untrusted connection.
    """


class ProtocolViolation(CASFailure):
    """
    The peer broke its protocol: bad syntax, bad base64, an overlong line.
    """
