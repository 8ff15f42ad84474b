"""Peak memory and throughput of ``itq3s convert`` on a generated multi-GB checkpoint.

Generates a LLaMA-shaped float safetensors checkpoint of about ``--gb`` GB in
``--dir`` (default /tmp; streamed, never committed), converts it with the CLI
in a child process, and prints the child's peak RSS (``wait4`` rusage), the
largest tensor, the claim ``peak <= 2 x largest + constant`` (the constant
measured by converting one chunk-sized tensor per quantized K the same way, so
the same jit compilations happen) and weights/s.

  python benchmarks/convert_rss.py --gb 2 [--format itq3_t] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from itq3s_jax import checkpoint
from itq3s_jax.checkpoint import converter
from itq3s_jax.checkpoint import safetensors_file


def layout(gb: float, hidden: int, inter: int, vocab: int, dtype) -> dict:
  item = np.dtype(dtype).itemsize
  per_layer = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
               "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
               "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
               "mlp.down_proj": (hidden, inter)}
  layer_bytes = sum(a * b for a, b in per_layer.values()) * item
  n_layers = max(1, round((gb * 1e9 - 2 * vocab * hidden * item) / layer_bytes))
  specs = {"model.embed_tokens.weight": ((vocab, hidden), dtype)}
  for i in range(n_layers):
    specs[f"model.layers.{i}.input_layernorm.weight"] = ((hidden,), dtype)
    for name, shape in per_layer.items():
      specs[f"model.layers.{i}.{name}.weight"] = (shape, dtype)
  specs["model.norm.weight"] = ((hidden,), dtype)
  specs["lm_head.weight"] = ((vocab, hidden), dtype)
  return specs


def generate(path: str, specs: dict) -> None:
  rng = np.random.default_rng(0)

  def produce(name):
    shape, dtype = specs[name]
    if len(shape) == 1:
      return np.ones(shape, dtype)
    return (rng.standard_normal(shape, np.float32) * 0.02).astype(dtype)

  safetensors_file.write(path, specs, produce)


def convert(src: str, dst: str, fmt: str) -> tuple[float, float, str]:
  """Runs ``itq3s convert`` in a child; returns (peak RSS bytes, wall seconds, stdout)."""
  shutil.rmtree(dst, ignore_errors=True)
  cmd = [sys.executable, "-m", "itq3s_jax.cli", "convert", src, dst, "--format", fmt]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  out = proc.stdout.read()
  _, status, usage = os.wait4(proc.pid, 0)
  wall = time.perf_counter() - t0
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"convert failed ({status}): {out[-2000:]}")
  return usage.ru_maxrss * 1024.0, wall, out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gb", type=float, default=2.0, help="checkpoint size to generate (GB)")
  p.add_argument("--dir", default="/tmp", help="where to generate (never the repo)")
  p.add_argument("--format", default="itq3_t")
  p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
  p.add_argument("--hidden", type=int, default=2048)
  p.add_argument("--inter", type=int, default=5632)
  p.add_argument("--vocab", type=int, default=8192)
  p.add_argument("--keep", action="store_true", help="keep the generated files")
  args = p.parse_args()
  dtype = np.dtype(args.dtype) if args.dtype != "bfloat16" else safetensors_file.DTYPES["BF16"]
  work = os.path.join(args.dir, "itq3s_convert_rss")
  os.makedirs(work, exist_ok=True)
  src, tiny = os.path.join(work, "model.safetensors"), os.path.join(work, "tiny.safetensors")
  specs = layout(args.gb, args.hidden, args.inter, args.vocab, dtype)
  t0 = time.perf_counter()
  generate(src, specs)
  print(f"generated {os.path.getsize(src) / 1e9:.2f} GB, {len(specs)} tensors in "
        f"{time.perf_counter() - t0:.0f} s: {src}")
  # The constant: the same command on one chunk-sized tensor per K that gets quantized
  # (imports, the same jit compilations, one chunk's temporaries, orbax threads), minus
  # the largest of those tensors.
  policy = checkpoint.Policy(format=args.format)
  ks = sorted({s[-1] for name, (s, d) in specs.items()
               if checkpoint.decide(policy, name, s, np.dtype(d)).quantize})
  tiny_specs = {f"layers.{k}.proj.weight": ((converter.CHUNK_WEIGHTS // k, k), dtype)
                for k in ks}
  generate(tiny, tiny_specs)
  base_rss, _, _ = convert(tiny, os.path.join(work, "tiny_out"), args.format)
  const = base_rss - max(np.prod(s) * dtype.itemsize for s, _ in tiny_specs.values())
  rss, wall, out = convert(src, os.path.join(work, "out"), args.format)
  largest = max(np.prod(s) * np.dtype(d).itemsize for s, d in specs.values())
  weights = sum(int(np.prod(s)) for s, _ in specs.values())
  m = re.search(r"([\d.]+) s, ([\d.]+) M weights/s", out)
  print(out.strip().splitlines()[-1])
  print(f"peak RSS {rss / 2**20:.0f} MiB; largest tensor {largest / 2**20:.0f} MiB; constant "
        f"(chunk-sized run minus its largest tensor) {const / 2**20:.0f} MiB; "
        f"2 x largest + constant = {(2 * largest + const) / 2**20:.0f} MiB -> "
        f"{'OK' if rss <= 2 * largest + const else 'EXCEEDED'}")
  print(f"{weights / 1e6:.0f} M weights in {wall:.0f} s wall (child incl. start-up): "
        f"{weights / wall / 1e6:.2f} M weights/s"
        + (f"; convert's own timer {m.group(1)} s, {m.group(2)} M weights/s" if m else ""))
  if not args.keep:
    shutil.rmtree(work)


if __name__ == "__main__":
  main()
