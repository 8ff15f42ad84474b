"""One-shot GPU check of the fused kernels: correctness first, then timings.

Run through benchmarks/gpu_check.sh on a machine with a GPU (no network needed).
1. Correctness: each kernel (compiled, bf16 and f32 activations) against a
   float64 numpy reference, with the error model of tests/pallas_kernels_test.py,
   on shapes with tail blocks and N not a multiple of the tile.
2. Timings, M in {1, 16, 256} x (N, K) in {4096^2, 8192^2, 8192x28672,
   28672x8192}, bf16 activations: bf16 jnp.dot, XLA dequantize(bf16)+dot, an
   int4 per-group (g=128, bf16 scales) Pallas kernel (the "4-bit alternative"),
   weight_ifwht and act_rotate on itq3_t, act_rotate on itq3_s (the published
   ITQ3_S bytes). Each timing runs the op ``--reps`` times inside one jitted
   fori_loop whose iterations depend on each other (x += 0 * y[0, 0]), so the
   device time per call is measured without Python dispatch; the median of
   ``--trials`` such device-synchronised loops is reported. Prints the
   memory-bound floor of each shape and a table last.
3. Measured beside predicted: each kernel timing next to the static roofline
   prediction of benchmarks/kernel_report.py for this card (H100 or H200 rows
   of ``--predicted``, the JSON that ``kernel_report.py --json`` writes), so the
   model behind the tilings can be checked (benchmarks/KERNELS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

import itq3s_jax
from itq3s_jax.pallas_kernels import act_rotate
from itq3s_jax.pallas_kernels import driver as _driver
from itq3s_jax.pallas_kernels import weight_ifwht

SHAPES_NK = ((4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192))
# 64 and 1024 bracket matmul.choose's thresholds on a GPU: where dequantize-then-dot
# weight overtakes the fused kernels' Triton dot.
ROWS = (1, 16, 64, 256, 1024)
KERNELS = {"weight_ifwht": weight_ifwht.weight_ifwht, "act_rotate": act_rotate.act_rotate}
# --smoke: the interpreter and one small shape, so the script itself can be checked on a CPU.
INTERPRET = False
# Achievable HBM bandwidth, bytes/s (about 90% of spec); unknown cards use 3.0e12.
_BANDWIDTH = {"H100": 3.0e12, "H200": 4.3e12, "A100": 1.8e12, "B200": 7.2e12}
_U32 = 2.0**-24
_INT4_GROUP = 128


def _bandwidth(kind: str) -> float:
  return next((bw for key, bw in _BANDWIDTH.items() if key in kind), 3.0e12)


# ---------------------------------------------------------------- int4 baseline
def _int4_kernel(x_ref, q_ref, s_ref, o_ref, *, groups):
  """x (bm, K) bf16; q (K/2, bn) uint8: low nibbles = first 64 rows of a group,
  high nibbles = last 64; s (K/128, bn) bf16. Value = (nibble - 8) * scale."""
  half = _INT4_GROUP // 2

  def body(g, acc):
    q = q_ref[pl.ds(g * half, half), :].astype(jnp.int32)
    s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)
    lo = (((q & 0xF) - 8).astype(jnp.float32) * s).astype(jnp.bfloat16)
    hi = (((q >> 4) - 8).astype(jnp.float32) * s).astype(jnp.bfloat16)
    x0 = x_ref[:, pl.ds(g * _INT4_GROUP, half)]
    x1 = x_ref[:, pl.ds(g * _INT4_GROUP + half, half)]
    acc += jnp.dot(x0, lo, preferred_element_type=jnp.float32)
    return acc + jnp.dot(x1, hi, preferred_element_type=jnp.float32)

  acc = jnp.zeros((x_ref.shape[0], o_ref.shape[1]), jnp.float32)
  o_ref[...] = lax.fori_loop(0, groups, body, acc)


@functools.partial(jax.jit, static_argnames=("interpret",))
def int4_matmul(x, q, s, interpret=False):
  """bf16 x (M, K) @ W^T, W (N, K) int4 per-group: q uint8 (K/2, N), s bf16 (K/128, N)."""
  m, k = x.shape
  n = q.shape[1]
  cfg = _driver.heuristic(m, n, k)
  bm, bn = cfg.block_m, cfg.block_n
  mp = -(-m // bm) * bm
  xp = jnp.pad(x, ((0, mp - m), (0, 0)))
  return pl.pallas_call(
      functools.partial(_int4_kernel, groups=k // _INT4_GROUP),
      grid=(mp // bm, n // bn),
      in_specs=[pl.BlockSpec((bm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k // 2, bn), lambda i, j: (0, j)),
                pl.BlockSpec((k // _INT4_GROUP, bn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((mp, n), jnp.float32),
      interpret=interpret,
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      name="int4_baseline",
  )(xp, q, s)[:m]


def int4_dense(q, s) -> np.ndarray:
  """float64 (N, K) of the int4 layout above (reference)."""
  q = np.asarray(q).astype(np.int64)
  kh, n = q.shape
  lo, hi = (q & 0xF) - 8, (q >> 4) - 8
  g = kh // (_INT4_GROUP // 2)
  lo = lo.reshape(g, _INT4_GROUP // 2, n)
  hi = hi.reshape(g, _INT4_GROUP // 2, n)
  w = np.concatenate([lo, hi], axis=1) * np.asarray(s, np.float64)[:, None, :]
  return w.reshape(g * _INT4_GROUP, n).T


# ---------------------------------------------------------------- correctness
def check(rng) -> bool:
  ok = True
  cases = [(1, 1000, 1088, "itq3_t"), (16, 520, 4096 + 96, "itq3_t"),
           (256, 300, 768, "itq3_t"), (3, 264, 576, "uniform3_rot"), (1, 1000, 1088, "itq3_s"),
           (16, 264, 800, "iq3_s")]
  for m, n, k, fmt in cases:
    w = rng.standard_normal((n, k)).astype(np.float32)
    qt = itq3s_jax.quantize(w, fmt, seed=1)
    w64 = np.asarray(itq3s_jax.dequantize(qt), np.float64)
    for dtype, u_h in ((jnp.float32, 0.0), (jnp.bfloat16, 2.0**-9)):
      x = jnp.asarray(rng.standard_normal((m, k)), dtype)
      x64 = np.asarray(x.astype(jnp.float32), np.float64)
      norms = np.outer(np.linalg.norm(x64, axis=-1), np.linalg.norm(w64, axis=-1))
      tol = 1.25 * ((k + 256) * _U32 + 2 * u_h + u_h * u_h) * norms
      want = x64 @ w64.T
      methods = {n: functools.partial(f, interpret=INTERPRET) for n, f in KERNELS.items()}
      # The GPU's fallbacks (XLA) and the dispatch a user gets, on the same error model.
      methods["xla_act_rotate"] = functools.partial(itq3s_jax.matmul, method="xla_act_rotate")
      methods[f"auto={itq3s_jax.choose_method(x, qt)}"] = itq3s_jax.matmul
      for name, kernel in methods.items():
        y = np.asarray(jax.jit(kernel)(x, qt))
        err = np.abs(y - want)
        good = bool(np.isfinite(y).all() and (err <= tol).all())
        ok &= good
        print(f"check {name:18s} {fmt:12s} M={m:<4d} N={n:<5d} K={k:<5d} "
              f"{jnp.dtype(dtype).name:8s} max_err/tol={float((err / tol).max()):.3g} "
              f"{'PASS' if good else 'FAIL'}", flush=True)
  # The int4 baseline too, so its timings are for a correct kernel.
  k, n = 1024, 256
  q = jnp.asarray(rng.integers(0, 256, (k // 2, n)), jnp.uint8)
  s = jnp.asarray(rng.uniform(0.5, 1.5, (k // _INT4_GROUP, n)), jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((16, k)), jnp.bfloat16)
  w64 = int4_dense(q, s)
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  tol = 1.25 * ((k + 8) * _U32 + 2.0**-9) * np.outer(
      np.linalg.norm(x64, axis=-1), np.linalg.norm(w64, axis=-1))
  y = np.asarray(int4_matmul(x, q, s, interpret=INTERPRET))
  good = bool((np.abs(y - x64 @ w64.T) <= tol).all())
  ok &= good
  print(f"check int4_baseline {'PASS' if good else 'FAIL'}", flush=True)
  return ok


# ---------------------------------------------------------------- timing
def device_time(fn, args, reps: int, trials: int) -> float:
  """Median over ``trials`` of (one jitted loop of ``reps`` dependent calls) / reps, seconds."""
  x, rest = args[0], args[1:]

  @jax.jit
  def loop(x, *rest):
    def body(_, carry):
      xi, acc = carry
      y = fn(xi, *rest)
      # Make the next call depend on this one so calls cannot overlap or be hoisted.
      return xi + (0 * y[0, 0]).astype(xi.dtype), acc + y[0, 0].astype(jnp.float32)
    return lax.fori_loop(0, reps, body, (x, jnp.float32(0)))[1]

  jax.block_until_ready(loop(x, *rest))  # compile + warm up
  times = []
  for _ in range(trials):
    t0 = time.perf_counter()
    jax.block_until_ready(loop(x, *rest))
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def random_weight(key, n: int, k: int, fmt: str) -> itq3s_jax.QuantizedTensor:
  """Timing data: random bytes (itq3_t: trit bytes < 243 are valid, any step code is finite;
  itq3_s, same 110-byte blocks: byte 1 = 0x3B keeps the fp16 d finite)."""
  q = jax.random.randint(key, (n, itq3s_jax.row_nbytes("itq3_t", k)), 0, 243,
                         jnp.int32).astype(jnp.uint8)
  if fmt == "itq3_s":
    q = q.reshape(n, -1, 110).at[:, :, 1].set(0x3B).reshape(n, -1)
  return itq3s_jax.QuantizedTensor(data=q, format=fmt, k=k, seed=0)


def bench(args, kind: str, deadline: float) -> list[tuple]:
  """Timings per (N, K) and M; rows past ``deadline`` (time.time()) are skipped, not lost."""
  bw = _bandwidth(kind)
  rows = []
  key = jax.random.key(0)
  for n, k in args.shapes:
    qt, qs = random_weight(key, n, k, "itq3_t"), random_weight(key, n, k, "itq3_s")
    q4 = jax.random.randint(key, (k // 2, n), 0, 256, jnp.int32).astype(jnp.uint8)
    s4 = jnp.ones((k // _INT4_GROUP, n), jnp.bfloat16)
    w_bf16 = jax.random.normal(key, (n, k), jnp.bfloat16)
    for m in args.rows:
      if time.time() > deadline:
        print(f"M={m:<4d} N={n:<5d} K={k:<6d} skipped: --budget spent", flush=True)
        continue
      x = jax.random.normal(key, (m, k), jnp.bfloat16)
      io = m * k * 2 + m * n * 4
      floors = {"bf16": (n * k * 2 + io) / bw, "int4": (n * k * 4.125 / 8 + io) / bw,
                "itq3_t": (qt.nbytes + io) / bw}
      ops = {
          "bf16_dot": (lambda x, w: jnp.dot(x, w.T, preferred_element_type=jnp.float32),
                       (x, w_bf16)),
          "xla_dequant_dot": (
              lambda x, q: jnp.dot(x, itq3s_jax.dequantize(q, jnp.bfloat16).T,
                                   preferred_element_type=jnp.float32), (x, qt)),
          "xla_act_rotate": (functools.partial(itq3s_jax.matmul, method="xla_act_rotate"),
                             (x, qt)),
          "int4_pallas": (functools.partial(int4_matmul, interpret=INTERPRET), (x, q4, s4)),
          "weight_ifwht": (functools.partial(weight_ifwht.weight_ifwht, interpret=INTERPRET),
                           (x, qt)),
          "act_rotate": (functools.partial(act_rotate.act_rotate, interpret=INTERPRET), (x, qt)),
          "act_rotate_itq3_s": (functools.partial(act_rotate.act_rotate, interpret=INTERPRET),
                                (x, qs)),
      }
      res = {}
      for name, (fn, fargs) in ops.items():
        if args.only and name not in args.only:
          continue
        try:
          res[name] = device_time(fn, fargs, args.reps, args.trials)
        except Exception as e:  # keep going: one failing method must not hide the rest
          print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
          res[name] = float("nan")
      print(f"M={m:<4d} N={n:<5d} K={k:<6d} floors (us): bf16 {floors['bf16']*1e6:.1f} "
            f"int4 {floors['int4']*1e6:.1f} itq3_t {floors['itq3_t']*1e6:.1f}  | "
            + " ".join(f"{a} {b*1e6:.1f}" for a, b in res.items()), flush=True)
      rows.append((m, n, k, floors, res))
  return rows


_MEASURED = {"weight_ifwht": ("weight_ifwht", "itq3_t"), "act_rotate": ("act_rotate", "itq3_t"),
             "act_rotate_itq3_s": ("act_rotate", "itq3_s")}


def compare(rows, kind: str, path: str) -> None:
  """Measured kernel times beside kernel_report.py's roofline predictions for this card."""
  if not os.path.exists(path):
    print(f"\n(no predictions: {path} missing; run benchmarks/kernel_report.py --json {path})")
    return
  gpu = "H200" if "H200" in kind else "H100"
  with open(path) as f:
    pred = {(r["kernel"], r["format"], r["m"], r["n"], r["k"]): r[gpu]
            for r in json.load(f)["rows"] if r["dtype"] == "bf16"}
  print(f"\n## measured vs predicted ({gpu} rows of {path}); us\n")
  print("| kernel | format | M | N | K | measured | predicted (mem / issue) | measured / predicted |")
  print("|---|---|---|---|---|---|---|---|")
  for m, n, k, _, res in rows:
    for op, (kernel, fmt) in _MEASURED.items():
      p = pred.get((kernel, fmt, m, n, k))
      t = res.get(op, float("nan")) * 1e6
      if p is None:
        continue
      print(f"| {kernel} | {fmt} | {m} | {n} | {k} | {t:.1f} | {p['pred_us']:.1f} "
            f"({p['mem_us']:.1f} / {p['issue_us']:.1f}) | {t / p['pred_us']:.2f} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reps", type=int, default=50, help="calls per timed loop")
  p.add_argument("--trials", type=int, default=10, help="timed loops per op (median)")
  p.add_argument("--only", nargs="*", help="time only these ops")
  p.add_argument("--skip-check", action="store_true")
  p.add_argument("--budget", type=float, default=330.0,
                 help="seconds for the whole run; timing rows after it are skipped")
  p.add_argument("--smoke", action="store_true",
                 help="self-test on any backend: interpreter, one 512x512 shape, M=1, 2 reps")
  p.add_argument("--predicted", default=os.path.join(os.path.dirname(__file__), "results",
                                                     "kernel_report.json"),
                 help="kernel_report.py --json output to compare the timings with")
  args = p.parse_args(argv)
  global INTERPRET
  args.shapes, args.rows = SHAPES_NK, ROWS
  if args.smoke:
    INTERPRET, args.shapes, args.rows, args.reps, args.trials = True, ((512, 512),), (1,), 2, 1
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", str(dev))
  print(f"jax {jax.__version__}, device {kind} ({dev.platform}), python {sys.version.split()[0]}")
  if dev.platform != "gpu" and not args.smoke:
    print("no GPU: this script only makes sense on a GPU machine (--smoke checks it anywhere).")
    return 2
  t0 = time.time()
  ok = True if args.skip_check else check(np.random.default_rng(0))
  print(f"correctness: {'ALL PASS' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)", flush=True)
  rows = bench(args, kind, t0 + args.budget)
  names = ["bf16_dot", "xla_dequant_dot", "xla_act_rotate", "int4_pallas", "weight_ifwht",
           "act_rotate", "act_rotate_itq3_s"]
  print(f"\n## {kind}, jax {jax.__version__}; times in us (median of {args.trials} loops of "
        f"{args.reps}); floor = itq3_t bytes / {_bandwidth(kind)/1e12:.1f} TB/s\n")
  print("| M | N | K | floor itq3_t | " + " | ".join(names) + " | bf16/act_rotate | int4/act_rotate |")
  print("|" + "---|" * (len(names) + 6))
  for m, n, k, floors, res in rows:
    cells = " | ".join(f"{res.get(c, float('nan'))*1e6:.1f}" for c in names)
    ar = res.get("act_rotate", float("nan"))
    print(f"| {m} | {n} | {k} | {floors['itq3_t']*1e6:.1f} | {cells} | "
          f"{res.get('bf16_dot', float('nan'))/ar:.2f} | {res.get('int4_pallas', float('nan'))/ar:.2f} |")
  compare(rows, kind, args.predicted)
  print(f"\ntotal {time.time() - t0:.0f} s")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
