"""Shared pytest configuration: deterministic hypothesis profiles.

``ci`` (default) is small and derandomized so CI is reproducible; ``thorough``
(HYPOTHESIS_PROFILE=thorough) runs thousands of examples per property.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, database=None,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    "thorough", max_examples=2000, deadline=None, derandomize=False,
    print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
