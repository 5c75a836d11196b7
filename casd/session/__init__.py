# -*- test-case-name: tests.test_relay -*-
"""The session path: the client-side base protocol, the backend dialogue, the relay, what casd knows of a client, the session log."""
