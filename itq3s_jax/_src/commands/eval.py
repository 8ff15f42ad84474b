"""``itq3s eval``: SmolLM2-135M perplexity and MiniLM embedding fidelity per format.

What is quantized: every ``nnx.Linear`` of the models (``quantize_model`` with
its defaults), i.e. SmolLM2's q/k/v/o and gate/up/down projections (210
matrices, 106M weights) and MiniLM's q/k/v/attention-output and FFN layers.
Token embeddings, the tied output head, RMS/LayerNorms and biases stay float32.
"ref" is the float model: for SmolLM2 the GGUF's Q4_1 weights dequantized.

Perplexity follows :mod:`itq3s_jax.evaluation` (pydoc topics text, 512-token
windows, no BOS); Δppl carries a paired standard error over windows. MiniLM
reports the mean cosine between quantized and float sentence embeddings over a
fixed sentence list, and the paraphrase check of the float model.

``--calibrated`` adds, per format, a row ``FORMAT+gptq``: the same layers
rounded with GPTQ in the coding domain (``quantize_model(..., hessians=...)``)
from input statistics of calibration text disjoint from the scored text
(SmolLM2: tokens 16384..24575 of the protocol stream; MiniLM: the first 32768
MiniLM tokens of the same text in [CLS] + 14 + [SEP] windows, the scored sentences being a
separate list). Statistics are the float model's, as ``itq3s calibrate`` makes
them by default, and SmolLM2's calibrated rows then get what ``itq3s calibrate``
does by default before ``itq3s convert --calibration``: the norm gains tuned by
KL(float || quantized) on the same calibration tokens (``--tune`` steps, 0 for
GPTQ alone). Statistics and quantization (with the tuning) are timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx

import itq3s_jax
from itq3s_jax import cli
from itq3s_jax import evaluation

NAME = "eval"
HELP = "perplexity of SmolLM2-135M and MiniLM embedding cosine for each format"
DEFAULT_FORMATS = "ref,itq3_t,itq3_s,iq3_s,uniform3"
REF = "ref"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--formats", default=DEFAULT_FORMATS,
                 help=f"comma-separated formats; '{REF}' is the float model (default: %(default)s)")
  p.add_argument("--tokens", type=int, default=evaluation.N_TOKENS,
                 help="leading tokens of the text to score, in windows of 512 (default: %(default)s)")
  p.add_argument("--model", choices=("smollm2", "minilm", "both"), default="both")
  p.add_argument("--batch", type=int, default=4, help="windows per forward call (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="sign-vector seed of randomized formats")
  p.add_argument("--include", help="regex: quantize only linear layers whose dotted path matches "
                 "(e.g. 'mlp' for SmolLM2, 'intermediate|output' for MiniLM)")
  p.add_argument("--exclude", help="regex: linear layers whose dotted path matches stay float")
  p.add_argument("--calibrated", action="store_true",
                 help="also evaluate every format with GPTQ rounding from calibration statistics")
  p.add_argument("--calibration", metavar="NPZ",
                 help="SmolLM2 statistics file for --calibrated: read if it exists, else "
                 "computed and written there (itq3s_jax.calibration save/load format)")
  cli.add_rounding_argument(p, "of --calibrated rows")
  p.add_argument("--tune", type=int, default=32, metavar="STEPS",
                 help="norm-tuning steps of SmolLM2's --calibrated rows, as itq3s calibrate's "
                 "default (0: GPTQ alone; default: %(default)s)")
  p.add_argument("--json", metavar="OUT", help="also write the results as JSON")


def _state_nbytes(model: nnx.Module) -> int:
  """Bytes of every array in the model's state (float params and coded weights)."""
  return int(sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))))


def _quantized(model: nnx.Module, fmt: str, rules: dict[str, Any]):
  """(model copy with its linear layers in ``fmt``, report); raises on failure.

  ``rules``: QuantRule fields (seed, include, exclude), plus ``hessians`` and
  ``gptq`` for a calibrated row, and ``tune`` = (tokens, steps) to tune its norms.
  """
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  from itq3s_jax import flax as qflax  # pylint: disable=g-import-not-at-top
  rules = dict(rules)
  extra = {k: rules.pop(k) for k in ("hessians", "gptq") if k in rules}
  tune = rules.pop("tune", None)
  qmodel, report = qflax.quantize_model(nnx.clone(model), itq3s_jax.QuantRule(fmt, **rules),
                                        progress=True, **extra)
  if tune is not None and tune[1] > 0:
    calibration.tune_unquantized(model, qmodel, tune[0], steps=tune[1], progress=True)
  return qmodel, report


def check_formats(formats: list[str]) -> None:
  """CommandError (exit 2) naming every format that is neither ``ref`` nor registered."""
  unknown = [f for f in formats if f != REF and f not in itq3s_jax.formats()]
  if unknown:
    raise cli.CommandError(f"unknown format(s) {unknown}; known: "
                           f"{[REF, *itq3s_jax.formats()]}.")


class _Ticking(nnx.Module):
  """The model, ticking a progress bar once per batch it scores (a host callback: the
  computed values are the model's)."""

  def __init__(self, model: nnx.Module, bar):
    self.model = model
    self.bar = bar

  def __call__(self, tokens):
    jax.debug.callback(lambda: self.bar.update(1))
    return self.model(tokens)


def _scored(model, windows, batch: int, label: str) -> list[float]:
  """evaluation.nlls with a tqdm bar over the batches (stderr)."""
  n = -(-len(windows) // batch)
  with tqdm.tqdm(total=n, desc=f"score {label}", unit="batch", leave=False,
                 file=sys.stderr) as bar:
    return evaluation.nlls(_Ticking(model, bar), windows, batch).tolist()


CALIBRATED = "+gptq"  # suffix of the label of a calibrated row


def _row(fmt: str, model, rules: dict[str, Any], measure) -> dict[str, Any]:
  """Quantizes (unless ref), runs ``measure(model) -> dict``; errors become a status.

  ``fmt`` may end in ``+gptq``: then ``rules`` carries ``hessians`` (and options).
  """
  base = fmt.removesuffix(CALIBRATED)
  t0, c0 = time.perf_counter(), time.process_time()
  row: dict[str, Any] = {"format": fmt, "status": "ok"}
  try:
    if fmt == REF:
      qmodel, row["bpw"], row["quantized_bytes"] = model, 32.0, None
    else:
      qmodel, report = _quantized(model, base, rules)
      jax.block_until_ready(nnx.state(qmodel))
      row["quantize_seconds"] = time.perf_counter() - t0
      row["bpw"] = 8.0 * report.nbytes / report.num_weights
      row["quantized_bytes"] = report.nbytes
      row["quantized_layers"] = len(report.quantized)
    row["model_bytes"] = _state_nbytes(qmodel)
    row.update(measure(qmodel))
  except (ValueError, NotImplementedError) as exc:
    row = {"format": fmt, "status": f"failed: {type(exc).__name__}: {exc}"}
  # CPU seconds (all threads) as well: wall time is meaningless on a shared machine.
  row["seconds"], row["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
  return row


def _timed_stats(info: dict[str, Any], compute, path: str | None = None):
  """Statistics from ``path`` if it exists, else ``compute()`` (timed, written to ``path``)."""
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  if path and os.path.exists(path):
    info["calibration_file"] = path
    return calibration.load(path)
  t0 = time.perf_counter()
  stats = compute()
  info["calibrate_seconds"] = time.perf_counter() - t0
  info["calibration_mb"] = calibration.nbytes(stats) / 1e6
  print(f"calibration statistics in {info['calibrate_seconds']:.1f} s "
        f"({info['calibration_mb']:.0f} MB)", flush=True)
  if path:
    calibration.save(path, stats)
  return stats


def _with_calibrated(formats: list[str], calibrated: bool) -> list[str]:
  return formats + ([f + CALIBRATED for f in formats if f != REF] if calibrated else [])


def _rules_for(fmt: str, rules: dict[str, Any], stats, rounding: str | None,
               tune=None) -> dict[str, Any]:
  if not fmt.endswith(CALIBRATED):
    return rules
  return {**rules, "hessians": stats, "gptq": itq3s_jax.GptqConfig(rounding=rounding),
          **({"tune": tune} if tune is not None else {})}


def run_smollm2(formats: list[str], n_tokens: int, batch: int, rules: dict[str, Any],
                calibrated: bool = False, stats_path: str | None = None,
                rounding: str | None = None, tune_steps: int = 0) -> dict[str, Any]:
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  from itq3s_jax.models import llama  # pylint: disable=g-import-not-at-top
  from itq3s_jax.models import loaders  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  model, tok = loaders.load(llama.smollm2_gguf_path(), progress=True)
  cfg = model.config
  text = evaluation.protocol_text()
  windows = evaluation.make_windows(tok.encode(text, add_special_tokens=False).ids, n_tokens)
  info = {"text_sha256": evaluation.text_sha256(text), "python": platform.python_version(),
          "tokens": int(windows.size), "windows": len(windows),
          "load_seconds": time.perf_counter() - t0}
  print(f"SmolLM2-135M-Instruct ({cfg.n_layers} blocks, d={cfg.d_model}); text sha256 "
        f"{info['text_sha256'][:16]}..., Python {info['python']}; {info['windows']} windows "
        f"x {evaluation.WINDOW} tokens; loaded in {info['load_seconds']:.1f} s", flush=True)
  stats, cal_tokens = None, None
  if calibrated:
    cal_tokens = calibration.protocol_tokens(tok)
    stats = _timed_stats(info, lambda: calibration.calibrate(model, cal_tokens, progress=True),
                         stats_path)
    info["tune_steps"] = tune_steps
  ref_nlls = None
  rows = []
  formats = _with_calibrated(formats, calibrated)
  order = [REF] + [f for f in formats if f != REF]  # the reference first: deltas need it
  for fmt in order:
    row = _row(fmt, model, _rules_for(fmt, rules, stats, rounding, (cal_tokens, tune_steps)),
               lambda m, f=fmt: {"nlls": _scored(m, windows, batch, f)})
    if row["status"] == "ok":
      row["ppl"] = evaluation.perplexity(row["nlls"])
      if fmt == REF:
        ref_nlls = row["nlls"]
      elif ref_nlls is not None:
        d = evaluation.delta_ppl(ref_nlls, row["nlls"])
        row["delta_ppl"], row["delta_se"] = d.delta, d.se
    if fmt in formats:
      rows.append(row)
    progress = f"ppl {row['ppl']:.3f}" if "ppl" in row else row["status"]
    if "delta_ppl" in row:
      progress += f", Δppl {row['delta_ppl']:+.3f} ± {row['delta_se']:.3f}"
    print(f"  {fmt}: {progress} ({row['seconds']:.1f} s, cpu {row['cpu_seconds']:.1f} s)",
          flush=True)
  return {**info, "rows": rows}


# Leading MiniLM tokens of the protocol text, and the length of the [CLS] ... [SEP] windows
# they are cut into (bert.framed_windows). Chosen on 64 held-out sentences of the text's second
# half (not the scored list), itq3_t + GPTQ mean cosine: unframed windows of 128 (the old
# default) 0.966; framed 128 / 64 / 32 / 16: 0.966 / 0.973 / 0.977 / 0.979; framed 12 0.980,
# 8 0.975; 16 with 16384 / 32768 tokens 0.979 / 0.980.
MINILM_CALIBRATION = (32768, 16)


def _minilm_stats(model, tok):
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  from itq3s_jax.models import bert  # pylint: disable=g-import-not-at-top
  n, window = MINILM_CALIBRATION
  ids = tok.encode(evaluation.protocol_text(), add_special_tokens=False).ids[:n]
  return calibration.calibrate(model, bert.framed_windows(tok, ids, window), batch_size=64,
                               forward=lambda m, t: m(t, jnp.ones_like(t)))


def run_minilm(formats: list[str], rules: dict[str, Any], calibrated: bool = False,
               rounding: str | None = None) -> dict[str, Any]:
  from itq3s_jax.models import bert  # pylint: disable=g-import-not-at-top
  model, tok, _ = bert.load_minilm()
  info: dict[str, Any] = {}
  stats = _timed_stats(info, lambda: _minilm_stats(model, tok)) if calibrated else None
  ref = bert.embed(model, tok, evaluation.SENTENCES)
  sims = ref @ ref.T
  para = [float(sims[i, j]) for i, j in evaluation.PARAPHRASE_PAIRS]
  paired = {k for p in evaluation.PARAPHRASE_PAIRS for k in (p, p[::-1])}
  unrel = [float(sims[i, j]) for i in range(len(ref)) for j in range(i + 1, len(ref))
           if (i, j) not in paired]
  rows = [_row(fmt, model, _rules_for(fmt, rules, stats, rounding),
               lambda m: {"cosine": evaluation.mean_cosine(
                   bert.embed(m, tok, evaluation.SENTENCES), ref)})
          for fmt in _with_calibrated(formats, calibrated)]
  return {**info, "paraphrase_cos_min": min(para), "unrelated_cos_max": max(unrel),
          "sentences": len(evaluation.SENTENCES), "rows": rows}


def _fmt(v, spec: str) -> str:
  return "-" if v is None else format(v, spec)


def render_smollm2(res: dict[str, Any]) -> str:
  lines = [f"SmolLM2-135M perplexity: {res['tokens']} tokens, {res['windows']} windows, text sha256 "
           f"{res['text_sha256']}, Python {res['python']}",
           f"{'format':<13} {'ppl':>9} {'Δppl ± SE':>19} {'bpw(lin)':>9} {'lin MB':>8} "
           f"{'model MB':>9} {'wall s':>7} {'cpu s':>7}"]
  for r in res["rows"]:
    if r["status"] != "ok":
      lines.append(f"{r['format']:<13} {r['status']}")
      continue
    delta = "-" if "delta_ppl" not in r else f"{r['delta_ppl']:+.3f} ± {r['delta_se']:.3f}"
    lin = r["quantized_bytes"]
    lines.append(f"{r['format']:<13} {r['ppl']:9.3f} {delta:>19} {r['bpw']:9.4f} "
                 f"{_fmt(None if lin is None else lin / 1e6, '8.2f'):>8} "
                 f"{r['model_bytes'] / 1e6:9.2f} {r['seconds']:7.1f} {r['cpu_seconds']:7.1f}")
  return "\n".join(lines)


def render_minilm(res: dict[str, Any]) -> str:
  lines = [f"all-MiniLM-L6-v2: float paraphrase cos >= {res['paraphrase_cos_min']:.3f}, "
           f"unrelated cos <= {res['unrelated_cos_max']:.3f}; mean cos(quantized, float) "
           f"over {res['sentences']} sentences",
           f"{'format':<13} {'cosine':>8} {'bpw(lin)':>9} {'model MB':>9} {'wall s':>7} {'cpu s':>7}"]
  for r in res["rows"]:
    if r["status"] != "ok":
      lines.append(f"{r['format']:<13} {r['status']}")
      continue
    lines.append(f"{r['format']:<13} {r['cosine']:8.5f} {r['bpw']:9.4f} "
                 f"{r['model_bytes'] / 1e6:9.2f} {r['seconds']:7.1f} {r['cpu_seconds']:7.1f}")
  return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
  formats = [f.strip() for f in args.formats.split(",") if f.strip()]
  if not formats:
    raise cli.CommandError("--formats is empty.")
  check_formats(formats)
  if args.tokens < 2 * evaluation.WINDOW:
    raise cli.CommandError(f"--tokens={args.tokens} must be >= {2 * evaluation.WINDOW} "
                           "(two windows, for a standard error).")
  if args.batch < 1 or args.tune < 0:
    raise cli.CommandError(f"--batch={args.batch} must be >= 1 and --tune={args.tune} >= 0.")
  t0, c0 = time.perf_counter(), time.process_time()
  rules = {"seed": args.seed, "include": args.include, "exclude": args.exclude}
  out: dict[str, Any] = {"rules": rules, "python": sys.version.split()[0], "platform": platform.platform()}
  try:
    if args.model in ("smollm2", "both"):
      out["smollm2"] = run_smollm2(formats, args.tokens, args.batch, rules, args.calibrated,
                                   args.calibration, args.rounding, args.tune)
      print(render_smollm2(out["smollm2"]), flush=True)
    if args.model in ("minilm", "both"):
      out["minilm"] = run_minilm(formats, rules, args.calibrated, args.rounding)
      print(render_minilm(out["minilm"]), flush=True)
  except (FileNotFoundError, ModuleNotFoundError) as exc:
    raise cli.CommandError(str(exc)) from None
  out["wall_seconds"], out["cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
  print("Quantized: every nnx.Linear (attention q/k/v/o and FFN projections)"
        + (f" matching include={args.include!r}" if args.include else "")
        + (f" except exclude={args.exclude!r}" if args.exclude else "")
        + "; embeddings, the output head and norms stay float32.")
  print(f"total wall time {out['wall_seconds']:.1f} s (process CPU time {out['cpu_seconds']:.1f} s)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)
  return 0
