"""
Integration-test fixtures: private instances of real servers.

The modules in this package start Dovecot (IMAP, POP3, ManageSieve) and
OpenLDAP's slapd from the Debian packages on loopback high ports, with
all configuration and state under a caller-supplied directory, and stop
them again by PID.  They block; call them from C{setUp}/C{tearDown} (or
C{addCleanup}) of a L{twisted.trial.unittest.TestCase}.

A missing server binary raises L{RuntimeError} (a test error), never
a skip: the integration tests are meant to run.
"""
