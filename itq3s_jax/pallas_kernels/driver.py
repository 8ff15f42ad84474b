"""The one fused dequant-matmul kernel body both ``pallas_kernels`` methods run.

y = x @ W^T with W (N, K) coded row by row in 256-blocks. Grid (M/bm, N/bn);
each program loops (``lax.fori_loop``) over the 256-blocks of its bn rows:
decode the (bn, 256) coding-domain tile from the native bytes
(``itq3s_jax/_src/core/kernel_codec.py``), optionally apply the inverse
randomized Hadamard transform to it (``weight_ifwht``), and accumulate
x_tile (bm, 256) . tile^T in float32.

Written for the Triton lowering of ``pl.pallas_call`` (jax 0.10-0.12): no scratch, no in-register slicing or gather (bytes are
fetched from the ref at computed offsets), power-of-two loads only, 2-D dots on
float operands. Compiled Triton kernels do not mask out-of-bounds blocks, so
nothing here relies on masking: x is zero-padded to whole row blocks, weight
row indices are clamped to N - 1 and the output is allocated padded to whole
blocks and cropped afterwards.

Only blocks of 256 run in the kernel: the power-of-two tail blocks (128/64/32,
K not a multiple of 256) go through a small XLA dequantize + dot
(:func:`tail_matmul`); ``pad256`` formats have no tail, their last block is
zero-padded like any other.
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

QK = blocks.QK
_HALF_FLOATS = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _pow2(v: int) -> bool:
  return v > 0 and not v & (v - 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Tiling of the fused kernel (all powers of two).

  Attributes:
    block_m: activation rows per program; >= 16 because Triton's tensor-core
      dot needs 16 rows (x is zero-padded up to it).
    block_n: weight rows per program.
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining stages of the K loop.
  """

  block_m: int
  block_n: int
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("block_m", "block_n", "num_warps"):
      if not _pow2(getattr(self, name)):
        raise ValueError(f"Config.{name}={getattr(self, name)} must be a power of two.")
    if self.block_m < 16 or self.block_n < 16:
      raise ValueError(f"Config needs block_m, block_n >= 16 (Triton dot), got {self}.")
    if self.num_stages < 1:
      raise ValueError(f"Config.num_stages={self.num_stages} must be >= 1.")


def heuristic(m: int, n: int, k: int) -> Config:
  """The default tiling for x (m, k) @ W (n, k)^T (the only heuristic).

  Small m is a memory-bound GEMV: 16 activation rows (the least a tensor-core
  dot takes) and narrow 32-row weight tiles so 4096-8192 rows give 128-256
  programs, about one or two waves on 132 SMs. Larger m uses 64 x 64 tiles.
  Unmeasured on a GPU: benchmarks/gpu_check.py is where these get tuned.
  """
  del k  # every program walks all of K; kept for a future split-K choice
  bm = min(64, max(16, 1 << max(m - 1, 0).bit_length()))
  bn = 32 if m <= 16 else 64
  return Config(block_m=bm, block_n=min(bn, max(16, 1 << max(n - 1, 0).bit_length())))


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


def interpret_default() -> bool:
  """Interpret mode unless the default backend is a GPU (CPU CI, tests)."""
  backend = jax.default_backend()
  if backend in ("gpu", "cuda", "rocm"):
    return False
  if backend == "cpu":
    return True
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


class _RefSource:
  """kernel_codec.Source over the coded-rows ref: rows (bn, 1), block at byte ``base``."""

  def __init__(self, data_ref, rows, base, tables, lut_refs):
    self._data, self._rows, self._base = data_ref, rows, base
    self._tables, self._luts = tables, lut_refs

  def byte(self, cols):
    shape = (self._rows.shape[0], cols.shape[1])
    idx = (jnp.broadcast_to(self._rows, shape), jnp.broadcast_to(cols + self._base, shape))
    return self._data[idx].astype(jnp.int32)

  def table(self, name):
    return self._tables[name]

  def lut(self, name, idx):
    return self._luts[name][idx]


def _kernel(x_ref, data_ref, signs_ref, *refs, codec, n_rows, p, block_n, transform,
            dot_dtype):
  names, lut_names = sorted(codec.tables), sorted(codec.luts)
  tables = {k: r[...] for k, r in zip(names, refs)}
  lut_refs = dict(zip(lut_names, refs[len(names):]))
  o_ref = refs[-1]
  rows = pl.program_id(1) * block_n + lax.broadcasted_iota(jnp.int32, (block_n, 1), 0)
  rows = jnp.minimum(rows, n_rows - 1)  # padded rows re-read the last row; cropped later
  precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None

  def body(b, acc):
    z = codec.decode(_RefSource(data_ref, rows, b * p.nbytes, tables, lut_refs))
    if transform:  # inverse RHT of each row: sigma * H z / 16 (codec.transform inverse, n = 256)
      z = kernel_codec.hadamard(z) * signs_ref[...]
    xt = x_ref[:, pl.ds(b * QK, QK)]
    return acc + lax.dot_general(xt, z.astype(dot_dtype), (((1,), (1,)), ((), ())),
                                 precision=precision, preferred_element_type=jnp.float32)

  acc = jnp.zeros((x_ref.shape[0], block_n), jnp.float32)
  o_ref[...] = lax.fori_loop(0, p.n_blocks, body, acc)


@functools.partial(jax.jit, static_argnames=("format", "transform", "config",
                                             "interpret", "n", "name"))
def fused(xk: jax.Array, data: jax.Array, sig: jax.Array, out_init: jax.Array | None, *,
          format: str, n: int, transform: bool, config: Config, interpret: bool,
          name: str) -> jax.Array:
  """The kernel on the 256-block part: xk (M, n_blocks*256) . W_blocks^T -> f32 (M, n).

  Args:
    xk: activations of the kernel columns (original or rotated domain), zero
      columns where a pad256 block is padded; bf16/f16 run a bf16/f16 dot,
      anything else a float32 dot at full precision.
    data: uint8 (n, row_nbytes) coded rows.
    sig: float32 (256,) sign vector of the weight (``codec.signs``).
    out_init: None, or a float32 (Mp, Np) buffer (M, n padded to whole blocks)
      aliased to the output: tests fill it with NaN to catch unwritten blocks.
    format: the weight's format.
    n: weight rows N.
    transform: apply the inverse block transform to decoded tiles.
    config: tiling.
    interpret: run the Pallas interpreter (CPU).
    name: the calling kernel's name (the custom call is named ``itq3s_<name>``).

  Returns:
    float32 (M, n).
  """
  dec = kernel_codec.get(format, QK)
  p = plan(format, xk.shape[-1])  # xk covers whole 256-blocks: the same blocks as the row's
  m = xk.shape[0]
  bm, bn = config.block_m, config.block_n
  mp, np_ = -(-m // bm) * bm, -(-n // bn) * bn
  dot_dtype = xk.dtype if xk.dtype in _HALF_FLOATS else jnp.dtype(jnp.float32)
  xk = jnp.pad(xk.astype(dot_dtype), ((0, mp - m), (0, 0)))
  names, lut_names = sorted(dec.tables), sorted(dec.luts)
  consts = ([jnp.asarray(dec.tables[k])[None, :] for k in names]
            + [jnp.asarray(dec.luts[k]) for k in lut_names])
  whole = lambda a: pl.BlockSpec(a.shape, lambda i, j, nd=a.ndim: (0,) * nd)
  # sigma / 16 finishes the inverse transform (1/16 = 1/sqrt(256) exactly).
  args = [xk, data, (sig.astype(jnp.float32) / 16.0)[None, :], *consts]
  in_specs = [pl.BlockSpec((bm, xk.shape[1]), lambda i, j: (i, 0))] + [whole(a) for a in args[1:]]
  aliases = {}
  if out_init is not None:
    if out_init.shape != (mp, np_):
      raise ValueError(f"out_init has shape {out_init.shape}, expected {(mp, np_)}.")
    aliases = {len(args): 0}
    args.append(out_init.astype(jnp.float32))
    in_specs.append(pl.BlockSpec((bm, bn), lambda i, j: (i, j)))
  kernel = functools.partial(
      _kernel, codec=dec, n_rows=n, p=p, block_n=bn, transform=transform,
      dot_dtype=dot_dtype)
  if out_init is not None:  # the poisoned buffer is written only through the output ref
    kernel = functools.partial(_drop_aliased, kernel)
  # Under shard_map(check_vma=True) the output must declare the mesh axes it varies
  # along: those of x and of the weight, read off an op that joins the two.
  joined = jax.typeof(xk[0, 0].astype(jnp.float32) + data[0, 0].astype(jnp.float32))
  out_shape = jax.ShapeDtypeStruct((mp, np_), jnp.float32,
                                   manual_axis_type=getattr(joined, "mat", None))
  out = pl.pallas_call(
      kernel,
      grid=(mp // bm, np_ // bn),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=out_shape,
      input_output_aliases=aliases,
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=config.num_warps,
                                         num_stages=config.num_stages),
      name=f"itq3s_{name}",
  )(*args)
  return out[:m, :n]


def _drop_aliased(kernel, *refs):
  return kernel(*refs[:-2], refs[-1])


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


def run(x, qt, *, rotate_x: bool, config: Config | None, interpret: bool | None,
        out_init: jax.Array | None) -> jax.Array:
  """Shared entry of both kernels: flatten x, kernel on 256-blocks, XLA tail, reshape."""
  x = jnp.asarray(x)
  check_supported(x, qt)
  n, k = qt.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k)
  m = x2.shape[0]
  config = config or heuristic(m, n, k)
  interpret = interpret_default() if interpret is None else interpret
  p = plan(qt.format, k)
  xk = x2[:, :p.k_cols]
  sig = jnp.asarray(codec.signs(qt.format, qt.seed))
  if rotate_x:  # coding domain of the activations, once per 256 columns (zero-padded)
    xk = codec.rotate(xk, sig, qt.format).astype(
        x.dtype if x.dtype in _HALF_FLOATS else jnp.float32)
  else:
    xk = jnp.pad(xk, ((0, 0), (0, p.n_blocks * QK - p.k_cols)))
  y = fused(xk, qt.data, sig, out_init, format=qt.format, n=n,
            transform=not rotate_x and registry.get_format(qt.format).transform != "none",
            config=config, interpret=interpret,
            name="act_rotate" if rotate_x else "weight_ifwht")
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
