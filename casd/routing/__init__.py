"""Mailbox location: the locator chain, groups, hashing and sites."""
