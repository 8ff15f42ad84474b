"""Shared machinery of the proofs: float64 references, jitted codecs, derived constants.

Every property is a plain function ``check(case) -> float`` that raises
``AssertionError`` when the theorem fails and otherwise returns the observed
ratio to the bound (<= 1 when the theorem holds; for tightness checks, the
ratio reached). pytest wraps each with ``hypothesis.given``; ``python -m proofs``
runs the same functions with a chosen number of examples and tabulates the
worst ratio. Constants are derived in proofs/README.md (section named per use).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Callable

import numpy as np
import scipy.linalg

import itq3s_jax
from itq3s_jax._src.core import registry

U = 2.0**-24  # float32 unit roundoff (round to nearest)
MU = 2.0**-126  # smallest normal float32; XLA:CPU flushes anything below to zero (FTZ/DAZ)


# ---------------------------------------------------------------- derived constants


def stages(n: int) -> int:
  """Roundings along one FWHT path: L butterflies, +2 (inexact 1/sqrt(n) and its product) for odd L."""
  L = n.bit_length() - 1
  return L if L % 2 == 0 else L + 2


def phi(n: int) -> float:
  """README T1: ||fwht_fp32(x) - R x||_2 <= phi(n) ||x||_2 (no underflow)."""
  return (1.0 + U)**stages(n) - 1.0


def tau(n: int) -> float:
  """README T3 (underflow): absolute slack for FTZ/DAZ, 10 sqrt(n) 2^-126."""
  return 10.0 * math.sqrt(n) * MU


def rigorous_slack(fmt: registry.Format, n: int) -> float:
  """README T3: coefficient c(n) u of (||z_hat|| + eps_q), with a (1 + 2^-10) cover for 2nd-order terms."""
  rot = 0 if fmt.transform == "none" else 2 * stages(n)
  return (rot + n / 32 + 13) * U * (1 + 2.0**-10)


def gamma(k: int) -> float:
  """Higham's gamma_k = k u / (1 - k u): relative error of a k-term float32 dot product."""
  return k * U / (1 - k * U)


# ---------------------------------------------------------------- formats


def bound_formats() -> tuple[str, ...]:
  """Every registered format with a certified bound (new formats join automatically)."""
  return tuple(f for f in itq3s_jax.formats() if itq3s_jax.has_bound(f))


def rotated_formats() -> tuple[str, ...]:
  return tuple(f for f in itq3s_jax.formats()
               if itq3s_jax.get_format(f).transform != "none")


# ---------------------------------------------------------------- float64 references


@functools.lru_cache(maxsize=None)
def rotation(fmt_name: str, seed: int, n: int) -> np.ndarray:
  """float64 (n, n) orthonormal R with z = R w for one block (identity for transform none)."""
  fmt = itq3s_jax.get_format(fmt_name)
  if fmt.transform == "none":
    return np.eye(n)
  h = scipy.linalg.hadamard(n).astype(np.float64) / math.sqrt(n)
  if fmt.transform == "hadamard":
    return h
  return h * itq3s_jax.sign_vector(seed, n).astype(np.float64)[None, :]


def blocks64(fmt_name: str, seed: int, w: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per block of the row layout: (w_b float64 (..., n), z_b = R w_b float64 (..., n)).

  Blocks follow ``block_columns`` (bound order); a zero-padded tail block is padded here too.
  """
  out = []
  k = w.shape[-1]
  for lo, hi in itq3s_jax.block_columns(fmt_name, k):
    n = _block_n(fmt_name, k, lo)
    wb = np.zeros((*w.shape[:-1], n))
    wb[..., :hi - lo] = np.asarray(w[..., lo:hi], np.float64)
    out.append((wb, wb @ rotation(fmt_name, seed, n).T))
  return out


def _block_n(fmt_name: str, k: int, lo: int) -> int:
  fmt = itq3s_jax.get_format(fmt_name)
  from itq3s_jax._src.core import qtensor  # the plan is the core's; only its block length is read
  for seg in qtensor.segments(fmt.name, k):
    if seg.start <= lo < seg.start + seg.count * seg.n:
      return seg.n
  raise ValueError(f"column {lo} outside the plan of k={k}.")


def block_ns(fmt_name: str, k: int) -> list[int]:
  return [_block_n(fmt_name, k, lo) for lo, _ in itq3s_jax.block_columns(fmt_name, k)]


def in_range(fmt_name: str, seed: int, w: np.ndarray) -> bool:
  """Whether every coding-domain coefficient is within the format's max_abs (else quantize raises)."""
  fmt = itq3s_jax.get_format(fmt_name)
  zmax = max((float(np.max(np.abs(z))) for _, z in blocks64(fmt_name, seed, w)), default=0.0)
  return zmax <= fmt.max_abs * (1 - 1e-5)


# ---------------------------------------------------------------- jitted core calls


@dataclasses.dataclass(frozen=True)
class Coded:
  """Everything the proofs read about one quantized matrix, as float64/uint8 numpy arrays."""
  data: np.ndarray  # uint8 (rows, row_nbytes)
  w_hat: np.ndarray  # dequantize(qt), (rows, K)
  z_hat: np.ndarray  # decode_rotated(qt), (rows, Kp)
  bound: np.ndarray | None  # error_bound(qt) (include_rounding=True), (rows, nblocks)
  eps: np.ndarray | None  # error_bound(qt, include_rounding=False), (rows, nblocks)


def _coder(fmt_name: str, seed: int, w) -> list:
  # The public functions are compiled once per shape each and shared by every test that
  # calls them; a jax.jit around them here would compile a second, private program.
  qt = itq3s_jax.quantize(w, fmt_name, seed=seed)
  out = [qt.data, itq3s_jax.dequantize(qt), itq3s_jax.decode_rotated(qt)]
  if itq3s_jax.has_bound(fmt_name):
    out += [itq3s_jax.error_bound(qt), itq3s_jax.error_bound(qt, include_rounding=False)]
  return out


def code(fmt_name: str, seed: int, w: np.ndarray) -> Coded:
  """Quantizes ``w`` (float32 (rows, K)) and returns what the proofs read."""
  out = [np.asarray(a) for a in _coder(fmt_name, seed, w)]
  data, w_hat, z_hat = out[0], f64(out[1]), f64(out[2])
  bound, eps = (f64(out[3]), f64(out[4])) if len(out) > 3 else (None, None)
  return Coded(data, w_hat, z_hat, bound, eps)


def rotate_fn(fmt_name: str, seed: int):
  return functools.partial(itq3s_jax.rotate_activations, format=fmt_name, seed=seed)


def matmul_methods(every: bool | None = None) -> tuple[str, ...]:
  """matmul methods registered at the time (the kernels helper adds Pallas ones).

  Pallas methods run in interpret mode on CPU (slow): property runs use them only in
  the thorough profile (``every``); each also has one pinned ci test.
  """
  from itq3s_jax._src.matmul import api  # pylint: disable=g-import-not-at-top
  if every is None:
    every = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
  names = tuple(api.METHODS)
  return names if every else tuple(m for m in names if m == "xla")


def run_matmul(method: str, x, qt) -> np.ndarray | None:
  """float64 result, or None where the method documents NotImplementedError (format/shape)."""
  try:
    return f64(itq3s_jax.matmul(x, qt, method=method))
  except NotImplementedError:
    return None


def f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def split_blocks(v: np.ndarray, fmt_name: str, k: int) -> list[np.ndarray]:
  """Coding-domain (..., Kp) -> list of (..., n) blocks in bound order."""
  out, col = [], 0
  for n in block_ns(fmt_name, k):
    out.append(v[..., col:col + n])
    col += n
  return out


# ---------------------------------------------------------------- the theorem table


@dataclasses.dataclass
class Check:
  """One property: a check function and the hypothesis strategy of its cases."""
  theorem: str
  name: str
  fn: Callable[[Any], float | None]
  strategy: Any
  kind: str = "bound"  # "bound": ratio <= 1 must hold; "tight": ratio is a tightness witness
  examples: list = dataclasses.field(default_factory=list)


CHECKS: list[Check] = []


def check(theorem: str, strategy, *, kind: str = "bound", examples=()):
  """Registers ``fn`` as a property of ``theorem``; returns fn unchanged."""

  def wrap(fn):
    CHECKS.append(Check(theorem, fn.__name__, fn, strategy, kind, list(examples)))
    return fn

  return wrap
