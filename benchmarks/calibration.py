"""Calibration levers, one row each: Δppl ± paired SE, bits per weight, certified bound, time.

Text slices of the ``itq3s eval`` protocol stream (pydoc topics, the model's tokens):

  eval   [0, 8192)       the scored tokens of ``itq3s eval`` (never used for choices)
  val    [8192, 12288)   validation: every hyper-parameter was chosen here
  calib  [16384, 24576)  calibration: statistics (and the start of the tuning text)
  tune   [16384, 40960)  norm tuning (``calibration.TUNING_SLICE``, as ``itq3s calibrate``)

Rows (``--rows``; models: smollm2 and gemma score perplexity, minilm the mean
cosine of ``itq3s eval``'s sentence embeddings):

  rtn              round to nearest, no statistics
  gptq             float-model statistics, GPTQ two-neighbour + act-order (``itq3s
                   calibrate --tune 0`` / ``itq3s convert --calibration``); gptq+tune
                   is what the two commands give by default (``--tune 48``)
  sequential       lever 2: statistics on the quantized prefix (``itq3s calibrate
                   --sequential``; ``itq3s convert --calibration`` writes these codes)

and modifiers after gptq or sequential, combined freely (``gptq+tokens=32768+tune``):

  +refit           lever 1: step codes re-fitted to the codes, re-rounded (GptqConfig(refit=2))
  +tune            lever 3: norm gains and biases tuned by KL(float || quantized) (optax)
  +tokens=N        lever 4: N calibration tokens from the calibration slice's start
                   (default 8192; beyond 24576 they run on past that slice, still
                   disjoint from eval and val)
  +tune_tokens=N   the tuning alone on N tokens from the same start (statistics keep
                   +tokens); default: the tune slice (MiniLM: the statistics' tokens)
  +damp=X          lever 4: GPTQ damping X

Columns: Δppl (or cosine), bpw over the quantized linear layers with every byte
counted, the bound the bytes certify (two-neighbour eps_2 for GPTQ, eps_q for RTN)
and the worst ||w - w_hat||_2 / bound over all blocks, seconds of statistics plus
quantization (wall clock, and process CPU time, which a shared machine inflates less).

  python benchmarks/calibration.py --model smollm2 --slice eval --rows gptq,sequential \\
      --ref-nlls /tmp/ref.npy --json benchmarks/results/calibration.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import itq3s_jax
from itq3s_jax import calibration
from itq3s_jax import evaluation
from itq3s_jax import flax as qflax
from itq3s_jax._src.commands import eval as eval_command
from itq3s_jax.flax import state as state_lib

SLICES = {"eval": (0, 8192), "val": (8192, 12288)}
CALIB = calibration.CALIBRATION_SLICE
# Leading MiniLM tokens and the [CLS] ... [SEP] window length: itq3s eval's (see there).
MINILM_CALIB, MINILM_WINDOW = eval_command.MINILM_CALIBRATION


def _load(name: str):
  """(model, tokenizer, forward, window, batch) of a benchmark model."""
  if name == "smollm2":
    from itq3s_jax.models import llama  # pylint: disable=g-import-not-at-top
    m, tok, _ = llama.load_gguf()
    return m, tok, None, 512, 2
  if name == "gemma":
    from itq3s_jax.models import gemma  # pylint: disable=g-import-not-at-top
    m, tok, _ = gemma.load_gguf()
    return m, tok, None, 512, 1
  from itq3s_jax.models import bert  # pylint: disable=g-import-not-at-top
  m, tok, _ = bert.load_minilm()
  return m, tok, lambda mm, t: mm(t, jnp.ones_like(t)), 128, 16


def bound_check(model: nnx.Module, qmodel: nnx.Module) -> dict:
  """Worst ||w - w_hat||_2 / certified bound over every block of every quantized layer."""
  floats = {state_lib.dotted(p): m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)}
  worst, blocks, kinds = 0.0, 0, set()
  for path, layer in nnx.iter_modules(qmodel):
    if not hasattr(layer, "qt"):
      continue
    qt = layer.qt
    w = np.asarray(floats[state_lib.dotted(path)].kernel[...], np.float64).T
    d = np.asarray(itq3s_jax.dequantize(qt), np.float64) - w
    err = np.stack([np.linalg.norm(d[:, a:b], axis=-1)
                    for a, b in itq3s_jax.block_columns(qt.format, qt.k)], -1)
    worst = max(worst, float((err / np.asarray(itq3s_jax.error_bound(qt), np.float64)).max()))
    blocks += err.size
    kinds.add({"nearest": "eps_q", "two_neighbour": "eps_2"}[qt.rounding])
  return {"blocks": blocks, "bound": "/".join(sorted(kinds)), "worst_err_over_bound": worst}


def _parse_row(row: str) -> tuple[str, dict]:
  """'gptq+refit+tokens=32768' -> ('gptq', {'refit': True, 'tokens': '32768'})."""
  base, *mods = row.split("+")
  if base not in ("rtn", "gptq", "sequential"):
    raise ValueError(f"unknown row {row!r}: starts with rtn, gptq or sequential")
  opts = dict(m.split("=", 1) if "=" in m else (m, True) for m in mods)
  unknown = set(opts) - {"refit", "damp", "tokens", "tune", "tune_tokens"}
  if unknown or (base == "rtn" and opts):
    raise ValueError(f"unknown row {row!r}: modifiers are +refit +damp=X +tokens=N +tune "
                     "+tune_tokens=N")
  return base, opts


def quantized_row(row: str, model, tok, ids, forward, window, batch, args):
  """(quantized model, wall seconds, process CPU seconds) for one row label."""
  base, opts = _parse_row(row)
  if args.model == "minilm":
    cal = ids[:int(opts.get("tokens", MINILM_CALIB))]
  else:
    cal = ids[CALIB[0]:CALIB[0] + int(opts.get("tokens", CALIB[1] - CALIB[0]))]
  tune_cal = cal if args.model == "minilm" else ids[slice(*calibration.TUNING_SLICE)]
  if "tune_tokens" in opts:
    start = 0 if args.model == "minilm" else CALIB[0]
    tune_cal = ids[start:start + int(opts["tune_tokens"])]
  for key, got in (("tokens", cal), ("tune_tokens", tune_cal)):
    if key in opts and len(got) < int(opts[key]):
      raise ValueError(f"{row!r}: the text has only {len(got)} calibration tokens")
  if args.model == "minilm":  # statistics (and default tuning) windows as itq3s eval's
    from itq3s_jax.models import bert  # pylint: disable=g-import-not-at-top
    cal = bert.framed_windows(tok, cal, MINILM_WINDOW)
    if "tune_tokens" not in opts:
      tune_cal = cal
  t0, c0 = time.perf_counter(), time.process_time()
  kw = dict(window=window, batch_size=batch, forward=forward)
  if base == "rtn":
    q = qflax.quantize_model(nnx.clone(model))[0]
  else:
    if base == "gptq":
      stats = calibration.calibrate(model, cal, **kw)
    else:
      stats, _ = calibration.calibrate_sequential(model, cal, **kw)
    cfg = {}
    if "refit" in opts:
      cfg["refit"] = 2
    if "damp" in opts:
      cfg["damp"] = float(opts["damp"])
    q = qflax.quantize_model(nnx.clone(model), hessians=stats,
                             gptq=itq3s_jax.GptqConfig(**cfg))[0]
    if "tune" in opts:
      loss = calibration.kl_divergence if args.model != "minilm" else _token_cosine_distance
      calibration.tune_unquantized(model, q, tune_cal, steps=args.tune_steps,
                                   learning_rate=args.tune_lr, loss=loss, window=window,
                                   batch_size=1 if args.model != "minilm" else 8,
                                   forward=forward)
  jax.block_until_ready(nnx.state(q))
  return q, time.perf_counter() - t0, time.process_time() - c0


def _sample(model, tok, prompt: str, n_new: int = 16) -> str:
  """Greedy completion of ``prompt`` (after the tokenizer's <bos>, where it has one)."""
  from itq3s_jax.models import llama  # pylint: disable=g-import-not-at-top
  bos = tok.token_to_id("<bos>")
  ids = ([bos] if bos is not None else []) + tok.encode(prompt, add_special_tokens=False).ids
  return tok.decode(llama.greedy_generate(model, ids, n_new))


def _token_cosine_distance(ref, out):
  """Mean 1 - cos of per-token hidden states (MiniLM's tuning loss)."""
  ref = ref / jnp.linalg.norm(ref, axis=-1, keepdims=True)
  out = out / jnp.linalg.norm(out, axis=-1, keepdims=True)
  return jnp.mean(1.0 - jnp.sum(ref * out, -1))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--model", choices=("smollm2", "gemma", "minilm"), default="smollm2")
  p.add_argument("--rows", default="rtn,gptq,gptq+tune,gptq+refit,sequential")
  p.add_argument("--slice", choices=tuple(SLICES), default="eval")
  p.add_argument("--tune-steps", type=int, default=48,
                 help="Adam steps of +tune (default %(default)s, as itq3s calibrate)")
  p.add_argument("--tune-lr", type=float, default=1e-3)
  p.add_argument("--ref-nlls", help=".npy of the float model's window NLLs on the slice "
                 "(read if present, else written)")
  p.add_argument("--no-bound-check", action="store_true")
  p.add_argument("--json", help="append the rows to this JSON file (created if absent)")
  p.add_argument("--sample", metavar="PROMPT",
                 help="also print the greedy completion (16 tokens) of PROMPT by the float "
                 "model and each row's model (smollm2, gemma)")
  a = p.parse_args()
  model, tok, forward, window, batch = _load(a.model)
  text = evaluation.protocol_text()
  ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)
  info = {"model": a.model, "python": platform.python_version(), "jax": jax.__version__,
          "text_sha256": evaluation.text_sha256(text), "slice": a.slice, "rows": []}
  if a.json and os.path.exists(a.json):
    with open(a.json) as f:
      info = json.load(f)
  if a.model == "minilm":
    from itq3s_jax.models import bert  # pylint: disable=g-import-not-at-top
    ref = bert.embed(model, tok, evaluation.SENTENCES)
    measure = lambda q: {"cosine": evaluation.mean_cosine(  # noqa: E731
        bert.embed(q, tok, evaluation.SENTENCES), ref)}
  else:
    lo, hi = SLICES[a.slice]
    windows = evaluation.make_windows(ids[lo:hi], hi - lo)
    if a.ref_nlls and os.path.exists(a.ref_nlls):
      ref = np.load(a.ref_nlls)
    else:
      ref = evaluation.nlls(model, windows, batch)
      if a.ref_nlls:
        np.save(a.ref_nlls, ref)
    info["ref_ppl"] = evaluation.perplexity(ref)
    print(f"{a.model} float ppl {info['ref_ppl']:.3f} on tokens [{lo}, {hi})", flush=True)

    def measure(q):
      d = evaluation.delta_ppl(ref, evaluation.nlls(q, windows, batch))
      out = {"delta_ppl": d.delta, "delta_se": d.se}
      if a.sample:
        out["sample"] = _sample(q, tok, a.sample)
      return out

    if a.sample:
      info["sample_float"] = _sample(model, tok, a.sample)
      print(f"float: {a.sample!r} -> {info['sample_float']!r}", flush=True)
  for row in a.rows.split(","):
    q, secs, cpu = quantized_row(row, model, tok, ids, forward, window, batch, a)
    coded = [m.qt for _, m in nnx.iter_modules(q) if hasattr(m, "qt")]
    out = {"row": row, "slice": a.slice, "seconds": secs, "cpu_seconds": cpu,
           "layers": len(coded),
           "bpw": 8.0 * sum(t.data.size for t in coded) / sum(np.prod(t.shape) for t in coded),
           **measure(q)}
    if not a.no_bound_check:
      out.update(bound_check(model, q))
    if "+tune" in row:
      out.update(tune_steps=a.tune_steps, tune_lr=a.tune_lr)
    info["rows"].append(out)
    print(json.dumps(out), flush=True)
    if a.json:
      with open(a.json, "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
  main()
