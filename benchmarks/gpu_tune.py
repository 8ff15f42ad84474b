"""Times candidate tilings of the act_rotate kernel on a GPU, each checked for correctness.

tiling.heuristic picks tiles from a static model (kernel_report.py: SASS
instruction counts, one program per SM). benchmarks/gpu_check.py measured the
kernel 15-40x slower than that model on an H200, which a latency-bound kernel
with too few programs in flight would explain. This sweeps block_n, split_k
and num_stages per case (bf16 activations, decode-sized M), checks each
result against the XLA fallback (``matmul(method="xla_act_rotate")``) within
the two methods' error bounds added, and prints the time of every tiling
beside the heuristic's. Run it through a GPU machine:

  python benchmarks/gpu_tune.py --budget 240

``--smoke`` runs one tiny case in the interpreter, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import itq3s_jax
from itq3s_jax.pallas_kernels import act_rotate
from itq3s_jax.pallas_kernels import tiling

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import gpu_check  # noqa: E402  (the same timing loop and timing data)

CASES = ((1, 4096, 4096, "itq3_t"), (1, 8192, 28672, "itq3_t"), (1, 8192, 8192, "itq3_s"),
         (16, 8192, 8192, "itq3_t"))
_U32, _UH = 2.0**-24, 2.0**-9


def candidates(m: int) -> list[tiling.Config]:
  bm = 16 if m <= 16 else 64
  grid = itertools.product((3, 1), (16, 4, 1), (32, 64, 16))
  return [tiling.Config(block_m=bm, block_n=bn, num_warps=4, num_stages=st, split_k=sk)
          for st, sk, bn in grid]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--budget", type=float, default=240.0, help="seconds; later tilings skipped")
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--trials", type=int, default=5)
  p.add_argument("--smoke", action="store_true")
  args = p.parse_args(argv)
  cases, interpret = CASES, False
  if args.smoke:
    cases, interpret, args.reps, args.trials = ((1, 64, 512, "itq3_t"),), True, 1, 1
  t0 = time.time()
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}", flush=True)
  ok = True
  for m, n, k, fmt in cases:
    qt = gpu_check.random_weight(jax.random.key(1), n, k, fmt)
    x = jax.random.normal(jax.random.key(2), (m, k), jnp.bfloat16)
    ref = jax.jit(functools.partial(itq3s_jax.matmul, method="xla_act_rotate"))(x, qt)
    w_norm = jnp.linalg.norm(itq3s_jax.dequantize(qt), axis=-1)
    x_norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-1)
    # Kernel bound (gpu_check.check, bf16) plus the XLA method's (matmul_test.py).
    tol = 1.25 * ((2 * k + 265) * _U32 + 2 * _UH + _UH * _UH) * x_norm[:, None] * w_norm[None]
    default = tiling.heuristic(m, n, k, format=fmt)
    times = {}
    for cfg in [default] + [c for c in candidates(m) if c != default]:
      if time.time() - t0 > args.budget:
        print(f"  budget spent: {len(times)} tilings timed for this case", flush=True)
        break
      fn = functools.partial(act_rotate.act_rotate, config=cfg, interpret=interpret)
      try:
        y = jax.jit(fn)(x, qt)
        good = bool(jnp.all(jnp.abs(y - ref) <= tol))
        t = gpu_check.device_time(fn, (x, qt), args.reps, args.trials)
      except Exception as e:  # a tiling that does not compile must not stop the sweep
        print(f"  {cfg}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        continue
      ok &= good
      times[cfg] = t
      print(f"  M={m} N={n} K={k} {fmt} bn={cfg.block_n:<3d} sk={cfg.split_k:<2d} "
            f"st={cfg.num_stages} w={cfg.num_warps}: {t * 1e6:8.1f} us "
            f"{'ok' if good else 'WRONG'}{'  (heuristic)' if cfg == default else ''}",
            flush=True)
    if times:
      best = min(times, key=times.get)
      print(f"best M={m} N={n} K={k} {fmt}: {best} {times[best] * 1e6:.1f} us; heuristic "
            f"{times.get(default, float('nan')) * 1e6:.1f} us", flush=True)
  print(f"{'all tilings correct' if ok else 'SOME TILINGS WRONG'}; {time.time() - t0:.0f} s")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
