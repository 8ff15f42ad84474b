"""iq3_s / itq3_s encoder and decoder: speed, accuracy, candidate-search check.

  python benchmarks/iq3s_encoder.py                 # 1M weights (256 x 4096)
  python benchmarks/iq3s_encoder.py --rows 4096     # 16M weights
  python benchmarks/iq3s_encoder.py --skip-speed    # accuracy + search check only

Speed: ``quantize`` / ``dequantize`` under ``jax.jit`` on N(0,1) weights, after
one warm-up call, median of ``--repeats`` runs (wall clock, all cores). Accuracy:
rel-MSE (float64) on test tensors a (N(0,1)) and b (Student-t 3), benchmarks/anchors.py
§1.1 recipes. Search check: the fraction of 4-groups whose ``NCAND``-candidate
choice differs from an exhaustive 512-point search, and the squared-error
excess over the exhaustive optimum.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import itq3s_jax
from itq3s_jax import iq3s


def _median_time(fn, repeats: int) -> tuple[float, float]:
  """Median wall and process-CPU seconds (CPU time is less sensitive to other
  processes sharing the cores)."""
  jax.block_until_ready(fn())
  walls, cpus = [], []
  for _ in range(repeats):
    t, c = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn())
    walls.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
  return statistics.median(walls), statistics.median(cpus)


def speed(rows: int, repeats: int) -> None:
  w = jnp.asarray(np.random.default_rng(0).standard_normal((rows, 4096)).astype(np.float32))
  n = w.size
  blocks = w.reshape(-1, 256)
  codec = [("codec", jax.jit(iq3s.encode), jax.jit(lambda b: iq3s.decode(b, 256)), blocks)]
  for fmt in ("iq3_s", "itq3_s"):
    codec.append((fmt, jax.jit(functools.partial(itq3s_jax.quantize, format=fmt)),
                  jax.jit(itq3s_jax.dequantize), w))
  for name, enc, dec, x in codec:
    coded = enc(x)
    (te, ce), (td, cd) = (_median_time(lambda: enc(x), repeats),
                          _median_time(lambda: dec(coded), repeats))
    print(f"{name:7s} {n} weights: encode {n / te:.3g} w/s wall ({te * 1e3:.1f} ms, "
          f"cpu {ce * 1e3:.1f} ms), decode {n / td:.3g} w/s wall ({td * 1e3:.2f} ms, "
          f"cpu {cd * 1e3:.2f} ms)")


def accuracy() -> None:
  tensors = {
      "a N(0,1)": np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32),
      "b t(3)": np.random.default_rng(0).standard_t(3, (256, 4096)).astype(np.float32),
  }
  for name, w in tensors.items():
    for fmt in ("iq3_s", "itq3_s"):
      y = np.asarray(itq3s_jax.dequantize(itq3s_jax.quantize(w, fmt)), np.float64)
      w64 = w.astype(np.float64)
      print(f"{name:9s} {fmt:7s} rel-MSE {((y - w64) ** 2).sum() / (w64 ** 2).sum():.5f}")


def search_check(groups: int = 1 << 16) -> None:
  """Candidate search vs exhaustive 512-point search at the same scales."""
  rng = np.random.default_rng(0)
  x = np.abs(rng.standard_normal((groups, 4))).astype(np.float32)
  scale = np.float32(1 / 5.0)  # a typical N(0,1) sub-block scale (max ~ 13-15 S)
  n = groups // 64
  xa = [jnp.asarray(x[:, j].reshape(8, 8, n)) for j in range(4)]
  ones = [jnp.ones((8, 8, n), jnp.float32)] * 4
  code, _ = jax.jit(iq3s.assign)(xa, ones, jnp.full((8, n), scale))
  g = iq3s.grid()
  ours = g[iq3s.index_of_code()[np.asarray(code).reshape(-1)]]
  ours = ours.reshape(8, 8, n, 4).transpose(0, 1, 2, 3).reshape(-1, 4)
  xs = np.stack([x[:, j].reshape(8, 8, n) for j in range(4)], -1).reshape(-1, 4)
  err_all = ((xs[:, None, :] - scale * g[None]) ** 2).sum(-1)
  best = err_all.min(-1)
  mine = ((xs - scale * ours) ** 2).sum(-1)
  differ = np.mean(mine > best * (1 + 1e-6) + 1e-12)
  print(f"candidate search (NCAND={iq3s.NCAND}) vs exhaustive on {groups} groups: "
        f"{differ:.4%} differ, error excess {mine.sum() / best.sum() - 1:.2e}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=256, help="rows of 4096 weights (default 256)")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--skip-speed", action="store_true")
  args = p.parse_args(argv)
  search_check()
  accuracy()
  if not args.skip_speed:
    speed(args.rows, args.repeats)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
