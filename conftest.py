"""Shared pytest configuration: 8 virtual CPU devices, test tiers, hypothesis profiles, a cache.

Devices. ``--xla_force_host_platform_device_count=8`` only takes effect before jax
initialises its backends, so it is set here, before any test module imports jax:
sharding tests run in-process on a (2, 4) mesh instead of in subprocesses.

Tiers (markers, assigned by location unless a test marks itself):
  ``unit``        fast tests of one function or module (``itq3s_jax`` doctests too);
  ``property``    the proofs (``proofs/``) and the every-format codec sweeps, hypothesis
                  ``ci`` profile;
  ``integration`` notebooks, command lines, kill/resume, real-model smoke tests;
  ``kernel``      Pallas kernels in interpret mode and their GPU lowering.
``ITQ3S_TEST_TIERS=unit,kernel`` (comma-separated) runs only those tiers; unset
runs all. CI runs every tier on one Python and ``unit`` on the other.

Hypothesis: ``ci`` (default) is small and derandomized so CI is reproducible;
``thorough`` (HYPOTHESIS_PROFILE=thorough) runs ITQ3S_THOROUGH_EXAMPLES (default
2000) examples per property.

Most of the suite's time is XLA compilation of the same programs in both xdist
workers. JAX's persistent compilation cache, in ``.jax_cache/`` at the
repository root, lets them share executables: same HLO, same compiled code, so
no result can change. Set JAX_COMPILATION_CACHE_DIR to use another directory, or
to "" to disable it.

Temporary files: TMPDIR points under pytest's own temporary directory for the whole
session, so what a notebook or a doctest leaves behind with ``tempfile.mkdtemp`` (a
51 MB checkpoint per run of 04_conversion) is pruned with pytest's old runs instead of
piling up in /tmp until a CI disk fills.
"""

import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
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

TIERS = ("unit", "property", "integration", "kernel")
# Test files of the integration and kernel tiers (everything else under tests/ is unit).
INTEGRATION = ("notebooks_test.py", "cli_test.py", "convert_test.py", "convert_gguf_test.py",
               "inspect_test.py", "models_test.py", "fuzz_test.py", "loaders_test.py",
               "gguf_llamacpp_test.py")
KERNEL = ("pallas_kernels_test.py", "pallas_lowering_test.py", "kernel_report_test.py")
# Sweeps of every format x shape x dtype x rounding (hypothesis-driven in part): property
# tests of the codecs, run with the proofs. The unit tier keeps one pinned-bytes check per
# format (bytes_pinned_test.py), which exercises the same encoders on both jax versions.
PROPERTY = ("formats_test.py", "gptq_test.py")


def _tier(item) -> str:
  for tier in TIERS:
    if item.get_closest_marker(tier):
      return tier
  path = str(item.path)
  name = os.path.basename(path)
  if f"{os.sep}proofs{os.sep}" in path or name in PROPERTY:
    return "property"
  if name in INTEGRATION:
    return "integration"
  if name in KERNEL:
    return "kernel"
  return "unit"


@pytest.fixture(autouse=True, scope="session")
def _tmpdir_under_pytest(tmp_path_factory):
  old = os.environ.get("TMPDIR")
  # Subprocesses (notebook kernels, command-line tests) inherit the variable; this
  # process reads it again once tempfile's cached choice is cleared.
  os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmpdir"))
  tempfile.tempdir = None
  yield
  if old is None:
    os.environ.pop("TMPDIR", None)
  else:
    os.environ["TMPDIR"] = old
  tempfile.tempdir = None


def pytest_configure(config):
  for tier in TIERS:
    config.addinivalue_line("markers", f"{tier}: test tier (conftest.py)")


def pytest_collection_modifyitems(config, items):
  wanted = os.environ.get("ITQ3S_TEST_TIERS", "")
  wanted = {t.strip() for t in wanted.split(",") if t.strip()}
  unknown = wanted - set(TIERS)
  if unknown:
    raise pytest.UsageError(f"ITQ3S_TEST_TIERS names unknown tiers {sorted(unknown)}; "
                            f"known: {TIERS}.")
  keep, drop = [], []
  for item in items:
    tier = _tier(item)
    item.add_marker(getattr(pytest.mark, tier))
    (keep if not wanted or tier in wanted else drop).append(item)
  if drop:
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
