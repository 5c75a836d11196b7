"""
Integration tests: casd against real servers (Dovecot, Postfix, slapd, nginx, HAProxy, Redis, ...) on loopback.
"""
