"""
casd-hello: an example protocol plugin for casd (see docs/writing-a-protocol-plugin.md).
"""
