"""Speed benchmark, as ratios measured in one process: matmul vs float, codec throughput.

Matmul: ``jax.jit(itq3s_jax.matmul)`` (default method, and ``--methods``) on an
N x K quantized weight against the float products a user would otherwise run,
same shapes, jitted, for M in ``--ms`` activation rows:
  * ``f32 x@w.T``: ``jnp.dot(x, w.T)`` with w float32 (N, K), the issue's baseline;
  * ``f32 x@W``: w stored (K, N), as ``nnx.Linear`` holds a kernel (XLA:CPU runs
    ``x @ w.T`` at M = 1 as a transposing copy of w plus a dot, measured 20-40x
    slower than this layout, so both are reported);
  * ``bf16 x@w.T``: both operands bfloat16.
Codec: quantize / dequantize weights per second for every format, the coding-
domain decode as the matmul runs it (column-major, weight tiles, each tile
reduced so no tensor-sized buffer is written) and as ``decode_rotated`` returns
it (row-major), and a numpy baseline on the same tensor: absmax 3-bit
round-to-nearest per 256-block (d = absmax/4, codes clip(round(x/d), -4, 3) as
int8; dequantize = codes * d).

Timing: every candidate is compiled and run once, then the candidates of one
table are timed in interleaved rounds and each keeps its fastest run (the
machine may be shared: a slower run is another process's time, not ours).

  python benchmarks/speed.py                      # 4096 x 4096, M = 1 8 32 256
  python benchmarks/speed.py --formats itq3_t itq3_s --ms 1 32 --rounds 5
  python benchmarks/speed.py --skip-codec --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import itq3s_jax
from itq3s_jax import tiles

# Targets of issue 19 (2-core CPU): slowdown limits, throughputs in weights/s.
MATMUL_TARGETS = {1: 1.5, 32: 4.0}  # default method vs f32 x@w.T, itq3_t and itq3_s
THROUGHPUT_TARGETS = {("itq3_t", "quantize"): 5e7, ("itq3_t", "dequantize"): 2e8,
                      ("iq3_s", "quantize"): 3e7, ("itq3_s", "quantize"): 3e7,
                      ("itq3_t", "decode"): 8e8}


def interleaved(fns: dict, rounds: int) -> dict[str, float]:
  """Fastest wall seconds of each zero-argument ``fns[name]()`` after a warm-up call."""
  for f in fns.values():
    jax.block_until_ready(f())
  best = {k: float("inf") for k in fns}
  for _ in range(rounds):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      best[k] = min(best[k], time.perf_counter() - t0)
  return best


def matmul_table(w: np.ndarray, formats, methods, ms, rounds: int) -> list[dict]:
  k = w.shape[1]
  wf = jnp.asarray(w)
  wkn, wb = jnp.asarray(np.ascontiguousarray(w.T)), wf.astype(jnp.bfloat16)
  qts = {f: itq3s_jax.quantize(wf, f) for f in formats}
  f32 = jax.jit(lambda x, w: jnp.dot(x, w.T))
  f32kn = jax.jit(lambda x, w: jnp.dot(x, w))
  bf16 = jax.jit(lambda x, w: jnp.dot(x.astype(jnp.bfloat16), w.T))
  qmm = jax.jit(itq3s_jax.matmul, static_argnames="method")
  out = []
  for m in ms:
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)), jnp.float32)
    fns = {"f32 x@w.T": lambda: f32(x, wf), "f32 x@W": lambda: f32kn(x, wkn),
           "bf16 x@w.T": lambda: bf16(x, wb)}
    for f, qt in qts.items():
      for meth in methods:
        fns[f"{f} {meth}"] = lambda qt=qt, meth=meth: qmm(x, qt, method=meth)
    t = interleaved(fns, rounds)
    out.append({"M": m, "seconds": t})
  return out


def decode_rates(w: np.ndarray, formats, rounds: int) -> dict[str, dict[str, float]]:
  """Coding-domain decode w/s: as the matmul runs it (tiled, reduced) and decode_rotated."""
  n, k = w.shape
  out = {}
  for f in formats:
    qt = itq3s_jax.quantize(jnp.asarray(w), f)
    segs = tiles.segments(f, k)
    rows = tiles.tile_rows(n, k)

    def tile_sum(bts, f=f, segs=segs):  # the matmul's decode with a trivial consumer
      return sum(jnp.sum(tiles.decode_tile(bt, seg, f), axis=(0, 1)) for seg, bt in zip(segs, bts))

    tiled = jax.jit(lambda d, f=f, rows=rows: tiles.map_tiles(
        tile_sum, tiles.column_tiles(d, f, k, rows)))
    rot = jax.jit(lambda d, f=f: itq3s_jax.decode_rotated(
        itq3s_jax.QuantizedTensor(data=d, format=f, k=k)))
    t = interleaved({"tiled": lambda: tiled(qt.data), "row": lambda: rot(qt.data)}, rounds)
    out[f] = {"decode": w.size / t["tiled"], "decode_rotated": w.size / t["row"]}
  return out


def codec_rates(w: np.ndarray, formats, rounds: int) -> dict[str, dict[str, float]]:
  wj = jnp.asarray(w)
  out = {}
  for f in formats:
    quant = jax.jit(lambda v, f=f: itq3s_jax.quantize(v, f).data)
    data = jax.block_until_ready(quant(wj))
    deq = jax.jit(lambda d, f=f: itq3s_jax.dequantize(
        itq3s_jax.QuantizedTensor(data=d, format=f, k=w.shape[-1])))
    t = interleaved({"q": lambda: quant(wj), "d": lambda: deq(data)}, rounds)
    out[f] = {"quantize": w.size / t["q"], "dequantize": w.size / t["d"],
              "bpw": 8.0 * data.size / w.size}
  return out


def numpy_baseline(w: np.ndarray, rounds: int) -> dict[str, float]:
  """Absmax 3-bit RTN per 256-block in numpy (float32): the ratio reference."""
  blocks = w.reshape(-1, 256)

  def quant():
    d = np.max(np.abs(blocks), axis=-1, keepdims=True) / np.float32(4.0)
    inv = np.where(d > 0, np.float32(1.0) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return np.clip(np.rint(blocks * inv), -4, 3).astype(np.int8), d.astype(np.float16)

  codes, d = quant()
  t = interleaved({"q": quant, "d": lambda: codes.astype(np.float32) * d.astype(np.float32)},
                  rounds)
  return {"quantize": w.size / t["q"], "dequantize": w.size / t["d"]}


def _print_matmul(table, formats, methods):
  base = ["f32 x@w.T", "f32 x@W", "bf16 x@w.T"]
  quant = [f"{f} {m}" for f in formats for m in methods]
  print(f"{'M':>4}" + "".join(f"{c:>14}" for c in base) + "".join(f"{c:>22}" for c in quant))
  for row in table:
    t = row["seconds"]
    ref = t["f32 x@w.T"]
    cells = [f"{1e3 * t[c]:11.2f} ms" for c in base]
    cells += [f"{1e3 * t[c]:8.2f} ms {t[c] / ref:5.2f}x{t[c] / t['f32 x@W']:5.1f}x" for c in quant]
    print(f"{row['M']:>4}" + "".join(f"{c:>14}" for c in cells[:3])
          + "".join(f"{c:>22}" for c in cells[3:]))
  print("  (quantized cells: time, x f32 x@w.T, x f32 x@W)")


def _verdicts(table, rates, decode, formats) -> list[str]:
  lines = []
  for row in table:
    limit = MATMUL_TARGETS.get(row["M"])
    if limit is None:
      continue
    for f in ("itq3_t", "itq3_s"):
      key = f"{f} default"
      if f in formats and key in row["seconds"]:
        r = row["seconds"][key] / row["seconds"]["f32 x@w.T"]
        lines.append(f"{'met ' if r <= limit else 'MISS'}  matmul {f} M={row['M']}: "
                     f"{r:.2f}x f32 x@w.T (target <= {limit}x)")
  for (f, what), limit in THROUGHPUT_TARGETS.items():
    got = (decode if what == "decode" else rates).get(f, {}).get(what)
    if got is not None:
      lines.append(f"{'met ' if got >= limit else 'MISS'}  {f} {what}: {got:.3g} w/s "
                   f"(target >= {limit:.0e})")
  return lines


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--formats", nargs="+", default=None, help="default: every registered format")
  p.add_argument("--matmul-formats", nargs="+", default=["itq3_t", "itq3_s"])
  p.add_argument("--methods", nargs="+", default=["default"],
                 help="matmul methods ('default' = what method='auto' picks here)")
  p.add_argument("--ms", nargs="+", type=int, default=[1, 8, 32, 256])
  p.add_argument("--n", type=int, default=4096)
  p.add_argument("--k", type=int, default=4096)
  p.add_argument("--rounds", type=int, default=5, help="timed rounds (fastest kept)")
  p.add_argument("--skip-codec", action="store_true", help="matmul table only")
  p.add_argument("--json", action="store_true")
  args = p.parse_args(argv)
  formats = args.formats or list(itq3s_jax.formats())
  methods = ["auto" if m == "default" else m for m in args.methods]
  w = np.random.default_rng(0).standard_normal((args.n, args.k)).astype(np.float32)
  load0 = os.getloadavg()[0]
  table = matmul_table(w, args.matmul_formats, methods, args.ms, args.rounds)
  for row in table:  # name the default method's column by what it is
    row["seconds"] = {k.replace(" auto", " default"): v for k, v in row["seconds"].items()}
  methods = ["default" if m == "auto" else m for m in methods]
  rates = decode = base = {}
  if not args.skip_codec:
    decode = decode_rates(w, args.matmul_formats, args.rounds)
    rates = codec_rates(w, formats, max(2, args.rounds // 2))
    base = numpy_baseline(w, args.rounds)
  machine = (f"{platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__} "
             f"{jax.default_backend()}, load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
  verdicts = _verdicts(table, rates, decode, args.matmul_formats)
  if args.json:
    print(json.dumps({"shape": [args.n, args.k], "machine": machine, "matmul": table,
                      "decode": decode, "codec": rates, "numpy_baseline": base,
                      "verdicts": verdicts}, indent=1))
    return 0
  print(f"speed: {args.n} x {args.k} weight, fastest of {args.rounds} interleaved runs; {machine}")
  print(f"default matmul method here: {_default_method()}\n")
  _print_matmul(table, args.matmul_formats, methods)
  if not args.skip_codec:
    print("\ncoding-domain decode (w/s): as the matmul runs it (tiled) / decode_rotated")
    for f, r in decode.items():
      print(f"  {f:14}{r['decode']:12.3g}{r['decode_rotated']:12.3g}")
    print(f"\nnumpy baseline (absmax 3-bit RTN per 256-block): quantize {base['quantize']:.3g} "
          f"w/s, dequantize {base['dequantize']:.3g} w/s")
    print(f"{'format':14}{'bpw':>7}{'quantize w/s':>14}{'x numpy':>9}{'dequant w/s':>14}{'x numpy':>9}")
    for f, r in rates.items():
      print(f"{f:14}{r['bpw']:7.4f}{r['quantize']:14.3g}{r['quantize'] / base['quantize']:9.3f}"
            f"{r['dequantize']:14.3g}{r['dequantize'] / base['dequantize']:9.3f}")
  print("\ntargets (issue 19, 2-core CPU):")
  for line in verdicts:
    print("  " + line)
  return 0


def _default_method() -> str:
  qt = itq3s_jax.quantize(jnp.ones((8, 256)), "itq3_t")
  return itq3s_jax.choose_method(jax.ShapeDtypeStruct((1, 256), jnp.float32), qt)


if __name__ == "__main__":
  sys.exit(main())
