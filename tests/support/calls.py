"""
Counting the function calls of a piece of code (deterministic, unlike its time): for tests that
keep a hot path at a handful of calls.
"""

import cProfile
import gc
import pstats


def pythonCalls(f, *args) -> int:
    """
    @return: the function calls (Python and built-in) that C{f(*args)} makes, itself included.
    """
    # No collection in the middle: finalisers of other tests' garbage would be counted.
    gc.collect()
    gc.disable()
    try:
        profile = cProfile.Profile()
        profile.runcall(f, *args)
    finally:
        gc.enable()
    # Less the profiler's own "disable".
    return pstats.Stats(profile).total_calls - 1
