"""Calibration statistics: the input second moment Sigma_x = X^T X / n of every linear layer.

``calibrate(model, tokens)`` runs the float NNX model over windows of
calibration text and, for every ``nnx.Linear`` (the layers
``itq3s_jax.flax.quantize_model`` quantizes), accumulates X^T X over all
token positions of its input. The result feeds ``quantize(w, fmt,
hessian=sigma)`` (GPTQ rounding, ``gptq.py``).

How: a copy of the model has each ``nnx.Linear`` wrapped by a tap that stores
X^T X of the current batch (float32, highest matmul precision) in a variable;
one jitted forward per batch returns them, and the host adds them up in
float64 (or float32). Layers fed the same activation (q/k/v; gate/up) get
bitwise equal moments: they are detected on the first batch and accumulated
once, and the returned dict maps each of their paths to the same array.
Memory: one (K, K) accumulator per distinct layer input (:func:`nbytes`).

Calibration text must be disjoint from evaluation text: :func:`protocol_tokens`
gives tokens 16384..24575 of the perplexity protocol's stream by default, the
protocol itself scoring tokens 0..8191.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from itq3s_jax._src import gptq
from itq3s_jax._src import qtensor

CALIBRATION_SLICE = (16384, 24576)  # tokens of the protocol stream; eval uses [0, 8192)
_FORMAT_KEY = "__itq3s_calibration__"


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


def _dotted(path) -> str:
  return ".".join(str(p) for p in path)


def _linears(model: nnx.Module, include: Callable[[str], bool] | None = None):
  """[(path tuple, nnx.Linear)] of the selected linear layers (collected before any surgery)."""
  return [(p, m) for p, m in nnx.iter_modules(model)
          if isinstance(m, nnx.Linear) and p and (include is None or include(_dotted(p)))]


def _replace(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
  parent = model
  for key in path[:-1]:
    parent = parent[key] if isinstance(key, int) else getattr(parent, key)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _tapped_copy(model: nnx.Module, include: Callable[[str], bool] | None):
  """A copy of ``model`` sharing its arrays, with the selected linears wrapped; paths."""
  gdef, state = nnx.split(model)
  copy = nnx.merge(gdef, state)
  targets = _linears(copy, include)
  for path, linear in targets:
    _replace(copy, path, _Tap(linear))
  return copy, [_dotted(p) for p, _ in targets]


def calibrate(model: nnx.Module, tokens: ArrayLike, *, window: int = 512,
              batch_size: int = 2, dtype=np.float64,
              include: Callable[[str], bool] | None = None,
              forward: Callable[[nnx.Module, jax.Array], jax.Array] | None = None,
              ) -> dict[str, np.ndarray]:
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
  for i in range(0, len(ids), batch_size):
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


def nbytes(stats: Mapping[str, np.ndarray]) -> int:
  """Bytes held by the distinct arrays of ``stats`` (shared arrays counted once)."""
  return sum(a.nbytes for a in {id(a): a for a in stats.values()}.values())


def save(path: str | os.PathLike[str], stats: Mapping[str, np.ndarray], *,
         dtype=np.float32) -> None:
  """Writes ``stats`` to an .npz, each distinct array once, in ``dtype``.

  Written to ``path + ".tmp"`` then renamed, so a crash leaves no partial file.
  """
  arrays, names, index = {}, [], {}
  for p, a in stats.items():
    key = index.setdefault(id(a), f"s{len(index)}")
    if key not in arrays:
      arrays[key] = np.asarray(a, dtype)
    names.append((p, key))
  arrays[_FORMAT_KEY] = np.array([f"{p}\t{k}" for p, k in names])
  tmp = os.fspath(path) + ".tmp"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def load(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """Reads statistics written by :func:`save`; shared arrays stay shared.

  Raises:
    ValueError: the file is not a calibration .npz.
  """
  with np.load(path, allow_pickle=False) as f:
    if _FORMAT_KEY not in f.files:
      raise ValueError(f"{os.fspath(path)} is not an itq3s calibration file (no index); "
                       "write it with itq3s_jax.calibrate's save().")
    table = [str(s).split("\t") for s in f[_FORMAT_KEY]]
    arrays = {k: f[k] for k in {k for _, k in table}}
  return {p: arrays[k] for p, k in table}


def protocol_tokens(tokenizer, start: int = CALIBRATION_SLICE[0],
                    stop: int = CALIBRATION_SLICE[1]) -> np.ndarray:
  """Token ids [start, stop) of the perplexity protocol's text (default: disjoint from eval).

  Args:
    tokenizer: a ``tokenizers.Tokenizer`` (e.g. from ``llama.load_gguf``), no BOS added.
    start, stop: token range; the protocol scores [0, 8192).

  Returns:
    int32 (stop - start,).
  """
  from itq3s_jax._src import evaluation  # pylint: disable=g-import-not-at-top
  ids = np.asarray(tokenizer.encode(evaluation.protocol_text(), add_special_tokens=False).ids,
                   np.int32)
  if len(ids) < stop:
    raise ValueError(f"the protocol text has {len(ids)} tokens, fewer than {stop=}.")
  return ids[start:stop]


def quantize_weights(model: nnx.Module, stats: Mapping[str, ArrayLike], *,
                     format: str = "itq3_t", seed: int = 0, **options
                     ) -> dict[str, qtensor.QuantizedTensor]:
  """GPTQ-quantizes the kernels of the linear layers that have statistics.

  Layers sharing one Sigma (same array object, e.g. q/k/v) are rounded in one
  call with their rows stacked: rows are independent given Sigma, so this only
  saves the shared factorization.

  Args:
    model: the float NNX model (not modified).
    stats: {dotted path: Sigma (K, K)} from :func:`calibrate` / :func:`load`.
    format, seed: as ``itq3s_jax.quantize``.
    **options: ``gptq.quantize`` options (rounding, scales, damp, act_order).

  Returns:
    {dotted path: QuantizedTensor (out_features, in_features)}.
  """
  groups: dict[int, list] = {}
  for path, lin in _linears(model, lambda p: p in stats):
    groups.setdefault(id(stats[_dotted(path)]), []).append((_dotted(path), lin))
  out = {}
  for members in groups.values():
    w = jnp.concatenate([lin.kernel[...].T for _, lin in members], axis=0)
    qt = gptq.quantize(w, format, stats[members[0][0]], seed=seed, **options)
    row = 0
    for name, lin in members:
      data = qt.data[row:row + lin.out_features]
      out[name] = qtensor.QuantizedTensor(data, (lin.out_features, lin.in_features),
                                          qt.format, qt.seed, qt.rounding)
      row += lin.out_features
  return out


def quantize_model(model: nnx.Module, stats: Mapping[str, ArrayLike], *,
                   format: str = "itq3_t", seed: int = 0, method: str = "auto",
                   **options) -> nnx.Module:
  """Replaces each calibrated ``nnx.Linear`` by a GPTQ-coded ``QuantizedLinear`` (in place).

  ``itq3s_jax.flax.quantize_model(model, hessians=stats, include=...)`` restricted
  to the layers that have statistics; use that directly for a report, or to
  round the layers without statistics to nearest.

  Args:
    model: the float NNX model; layers without statistics stay float.
    stats: {dotted path: Sigma} from :func:`calibrate` / :func:`load`.
    format, seed: as ``itq3s_jax.quantize``.
    method: ``itq3s_jax.matmul`` method of the new layers.
    **options: ``gptq.quantize`` options.

  Returns:
    ``model``, modified.
  """
  from itq3s_jax import flax as qflax  # pylint: disable=g-import-not-at-top (flax imports us)
  only = "^(" + "|".join(re.escape(p) for p in stats) + ")$"
  return qflax.quantize_model(model, format=format, seed=seed, method=method, include=only,
                              hessians=stats, **options)[0]
