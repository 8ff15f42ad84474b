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

:func:`calibrate_sequential` is the GPTQ paper's procedure: block by block
(``model.layers``), each layer's moment is taken on the model whose earlier
layers (earlier blocks, and earlier layers of its own block in call order) are
already quantized, so later layers see, and correct for, the earlier errors.
It returns the statistics and the codes; ``quantize(w, hessian=sigma)`` with
the same format, seed and :class:`GptqConfig` reproduces those codes (what
``itq3s calibrate --sequential`` then ``itq3s convert --calibration`` does).

Calibration text must be disjoint from evaluation text: ``stats.protocol_tokens``
gives tokens 16384..24575 of the perplexity protocol's stream by default, the
protocol itself scoring tokens 0..8191.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.typing import ArrayLike

from itq3s_jax._src import api
from itq3s_jax._src import codec
from itq3s_jax._src import config
from itq3s_jax._src import stats
from itq3s_jax._src.core import qtensor
from itq3s_jax.flax import _core
from itq3s_jax.flax import nnx as qnnx
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


class _Args(nnx.Variable):
  """The positional inputs of a block's last call (not a parameter)."""


class _Capture(nnx.Module):
  """Wraps a block: same output, and records its positional inputs."""

  def __init__(self, block: nnx.Module):
    self.block = block
    self.args = _Args(())

  def __call__(self, *args):
    self.args.set_value(tuple(args))
    return self.block(*args)


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


def _windows(tokens: ArrayLike, window: int) -> np.ndarray:
  ids = np.asarray(tokens)
  if ids.ndim == 1:
    ids = ids[:len(ids) // window * window].reshape(-1, window)
  if ids.ndim != 2 or ids.shape[0] == 0:
    raise ValueError(f"tokens give no complete window of {window} (shape {np.shape(tokens)}).")
  return ids


@functools.partial(jax.jit, static_argnums=0)
def _run(gdef, state, args):
  """One block forward: (outputs, the moments of its taps in iteration order)."""
  m = nnx.merge(gdef, state)
  out = m(*args)
  return out, [t.moment[...] for _, t in nnx.iter_modules(m) if isinstance(t, _Tap)]


def _call_groups(block: nnx.Module, args, paths: list[str]) -> list[list[str]]:
  """The block's tapped linears grouped by shared input, in the order they are called.

  Found by tracing the block once (no compute): layers called on the same traced
  array (q/k/v, gate/up) share an input, so they form one group.
  """
  seen: dict[int, list[str]] = {}

  class Order(nnx.Module):
    def __init__(self, linear, name):
      self.linear, self.name = linear, name

    def __call__(self, x):
      seen.setdefault(id(x), []).append(self.name)
      return self.linear(x)

  gdef, state = nnx.split(block)
  copy = nnx.merge(gdef, state)
  for name in paths:
    path = tuple(int(k) if k.isdigit() else k for k in name.split("."))
    state_lib.set_submodule(copy, path, Order(state_lib.get_submodule(copy, path), name))
  jax.eval_shape(lambda a: copy(*a), args)
  return list(seen.values())


def calibrate_sequential(model: nnx.Module, tokens: ArrayLike, *, format: str = "itq3_t",
                         seed: int = 0, gptq: config.GptqConfig | None = None,
                         window: int = 512, batch_size: int = 2,
                         include: Callable[[str], bool] | None = None,
                         forward: Callable[[nnx.Module, jax.Array], jax.Array] | None = None,
                         blocks: str = "layers", progress: bool = False
                         ) -> tuple[dict[str, np.ndarray], dict[str, qtensor.QuantizedTensor]]:
  """Sequential statistics and GPTQ codes: each layer calibrated on the quantized prefix.

  The float model runs once to capture the input of ``model.<blocks>[0]``; then
  for each block, for each group of its linear layers in call order (q/k/v,
  o, gate/up, down): Sigma = X^T X / n of the group's input with every earlier
  layer quantized, GPTQ codes from it, and the layer's kernel replaced by the
  dequantized codes; finally the block's output feeds the next block.

  Args:
    model: an NNX model with an ``nnx.List`` of blocks at attribute ``blocks``
      whose linear layers are ``nnx.Linear`` (not modified).
    tokens, window, batch_size, include, forward, progress: as :func:`calibrate`.
    format, seed, gptq: as :func:`quantize_weights`.
    blocks: attribute of the block list.

  Returns:
    ``(stats, codes)``: {dotted path: float32 Sigma (K, K)} (a group shares one
    array), and {dotted path: QuantizedTensor (out, in)} equal to
    ``quantize_weights(model, stats, ...)``'s.

  Raises:
    ValueError: no complete window, no block list, or a selected linear layer
      outside the blocks.
  """
  ids = _windows(tokens, window)
  stack = getattr(model, blocks, None)
  if not isinstance(stack, nnx.List) or not len(stack):
    raise ValueError(f"model.{blocks} is not a non-empty nnx.List of blocks.")
  outside = [n for n in (state_lib.dotted(p) for p, _ in _linears(model, include))
             if not n.startswith(f"{blocks}.")]
  if outside:
    raise ValueError(f"linear layers outside model.{blocks} cannot be calibrated "
                     f"sequentially: {outside[:3]}; exclude them (include=...).")
  gdef, state = nnx.split(model)
  work = nnx.merge(gdef, jax.tree.map(jnp.array, state))  # a private copy: kernels change
  fwd = forward or (lambda m, t: m(t))
  gcap, scap = nnx.split(work)
  cap = nnx.merge(gcap, scap)
  getattr(cap, blocks)[0] = _Capture(getattr(cap, blocks)[0])
  gcap, scap = nnx.split(cap)

  @jax.jit
  def first_inputs(state, toks):
    m = nnx.merge(gcap, state)
    fwd(m, toks)
    return getattr(m, blocks)[0].args.get_value()

  inputs = [first_inputs(scap, jnp.asarray(ids[i:i + batch_size], jnp.int32))
            for i in range(0, len(ids), batch_size)]
  n = ids.size
  stats: dict[str, np.ndarray] = {}
  codes: dict[str, qtensor.QuantizedTensor] = {}
  stack = getattr(work, blocks)
  for bi in tqdm.tqdm(range(len(stack)), desc="sequential", unit="block",
                      disable=not progress, leave=False):
    prefix = f"{blocks}.{bi}."
    block = stack[bi]
    mine = None if include is None else (lambda p: include(prefix + p))
    tapped, paths = _tapped_copy(block, mine)
    for group in _call_groups(block, inputs[0], paths) if paths else []:
      tapped, paths = _tapped_copy(block, mine)
      tg, ts = nnx.split(tapped)
      acc = None
      for args in inputs:
        _, mats = _run(tg, ts, args)
        x = np.asarray(mats[paths.index(group[0])], np.float64)
        acc = x if acc is None else acc + x
      sigma = (acc / n).astype(np.float32)
      qts = quantize_weights(block, {p: sigma for p in group}, format=format, seed=seed,
                             gptq=gptq)
      for p, qt in qts.items():
        lin = state_lib.get_submodule(block, tuple(int(k) if k.isdigit() else k
                                                   for k in p.split(".")))
        lin.kernel.set_value(codec.dequantize(qt).T.astype(lin.kernel[...].dtype))
        stats[prefix + p], codes[prefix + p] = sigma, qt
    bg, bs = nnx.split(block)
    inputs = [(_run(bg, bs, args)[0],) + tuple(args[1:]) for args in inputs]
  return stats, codes


class _Decoded(nnx.Variable):
  """A weight decoded from its codes: state that is neither a Param nor tuned."""


class _DecodedLinear(nnx.Module):
  """A QuantizedLinear's function with its weight decoded once: float32 (K, N), same bias."""

  def __init__(self, layer: qnnx.QuantizedLinear):
    self.kernel = _Decoded(codec.dequantize(layer.qt).T)
    self.bias = layer.bias if layer.bias is not None else nnx.data(None)
    self.dtype, self.param_dtype = layer.dtype, layer.param_dtype

  def __call__(self, x):
    x = jnp.asarray(x)
    y = jnp.dot(x.astype(jnp.float32), self.kernel[...], precision=jax.lax.Precision.HIGHEST,
                preferred_element_type=jnp.float32)
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(_core.output_dtype(x.dtype, self.dtype, self.param_dtype))


def _decoded_copy(qmodel: nnx.Module) -> nnx.Module:
  """A copy of ``qmodel`` whose QuantizedLinear layers are :class:`_DecodedLinear` at the same paths."""
  copy = nnx.clone(qmodel)
  for path, layer in list(nnx.iter_modules(copy)):
    if isinstance(layer, qnnx.QuantizedLinear):
      state_lib.set_submodule(copy, path, _DecodedLinear(layer))
  return copy


def _is_tunable(path, value) -> bool:
  """1-D float parameters: norm gains and biases (of quantized layers too), never codes."""
  return value.ndim == 1 and jnp.issubdtype(value.dtype, jnp.floating)


def tuned_values(model: nnx.Module) -> dict[str, np.ndarray]:
  """The parameters :func:`tune_unquantized` fits: {dotted state path: float32 (n,)}.

  What ``itq3s calibrate --tune`` stores beside the statistics
  (``calibration.save(..., tuned=...)``) for ``itq3s convert`` to write.
  """
  _, tuned, _ = nnx.split(model, nnx.All(nnx.Param, _is_tunable), ...)
  return {state_lib.dotted(p): np.asarray(v[...], np.float32)
          for p, v in nnx.to_flat_state(tuned)}


def coded_weights(model: nnx.Module, qmodel: nnx.Module,
                  gptq: config.GptqConfig) -> dict[str, stats.Codes]:
  """{dotted layer path: ``stats.Codes``} of every GPTQ-coded QuantizedLinear of ``qmodel``.

  ``model`` is the float model ``qmodel`` was quantized from (same paths),
  with GPTQ options ``gptq`` (``quantize_model(..., gptq=gptq)``). Each code
  row is stored with the digest of the float row it codes
  (``stats.row_digests`` of the (out, in) weight), which ``itq3s convert``
  checks before it writes these codes instead of computing them again.
  """
  floats = {state_lib.dotted(p): layer for p, layer in nnx.iter_modules(model)
            if isinstance(layer, nnx.Linear)}
  out = {}
  for path, layer in nnx.iter_modules(qmodel):
    key = state_lib.dotted(path)
    if isinstance(layer, qnnx.QuantizedLinear) and key in floats:
      qt = layer.qt
      w = np.asarray(floats[key].kernel[...], np.float32).T
      if qt.rounding == "nearest":  # no statistics for this layer: nothing worth keeping
        continue
      out[key] = stats.Codes(qt.format, qt.seed, gptq.resolve(qt.format).to_json(),
                             np.asarray(qt.data), stats.row_digests(w))
  return out


def kl_divergence(ref_logits: jax.Array, logits: jax.Array) -> jax.Array:
  """Mean over positions of KL(softmax(ref) || softmax(logits)) (float32 scalar)."""
  lp = jax.nn.log_softmax(ref_logits.astype(jnp.float32), -1)
  lq = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
  return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))


def tune_unquantized(model: nnx.Module, qmodel: nnx.Module, tokens: ArrayLike, *,
                     steps: int = 32, learning_rate: float = 1e-3, window: int = 512,
                     batch_size: int = 1,
                     forward: Callable[[nnx.Module, jax.Array], jax.Array] | None = None,
                     loss: Callable[[jax.Array, jax.Array], jax.Array] = kl_divergence,
                     progress: bool = False) -> list[float]:
  """Fits the float 1-D parameters of ``qmodel`` (norm gains, biases) to the float model.

  Adam (optax) on ``loss(model outputs, qmodel outputs)`` (default: KL of the
  next-token distributions) over windows of calibration text, cycling through
  them for ``steps`` steps. The coded weights are not touched, so every
  certified bound stays what the bytes say. The optimisation runs on a copy
  whose ``QuantizedLinear`` weights are decoded once to float32 (the same
  function up to float rounding, proofs T6): it compiles and steps like the
  float model, where the coded layers' per-call decoding made SmolLM2's
  training step take 150 s to compile.

  Args:
    model: the float reference (not modified).
    qmodel: the quantized model (same structure outside its quantized layers);
      its 1-D float parameters are updated in place.
    tokens, window, batch_size, forward: as :func:`calibrate`.
    steps, learning_rate: optimisation budget.
    loss: ``(reference outputs, outputs) -> scalar``.
    progress: tqdm bar over the steps (stderr).

  Returns:
    The loss of each step (before its update).
  """
  import optax  # pylint: disable=g-import-not-at-top
  ids = _windows(tokens, window)
  fwd = forward or (lambda m, t: m(t))
  fdef, fstate = nnx.split(model)
  qdef, tuned, rest = nnx.split(_decoded_copy(qmodel), nnx.All(nnx.Param, _is_tunable), ...)
  opt = optax.adam(learning_rate)
  opt_state = opt.init(tuned)

  @jax.jit
  def step(tuned, opt_state, toks, fstate, rest):  # states as arguments, not baked constants
    ref = jax.lax.stop_gradient(fwd(nnx.merge(fdef, fstate), toks))
    value, grads = jax.value_and_grad(
        lambda p: loss(ref, fwd(nnx.merge(qdef, p, rest), toks)))(tuned)
    updates, opt_state = opt.update(grads, opt_state, tuned)
    return optax.apply_updates(tuned, updates), opt_state, value

  history = []
  starts = range(0, len(ids), batch_size)
  for i in tqdm.tqdm(range(steps), desc="tune", unit="step", disable=not progress, leave=False):
    b = starts[i % len(starts)]
    tuned, opt_state, value = step(tuned, opt_state, jnp.asarray(ids[b:b + batch_size]),
                                    fstate, rest)
    history.append(float(value))
  nnx.update(qmodel, tuned)
  return history
