"""
Makes the HELLO protocol discoverable by casd (and nothing else).
"""

from casd.service.discovery import LazyProtocol

hello = LazyProtocol("hello", "HELLO example protocol", "casd_hello.protocol.hello")
