"""Small helpers shared by the tests (imported as ``from tests import helpers``)."""

from __future__ import annotations

import contextlib

import jax
import numpy as np
import scipy.linalg

import itq3s_jax

_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_traces = [0]


def _listener(event: str, duration: float, **_) -> None:
  del duration
  if event == _TRACE_EVENT:
    _traces[0] += 1


jax.monitoring.register_event_duration_secs_listener(_listener)


@contextlib.contextmanager
def count_traces():
  """Counts the jax.jit traces (of any function) run inside the block.

  >>> with count_traces() as n:
  ...   pass
  >>> n()
  0

  Yields a callable returning the count so far; a second call of a compiled
  function with the same shapes and static arguments traces nothing.
  """
  start = _traces[0]
  yield lambda: _traces[0] - start


def assert_max_traces(n: int):
  """Context manager failing when the block runs more than ``n`` jax.jit traces."""

  @contextlib.contextmanager
  def check():
    with count_traces() as count:
      yield count
    assert count() <= n, f"{count()} jax.jit traces, expected at most {n}"

  return check()


def submodule(module, dotted: str):
  """The attribute / list item at a dotted state path (``layers.0.attn.q_proj``) of a model."""
  for part in dotted.split("."):
    module = module[int(part)] if part.isdigit() else getattr(module, part)
  return module


def oracle_weights(qt) -> np.ndarray:
  """float64 (N, K) of any format from its exact coding-domain values, inverse-transformed
  with scipy's Hadamard matrix (no transform code shared with the library); pad256 blocks
  are transformed whole, then cut to K."""
  z = np.asarray(itq3s_jax.decode_rotated(qt), np.float64)
  fmt = itq3s_jax.get_format(qt.format)
  out, start = [], 0
  for lo, hi in itq3s_jax.block_columns(qt.format, qt.shape[-1]):
    n = 256 if fmt.tail == "pad256" else hi - lo
    zb = z[:, start:start + n]
    start += n
    if fmt.transform != "none":
      sig = itq3s_jax.sign_vector(qt.seed, n) if fmt.transform == "rht" else np.ones(n)
      zb = sig * (zb @ scipy.linalg.hadamard(n).T / np.sqrt(n))
    out.append(zb[:, :hi - lo])
  return np.concatenate(out, axis=-1)
