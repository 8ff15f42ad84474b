"""Reliability: no false certificate at any magnitude, and the fuzz tier (tests/fuzz/).

The fuzz tier here runs the pinned counterexamples and ``N_CASES`` generated
malformed inputs (every reader, every family; ``python -m tests.fuzz --cases
5000`` runs more) and requires that none ends in a traceback, a hang, a
partial output, a silently wrong result or a large allocation.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import checkpoint
from itq3s_jax.checkpoint import safetensors_file
from tests.fuzz import oracle
from tests.fuzz import pinned
from tests.fuzz import runner

N_CASES = 200  # ~35 s on the shared 2-core machine, about 18 per reader
BOUNDED = [f for f in itq3s_jax.formats() if itq3s_jax.has_bound(f)]
F32_MAX = float(np.finfo(np.float32).max)
SHAPE = (4, 288)  # a 256-block and a 32-block per row: both block sizes of the plan


def _extremes() -> dict[str, np.ndarray]:
  """Weights from float32's largest values down to its subnormals, pure and mixed."""
  rng = np.random.default_rng(18)
  signs = np.where(rng.random(SHAPE) < 0.5, -1.0, 1.0)
  out = {}
  for v in (F32_MAX, 3.0e38, 1.0e38, 3.0e37, 1.0e37, 1.0e30, 2.6e5, 1e-30, 1e-38, 1e-45):
    out[f"all_{v:g}"] = (signs * v).astype(np.float32)
  for v in (F32_MAX, 3.0e38, 1.0e37, 2.6e5):
    mixed = (signs * 1e-40).astype(np.float32)  # subnormals ...
    mixed[:, ::37] = v  # ... with a few huge values in every block
    out[f"mixed_{v:g}"] = mixed
  out["lognormal"] = (signs * np.exp(rng.uniform(math.log(1e-44), math.log(3e38), SHAPE))
                      ).astype(np.float32)
  out["one_huge"] = np.full(SHAPE, 1e-3, np.float32)
  out["one_huge"][2, 5] = 3.0e38
  return out


EXTREMES = _extremes()
# One of each kind for the (slower) converter path: overflowing, in range, mixed, tiny.
THROUGH_CONVERTER = ("all_3.40282e+38", "all_3e+38", "all_3e+37", "mixed_3e+38", "lognormal",
                     "all_260000", "all_1e-30", "all_1e-45")


def _holds_or_refused(w: np.ndarray, fmt: str, dtype) -> str:
  """'refused' (ValueError) or 'holds' (blockwise float64 error <= the certified bound)."""
  w = w.astype(dtype)
  try:
    qt = itq3s_jax.quantize(w, fmt)
  except ValueError:
    return "refused"
  msg = oracle.certificate_violation(qt, w.astype(np.float64))
  assert msg is None, msg
  return "holds"


@pytest.mark.parametrize("fmt", BOUNDED)
def test_no_false_certificate_at_extreme_magnitudes_eager(fmt):
  outcomes = {}
  for name, w in EXTREMES.items():
    for dtype in (np.float32, ml_dtypes.bfloat16):
      outcomes[name, np.dtype(dtype).name] = _holds_or_refused(w, fmt, dtype)
  # Both outcomes occur: the huge values are refused, the small ones certified.
  assert outcomes["all_3e+38", "float32"] == outcomes["all_3e+38", "bfloat16"] == "refused"
  assert outcomes["all_1e-30", "float32"] == "holds"
  assert outcomes["all_1e-45", "float32"] == "holds"


@pytest.mark.parametrize("fmt", [f for f in itq3s_jax.formats() if f not in BOUNDED])
def test_unbounded_formats_refuse_or_decode_finite(fmt):
  for w in EXTREMES.values():
    try:
      qt = itq3s_jax.quantize(w, fmt)
    except ValueError:
      continue
    assert np.all(np.isfinite(np.asarray(itq3s_jax.dequantize(qt))))


@pytest.mark.parametrize("fmt", BOUNDED)
def test_no_false_certificate_at_extreme_magnitudes_through_the_converter(tmp_path, fmt):
  """Each extreme tensor converted alone: a clean CheckpointError (nothing written), or a
  checkpoint whose certificate holds for the source values."""
  rule = itq3s_jax.QuantRule(fmt, min_size=1)
  refused = 0
  for i, name in enumerate(THROUGH_CONVERTER):
    w = EXTREMES[name]
    src, dst = str(tmp_path / f"{i}.safetensors"), str(tmp_path / f"out{i}")
    w = w.astype(ml_dtypes.bfloat16) if i % 2 else w
    safetensors_file.write(src, {name: (w.shape, w.dtype)}, lambda _: w)
    try:
      checkpoint.convert(src, dst, rule=rule)
    except checkpoint.CheckpointError as exc:
      assert "too large" in str(exc) or "NaN/Inf" in str(exc), exc
      assert not (tmp_path / f"out{i}").exists()
      refused += 1
      continue
    qt = checkpoint.load(dst)[name]
    assert oracle.certificate_violation(qt, w.astype(np.float64)) is None, name
  assert 0 < refused < len(THROUGH_CONVERTER)


def test_overflowing_calibration_statistics_keep_the_certificate(tmp_path):
  """GPTQ on statistics near float32's maximum used to write two-neighbour codes whose
  bound failed by 2x (found by the fuzz tier). GPTQ now rescales such statistics by a
  power of two and keeps every code within its two levels: the certificate holds."""
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  w = EXTREMES["all_1e-30"][:, :256] * 1e28
  src = str(tmp_path / "m.safetensors")
  safetensors_file.write(src, {"l.weight": (w.shape, w.dtype)}, lambda _: w)
  calibration.save(tmp_path / "s.npz", {"l": np.full((256, 256), 3e38, np.float32)})
  checkpoint.convert(src, str(tmp_path / "out"), rule=itq3s_jax.QuantRule(min_size=1),
                     calibration=calibration.load(tmp_path / "s.npz"))
  qt = checkpoint.load(str(tmp_path / "out"))["l.weight"]
  assert qt.rounding == "two_neighbour"
  assert oracle.certificate_violation(qt, w.astype(np.float64)) is None


@pytest.fixture(scope="module")
def fuzz_results(tmp_path_factory):
  return runner.run(N_CASES, seed=0, timeout_s=30.0,
                    workdir=str(tmp_path_factory.mktemp("fuzz")))


def test_pinned_counterexamples_keep_their_outcome(fuzz_results):
  want = {fn.__name__: outcome for fn, outcome in pinned.PINNED}
  got = {r.family: (r.status, r.detail) for r in fuzz_results if r.target == "pinned"}
  assert set(got) == set(want)
  bad = {k: v for k, v in got.items() if v[0] != want[k]}
  assert not bad, bad


def test_generated_cases_end_cleanly(fuzz_results):
  generated = [r for r in fuzz_results if r.target != "pinned"]
  assert len(generated) == N_CASES
  failures = [r for r in generated if r.status in runner.FAILURES]
  assert not failures, "\n".join(f"case {r.case} {r.target}/{r.family}: {r.status}: "
                                 f"{r.detail}" for r in failures[:5])
  # The mutations must reach past the first check: some inputs are accepted (and equal
  # to the independent decode), and every reader refuses some.
  assert sum(r.status == "ok" for r in generated) >= N_CASES // 10
  assert {r.target for r in generated if r.status == "error"} == {
      t.name for t in runner.targets.TARGETS}
