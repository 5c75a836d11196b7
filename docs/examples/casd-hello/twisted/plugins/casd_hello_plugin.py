"""
Makes the HELLO protocol discoverable by casd (and nothing else).
"""

from casd.plugin import LazyProtocol

hello = LazyProtocol("hello", "HELLO example protocol", "casd_hello.protocol.hello")
