"""Tiling of the fused kernels: :class:`Config` and the one heuristic that picks it.

The tiles come from benchmarks/kernel_report.py ``--tune``: it compiles every
candidate tiling to sm_90 cubin on a CPU host, counts the K loop's
instructions and keeps, per case, the spill-free tiling (<= 128 registers for
GEMV tiles) whose roofline prediction is lowest (benchmarks/KERNELS.md has
the table). Split-K is chosen here in closed form: the issue time of a grid
is (rounds of programs over the SMs) x (blocks per program), so the heuristic
takes the split that minimises that product. On an H200 (benchmarks/gpu_tune.py,
benchmarks/results/gpu_tune_h200.log) the GEMV tiles ran 15-40x slower than that
model predicts, for every tiling tried: latency, not issue, bounds them, so several
programs share an SM and a round holds ``resident`` programs per SM.
"""

from __future__ import annotations

import dataclasses

SMS = 132  # H100 / H200


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


def split_k(programs: int, blocks: int, sms: int = SMS, resident: int = 1) -> int:
  """The power-of-two split (<= 4, >= 4 blocks per program, the smallest of equals) of
  ``blocks`` 256-blocks over ``programs`` output tiles that minimises rounds x blocks
  per program, ceil(programs s / (sms resident)) ceil(blocks / s), with ``resident``
  programs in flight per SM. Each split writes one more float32 partial output, so it
  must pay for itself."""
  best, cost = 1, None
  s = 1
  while s <= min(4, max(1, blocks // 4)):
    c = -(-programs * s // (sms * resident)) * -(-blocks // s)
    if cost is None or c < cost:
      best, cost = s, c
    s *= 2
  return best


# (block_n, num_warps, num_stages) of act_rotate tiles where a format's best differs
# from the default (128, 8, 1) (kernel_report.py --tune, H100 model, M = 1 and 256):
# GEMV tiles (block_m 16) within 128 registers, GEMM tiles (block_m 64, 128) spill-free.
# Measured on an H200 (M = 1, 8192^2, itq3_s): 2 stages 272 us, 1 stage 167 us (95 us
# with split 4), so the model's 2 stages for the IQ3_S grid decoders are not kept.
_GEMV = {"itq3_t": (64, 4, 1), "iq3_s": (64, 4, 1), "itq3_s": (64, 4, 1)}
# Programs in flight per SM for the GEMV tile: on the H200 split 4 (4 programs per SM at
# 8192 rows) beat the one-program-per-SM model's choice (split 1 or 2) in all three
# measured M = 1 cases: 126 vs 133 us (itq3_t 4096^2), 1094 vs 1138 (itq3_t 8192 x 28672),
# 95 vs 167 (itq3_s 8192^2, 1 stage). Larger tiles are unmeasured: one per SM.
_GEMV_RESIDENT = 4
# itq3_t's act_rotate expands x into its trit-slot planes, so shared memory grows with
# block_m: (128, 64, 8 warps, 2 stages) needed 321 KB (bf16) / 904 KB (f32) and launches on
# no GPU. At M = 256, 8192^2 (kernel_report.compile_case, sm_80 / sm_90): (32, 64, 4, 1) bf16
# 148 / 144 registers, no spills, 16 / 8 KB, 3 CTAs per SM; float32 at 32 rows spills
# (120 / 360 B), at 16 rows (the GEMV tile) 16 / 0 B. Larger M runs more row tiles.
_MAX_BLOCK_M = {("itq3_t", True): 32, ("itq3_t", False): 16}


def heuristic(m: int, n: int, k: int, *, rotate: bool = True, half: bool = True,
              format: str | None = None) -> Config:
  """The default tiling for x (m, k) @ W (n, k)^T.

  Args:
    m, n, k: problem size (activation rows, weight rows, columns).
    rotate: ``act_rotate`` (else ``weight_ifwht``, whose float32 tile and
      butterfly need fewer rows per program to stay spill-free).
    half: bf16/f16 activations rather than float32 (float32 activations take
      more shared memory: smaller or fewer-stage tiles where it would not fit).
    format: the weight's format (its decoder's best GEMV tile), or None.
  """
  bm = 16 if m <= 16 else 64 if m <= 64 else 128  # 16: the least a tensor-core dot takes
  if not rotate:  # float32 tile + butterfly: the only spill-free tiles have 32 rows
    bn, warps, stages = 32, 8, 2
    if not half and bm == 128:  # 192 KB of shared memory at 2 stages: over sm_80's 163 KB
      stages = 1
  else:
    bm = min(bm, _MAX_BLOCK_M.get((format, half), bm))
    bn, warps, stages = _GEMV.get(format, (128, 8, 1)) if bm <= 32 else (128, 8, 1)
  bn = min(bn, max(16, _ceil_pow2(n)))
  programs = -(-m // bm) * -(-n // bn)
  resident = _GEMV_RESIDENT if bm == 16 else 1
  return Config(block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                split_k=split_k(programs, max(1, k // 256), resident=resident))
