# -*- test-case-name: tests.test_connector -*-
"""The backend pool: connecting to mailbox servers, members and their health."""
