"""Generation benchmark: SmolLM2-135M greedy decoding with a KV cache, float vs each format.

For each model (float32, then every ``--formats`` format applied to all q/k/v/o
and MLP projections by ``itq3s_jax.flax.quantize_model``; embeddings, norms and
the tied head stay float): greedy decoding of a chat prompt under ``jax.jit``
(``itq3s_jax.models.generate``: one prefill program, one decode program,
every matmul of a decode step has M = 1), reporting
  * decode tokens/s: new tokens after the first, fastest of ``--rounds`` runs
    after a warm-up run (compilation), and its ratio to float32;
  * model bytes: all float parameters plus the coded bytes, and the
    projections alone;
  * peak RSS: of a fresh subprocess that loads the model as a user runs it —
    the float GGUF for float32, an ``itq3s convert`` checkpoint of that format
    (written once, round to nearest, into a temporary directory) for the
    others — and generates (``--no-rss`` skips it);
  * the greedy text (the quantized models should stay sensible).
Timing runs all models in one process, in interleaved rounds.

  python benchmarks/generate.py                       # float, itq3_t, itq3_s, iq3_s, uniform3
  python benchmarks/generate.py --formats itq3_t --tokens 24 --rounds 2 --no-rss
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

import itq3s_jax
from itq3s_jax import flax as qflax
from itq3s_jax.models import generate
from itq3s_jax.models import llama

PROMPT = "What is the capital of France? Answer in one sentence."
TARGET_ITQ3_T = 0.7  # issue 19: itq3_t decode tokens/s >= 0.7x float32


def chat(user: str) -> str:
  """SmolLM2's ChatML prompt (its GGUF chat template, with the default system line)."""
  return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n<|im_start|>user\n" + user
          + "<|im_end|>\n<|im_start|>assistant\n")


def build(fmt: str):
  """(model, tokenizer, report or None): SmolLM2 in float32, or quantized to ``fmt``."""
  model, tok, _ = llama.load_gguf()
  report = None
  if fmt != "float":
    model, report = qflax.quantize_model(model, itq3s_jax.QuantRule(format=fmt))
  return model, tok, report


def model_bytes(model, report) -> tuple[int, int]:
  """(all parameter and coded bytes, projection bytes) of a (quantized) model."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  total = sum(int(np.prod(v.shape)) * v.dtype.itemsize
              for v in jax.tree.leaves(nnx.state(model)))
  if report is not None:
    return total, report.nbytes
  proj = sum(int(np.prod(layer.kernel.shape)) * 4
             for _, layer in nnx.iter_graph(model) if isinstance(layer, nnx.Linear))
  return total, proj


def peak_rss_mb(fmt: str, n_new: int, ckpt: str | None = None) -> float:
  """Peak RSS (MiB) of a fresh process that loads ``fmt`` (from ``ckpt`` if given) and
  generates ``n_new`` tokens."""
  out = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child", fmt,
                        "--tokens", str(n_new), *(["--checkpoint", ckpt] if ckpt else [])],
                       capture_output=True, text=True, check=True)
  return float(out.stdout.strip().splitlines()[-1])


def _rss_child(fmt: str, n_new: int, ckpt: str | None) -> int:
  if ckpt:  # what a user deploys: the converted checkpoint, never the float model
    from itq3s_jax import models  # pylint: disable=g-import-not-at-top
    model, tok = models.load(ckpt)
  else:
    model, tok, _ = build(fmt)
  ids = tok.encode(chat(PROMPT)).ids
  generate.Generator(model, len(ids) + n_new).greedy(ids, n_new)
  print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--formats", nargs="+", default=["itq3_t", "itq3_s", "iq3_s", "uniform3"])
  p.add_argument("--tokens", type=int, default=32, help="new tokens per run")
  p.add_argument("--rounds", type=int, default=3, help="timed runs per model (fastest kept)")
  p.add_argument("--no-rss", action="store_true")
  p.add_argument("--json", action="store_true")
  p.add_argument("--rss-child", help=argparse.SUPPRESS)
  p.add_argument("--checkpoint", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.rss_child:
    return _rss_child(args.rss_child, args.tokens, args.checkpoint)
  names = ["float"] + [f for f in args.formats if f != "float"]
  load0 = os.getloadavg()[0]
  rows, gens, ids = {}, {}, None
  for name in names:
    t0 = time.perf_counter()
    model, tok, report = build(name)
    ids = tok.encode(chat(PROMPT)).ids
    gens[name] = generate.Generator(model, len(ids) + args.tokens)
    warm = gens[name].greedy(ids, args.tokens)  # compiles prefill and decode
    total, proj = model_bytes(model, report)
    eos = tok.token_to_id("<|im_end|>")
    answer = warm.tokens[:warm.tokens.index(eos)] if eos in warm.tokens else warm.tokens
    rows[name] = dict(bytes=total, projection_bytes=proj, text=tok.decode(answer),
                      setup_s=time.perf_counter() - t0, tokens_per_s=0.0, new_tokens=len(warm.tokens))
  for _ in range(args.rounds):  # interleaved: drift on a shared machine hits every model alike
    for name in names:
      r = gens[name].greedy(ids, args.tokens)
      rows[name]["tokens_per_s"] = max(rows[name]["tokens_per_s"], r.decode_tokens_per_s)
  if not args.no_rss:
    from itq3s_jax import checkpoint  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as tmp:
      for name in names:
        ckpt = None
        if name != "float":
          ckpt = os.path.join(tmp, name)
          checkpoint.convert(llama.smollm2_gguf_path(), ckpt, rule=itq3s_jax.QuantRule(name))
        rows[name]["peak_rss_mb"] = peak_rss_mb(name, args.tokens, ckpt)
  base = rows["float"]["tokens_per_s"]
  for r in rows.values():
    r["x_float"] = r["tokens_per_s"] / base if base else math.nan
  machine = (f"{os.cpu_count()} CPUs, jax {jax.__version__} {jax.default_backend()}, "
             f"load avg {load0:.1f} -> {os.getloadavg()[0]:.1f}")
  verdict = None
  if "itq3_t" in rows:
    got = rows["itq3_t"]["x_float"]
    verdict = (f"{'met ' if got >= TARGET_ITQ3_T else 'MISS'}  itq3_t decode tokens/s "
               f"{got:.2f}x float32 (target >= {TARGET_ITQ3_T}x)")
  if args.json:
    print(json.dumps({"machine": machine, "prompt": PROMPT, "tokens": args.tokens,
                      "models": rows, "verdict": verdict}, indent=1))
    return 0
  print(f"SmolLM2-135M-Instruct greedy decoding, {args.tokens} new tokens, KV cache, jax.jit; "
        f"fastest of {args.rounds} interleaved runs; {machine}\nprompt: {PROMPT!r}\n")
  rss = "" if args.no_rss else f"{'peak RSS MiB':>14}"
  print(f"{'model':10}{'tokens/s':>10}{'x float':>9}{'model MB':>10}{'proj. MB':>10}{rss}")
  for name, r in rows.items():
    cell = "" if args.no_rss else f"{r['peak_rss_mb']:14.0f}"
    print(f"{name:10}{r['tokens_per_s']:10.2f}{r['x_float']:9.2f}{r['bytes'] / 2**20:10.1f}"
          f"{r['projection_bytes'] / 2**20:10.1f}{cell}")
  print()
  for name, r in rows.items():
    print(f"--- {name}: {r['text']!r}")
  if verdict:
    print("\n" + verdict)
  return 0


if __name__ == "__main__":
  sys.exit(main())
