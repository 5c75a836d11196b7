# -*- test-case-name: tests.test_router -*-
"""Mailbox location: the locator chain, groups, hashing and sites."""
