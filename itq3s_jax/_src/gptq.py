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
    stored bytes (``bounds.error_bound``; proofs/README.md T10). For itq3_t this is
    4 ||Delta||_2, twice the nearest-rounding eps_q.
  ``"unrestricted"``: any level of the code range (classical GPTQ); no
    worst-case bound. The only mode of codebook formats (IQ3_S: each 4-group
    snaps to its nearest grid point, ``Format.snap``).

The returned tensor records the mode in ``QuantizedTensor.rounding``, so
``itq3s_jax.error_bound`` certifies the right bound (or refuses). Options
come as one :class:`itq3s_jax.GptqConfig`.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import jax.numpy as jnp
from jax.typing import ArrayLike

from itq3s_jax._src import codec
from itq3s_jax._src import config
from itq3s_jax._src.core import bitpack
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry
from itq3s_jax._src.formats import itq3_t


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
  return _rotate_hessian(jnp.asarray(hessian, jnp.float32), codec.signs(format, seed), format)


def _rotate_hessian(h: jax.Array, sig: jax.Array, format: str) -> jax.Array:
  half = codec.rotate(h, sig, format)  # Sigma R^T (rows rotated)
  return codec.rotate(half.T, sig, format)  # R Sigma R^T (symmetric)


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
  """The per-coefficient rounding of lattice formats: clip(round(x / step), lo, hi).

  NaN/Inf error feedback still lands in [lo, hi] (nan_to_num before the clip), so a
  two-neighbour code never leaves its two levels whatever the arithmetic did: the
  certificate is structural, not a property of well-behaved statistics.
  """
  def snap(x, step):
    return jnp.clip(jnp.nan_to_num(jnp.round(x / step)), lo, hi).astype(jnp.int32)
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


# A two-neighbour code errs by less than its step as long as |z| < (QMAX + 1) step: the
# two levels around z / step, clipped to [-QMAX, QMAX], then still lie within one step.
# The relative margin covers the float32 rounding of the product (as itq3_t's own test).
_TWO_NEIGHBOUR_REACH = np.float32(1.0 / 5.0 * (1.0 + 2.0**-20))


def _refit_itq3t_steps(z, q, hz, sup, s, need):
  """Step codes re-fitted to fixed codes: coordinate descent on tr(dZ Sigma_z dZ^T).

  Args:
    z: float32 (M, Kp) targets; q: int32 (M, Kp) codes.
    hz: float32 (Kp, Kp) rotated second moment.
    sup: float32 (M, Kp/16) super-scale D of each sub-block's block (kept).
    s: int32 (M, Kp/16) step codes; need: float32 (M, Kp/16) least admissible step.

  Each sub-block in turn takes, among its 8 admissible steps D * MULT[s'], the one
  that lowers the loss most with the others fixed (an exact quadratic update of the
  gradient), so the loss never increases.

  Returns:
    int32 (M, Kp/16) step codes.
  """
  mult = jnp.asarray(itq3_t.MULT)
  m, kp = z.shape
  sub = itq3_t.SUB
  qf = q.astype(jnp.float32)
  step = jnp.repeat(sup * mult[s], sub, axis=-1)
  grad = (z - qf * step) @ hz  # Sigma_z r per row

  def body(b, carry):
    s, grad = carry
    v = jax.lax.dynamic_slice(qf, (0, b * sub), (m, sub))
    rows = jax.lax.dynamic_slice(hz, (b * sub, 0), (sub, kp))
    hb = jax.lax.dynamic_slice(rows, (0, b * sub), (sub, sub))
    lin = jnp.sum(v * jax.lax.dynamic_slice(grad, (0, b * sub), (m, sub)), -1)
    quad = jnp.sum((v @ hb) * v, -1)
    d, cur = sup[:, b], s[:, b]
    delta = d[:, None] * mult - (d * mult[cur])[:, None]  # (M, 8)
    cost = -2.0 * delta * lin[:, None] + delta * delta * quad[:, None]
    cost = jnp.where(d[:, None] * mult >= need[:, b, None], cost, jnp.inf)
    cost = cost.at[jnp.arange(m), cur].set(0.0)  # staying is always allowed
    best = jnp.argmin(cost, axis=-1).astype(jnp.int32)
    dd = jnp.take_along_axis(delta, best[:, None], -1)
    grad = grad - dd * (v @ rows)
    return s.at[:, b].set(best), grad

  s, _ = jax.lax.fori_loop(0, kp // sub, body, (s, grad))
  return s


@functools.partial(jax.jit, static_argnames=("format", "gptq"))
def _quantize_rows(w, h, sig, *, format, gptq: config.GptqConfig):
  """float32 (M, K), (K, K) -> (uint8 (M, row_nbytes), peak, all finite, usable).

  One program per shape. ``peak`` and ``finite`` are the checks of ``codec.encode`` on
  the same rotated z; ``usable``: the rotated hessian and its factor are finite.
  """
  fmt = registry.get_format(format)
  k = w.shape[-1]
  z = codec.rotate(w, sig, fmt.name)  # (M, Kp)
  peak = jnp.max(jnp.where(jnp.isfinite(z), jnp.abs(z), jnp.inf), initial=0.0)
  # Statistics whose largest entry is beyond 2^+-64 are brought to [0.5, 1) by a power of
  # two (exact; any positive multiple of Sigma rounds the same up to the absolute 1.0 that
  # inverse_cholesky puts on dead inputs), so the rotation (sums of 256 x 256 entries) and
  # the factorization stay far from float32 overflow and underflow. Other statistics are
  # used as given, so their codes do not change.
  top = jnp.max(jnp.abs(h), initial=0.0)
  expo = jnp.frexp(jnp.where(top > 0, top, 1.0))[1]
  h = jnp.where(jnp.abs(expo) > 64, jnp.ldexp(h, -expo), h)
  hz = _rotate_hessian(h, sig, fmt.name)
  imp = jnp.diagonal(hz) if gptq.scales == "weighted" else None
  m = z.shape[0]
  rtn, step, lo, hi = [], [], [], []
  for seg in qtensor.segments(fmt.name, k):
    off = seg.coded_start
    zb = z[:, off:off + seg.count * seg.n].reshape(m, seg.count, seg.n)
    a = None if imp is None else jnp.broadcast_to(
        imp[off:off + seg.count * seg.n].reshape(seg.count, seg.n), zb.shape)
    b = fmt.encode(zb, a)
    s, l, u = fmt.levels(b, seg.n)
    rtn.append(b)
    step.append(s.reshape(m, -1))
    lo.append(l.reshape(m, -1))
    hi.append(u.reshape(m, -1))
  step, lo0, hi0 = (jnp.concatenate(a, axis=-1) for a in (step, lo, hi))
  lo0, hi0 = lo0.astype(jnp.float32), hi0.astype(jnp.float32)
  g = fmt.group
  if gptq.act_order:  # whole groups move, largest summed diag(Sigma_z) first
    order = jnp.argsort(-jnp.sum(jnp.diagonal(hz).reshape(-1, g), axis=-1))
    perm = (order[:, None] * g + jnp.arange(g)).reshape(-1)
  else:
    perm = jnp.arange(z.shape[1])
  inv = jnp.argsort(perm)
  u = inverse_cholesky(hz[perm][:, perm], gptq.damp)
  usable = jnp.all(jnp.isfinite(hz)) & jnp.all(jnp.isfinite(u))

  def round_with(step):
    lo, hi = lo0, hi0
    if gptq.rounding == "two_neighbour":
      r = z / jnp.where(step == 0, 1.0, step)
      lo, hi = jnp.clip(jnp.floor(r), lo, hi), jnp.clip(jnp.ceil(r), lo, hi)
    lo, hi = jnp.where(step == 0, 0.0, lo), jnp.where(step == 0, 0.0, hi)
    return _round_columns(z[:, perm], step[:, perm], lo[:, perm], hi[:, perm], u,
                          block=_col_block(z.shape[1]), format=fmt.name)[:, inv]

  q = round_with(step)
  if gptq.refit:  # itq3_t (GptqConfig.resolve checks): alternate step re-fits and re-rounding
    segs = qtensor.segments(fmt.name, k)
    ns = lambda seg: seg.n // itq3_t.SUB  # noqa: E731
    sup = jnp.concatenate([jnp.repeat(jnp.asarray(itq3_t.SUPER)[b[..., 0].astype(jnp.int32)],
                                      ns(seg), axis=-1) for seg, b in zip(segs, rtn)], axis=-1)
    codes = jnp.concatenate([bitpack.unpack_bits(b[..., 1:1 + -(-3 * ns(seg) // 8)], 3, ns(seg))
                             .reshape(m, -1) for seg, b in zip(segs, rtn)], axis=-1)
    zs = z.reshape(m, -1, itq3_t.SUB)
    need = jnp.max(jnp.abs(zs), axis=-1) * _TWO_NEIGHBOUR_REACH
    for _ in range(gptq.refit):
      codes = _refit_itq3t_steps(z, q, hz, sup, codes.astype(jnp.int32), need)
      q = round_with(jnp.repeat(sup * jnp.asarray(itq3_t.MULT)[codes], itq3_t.SUB, axis=-1))
    off, new_rtn = 0, []
    for seg, b in zip(segs, rtn):
      c = codes[:, off:off + seg.count * ns(seg)].reshape(m, seg.count, ns(seg))
      off += seg.count * ns(seg)
      sb = -(-3 * ns(seg) // 8)
      new_rtn.append(jnp.concatenate([b[..., :1], bitpack.pack_bits(c, 3), b[..., 1 + sb:]], -1))
    rtn = new_rtn
  out = []
  for seg, b in zip(qtensor.segments(fmt.name, k), rtn):
    qb = q[:, seg.coded_start:seg.coded_stop].reshape(m, seg.count, seg.n)
    out.append(fmt.repack(b, qb, seg.n).reshape(m, seg.count * seg.nbytes))
  return jnp.concatenate(out, axis=-1), peak, jnp.all(jnp.isfinite(w)), usable


def quantize(w: ArrayLike, format: str, hessian: ArrayLike, *, seed: int = 0,
             gptq: config.GptqConfig = config.GptqConfig()) -> qtensor.QuantizedTensor:
  """Quantizes ``w`` along its last axis minimising the activation-weighted error.

  Args:
    w: float (..., K); all leading rows share ``hessian``.
    format: a registered format with ``levels``/``repack`` hooks.
    hessian: float (K, K), Sigma = E[x x^T] of the layer input (any positive
      multiple gives the same result).
    seed: sign-vector seed of randomized formats.
    gptq: rounding mode, scales, damping and act-order (:class:`GptqConfig`;
      measured on SmolLM2 with itq3_t: act-order +1.77 ppl instead of +2.30).

  Returns:
    A :class:`QuantizedTensor` in ``format`` whose ``rounding`` says which bound
    its bytes certify.

  Raises:
    ValueError: bad shapes or options, NaN/Inf, values beyond the format's range.
    NotImplementedError: the format has no rounding hooks.
  """
  fmt = _hooks(format)
  w = jnp.asarray(w)
  codec.check_input(w)
  h = jnp.asarray(hessian, jnp.float32)
  k = w.shape[-1]
  if h.ndim != 2 or h.shape != (k, k):
    raise ValueError(f"hessian has shape {h.shape}, expected ({k}, {k}) for a weight "
                     f"with K={k} (Sigma = E[x x^T] of the layer input).")
  if codec.is_concrete(h) and not bool(jnp.all(jnp.isfinite(h))):
    raise ValueError("hessian has NaN/Inf entries; recompute the calibration statistics.")
  gptq = gptq.resolve(fmt.name)
  sig = codec.signs(fmt.name, seed)
  data, peak, finite, usable = _quantize_rows(w.reshape(-1, k), h, sig, format=fmt.name,
                                              gptq=gptq)
  codec.raise_if_unrepresentable(fmt.name, peak, finite, w)
  if codec.is_concrete(usable) and not bool(usable):
    raise ValueError("the hessian's rotated form or its damped inverse factor is not finite "
                     "in float32 (statistics of a degenerate or overflowing layer input); "
                     "recompute the statistics or quantize this weight without them.")
  return qtensor.QuantizedTensor(data=data.reshape(*w.shape[:-1], data.shape[-1]),
                                 format=fmt.name, k=k, seed=int(seed), rounding=gptq.rounding)


def output_error(w: ArrayLike, qt: qtensor.QuantizedTensor, hessian: ArrayLike) -> jax.Array:
  """tr((W - W_hat) Sigma (W - W_hat)^T) / tr(W Sigma W^T): relative output MSE (float32 scalar)."""
  w = jnp.asarray(w, jnp.float32).reshape(-1, qt.k)
  d = w - codec.dequantize(qt).reshape(w.shape)
  h = jnp.asarray(hessian, jnp.float32)
  return jnp.sum((d @ h) * d) / jnp.sum((w @ h) * w)
