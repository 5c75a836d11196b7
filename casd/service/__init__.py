# -*- test-case-name: tests.integration.test_tap -*-
"""The service assembly: the twistd composition root, listeners, workers, reload, protocol discovery."""
