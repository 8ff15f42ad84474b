"""Shared pytest configuration: deterministic hypothesis profiles, a compilation cache.

``ci`` (default) is small and derandomized so CI is reproducible; ``thorough``
(HYPOTHESIS_PROFILE=thorough) runs ITQ3S_THOROUGH_EXAMPLES (default 2000) examples
per property.

Most of the suite's time is XLA compilation of the same programs in both xdist
workers (and in the subprocesses some tests start). JAX's persistent
compilation cache, in ``.jax_cache/`` at the repository root, lets them share
the executables: same HLO, same compiled code, so no result can change. Set
JAX_COMPILATION_CACHE_DIR to use another directory, or to "" to disable it.
"""

import os

from hypothesis import HealthCheck, settings

# Environment variables (not jax.config) so the subprocesses of the tests inherit them.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.abspath(__file__)), ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=int(os.environ.get("ITQ3S_THOROUGH_EXAMPLES", "2000")),
    deadline=None, derandomize=False,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
