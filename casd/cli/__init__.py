"""The C{casd} command line: operator tools beside C{twistd cas}."""
