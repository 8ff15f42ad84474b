"""Speed benchmark: quantize / dequantize weights per second for every format.

One float32 N(0,1) tensor of 16M weights (4096 x 4096), the jitted public API
(``quantize(w, fmt).data`` and ``dequantize(qt)``), one warm-up call (compile),
then the median of several timed runs, each ending in ``block_until_ready``.
A plain numpy baseline runs on the same tensor in the same process: absmax
3-bit round-to-nearest per 256-block (d = absmax/4, codes clip(round(x/d), -4, 3)
as int8; dequantize = codes * d). Ratios to it are what compare across machines.

  python benchmarks/speed.py                       # every format, 16M weights
  python benchmarks/speed.py --formats itq3_t --rows 1024 --repeats 3
  python benchmarks/speed.py --json

Timing is wall-clock on a possibly shared machine: read the ratios, and rerun on
an idle machine before quoting absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import anchors  # noqa: E402  (benchmarks/anchors.py)
import itq3s_jax  # noqa: E402


def _time(fn, repeats: int, budget_s: float) -> tuple[float, int]:
  """Median seconds of ``fn()`` after one warm-up call; fewer runs if it is slow."""
  t0 = time.perf_counter()
  fn()  # warm-up: compilation and first-touch allocation
  first = time.perf_counter() - t0
  n = max(1, min(repeats, int(budget_s / max(first, 1e-9))))
  times = []
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), n


def numpy_baseline(w: np.ndarray, repeats: int, budget_s: float) -> dict[str, float]:
  """Absmax 3-bit RTN per 256-block in numpy (float32): the ratio reference."""
  blocks = w.reshape(-1, 256)

  def quant():
    d = np.max(np.abs(blocks), axis=-1, keepdims=True) / np.float32(4.0)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return np.clip(np.rint(blocks * inv), -4, 3).astype(np.int8), d.astype(np.float16)

  codes, d = quant()

  def dequant():
    return codes.astype(np.float32) * d.astype(np.float32)

  tq, _ = _time(quant, repeats, budget_s)
  td, _ = _time(dequant, repeats, budget_s)
  return {"quantize": w.size / tq, "dequantize": w.size / td}


def measure_format(fmt: str, w: jax.Array, repeats: int, budget_s: float) -> dict:
  shape = tuple(w.shape)
  quant = jax.jit(lambda v: itq3s_jax.quantize(v, fmt).data)
  dequant = jax.jit(lambda d: itq3s_jax.dequantize(itq3s_jax.QuantizedTensor(data=d, format=fmt, k=shape[-1])))
  t0 = time.perf_counter()
  data = jax.block_until_ready(quant(w))
  compile_s = time.perf_counter() - t0
  tq, nq = _time(lambda: jax.block_until_ready(quant(w)), repeats, budget_s)
  td, nd = _time(lambda: jax.block_until_ready(dequant(data)), repeats, budget_s)
  return {"format": fmt, "quantize": w.size / tq, "dequantize": w.size / td,
          "runs": [nq, nd], "first_call_s": compile_s,
          "bpw": 8.0 * data.size / w.size}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--formats", nargs="+", default=None, help="default: every registered format")
  p.add_argument("--rows", type=int, default=4096, help="rows of the 4096-wide tensor (4096 = 16M)")
  p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
  p.add_argument("--budget", type=float, default=30.0,
                 help="seconds per measurement; slow formats get fewer runs")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  formats = args.formats or list(itq3s_jax.formats())
  w_np = np.random.default_rng(0).standard_normal((args.rows, 4096)).astype(np.float32)
  w = jnp.asarray(w_np)
  base = numpy_baseline(w_np, args.repeats, args.budget)
  rows = [measure_format(f, w, args.repeats, args.budget) for f in formats]
  machine = (f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__} "
             f"{jax.default_backend()}, load avg {os.getloadavg()[0]:.1f}")
  targets = anchors.ITQ3_T_SPEED_TARGETS
  if args.json:
    print(json.dumps({"weights": w.size, "machine": machine, "numpy_baseline": base,
                      "formats": rows, "itq3_t_targets": targets}, indent=1))
    return 0
  print(f"speed: {w.size / 1e6:.1f}M weights ({args.rows} x 4096 float32), median of up to "
        f"{args.repeats} runs after a warm-up; {machine}")
  print(f"numpy baseline (absmax 3-bit RTN per 256-block): quantize {base['quantize']:.3g} w/s, "
        f"dequantize {base['dequantize']:.3g} w/s\n")
  print(f"{'format':14}{'bpw':>7}{'quantize w/s':>14}{'x numpy':>9}"
        f"{'dequant w/s':>14}{'x numpy':>9}{'first call s':>14}")
  for r in rows:
    print(f"{r['format']:14}{r['bpw']:7.4f}{r['quantize']:14.3g}"
          f"{r['quantize'] / base['quantize']:9.3f}{r['dequantize']:14.3g}"
          f"{r['dequantize'] / base['dequantize']:9.3f}{r['first_call_s']:14.1f}")
  ours = [r for r in rows if r["format"] == "itq3_t"]
  if ours:
    print("\nitq3_t targets (issue 2, 2-core CPU):")
    for what, limit in targets.items():
      got = ours[0][what]
      print(f"  {'met ' if got >= limit else 'MISS'}  {what}: {got:.3g} w/s (target >= {limit:.0e})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
