# -*- test-case-name: tests.test_demo -*-
"""casd's in-process DEMO mailbox backend.  DEMO ONLY: never use it to hold real mail."""
