"""The one fused dequant-matmul kernel both ``pallas_kernels`` methods run.

y = x @ W^T with W (N, K) coded row by row in 256-blocks. The kernel computes
the transposed product: a program owns ``block_n`` weight rows and
``block_m`` activation rows and loops (``lax.fori_loop``) over its share of
the row's 256-blocks (all of them, or a 1/``split_k`` slice whose partial sums
XLA adds). Per block:

* ``act_rotate`` decodes the block as the dot terms of its format
  (:class:`kernel_codec.Terms`: whole contiguous byte fields, lookup tables,
  values in a format-chosen slot order), dots each with the matching slice of
  the activations, which XLA rotated and expanded to that slot order once,
  and multiplies the block's sum by its per-row scale;
* ``weight_ifwht`` decodes the block in natural column order, applies the
  inverse randomized Hadamard transform to the tile (``kernel_codec.hadamard``)
  and dots it with the plain activations.

Operands of the dot. ``act_rotate``: float16 always. Each activation row is
scaled by a power of two so its largest |value| is in [0.5, 1); decoded terms
are exact small integers or rounded once. For float32 activations the row is
split into two float16 planes, hi = f16(x) and lo = f16((x - hi) 2^11), dotted
together (one dot of twice the width; 22 significant bits of x), and a format
whose terms are not exact in float16 adds a dot of its residual terms
(``Terms.residual``) with hi: float32 accuracy from float16 tensor cores, with
no per-element splitting in the kernel. ``weight_ifwht``: the activation dtype
for bf16/f16, float32 otherwise (3xTF32 dot when compiled, exact float32 in
interpret mode).

Written for the Triton lowering of ``pl.pallas_call`` (jax 0.10-0.12): no
scratch, no in-register slicing or gather (bytes are fetched from the ref, at
constant offsets within the block), power-of-two tiles, 2-D dots. Rows past N
are masked loads; the output is allocated padded to whole tiles and cropped.

Interpret mode is chosen per lowering platform (``lax.platform_dependent``):
the interpreter on CPU, the Triton kernel when lowering for CUDA/ROCm (also
from a CPU host: ``jax.export``, ``.lower(lowering_platforms=("cuda",))``).

Only 256-blocks run in the kernel: the power-of-two tail blocks (K not a
multiple of 256) go through a small XLA dequantize + dot (:func:`tail_matmul`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from itq3s_jax._src import codec
from itq3s_jax._src.core import blocks
from itq3s_jax._src.core import kernel_codec
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.core import registry
from itq3s_jax.pallas_kernels import source
from itq3s_jax.pallas_kernels import terms as terms_lib
from itq3s_jax.pallas_kernels import tiling

QK = blocks.QK
Config = tiling.Config
heuristic = tiling.heuristic
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_LO = 2.0**-11  # weight of the low float16 plane of float32 activations
_GPU = ("gpu", "cuda", "rocm")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Which part of a row the kernel covers.

  Attributes:
    k_cols: leading columns of x covered by the kernel's 256-blocks.
    n_blocks: number of 256-blocks (the last one zero-padded under pad256).
    nbytes: bytes of one 256-block.
    byte_stop: bytes of a row the kernel reads; the rest belongs to the tail.
  """

  k_cols: int
  n_blocks: int
  nbytes: int
  byte_stop: int


def plan(format: str, k: int) -> Plan:
  fmt = registry.get_format(format)
  segs = [s for s in qtensor.segments(format, k) if s.n == QK]
  return Plan(k_cols=sum(s.valid for s in segs), n_blocks=sum(s.count for s in segs),
              nbytes=fmt.block_nbytes(QK), byte_stop=sum(s.count * s.nbytes for s in segs))


def check_backend() -> None:
  """NotImplementedError on a default backend that neither interprets nor runs Triton."""
  backend = jax.default_backend()
  if backend != "cpu" and backend not in _GPU:
    raise NotImplementedError(
        f"the Pallas kernels target GPUs (Triton); backend {backend!r} is not supported: "
        "use matmul(..., method='xla').")


def check_supported(x: jax.Array, qt: qtensor.QuantizedTensor) -> None:
  """Raises the reason (ValueError/TypeError/NotImplementedError) the kernels can't run."""
  qtensor.validate(qt)
  if len(qt.shape) != 2:
    raise ValueError(f"the fused matmul needs a 2-D weight (N, K), got shape {qt.shape}.")
  if x.shape[-1] != qt.shape[-1]:
    raise ValueError(f"x has K={x.shape[-1]} but the weight has K={qt.shape[-1]}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"x must be a float array, got dtype {x.dtype}.")
  kernel_codec.get(qt.format, QK)  # NotImplementedError for formats without a decoder
  if plan(qt.format, qt.shape[-1]).n_blocks == 0:
    raise NotImplementedError(
        f"K={qt.shape[-1]} has no 256-block for the kernel; use method='xla'.")


def _dot(a, b, exact):
  """a (p, q) . b (q, r) in float32; float32 operands: 3xTF32 compiled, exact interpreted."""
  if a.dtype != jnp.float32:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)
  precision = lax.Precision.HIGHEST if exact else lax.DotAlgorithmPreset.TF32_TF32_F32_X3
  return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.float32)


def _kernel(xt_ref, data_ref, sig_ref, *refs, dec, names, lut_names, n_rows, p, cfg,
            rotate, transform, split, exact):
  tables = {k: r[...] for k, r in zip(names, refs)}
  lut_refs = dict(zip(lut_names, refs[len(names):]))
  o_ref = refs[-1]
  bn, s_blocks = cfg.block_n, -(-p.n_blocks // cfg.split_k)
  r0 = pl.program_id(1) * bn
  lo = pl.program_id(2) * s_blocks
  hi = jnp.minimum(lo + s_blocks, p.n_blocks)
  width = dec.terms * dec.slots if rotate else QK

  def body(b, acc):
    src = source.RefSource(data_ref, r0, bn, n_rows, b * p.nbytes, tables, lut_refs)
    if rotate:  # decoded terms . the matching slices of the expanded activations
      blk = None
      for t in range(dec.terms):
        rows = pl.ds(b * width + t * dec.slots, dec.slots)
        v = dec.decode(src, np.array([t]), jnp.dtype(jnp.float16)).reshape(bn, dec.slots)
        d = _dot(v, xt_ref[rows, :], exact)
        if split:  # columns: [hi | lo * 2^11] of the same activation rows
          d_hi, d_lo = jnp.split(d, 2, axis=1)
          d = d_hi + d_lo * _LO
          if dec.residual is not None:
            r = dec.residual(src, np.array([t])).reshape(bn, dec.slots)
            d = d + _dot(r, xt_ref[rows, pl.ds(0, cfg.block_m)], exact)
        blk = d if blk is None else blk + d
    else:  # inverse RHT of the natural-order tile: sigma * H z / 16 (sig_ref holds sigma / 16)
      if isinstance(dec, kernel_codec.Terms):
        z = dec.decode(src, np.arange(dec.terms), jnp.dtype(jnp.float32)).reshape(bn, QK)
      else:
        z = dec.decode(src)
      if transform:
        z = kernel_codec.hadamard(z) * sig_ref[...]
      blk = _dot(z.astype(xt_ref.dtype), xt_ref[pl.ds(b * QK, QK), :], exact)
    scale = dec.scale(src) if isinstance(dec, kernel_codec.Terms) else 1.0
    return acc + scale * blk

  o_ref[...] = lax.fori_loop(lo, hi, body, jnp.zeros((bn, cfg.block_m), jnp.float32))


def _drop_aliased(kernel, *refs):
  return kernel(*refs[:-2], refs[-1])


def decoder(format: str, rotate: bool):
  """What the kernel decodes: act_rotate runs terms; weight_ifwht natural order."""
  if rotate:
    return terms_lib.get(format)
  t = terms_lib.get(format)
  return t if t.natural else kernel_codec.get(format, QK)


def out_shape(m: int, n: int, cfg: Config) -> tuple[int, int, int]:
  """Shape of the kernel's padded, transposed float32 output (split_k, Np, Mp)."""
  return (cfg.split_k, -(-n // cfg.block_n) * cfg.block_n, -(-m // cfg.block_m) * cfg.block_m)


@functools.partial(jax.jit, static_argnames=("format", "n", "rotate", "split", "config",
                                             "interpret"))
def fused(xt: jax.Array, data: jax.Array, sig: jax.Array, out_init: jax.Array | None, *,
          format: str, n: int, rotate: bool, split: bool, config: Config,
          interpret: bool) -> jax.Array:
  """The kernel on the 256-block part: float32 (split_k, Np, Mp) transposed partial products.

  Args:
    xt: (width * n_blocks, Mp) activations, transposed and in the kernel's column
      order (expanded slots for ``rotate``), in the dot's operand dtype; with
      ``split``, (width * n_blocks, 2 Mp): per tile of block_m columns the hi
      plane, then the lo plane (:func:`_operand`).
    data: uint8 (n, row_nbytes) coded rows.
    sig: float32 (256,) sign vector of the weight (``codec.signs``).
    out_init: None, or a float32 buffer of :func:`out_shape` aliased to the
      output: tests fill it with NaN to catch unwritten blocks.
    format: the weight's format.
    n: weight rows N.
    rotate: ``act_rotate`` (terms) rather than ``weight_ifwht`` (transform tiles).
    split: float16 hi/lo planes of float32 activations (``rotate`` only).
    config: tiling.
    interpret: run the Pallas interpreter (CPU).
  """
  dec = decoder(format, rotate)
  k = (xt.shape[0] // (dec.terms * dec.slots)) * QK if rotate else xt.shape[0]
  p = plan(format, k)
  shape = out_shape(xt.shape[1] // (2 if split else 1), n, config)
  legacy = not isinstance(dec, kernel_codec.Terms)
  names = sorted(dec.tables) if legacy else []
  luts = dec.luts if not legacy else {k: np.asarray(v) for k, v in dec.luts.items()}
  lut_names = sorted(luts)
  consts = ([jnp.asarray(dec.tables[k])[None, :] for k in names]
            + [jnp.asarray(luts[k]) for k in lut_names])
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, s, nd=a.ndim: (0,) * nd)
  # sigma / 16 finishes the inverse transform (1/16 = 1/sqrt(256) exactly).
  args = [xt, data, (sig.astype(jnp.float32) / 16.0)[None, :], *consts]
  xcols = xt.shape[1] // shape[2] * config.block_m  # block_m, or 2 block_m: hi and lo planes
  in_specs = ([pl.BlockSpec((xt.shape[0], xcols), lambda i, j, s: (0, i))]
              + [whole(a) for a in args[1:]])
  out_spec = pl.BlockSpec((None, config.block_n, config.block_m), lambda i, j, s: (s, j, i))
  aliases = {}
  kernel = functools.partial(
      _kernel, dec=dec, names=names, lut_names=lut_names, n_rows=n, p=p, cfg=config,
      rotate=rotate, transform=registry.get_format(format).transform != "none", split=split,
      exact=interpret)
  if out_init is not None:  # the poisoned buffer is written only through the output ref
    if out_init.shape != shape:
      raise ValueError(f"out_init has shape {out_init.shape}, expected {shape}.")
    aliases = {len(args): 0}
    args.append(out_init.astype(jnp.float32))
    in_specs.append(out_spec)
    kernel = functools.partial(_drop_aliased, kernel)
  # Under shard_map(check_vma=True) the output must declare the mesh axes it varies
  # along: those of x and of the weight, read off an op that joins the two.
  joined = jax.typeof(xt[0, 0].astype(jnp.float32) + data[0, 0].astype(jnp.float32))
  return pl.pallas_call(
      kernel,
      grid=(shape[2] // config.block_m, shape[1] // config.block_n, config.split_k),
      in_specs=in_specs,
      out_specs=out_spec,
      out_shape=jax.ShapeDtypeStruct(shape, jnp.float32,
                                     manual_axis_type=getattr(joined, "mat", None)),
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=config.num_warps,
                                         num_stages=config.num_stages),
      name="itq3s_act_rotate" if rotate else "itq3s_weight_ifwht",
  )(*args)


def tail_matmul(x: jax.Array, qt: qtensor.QuantizedTensor, p: Plan) -> jax.Array | None:
  """x (M, K) @ dequantize(tail blocks)^T in float32, or None when K has no tail.

  The tail blocks' bytes form a valid row of K - k_cols columns in the same
  format (blocks.plan cuts it into the same 128/64/32 blocks).
  """
  k = qt.shape[-1]
  if p.k_cols == k:
    return None
  sub = qt.replace(data=qt.data[:, p.byte_stop:], k=k - p.k_cols)
  w = codec.dequantize(sub, jnp.float32)
  return jnp.dot(x[:, p.k_cols:].astype(jnp.float32), w.T,
                 precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def _operand(xk: jax.Array, dtype, rotate: bool, bm: int):
  """(M, Kc) float32 activations -> (operand (Mp or 2 Mp, Kc), per-row float32 scale to
  divide y by or None, split)."""
  m = xk.shape[0]
  mp = -(-m // bm) * bm
  xk = jnp.pad(xk, ((0, mp - m), (0, 0)))
  if not rotate:
    return (xk.astype(dtype) if dtype in _HALF else xk), None, False
  # A power-of-two row scale puts max |x| in [0.5, 1): nothing overflows float16, and
  # what underflows errs by <= 2^-24 max |x| (tests/pallas_kernels_test.py, error model).
  _, e = jnp.frexp(jnp.max(jnp.abs(xk), axis=-1, keepdims=True))
  scale = jnp.ldexp(jnp.ones_like(e, jnp.float32), -e)
  xs = xk * scale
  hi = xs.astype(jnp.float16)
  if dtype in _HALF:
    return hi, scale, False
  lo = ((xs - hi.astype(jnp.float32)) / _LO).astype(jnp.float16)  # exact difference, rounded
  planes = jnp.stack([hi.reshape(mp // bm, bm, -1), lo.reshape(mp // bm, bm, -1)], axis=1)
  return planes.reshape(2 * mp, -1), scale, True


def run(x, qt, *, rotate: bool, config: Config | None, interpret: bool | None,
        out_init: jax.Array | None) -> jax.Array:
  """Shared entry of both kernels: flatten x, kernel on 256-blocks, XLA tail, reshape."""
  x = jnp.asarray(x)
  check_supported(x, qt)
  n, k = qt.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  config = config or heuristic(m, n, k, rotate=rotate, half=x.dtype in _HALF,
                               format=qt.format)
  p = plan(qt.format, k)
  sig = jnp.asarray(codec.signs(qt.format, qt.seed))
  xk = x2[:, :p.k_cols].astype(jnp.float32)
  if rotate:  # coding domain of the activations, once per 256 columns, in slot order
    xk = kernel_codec.expand(codec.rotate(xk, sig, qt.format), terms_lib.get(qt.format))
  else:
    xk = jnp.pad(xk, ((0, 0), (0, p.n_blocks * QK - p.k_cols)))
  xo, xscale, split = _operand(xk, x.dtype, rotate, config.block_m)
  call = functools.partial(fused, format=qt.format, n=n, rotate=rotate, split=split,
                           config=config)
  if interpret is None:
    check_backend()
    out = lax.platform_dependent(
        xo.T, qt.data, sig, cpu=lambda *a: call(*a, out_init, interpret=True),
        cuda=lambda *a: call(*a, out_init, interpret=False),
        rocm=lambda *a: call(*a, out_init, interpret=False))
  else:
    out = call(xo.T, qt.data, sig, out_init, interpret=interpret)
  y = jnp.sum(out, axis=0)[:n, :m].T
  if xscale is not None:
    y = y / xscale[:m]
  tail = tail_matmul(x2, qt, p)
  if tail is not None:
    y = y + tail
  return y.reshape(*lead, n)


def supports(x: jax.ShapeDtypeStruct | jax.Array, qt: qtensor.QuantizedTensor) -> bool:
  """Whether the fused kernels take this x (..., K) and weight (N, K)."""
  try:
    check_supported(x, qt)
  except (ValueError, TypeError, NotImplementedError):
    return False
  return True
