"""Where a quantized decode step's time goes: one SmolLM2 decoder layer's products at M = 1.

For the seven projections of a SmolLM2-135M layer (q, k, v, o: K = 576; gate, up:
1536 x 576; down: 576 x 1536), with random weights quantized to ``--format``:
the jitted layer (all seven products in one program) quantized vs float32
``x @ w.T``, also with the codes prepared in decode tiles once (what
``models.generate.Generator`` does: ``matmul.xla.decode_tiles``), then per
product the quantized ``itq3s_jax.matmul`` (default method), the same with
prepared tiles, its activation rotation alone, and the float product. Times are
the fastest of ``--rounds`` batches (ms per call), all in one process.

  python benchmarks/layer_profile.py --format itq3_t
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import itq3s_jax
from itq3s_jax._src.matmul import xla

SHAPES = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
          "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}


def best_ms(fn, *args, calls: int = 40, rounds: int = 5) -> float:
  """Fastest mean time of ``calls`` back-to-back calls, over ``rounds`` batches (ms)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t0) / calls)
  return best * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--format", default="itq3_t", choices=itq3s_jax.formats())
  p.add_argument("--rounds", type=int, default=5)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  ws = {n: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.02)
        for n, s in SHAPES.items()}
  qs = {n: itq3s_jax.quantize(w, args.format) for n, w in ws.items()}
  xs = {k: jnp.asarray(rng.standard_normal((1, k)).astype(np.float32)) for k in (576, 1536)}
  float_layer = jax.jit(lambda ws, xs: [xs[w.shape[1]] @ w.T for w in ws.values()])
  quant_layer = jax.jit(lambda qs, xs: [itq3s_jax.matmul(xs[q.shape[1]], q)
                                        for q in qs.values()])
  tiles = {n: xla.decode_tiles(q, 1) for n, q in qs.items()}
  prepared = jax.jit(lambda qs, ts, xs: [xla.act_rotate_dot(xs[q.shape[1]], q, ts[n])
                                         for n, q in qs.items()])
  f, q = best_ms(float_layer, ws, xs, rounds=args.rounds), best_ms(quant_layer, qs, xs,
                                                                  rounds=args.rounds)
  pq = best_ms(prepared, qs, tiles, xs, rounds=args.rounds)
  print(f"{args.format}: one layer's 7 products at M = 1: float32 {f:.3f} ms, quantized "
        f"{q:.3f} ms ({q / f:.1f}x), prepared tiles {pq:.3f} ms ({pq / f:.1f}x)")
  print(f"{'product':8} {'N x K':>10} {'float':>8} {'matmul':>8} {'prepared':>8} "
        f"{'rotate':>8}  (ms)")
  for name, w in ws.items():
    x = xs[w.shape[1]]
    mm = best_ms(jax.jit(lambda q, x: itq3s_jax.matmul(x, q)), qs[name], x, rounds=args.rounds)
    pm = best_ms(jax.jit(xla.act_rotate_dot), x, qs[name], tiles[name], rounds=args.rounds)
    rot = best_ms(lambda x: itq3s_jax.rotate_activations(x, args.format), x,
                  rounds=args.rounds)
    fl = best_ms(jax.jit(lambda w, x: x @ w.T), w, x, rounds=args.rounds)
    print(f"{name:8} {w.shape[0]:>4} x {w.shape[1]:<4} {fl:8.3f} {mm:8.3f} {pm:8.3f} "
          f"{rot:8.3f}")


if __name__ == "__main__":
  main()
