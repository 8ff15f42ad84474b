"""Calibration-aware quantization of SmolLM2-135M: Δppl with and without GPTQ rounding.

Protocol: ``itq3s eval``'s (pydoc topics text, tokens [0, 8192) in 16 windows of
512, no BOS, Δppl with a paired standard error over windows). Calibration uses
tokens [16384, 24576) of the same stream, disjoint from the scored ones.

For each format: round-to-nearest (the plain ``quantize_model``) and GPTQ with
each requested rounding ("two_neighbour": certified bound; "unrestricted": none),
plus the time to collect statistics and to quantize all 210 linear layers.

  python benchmarks/calibration.py --formats itq3_t,uniform3_rot --json out.json
  python benchmarks/calibration.py --stats /tmp/smollm2_stats.npz   # reuse statistics
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import numpy as np
from flax import nnx

import itq3s_jax
from itq3s_jax._src import calibrate
from itq3s_jax import evaluation
from itq3s_jax._src import gptq
from itq3s_jax.models import llama


def _nlls(model, windows, batch):
  return evaluation.nlls(model, windows, batch)


def _rtn_model(model, fmt, seed):
  from itq3s_jax import flax as qflax  # pylint: disable=g-import-not-at-top
  return qflax.quantize_model(nnx.clone(model), format=fmt, seed=seed)[0]


def _bound_check(model, qmodel, stats) -> dict:
  """Worst ratio ||w - w_hat||_b / two-neighbour bound over all blocks, and vs the RTN bound."""
  worst, worst_rtn, blocks = 0.0, 0.0, 0
  float_lin = dict((calibrate._dotted(p), m) for p, m in calibrate._linears(model))
  for path, layer in nnx.iter_modules(qmodel):
    name = calibrate._dotted(path)
    if name not in stats or not hasattr(layer, "qt"):
      continue
    qt = layer.qt
    w = np.asarray(float_lin[name].kernel[...]).T
    d = np.asarray(itq3s_jax.dequantize(qt)) - w
    cols = itq3s_jax.block_columns(qt.format, qt.shape[-1])
    err = np.stack([np.linalg.norm(d[:, a:b], axis=-1) for a, b in cols], -1)
    worst = max(worst, float((err / np.asarray(gptq.error_bound(qt))).max()))
    # eps_q, the bound of nearest rounding, which a GPTQ-coded block may exceed
    eps_q = itq3s_jax.error_bound(dataclasses.replace(qt, rounding="nearest"))
    worst_rtn = max(worst_rtn, float((err / np.asarray(eps_q)).max()))
    blocks += err.size
  return {"blocks": blocks, "max_err_over_bound": worst, "max_err_over_rtn_bound": worst_rtn}


PROXY_LAYERS = ("layers.0.attn.q_proj", "layers.11.mlp.down_proj", "layers.20.mlp.gate_proj",
                "layers.29.attn.o_proj")


def proxy_table(model, stats, fmt: str, seed: int) -> list[dict]:
  """Relative output error tr(dW S dW^T)/tr(W S W^T) on a few layers, per GPTQ option."""
  lin = dict((calibrate._dotted(p), m) for p, m in calibrate._linears(model))
  variants = [("rtn", None)] + [
      (f"gptq {r} scales={s}{' act_order' if a else ''}", dict(rounding=r, scales=s, act_order=a))
      for r in gptq.ROUNDINGS for s in ("rtn", "weighted") for a in (False, True)
      if r == "unrestricted" or itq3s_jax.has_bound(fmt)]
  out = []
  for name in PROXY_LAYERS:
    w = np.asarray(lin[name].kernel[...]).T
    h = stats[name]
    for label, opts in variants:
      t0 = time.perf_counter()
      qt = (itq3s_jax.quantize(w, fmt, seed=seed) if opts is None
            else gptq.quantize(w, fmt, h, seed=seed, **opts))
      err = float(gptq.output_error(w, qt, h))
      row = {"layer": name, "variant": label, "rel_output_err": err,
             "seconds": time.perf_counter() - t0}
      out.append(row)
      print(json.dumps(row), flush=True)
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--formats", default="itq3_t,uniform3_rot")
  p.add_argument("--roundings", default="default,unrestricted",
                 help="GPTQ roundings per format; 'default' is the format's own "
                 "(two_neighbour where it has a bound); modes a format lacks are skipped")
  p.add_argument("--scales", default="weighted")
  p.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                 help="GPTQ act-order (default: on, the library default)")
  p.add_argument("--damp", type=float, default=0.01)
  p.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest rows")
  p.add_argument("--tokens", type=int, default=evaluation.N_TOKENS)
  p.add_argument("--calib", default="16384:24576", help="calibration token range start:stop")
  p.add_argument("--stats", help="npz of statistics: loaded if present, else written")
  p.add_argument("--ref-nlls", help=".npy of the float model's per-window NLLs: loaded if present, "
                 "else written (the reference costs as much as one format)")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--bound-check", action="store_true", help="check the certified bound on every block")
  p.add_argument("--proxy-only", action="store_true",
                 help="only the per-layer output-error table (needs --stats)")
  p.add_argument("--json")
  a = p.parse_args()
  if a.proxy_only:
    model = llama.load_gguf()[0]
    stats = calibrate.load(a.stats)
    rows = [r for f in a.formats.split(",") for r in proxy_table(model, stats, f, a.seed)]
    if a.json:
      with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    return

  model, tok, _ = llama.load_gguf()
  text = evaluation.protocol_text()
  windows = evaluation.make_windows(tok.encode(text, add_special_tokens=False).ids, a.tokens)
  info = {"python": platform.python_version(), "text_sha256": evaluation.text_sha256(text),
          "windows": len(windows), "jax": jax.__version__, "calib": a.calib}
  t0 = time.perf_counter()
  if a.ref_nlls and os.path.exists(a.ref_nlls):
    ref = np.load(a.ref_nlls)
  else:
    ref = _nlls(model, windows, a.batch)
    if a.ref_nlls:
      np.save(a.ref_nlls, ref)
  info["ref_ppl"] = evaluation.perplexity(ref)
  info["ref_seconds"] = time.perf_counter() - t0
  print(f"ref ppl {info['ref_ppl']:.3f} ({info['ref_seconds']:.0f} s)", flush=True)

  if a.stats and os.path.exists(a.stats):
    t0 = time.perf_counter()
    stats = calibrate.load(a.stats)
    info["stats_loaded_seconds"] = time.perf_counter() - t0
  else:
    start, stop = (int(x) for x in a.calib.split(":"))
    t0 = time.perf_counter()
    stats = calibrate.calibrate(model, calibrate.protocol_tokens(tok, start, stop))
    info["calibrate_seconds"] = time.perf_counter() - t0
    info["stats_mb"] = calibrate.nbytes(stats) / 1e6
    print(f"calibrated in {info['calibrate_seconds']:.0f} s, {info['stats_mb']:.0f} MB", flush=True)
    if a.stats:
      calibrate.save(a.stats, stats)

  rows = []
  for fmt in a.formats.split(","):
    configs = [] if a.no_rtn else [("rtn", None)]
    wanted = [gptq.default_rounding(fmt) if r == "default" else r for r in a.roundings.split(",")]
    configs += [("gptq", r) for r in dict.fromkeys(wanted)
                if r == "unrestricted" or itq3s_jax.has_bound(fmt)]
    for kind, rounding in configs:
      t0 = time.perf_counter()
      if kind == "rtn":
        qmodel = _rtn_model(model, fmt, a.seed)
      else:
        qmodel = calibrate.quantize_model(
            nnx.clone(model), stats, format=fmt, seed=a.seed, rounding=rounding,
            scales=a.scales, damp=a.damp, act_order=a.act_order)
      jax.block_until_ready(nnx.state(qmodel))
      qsec = time.perf_counter() - t0
      q = _nlls(qmodel, windows, a.batch)
      d = evaluation.delta_ppl(ref, q)
      row = {"format": fmt, "method": kind, "rounding": rounding, "scales": a.scales,
             "act_order": a.act_order, "ppl": evaluation.perplexity(q), "delta_ppl": d.delta,
             "delta_se": d.se, "quantize_seconds": qsec}
      if a.bound_check and kind == "gptq" and rounding == "two_neighbour":
        row.update(_bound_check(model, qmodel, stats))
      rows.append(row)
      print(json.dumps(row), flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump({**info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
