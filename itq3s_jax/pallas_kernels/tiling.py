"""Tiling of the fused kernels: :class:`Config` and the one heuristic that picks it.

The heuristic's table comes from benchmarks/kernel_report.py: for each
benchmark shape it compiles candidate tilings to sm_90 cubin on a CPU host,
counts the K loop's instructions and keeps the tiling whose roofline
prediction (max of memory time and instruction-issue time, benchmarks/KERNELS.md)
is lowest. Unmeasured on a GPU: benchmarks/gpu_check.py times it.
"""

from __future__ import annotations

import dataclasses

_SMS = 132  # H100/H200 SMs: the split-K rule fills one wave of them


def _pow2(v: int) -> bool:
  return v > 0 and not v & (v - 1)


def _ceil_pow2(v: int) -> int:
  return 1 << max(v - 1, 0).bit_length()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
  """Tiling of the fused kernel.

  Attributes:
    block_m: activation rows per program (a power of two >= 16: Triton's
      tensor-core dot needs 16; x is zero-padded up to it).
    block_n: weight rows per program (a power of two >= 16).
    num_warps: Triton warps per program (a power of two).
    num_stages: Triton software-pipelining stages of the K loop (>= 1).
    split_k: programs sharing one row's 256-blocks (>= 1); their partial
      sums are added by XLA.
  """

  block_m: int
  block_n: int
  num_warps: int = 4
  num_stages: int = 1
  split_k: int = 1

  def __post_init__(self):
    for name in ("block_m", "block_n", "num_warps"):
      if not _pow2(getattr(self, name)):
        raise ValueError(f"Config.{name}={getattr(self, name)} must be a power of two.")
    if self.block_m < 16 or self.block_n < 16:
      raise ValueError(f"Config needs block_m, block_n >= 16 (Triton dot), got {self}.")
    if self.num_stages < 1 or self.split_k < 1:
      raise ValueError(f"Config.num_stages and split_k must be >= 1, got {self}.")


def heuristic(m: int, n: int, k: int, *, rotate: bool = True, half: bool = True) -> Config:
  """The default tiling for x (m, k) @ W (n, k)^T.

  Args:
    m, n, k: problem size (activation rows, weight rows, columns).
    rotate: ``act_rotate`` (else ``weight_ifwht``, whose f32 tile and butterfly
      need half the rows per program to stay within 128 registers).
    half: bf16/f16 activations (float16 dot) rather than float32 (3xTF32).

  Small m: 16 activation rows (the least a tensor-core dot takes) and 64
  weight rows per program; split-K until the grid covers the SMs once, with
  at least 8 blocks per program. Larger m: 64 x 64 tiles.
  """
  bm = min(64, max(16, _ceil_pow2(m)))
  bn = 64 if rotate and half else 32
  bn = min(bn, max(16, _ceil_pow2(n)))
  programs = -(-m // bm) * -(-n // bn)
  nb = max(1, k // 256)
  split = 1
  while programs * split * 2 <= _SMS and nb // (split * 2) >= 8:
    split *= 2
  return Config(block_m=bm, block_n=bn, split_k=split)
