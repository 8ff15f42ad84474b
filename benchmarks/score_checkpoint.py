"""Δppl of a converted checkpoint against its float source, under the ``itq3s eval`` protocol.

Both are opened with ``itq3s_jax.models.load`` (LLaMA family or Gemma 3), the
protocol text is tokenized with the source's tokenizer, and the leading
``--tokens`` tokens are scored in windows of 512 (one window a forward).

  python benchmarks/score_checkpoint.py gemma-3-270m-q4_k_m.gguf ckpt
"""

from __future__ import annotations

import argparse

import numpy as np

from itq3s_jax import evaluation
from itq3s_jax import models


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("source", help="the float checkpoint (HF directory or GGUF)")
  p.add_argument("checkpoint", help="what itq3s convert wrote from it")
  p.add_argument("--tokens", type=int, default=8192)
  a = p.parse_args()
  fmodel, tok = models.load(a.source)
  qmodel, _ = models.load(a.checkpoint)
  ids = np.asarray(tok.encode(evaluation.protocol_text(), add_special_tokens=False).ids, np.int32)
  windows = evaluation.make_windows(ids[:a.tokens], a.tokens)
  ref = evaluation.nlls(fmodel, windows, 1)
  d = evaluation.delta_ppl(ref, evaluation.nlls(qmodel, windows, 1))
  print(f"float ppl {evaluation.perplexity(ref):.3f}; converted Δppl {d.delta:+.3f} ± {d.se:.3f} "
        f"(tokens 0-{a.tokens - 1})")


if __name__ == "__main__":
  main()
