"""Hessian-aware rounding (GPTQ / LDLQ) for every format with ``levels``/``repack`` hooks.

A linear layer y = W x errs by (W - W_hat) x, so with Sigma = E[x x^T] (the
input second moment, ``calibrate.py``) the expected squared output error is

  L(W_hat) = tr((W - W_hat) Sigma (W - W_hat)^T).

The coding domain is Z = W R^T (R block-diagonal: one randomized FWHT per block
of the format's plan, ``rotate_activations`` applied to each row), and
W_hat = Z_hat R, so L = tr((Z - Z_hat) Sigma_z (Z - Z_hat)^T) with
Sigma_z = R Sigma R^T. We round Z there and store it as usual: inference is
unchanged.

Scales are fixed first (the format's own encoder on Z, optionally weighted by
diag(Sigma_z)); the rounding then runs GPTQ (Frantar et al. 2022): columns in
order, each rounded and its error fed forward to the unrounded columns through
the upper Cholesky factor U of (Sigma_z + damping)^-1 (equivalently LDLQ, QuIP),
with lazy updates per block of columns.

Rounding modes:
  ``"two_neighbour"``: coefficient i takes floor or ceil of z_i / step_i (the
    two grid levels around its own value, within the format's code range), the
    error feedback only choosing between them. Each coefficient then errs by
    less than step_i, so ||w - w_hat||_2 <= sqrt(sum_i step_i^2) follows from the
    stored bytes (:func:`error_bound`; proofs/T10.md). For itq3_t this is
    4 ||Delta||_2, twice the nearest-rounding eps_q.
  ``"unrestricted"``: any level of the code range (classical GPTQ); no
    worst-case bound. The only mode of codebook formats (IQ3_S: each 4-group
    snaps to its nearest grid point, ``Format.snap``).

The returned tensor records the mode in ``QuantizedTensor.rounding``, so
``itq3s_jax.error_bound`` certifies the right bound (or refuses).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from itq3s_jax._src import blocks
from itq3s_jax._src import qtensor
from itq3s_jax._src import quantize as quantize_lib
from itq3s_jax._src import registry

ROUNDINGS = ("two_neighbour", "unrestricted")
SCALES = ("rtn", "weighted")


def _segments(fmt: registry.Format, k: int):
  """Yields (segment, offset of its first coefficient in the coding-domain row)."""
  off = 0
  for seg in blocks.plan(k, fmt.tail, fmt.block_nbytes):
    yield seg, off
    off += seg.count * seg.n


def _hooks(format: str) -> registry.Format:
  fmt = registry.get_format(format)
  if fmt.levels is None or fmt.repack is None:
    raise NotImplementedError(
        f"format {fmt.name!r} has no levels/repack hooks, so it cannot be rounded with a "
        "Hessian; quantize it without one, or use "
        f"{[f for f in registry.format_names() if registry.get_format(f).levels]}.")
  return fmt


def rotate_hessian(hessian: ArrayLike, format: str, seed: int = 0) -> jax.Array:
  """The input second moment seen in ``format``'s coding domain: R Sigma R^T.

  Args:
    hessian: float (K, K) symmetric, Sigma = E[x x^T] of the layer input.
    format: registered format name (its transform and block plan give R).
    seed: the sign-vector seed the weight is quantized with.

  Returns:
    float32 (Kp, Kp), Kp the coded row length (K plus any block padding).
  """
  h = jnp.asarray(hessian, jnp.float32)
  half = quantize_lib.rotate_activations(h, format, seed)  # Sigma R^T (rows rotated)
  return quantize_lib.rotate_activations(half.T, format, seed)  # R Sigma R^T (symmetric)


def inverse_cholesky(h: jax.Array, damp: float) -> jax.Array:
  """Upper U with U^T U = (h + damp mean(diag h) I)^-1; zero-diagonal columns made inert.

  Args:
    h: float32 (K, K) symmetric positive semi-definite.
    damp: relative damping (GPTQ's percdamp), > 0 keeps the factorization defined.

  Returns:
    float32 (K, K) upper triangular.
  """
  d = jnp.diagonal(h)
  dead = d <= 0  # never-active inputs (and block padding): their weights are free
  h = jnp.where(jnp.diag(dead), 1.0, h)
  mean = jnp.mean(jnp.where(dead, 1.0, d))
  h = h + (damp * mean) * jnp.eye(h.shape[0], dtype=h.dtype)
  # Scale to unit mean diagonal so float32 Cholesky sees O(1) entries.
  c = jnp.linalg.cholesky(h / mean)
  hinv = jax.scipy.linalg.cho_solve((c, True), jnp.eye(h.shape[0], dtype=h.dtype)) / mean
  return jnp.linalg.cholesky(hinv).T


def _col_block(kp: int) -> int:
  for b in (128, 64, 32):
    if kp % b == 0:
      return b
  raise ValueError(f"coded row length {kp} is not a multiple of 32.")


def _diag_block_inverses(u: jax.Array, g: int) -> jax.Array:
  """(Kp, Kp) upper -> (Kp/g, g, g): inverses of its g x g diagonal blocks."""
  kp = u.shape[0]
  idx = jnp.arange(kp).reshape(-1, g)
  diag = u[idx[:, :, None], idx[:, None, :]]  # (Kp/g, g, g), upper triangular
  eye = jnp.broadcast_to(jnp.eye(g, dtype=u.dtype), diag.shape)
  return jax.scipy.linalg.solve_triangular(diag, eye, lower=False)


def _snap_range(lo, hi):
  """The per-coefficient rounding of lattice formats: clip(round(x / step), lo, hi)."""
  def snap(x, step):
    return jnp.clip(jnp.round(x / step), lo, hi).astype(jnp.int32)
  return snap


@functools.partial(jax.jit, static_argnames=("block", "format"))
def _round_columns(z, step, clo, chi, u, *, block, format):
  """GPTQ over columns: float32 (M, Kp) targets -> int32 (M, Kp) codes.

  Groups of ``g = fmt.group`` columns are rounded jointly, in order: group G
  takes the format's nearest admissible point to z'_G, where z' is z with the
  errors of earlier groups fed forward through u (upper, (Kp, Kp)):
  E_G = (z'_G - z_hat_G) u_GG^-1, later columns -= E_G u_G,later (GPTQ's
  update with the block's own inverse factor; g = 1 is the classical
  per-column loop). Codes of lattice formats lie in [clo, chi]; a zero step
  (an all-zero block) codes 0.
  """
  fmt = registry.get_format(format)
  g = fmt.group
  m, kp = z.shape
  safe = jnp.where(step == 0, 1.0, step)
  dinv = _diag_block_inverses(u, g)

  def one_block(bi, carry):
    w, codes = carry
    i1 = bi * block
    cols = lambda a: jax.lax.dynamic_slice(a, (0, i1), (m, block))
    w1, s1, lo1, hi1, st1 = cols(w), cols(safe), cols(clo), cols(chi), cols(step)
    urows = jax.lax.dynamic_slice(u, (i1, 0), (block, kp))
    u1 = jax.lax.dynamic_slice(urows, (0, i1), (block, block))
    d1 = jax.lax.dynamic_slice(dinv, (i1 // g, 0, 0), (block // g, g, g))

    def one_group(i, c):
      w1, q1, e1 = c
      grp = lambda a: jax.lax.dynamic_slice(a, (0, i * g), (m, g))
      x, s = grp(w1), grp(s1)
      snap = fmt.snap or _snap_range(grp(lo1), grp(hi1))
      q = jnp.where(grp(st1) == 0, 0, snap(x, s))
      err = (x - q * s) @ d1[i]
      w1 = w1 - err @ jax.lax.dynamic_slice(u1, (i * g, 0), (g, block))  # done columns stay
      q1 = jax.lax.dynamic_update_slice(q1, q, (0, i * g))
      e1 = jax.lax.dynamic_update_slice(e1, err, (0, i * g))
      return w1, q1, e1

    _, q1, e1 = jax.lax.fori_loop(
        0, block // g, one_group,
        (w1, jnp.zeros((m, block), jnp.int32), jnp.zeros((m, block), jnp.float32)))
    # Lazy update of all later columns; earlier ones are untouched (u upper triangular).
    w = w - e1 @ urows
    return w, jax.lax.dynamic_update_slice(codes, q1, (0, i1))

  _, q = jax.lax.fori_loop(0, kp // block, one_block,
                           (z, jnp.zeros(z.shape, jnp.int32)))
  return q


def _check(w: jax.Array, h: jax.Array, fmt: registry.Format, rounding: str, scales: str,
           damp: float) -> None:
  k = w.shape[-1]
  if h.ndim != 2 or h.shape != (k, k):
    raise ValueError(f"hessian has shape {h.shape}, expected ({k}, {k}) for a weight "
                     f"with K={k} (Sigma = E[x x^T] of the layer input).")
  if rounding not in ROUNDINGS:
    raise ValueError(f"unknown {rounding=}; choose one of {ROUNDINGS}.")
  if rounding == "two_neighbour" and fmt.snap is not None:
    raise ValueError(f"rounding='two_neighbour' needs a per-coefficient grid; {fmt.name!r} "
                     "codes groups on a codebook (and has no bound): use rounding='unrestricted'.")
  if scales not in SCALES:
    raise ValueError(f"unknown {scales=}; choose one of {SCALES}.")
  if not damp > 0:
    raise ValueError(f"{damp=} must be > 0 (relative diagonal damping, e.g. 0.01).")
  if quantize_lib._is_concrete(h) and not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError("hessian has NaN/Inf entries; recompute the calibration statistics.")


def default_rounding(format: str) -> str:
  """``"two_neighbour"`` for formats with a certified bound (it keeps one), else ``"unrestricted"``."""
  return "two_neighbour" if registry.get_format(format).bound is not None else "unrestricted"


@functools.partial(jax.jit, static_argnames=("format", "seed", "rounding", "scales", "damp",
                                             "act_order"))
def _quantize_rows(w, h, *, format, seed, rounding, scales, damp, act_order):
  """float32 (M, K), (K, K) -> (uint8 (M, row_nbytes), max |z|); one compiled program per shape."""
  fmt = registry.get_format(format)
  k = w.shape[-1]
  z = quantize_lib.rotate_activations(w, fmt.name, seed)  # (M, Kp)
  hz = rotate_hessian(h, fmt.name, seed)
  imp = jnp.diagonal(hz) if scales == "weighted" else None
  m = z.shape[0]
  rtn, step, lo, hi = [], [], [], []
  for seg, off in _segments(fmt, k):
    zb = z[:, off:off + seg.count * seg.n].reshape(m, seg.count, seg.n)
    a = None if imp is None else jnp.broadcast_to(
        imp[off:off + seg.count * seg.n].reshape(seg.count, seg.n), zb.shape)
    b = fmt.encode(zb, a)
    s, l, u = fmt.levels(b, seg.n)
    rtn.append(b)
    step.append(s.reshape(m, -1))
    lo.append(l.reshape(m, -1))
    hi.append(u.reshape(m, -1))
  step, lo, hi = (jnp.concatenate(a, axis=-1) for a in (step, lo, hi))
  lo, hi = lo.astype(jnp.float32), hi.astype(jnp.float32)
  if rounding == "two_neighbour":
    r = z / jnp.where(step == 0, 1.0, step)
    lo, hi = jnp.clip(jnp.floor(r), lo, hi), jnp.clip(jnp.ceil(r), lo, hi)
  lo, hi = jnp.where(step == 0, 0.0, lo), jnp.where(step == 0, 0.0, hi)
  g = fmt.group
  if act_order:  # whole groups move, largest summed diag(Sigma_z) first
    order = jnp.argsort(-jnp.sum(jnp.diagonal(hz).reshape(-1, g), axis=-1))
    perm = (order[:, None] * g + jnp.arange(g)).reshape(-1)
  else:
    perm = jnp.arange(z.shape[1])
  inv = jnp.argsort(perm)
  u = inverse_cholesky(hz[perm][:, perm], damp)
  q = _round_columns(z[:, perm], step[:, perm], lo[:, perm], hi[:, perm], u,
                     block=_col_block(z.shape[1]), format=fmt.name)[:, inv]
  out = []
  for (seg, off), b in zip(_segments(fmt, k), rtn):
    qb = q[:, off:off + seg.count * seg.n].reshape(m, seg.count, seg.n)
    out.append(fmt.repack(b, qb, seg.n).reshape(m, seg.count * seg.nbytes))
  return jnp.concatenate(out, axis=-1), jnp.max(jnp.abs(z), initial=0.0)


def quantize(w: ArrayLike, format: str, hessian: ArrayLike, *, seed: int = 0,
             rounding: str | None = None, scales: str = "weighted",
             damp: float = 0.01, act_order: bool = True) -> qtensor.QuantizedTensor:
  """Quantizes ``w`` along its last axis minimising the activation-weighted error.

  Args:
    w: float (..., K); all leading rows share ``hessian``.
    format: a registered format with ``levels``/``repack`` hooks.
    hessian: float (K, K), Sigma = E[x x^T] of the layer input (any positive
      multiple gives the same result).
    seed: sign-vector seed of randomized formats.
    rounding: ``"two_neighbour"`` (certified, :func:`error_bound`) or
      ``"unrestricted"`` (classical GPTQ; no worst-case bound); None picks
      :func:`default_rounding` (two_neighbour where the format has a bound).
    scales: ``"rtn"`` (the format's plain encode of Z) or ``"weighted"`` (its
      encode weighted by diag(Sigma_z), for formats whose encoder weighs).
    damp: diagonal damping relative to mean(diag Sigma_z).
    act_order: round the columns of largest diag(Sigma_z) first (GPTQ act-order;
      measured on SmolLM2 with itq3_t: +1.77 ppl instead of +2.30, README).

  Returns:
    A :class:`QuantizedTensor` in ``format``, decodable by every reader of it.

  Raises:
    ValueError: bad shapes or options, NaN/Inf, values beyond the format's range.
    NotImplementedError: the format has no rounding hooks.
  """
  fmt = _hooks(format)
  w = jnp.asarray(w)
  h = jnp.asarray(hessian, jnp.float32)
  quantize_lib._check_input(w, fmt, seed)
  rounding = default_rounding(fmt.name) if rounding is None else rounding
  _check(w, h, fmt, rounding, scales, damp)
  seed = int(seed)
  lead, k = w.shape[:-1], w.shape[-1]
  data, zmax = _quantize_rows(w.reshape(-1, k).astype(jnp.float32), h, format=fmt.name,
                              seed=seed, rounding=rounding, scales=scales, damp=float(damp),
                              act_order=bool(act_order))
  if quantize_lib._is_concrete(zmax) and float(zmax) > fmt.max_abs:
    raise ValueError(f"values too large for {fmt.name}: a coefficient of magnitude "
                     f"{float(zmax):.4g} exceeds {fmt.max_abs:.4g}; rescale the tensor first.")
  data = data.reshape(*lead, data.shape[-1])
  return qtensor.QuantizedTensor(data, tuple(w.shape), fmt.name, seed, rounding)


def error_bound(qt: qtensor.QuantizedTensor, *, include_rounding: bool = True) -> jax.Array:
  """Certified per-block L2 error bound of a two-neighbour-rounded tensor, from its bytes.

  Valid for every tensor of a format with a bound whose ``rounding`` is
  ``"nearest"`` or ``"two_neighbour"`` (the nearest level is one of the two
  neighbours): ||w_b - w_hat_b||_2 <=
  sqrt(sum_{i in b} step_i^2), plus the float32 slack of
  ``itq3s_jax.rounding_slack`` when ``include_rounding`` (proofs/T10.md).

  Args:
    qt: a :class:`QuantizedTensor` from :func:`quantize` with
      ``rounding="two_neighbour"`` (or from ``itq3s_jax.quantize``).
    include_rounding: add the float32 rounding slack.

  Returns:
    float32 (..., nblocks), blocks in ``itq3s_jax.block_columns`` order.

  Raises:
    ValueError: the format certifies no bound, or the tensor was rounded
      ``"unrestricted"``.
  """
  fmt = _hooks(qt.format)
  if fmt.bound is None:
    raise ValueError(f"format {fmt.name!r} has no certified error bound.")
  qtensor.validate(qt)
  if qt.rounding == "unrestricted":
    raise ValueError("this tensor was GPTQ-rounded with rounding='unrestricted': a coefficient "
                     "may sit several levels from its value, so no bound is certified.")
  lead = qt.data.shape[:-1]
  z = quantize_lib.decode_rotated(qt)
  out = []
  for seg, off in _segments(fmt, qt.shape[-1]):
    b = qt.data[..., seg.byte_start:seg.byte_start + seg.count * seg.nbytes]
    step, _, _ = fmt.levels(b.reshape(*lead, seg.count, seg.nbytes), seg.n)
    eps = jnp.sqrt(jnp.sum(step * step, axis=-1))
    if include_rounding:
      zb = z[..., off:off + seg.count * seg.n].reshape(*lead, seg.count, seg.n)
      eps = (eps + quantize_lib.rounding_slack(seg.n) * (jnp.linalg.norm(zb, axis=-1) + eps)
             + quantize_lib.underflow_slack(seg.n))
    out.append(eps)
  return jnp.concatenate(out, axis=-1) if out else jnp.zeros((*lead, 0))


def output_error(w: ArrayLike, qt: qtensor.QuantizedTensor, hessian: ArrayLike) -> jax.Array:
  """tr((W - W_hat) Sigma (W - W_hat)^T) / tr(W Sigma W^T): relative output MSE (float32 scalar)."""
  w = jnp.asarray(w, jnp.float32).reshape(-1, qt.shape[-1])
  d = w - quantize_lib.dequantize(qt).reshape(w.shape)
  h = jnp.asarray(hessian, jnp.float32)
  return jnp.sum((d @ h) * d) / jnp.sum((w @ h) * w)


def n_coefficients(format: str, k: int) -> int:
  """Coded row length Kp of ``format`` for K = k (k plus block padding)."""
  return sum(seg.count * seg.n for seg, _ in _segments(registry.get_format(format), k))

