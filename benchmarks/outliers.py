"""Outlier input channels of SmolLM2-135M and whether keeping their weight columns pays.

Part 1 (statistics only): per linear-layer input, the RMS of each channel,
sqrt(diag Sigma), and how far the loudest channels stand out (max / median RMS,
share of E||x||^2 held by the top 8 channels), summarised per input type.

Part 2 (perplexity): the "keep outlier columns" variant of the format. For each
layer the k input channels of largest RMS keep their weight columns in float16
(16 k bits per output row extra); the remaining weight, with those columns
zeroed, is GPTQ-coded with the same Sigma, so y = Q(W_rest) x + W_out x.
Reported against plain GPTQ on the ``itq3s eval`` protocol, with the honest bpw.

  python benchmarks/outliers.py --stats /tmp/smollm2_stats.npz --ref-nlls /tmp/ref_nlls.npy \\
      --keep 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

import itq3s_jax
from itq3s_jax import calibration
from itq3s_jax import evaluation
from itq3s_jax.flax import state as state_lib
from itq3s_jax.models import llama

KINDS = {"attn input (q/k/v)": r"attn\.q_proj$", "o_proj input": r"o_proj$",
         "mlp input (gate/up)": r"gate_proj$", "down_proj input": r"down_proj$"}


def channel_table(stats) -> list[dict]:
  rows = []
  for kind, pat in KINDS.items():
    ratios, shares, worst = [], [], (0.0, "")
    for name, s in stats.items():
      if not re.search(pat, name):
        continue
      d = np.diagonal(np.asarray(s, np.float64))
      rms = np.sqrt(np.maximum(d, 0))
      r = float(rms.max() / np.median(rms))
      ratios.append(r)
      shares.append(float(np.sort(d)[-8:].sum() / d.sum()))
      worst = max(worst, (r, name))
    rows.append({"input": kind, "layers": len(ratios), "median_max_over_median_rms":
                 float(np.median(ratios)), "worst_max_over_median_rms": worst[0],
                 "worst_layer": worst[1], "median_top8_energy_share": float(np.median(shares))})
  return rows


def keep_columns(model, stats, fmt: str, keep: int, seed: int = 0):
  """Float model whose linear kernels are dequant(GPTQ(W with the top-k columns zeroed)) + W_top.

  Returns (model, bits per weight of the linear layers including the float16 columns).
  """
  bits = weights = 0
  for path, lin in nnx.iter_modules(model):
    if not (path and isinstance(lin, nnx.Linear)):
      continue
    name = state_lib.dotted(path)
    w = np.asarray(lin.kernel[...]).T  # (N, K)
    d = np.diagonal(np.asarray(stats[name]))
    top = np.argsort(-d)[:keep]
    rest = w.copy()
    rest[:, top] = 0
    qt = itq3s_jax.quantize(rest, fmt, seed=seed, hessian=stats[name])
    w_hat = np.array(itq3s_jax.dequantize(qt))  # writable copy
    w_hat[:, top] = w[:, top].astype(np.float16).astype(np.float32)
    lin.kernel.set_value(jnp.asarray(w_hat.T))
    bits += 8 * qt.nbytes + 16 * keep * w.shape[0] + 16 * keep  # columns + their indices
    weights += w.size
  return model, bits / weights


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--stats", required=True, help="statistics npz (itq3s calibrate)")
  p.add_argument("--ref-nlls", help=".npy of the float model's per-window NLLs (loaded if present)")
  p.add_argument("--keep", default="8", help="comma-separated k values (0 = plain GPTQ)")
  p.add_argument("--format", default="itq3_t")
  p.add_argument("--json")
  a = p.parse_args()
  stats = calibration.load(a.stats)
  table = channel_table(stats)
  for r in table:
    print(json.dumps(r), flush=True)
  model, tok, _ = llama.load_gguf()
  windows = evaluation.make_windows(
      tok.encode(evaluation.protocol_text(), add_special_tokens=False).ids, evaluation.N_TOKENS)
  if a.ref_nlls and os.path.exists(a.ref_nlls):
    ref = np.load(a.ref_nlls)
  else:
    ref = evaluation.nlls(model, windows, 4)
  rows = []
  for k in (int(x) for x in a.keep.split(",")):
    m, bpw = keep_columns(nnx.clone(model), stats, a.format, k)
    q = evaluation.nlls(m, windows, 4)
    d = evaluation.delta_ppl(ref, q)
    row = {"format": a.format, "keep": k, "bpw": bpw, "ppl": evaluation.perplexity(q),
           "delta_ppl": d.delta, "delta_se": d.se}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump({"channels": table, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
