"""Calibration taps on an NNX model: the input second moment Sigma_x = X^T X / n per linear layer.

``calibrate(model, tokens)`` runs the float NNX model over windows of
calibration text and, for every ``nnx.Linear`` (the layers
``itq3s_jax.flax.quantize_model`` quantizes), accumulates X^T X over all
token positions of its input. The result feeds ``quantize(w, fmt,
hessian=sigma)`` (GPTQ rounding); saving and loading it is ``_src/stats.py``.

How: a copy of the model has each ``nnx.Linear`` wrapped by a tap that stores
X^T X of the current batch (float32, highest matmul precision) in a variable;
one jitted forward per batch returns them, and the host adds them up in
float64 (or float32). Layers fed the same activation (q/k/v; gate/up) get
bitwise equal moments: they are detected on the first batch and accumulated
once, and the returned dict maps each of their paths to the same array.
Memory: one (K, K) accumulator per distinct layer input (:func:`nbytes`).

Calibration text must be disjoint from evaluation text: ``stats.protocol_tokens``
gives tokens 16384..24575 of the perplexity protocol's stream by default, the
protocol itself scoring tokens 0..8191.
"""

from __future__ import annotations

import hashlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.typing import ArrayLike

from itq3s_jax._src import api
from itq3s_jax._src import config
from itq3s_jax._src.core import qtensor
from itq3s_jax.flax import state as state_lib


class _Moment(nnx.Variable):
  """X^T X of a tap's last input batch (not a parameter)."""


class _Tap(nnx.Module):
  """Wraps an ``nnx.Linear``: same output, and records X^T X of its input."""

  def __init__(self, linear: nnx.Linear):
    self.linear = linear
    self.moment = _Moment(jnp.zeros((), jnp.float32))  # replaced by (K, K) inside the trace

  def __call__(self, x: jax.Array) -> jax.Array:
    x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    self.moment.set_value(jnp.matmul(x2.T, x2, precision=jax.lax.Precision.HIGHEST))
    return self.linear(x)


def _linears(model: nnx.Module, include: Callable[[str], bool] | None = None):
  """[(path tuple, nnx.Linear)] of the selected linear layers (collected before any surgery)."""
  return [(p, m) for p, m in nnx.iter_modules(model)
          if isinstance(m, nnx.Linear) and p and (include is None or include(state_lib.dotted(p)))]


def _tapped_copy(model: nnx.Module, include: Callable[[str], bool] | None):
  """A copy of ``model`` sharing its arrays, with the selected linears wrapped; paths."""
  gdef, state = nnx.split(model)
  copy = nnx.merge(gdef, state)
  targets = _linears(copy, include)
  for path, linear in targets:
    state_lib.set_submodule(copy, path, _Tap(linear))
  return copy, [state_lib.dotted(p) for p, _ in targets]


def calibrate(model: nnx.Module, tokens: ArrayLike, *, window: int = 512,
              batch_size: int = 2, dtype=np.float64,
              include: Callable[[str], bool] | None = None,
              forward: Callable[[nnx.Module, jax.Array], jax.Array] | None = None,
              progress: bool = False) -> dict[str, np.ndarray]:
  """Input second moments Sigma_x = X^T X / n of the model's linear layers.

  Args:
    model: an NNX model whose linear layers are ``nnx.Linear`` (not modified).
    tokens: int (L,) token ids, cut into ``L // window`` windows (a partial last
      window is dropped), or int (n_windows, T) already cut; each window is an
      independent context.
    window: window length for 1-D ``tokens``.
    batch_size: windows per jitted forward (a short last batch is run as is).
    dtype: accumulator dtype across batches, ``np.float64`` or ``np.float32``.
    include: optional predicate on the dotted layer path (``"layers.0.attn.q_proj"``).
    forward: ``(model, tokens (B, T)) -> anything``; default ``model(tokens)``.
    progress: show a tqdm bar over the batches (stderr).

  Returns:
    {dotted path: Sigma (K, K) of ``dtype``}, K the layer's in_features;
    layers fed the same activation share one array object.

  Raises:
    ValueError: no complete window, a bad dtype, or no ``nnx.Linear`` selected.
  """
  dtype = np.dtype(dtype)
  if dtype not in (np.float32, np.float64):
    raise ValueError(f"dtype={dtype} must be float32 or float64.")
  ids = np.asarray(tokens)
  if ids.ndim == 1:
    ids = ids[:len(ids) // window * window].reshape(-1, window)
  if ids.ndim != 2 or ids.shape[0] == 0:
    raise ValueError(f"tokens give no complete window of {window} (shape {np.shape(tokens)}).")
  tapped, paths = _tapped_copy(model, include)
  if not paths:
    raise ValueError("the model has no nnx.Linear layer to calibrate (after include).")
  gdef, state = nnx.split(tapped)
  fwd = forward or (lambda m, t: m(t))

  @jax.jit
  def moments(state, toks):
    m = nnx.merge(gdef, state)
    fwd(m, toks)
    return [tap.moment[...] for p, tap in nnx.iter_modules(m) if isinstance(tap, _Tap)]

  sums: dict[str, np.ndarray] = {}
  owner: dict[str, str] = {}  # path -> path of the accumulator it shares
  for i in tqdm.tqdm(range(0, len(ids), batch_size), desc="calibrate", unit="batch",
                     disable=not progress, leave=False):
    out = moments(state, jnp.asarray(ids[i:i + batch_size], jnp.int32))
    mats = dict(zip(paths, (np.asarray(x) for x in out)))
    if not owner:
      first: dict[tuple, str] = {}
      for p, x in mats.items():
        key = (x.shape, hashlib.sha256(x.tobytes()).hexdigest())
        owner[p] = first.setdefault(key, p)
    for p, x in mats.items():
      if owner[p] != p:
        continue
      if p in sums:
        sums[p] += x.astype(dtype)
      else:
        sums[p] = x.astype(dtype)
  n = ids.size
  for s in sums.values():
    s /= n
  return {p: sums[owner[p]] for p in paths}


def quantize_weights(model: nnx.Module, stats: Mapping[str, ArrayLike], *,
                     format: str = "itq3_t", seed: int = 0,
                     gptq: config.GptqConfig | None = None, progress: bool = False
                     ) -> dict[str, qtensor.QuantizedTensor]:
  """GPTQ-quantizes the kernels of the linear layers that have statistics.

  Layers sharing one Sigma (same array object, e.g. q/k/v) are rounded in one
  call with their rows stacked: rows are independent given Sigma, so this only
  saves the shared factorization.

  Args:
    model: the float NNX model (not modified).
    stats: {dotted path: Sigma (K, K)} from :func:`calibrate` / :func:`load`.
    format, seed: as ``itq3s_jax.quantize``.
    gptq: rounding options (:class:`itq3s_jax.GptqConfig`); None: the defaults.
    progress: show a tqdm bar over the groups (stderr).

  Returns:
    {dotted path: QuantizedTensor (out_features, in_features)}.
  """
  groups: dict[int, list] = {}
  for path, lin in _linears(model, lambda p: p in stats):
    groups.setdefault(id(stats[state_lib.dotted(path)]), []).append((state_lib.dotted(path), lin))
  out = {}
  for members in tqdm.tqdm(groups.values(), desc="gptq", unit="group", leave=False,
                           disable=not progress):
    w = jnp.concatenate([lin.kernel[...].T for _, lin in members], axis=0)
    qt = api.quantize(w, format, seed=seed, hessian=stats[members[0][0]], gptq=gptq)
    row = 0
    for name, lin in members:
      out[name] = qt.replace(data=qt.data[row:row + lin.out_features])
      row += lin.out_features
  return out
