"""The small public modules re-export the package's own objects, each documented.

benchmarks/ and notebooks/ import only these (never ``itq3s_jax._src``), so a
public name that silently became a copy or a different object would let them
drift from what the CLI and the library run.
"""

from __future__ import annotations

import importlib
import inspect

import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import accuracy
from itq3s_jax._src import codec
from itq3s_jax._src import gguf_io
from itq3s_jax._src.commands import accuracy as accuracy_cmd
from itq3s_jax._src.commands import eval as eval_cmd
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.formats import iq3s as iq3s_src
from itq3s_jax._src.formats import iq3s_grid
from itq3s_jax._src.matmul import api as matmul_api

# public module -> the _src modules its re-exported names come from
SOURCES = {
    "itq3s_jax.accuracy": (accuracy_cmd,),
    "itq3s_jax.eval_tables": (eval_cmd,),
    "itq3s_jax.gguf": (gguf_io,),
    "itq3s_jax.iq3s": (iq3s_src, iq3s_grid),
    "itq3s_jax.tiles": (codec, qtensor),
}
DEFINED_HERE = {"itq3s_jax.accuracy": {"code_blocks"}, "itq3s_jax.iq3s": {"assign"}}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_public_module_names_are_the_src_objects(name):
  mod = importlib.import_module(name)
  assert list(mod.__all__) == sorted(set(mod.__all__))
  assert inspect.getdoc(mod)
  for attr in mod.__all__:
    obj = getattr(mod, attr)
    if attr in DEFINED_HERE.get(name, ()):
      assert inspect.getdoc(obj), f"{name}.{attr} has no docstring"
      continue
    assert any(getattr(src, attr, None) is obj for src in SOURCES[name]), f"{name}.{attr}"


def test_new_core_names_are_the_src_objects():
  assert itq3s_jax.row_nbytes is qtensor.row_nbytes
  assert itq3s_jax.choose_method is matmul_api.choose


def test_code_blocks_matches_a_direct_quantize():
  # Same jitted quantize on the same blocks, so bit-identical, not merely close.
  w = np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32)
  w_hat, eps, eps_r = accuracy.code_blocks(w, "itq3_t")
  qt = itq3s_jax.quantize(w.reshape(-1, 256), "itq3_t")
  np.testing.assert_array_equal(w_hat, np.asarray(itq3s_jax.dequantize(qt)))
  assert eps.shape == eps_r.shape == (6,) and np.all(eps_r >= eps)
