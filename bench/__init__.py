"""
casd's benchmark: the same load against casd, nginx's mail proxy and HAProxy (TCP mode), side by
side on one machine, in front of one private Dovecot.  Run it with C{bench/run} (see
C{docs/performance.md}).
"""
