# -*- test-case-name: tests.test_config,tests.integration.test_locate -*-
"""The C{casd} command line: operator tools beside C{twistd cas}."""
