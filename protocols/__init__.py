# -*- test-case-name: tests.test_plugin -*-
"""
casd's built-in client protocols, one module each; registered through
C{twisted/plugins/cas_plugin.py} exactly as a third-party protocol would be.
"""
