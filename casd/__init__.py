# -*- test-case-name: tests.test_config -*-
"""
casd: a Client Access Server.

The single front door of a mail system: it accepts client connections for every mail protocol,
terminates TLS, authenticates the user once through one shared layer, finds the user's mailbox
server and relays the session there.  It stores no mail.
"""

__version__ = "0.1.0"
