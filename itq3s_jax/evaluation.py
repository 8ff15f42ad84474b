"""Model-quality measurements: the perplexity protocol and embedding similarity.

Perplexity protocol (numbers compare across tools):
  text = "\\n\\n".join(topics[k] for k in sorted(topics)) from CPython's
  ``pydoc_data.topics`` (the text differs between Python versions: report
  :func:`text_sha256` and the version); token ids = tokenizer(text)[:n_tokens]
  with no BOS; cut into non-overlapping windows of 512 tokens, each an
  independent context starting at position 0; score all 511 next-token
  predictions of each window; ppl = exp(mean NLL).

Every window scores the same number of predictions, so the mean NLL is the mean
of the per-window means, and per-window means are the paired samples behind the
standard error of a perplexity difference (:func:`delta_ppl`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

WINDOW = 512
N_TOKENS = 8192


def protocol_text() -> str:
  """The evaluation text: every ``pydoc_data.topics`` entry, sorted by key, joined by a blank line."""
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  return "\n\n".join(topics.topics[k] for k in sorted(topics.topics))


def text_sha256(text: str) -> str:
  """Hex sha256 of the UTF-8 text (identifies the Python version's topics)."""
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_windows(ids: ArrayLike, n_tokens: int = N_TOKENS, window: int = WINDOW) -> np.ndarray:
  """Cuts ``ids[:n_tokens]`` into non-overlapping windows; an incomplete last window is dropped.

  Args:
    ids: (L,) int token ids.
    n_tokens: how many leading tokens to use.
    window: window length (>= 2: a window scores window - 1 predictions).

  Returns:
    int32 (min(L, n_tokens) // window, window).

  Raises:
    ValueError: fewer than one full window of tokens, or window < 2.
  """
  ids = np.asarray(ids).reshape(-1)[:n_tokens]
  if window < 2:
    raise ValueError(f"{window=} must be >= 2 (a window scores window - 1 predictions).")
  n = len(ids) // window
  if n == 0:
    raise ValueError(f"{len(ids)} tokens (n_tokens={n_tokens}) do not fill one window of {window}.")
  return ids[:n * window].reshape(n, window).astype(np.int32)


def window_nll(logits: ArrayLike, tokens: ArrayLike) -> jax.Array:
  """Mean next-token negative log-likelihood per window.

  Args:
    logits: float (B, T, V): logits[b, t] predicts tokens[b, t + 1].
    tokens: int (B, T).

  Returns:
    float32 (B,): mean over the T - 1 predictions of -log softmax(logits)[next].
  """
  logits = jnp.asarray(logits, jnp.float32)[:, :-1]
  nxt = jnp.asarray(tokens)[:, 1:, None]
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, nxt, axis=-1)[..., 0]
  return (lse - picked).mean(-1)


def nlls(model: Callable[[jax.Array], jax.Array], windows: np.ndarray,
         batch_size: int = 4) -> np.ndarray:
  """Per-window mean NLLs of a model, ``batch_size`` windows per jitted call.

  Args:
    model: (B, T) int32 -> (B, T, V) logits: an ``nnx.Module`` (its state is
      passed to the jitted function as an argument, never baked in as
      constants) or a pure function. Jitted together with :func:`window_nll`
      so the logits never leave the computation.
    windows: int32 (n, T) from :func:`make_windows`.
    batch_size: windows per call (a short last batch is padded with copies and
      the copies dropped, so one compilation serves every batch).

  Returns:
    float64 (n,).
  """
  if isinstance(model, nnx.Module):
    graphdef, state = nnx.split(model)
    call = lambda s, t: nnx.merge(graphdef, s)(t)  # noqa: E731
  else:
    state, call = None, lambda s, t: model(t)  # noqa: E731
  fn = jax.jit(lambda s, t: window_nll(call(s, t), t))
  n = len(windows)
  out = []
  for i in range(0, n, batch_size):
    chunk = windows[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    out.append(np.asarray(fn(state, jnp.asarray(chunk)))[:batch_size - pad])
  return np.concatenate(out).astype(np.float64)


def perplexity(window_nlls: ArrayLike) -> float:
  """exp(mean NLL) from per-window mean NLLs (windows of equal length)."""
  return float(np.exp(np.mean(np.asarray(window_nlls, np.float64))))


@dataclasses.dataclass(frozen=True)
class Delta:
  """ppl(model) - ppl(reference) with its paired standard error."""
  delta: float
  se: float


def delta_ppl(ref_nlls: ArrayLike, window_nlls: ArrayLike) -> Delta:
  """Δppl = exp(mean q) - exp(mean r) with a paired delta-method standard error.

  Windows are the sampling unit: with per-window means q_i, r_i (n windows),
  the gradient of exp(q̄) - exp(r̄) is g = (exp(q̄), -exp(r̄)) and
  SE² = gᵀ Σ g / n with Σ the sample covariance of (q_i, r_i). Pairing removes
  the window-to-window difficulty that both models share.

  Args:
    ref_nlls: float (n,) per-window mean NLLs of the reference.
    window_nlls: float (n,) of the compared model, same windows.

  Raises:
    ValueError: different lengths or fewer than 2 windows.
  """
  r = np.asarray(ref_nlls, np.float64)
  q = np.asarray(window_nlls, np.float64)
  if r.shape != q.shape or r.ndim != 1 or len(r) < 2:
    raise ValueError(f"need two equal-length 1-D NLL vectors with >= 2 windows, got "
                     f"{r.shape} and {q.shape}.")
  g = np.array([math.exp(q.mean()), -math.exp(r.mean())])
  cov = np.cov(np.stack([q, r]), ddof=1)
  return Delta(float(g[0] + g[1]), float(math.sqrt(max(g @ cov @ g, 0.0) / len(r))))


def mean_cosine(a: ArrayLike, b: ArrayLike) -> float:
  """Mean over rows of cos(a_i, b_i); a, b float (n, d)."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  if a.shape != b.shape:
    raise ValueError(f"shapes differ: {a.shape} vs {b.shape}.")
  cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  return float(cos.mean())


# Fixed sentences for the embedding check: (0, 1), (2, 3), (4, 5), (6, 7) are
# paraphrase pairs; the pairs are about unrelated topics.
SENTENCES = (
    "A man is playing a guitar on the stage.",
    "On stage, a man strums his guitar.",
    "The stock market fell sharply this morning.",
    "Share prices dropped steeply early today.",
    "The recipe needs two cups of flour and one egg.",
    "You will need an egg and two cups of flour for this recipe.",
    "Quantum computers use qubits instead of classical bits.",
    "Instead of ordinary bits, a quantum computer works with qubits.",
    "The children built a sandcastle at the beach.",
    "Heavy rain caused flooding in the city center.",
    "She forgot her umbrella at the train station.",
    "The committee approved the new budget after a long debate.",
)
PARAPHRASE_PAIRS = ((0, 1), (2, 3), (4, 5), (6, 7))
