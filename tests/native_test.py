"""The native CPU kernel (``matmul(..., method="cpu_native")``, matmul/native.py).

Error model: the same as ``xla_act_rotate`` (matmul_test.py's docstring): the
activations are rotated by the same XLA code, the kernel's decoded values are
the exact z_hat, and its float32 sum of Kp products errs by <= Kp u sum |z||x|
in any order: 1.25 (Kp + 9) u ||x_m|| ||w_n|| against the float64 oracle.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import itq3s_jax
from itq3s_jax._src.matmul import api as matmul_lib
from itq3s_jax._src.matmul import native
from tests import helpers

_U32 = 2.0**-24

needs_kernel = pytest.mark.skipif(not native.available(),
                                  reason=f"native kernel unavailable: {native.unavailable_reason()}")


def _tol(x, w64, kp):
  x64 = np.asarray(x, np.float64).reshape(-1, w64.shape[1])
  return 1.25 * (kp + 9) * _U32 * np.outer(np.linalg.norm(x64, axis=-1),
                                           np.linalg.norm(w64, axis=-1))


def _kp(fmt: str, k: int) -> int:
  """Coded length: pad256 formats (iq3_s, itq3_s) zero-pad the last block to 256."""
  return -(-k // 256) * 256 if itq3s_jax.get_format(fmt).tail == "pad256" else k


@needs_kernel
@pytest.mark.parametrize("fmt", native.FORMATS)
@pytest.mark.parametrize("n,k", [(12, 256), (33, 352), (40, 576), (7, 1056), (5, 32)])
@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_matches_float64_oracle(fmt, n, k, lead):
  """Every tail (itq3_t: 352 = 256 + 64 + 32, 1056 = 4 x 256 + 32, K = 32 alone; the IQ3_S
  formats: a zero-padded last block), one row and batched rows; several row chunks (33 rows)
  and fewer rows than chunks. (A 1-D x: test_bf16_activations_and_many_rows.)"""
  w = np.random.default_rng(k).standard_normal((n, k)).astype(np.float32)
  qt = itq3s_jax.quantize(w, fmt, seed=3)
  x = np.random.default_rng(n).standard_normal((*lead, k)).astype(np.float32)
  y = np.asarray(jax.jit(lambda x, qt: itq3s_jax.matmul(x, qt, method="cpu_native"))(x, qt))
  assert y.shape == (*lead, n) and y.dtype == np.float32
  w64 = helpers.oracle_weights(qt)
  want = np.asarray(x, np.float64).reshape(-1, k) @ w64.T
  assert (np.abs(y.reshape(-1, n) - want) <= _tol(x, w64, _kp(fmt, k))).all()


@needs_kernel
@pytest.mark.parametrize("fmt", native.FORMATS)
def test_decodes_the_same_numbers_as_the_xla_decoder(fmt):
  """Rotated activations = the identity: each output is one decoded value times 1 plus
  exact zeros, so the kernel's decoded values are compared bit for bit."""
  w = np.random.default_rng(5).standard_normal((9, 352)).astype(np.float32) * 1e-3
  w[0, :32] = 0  # a zero sub-block (IQ3_S codes it as +d) and small scales
  qt = itq3s_jax.quantize(w, fmt, seed=2)
  z = np.asarray(itq3s_jax.decode_rotated(qt))
  got = np.asarray(native._call(jnp.eye(z.shape[1], dtype=jnp.float32), qt))
  np.testing.assert_array_equal(got.T.view(np.uint32), z.view(np.uint32))


@needs_kernel
def test_bf16_activations_and_many_rows():
  """bf16 x is computed in float32 (cast exactly); 40 rows: beyond the dispatch limit but
  allowed when asked for; a 1-D x."""
  qt = itq3s_jax.quantize(np.random.default_rng(0).standard_normal((64, 512)), "itq3_t")
  x = jnp.asarray(np.random.default_rng(1).standard_normal((40, 512)), jnp.bfloat16)
  y = np.asarray(itq3s_jax.matmul(x, qt, method="cpu_native"))
  w64 = helpers.oracle_weights(qt)
  x64 = np.asarray(x.astype(jnp.float32), np.float64)
  assert (np.abs(y - x64 @ w64.T) <= _tol(x64, w64, 512)).all()
  one = np.asarray(itq3s_jax.matmul(x[0], qt, method="cpu_native"))  # 1-D x: (N,)
  assert one.shape == (64,) and (np.abs(one - x64[0] @ w64.T) <= _tol(x64[:1], w64, 512)).all()


@needs_kernel
def test_gradient_and_vmap_match_the_xla_method():
  qt = itq3s_jax.quantize(np.random.default_rng(0).standard_normal((24, 288)), "itq3_t")
  x = np.random.default_rng(1).standard_normal((3, 288)).astype(np.float32)
  g = np.random.default_rng(2).standard_normal((3, 24)).astype(np.float32)
  loss = lambda m: lambda x: jnp.sum(itq3s_jax.matmul(x, qt, method=m) * g)  # noqa: E731
  got, want = (np.asarray(jax.jit(jax.grad(loss(m)))(x)) for m in ("cpu_native",
                                                                  "xla_act_rotate"))
  # Both are the same transpose computation; only the forward differed.
  np.testing.assert_array_equal(got, want)
  batched = jax.vmap(lambda v: itq3s_jax.matmul(v, qt, method="cpu_native"))(x[:, None])
  w64 = helpers.oracle_weights(qt)
  assert (np.abs(np.asarray(batched)[:, 0] - x.astype(np.float64) @ w64.T)
          <= _tol(x, w64, 288)).all()


@needs_kernel
@pytest.mark.parametrize("n,m", [(0, 2), (4, 0)])
def test_empty_shapes(n, m):
  qt = itq3s_jax.quantize(np.ones((n, 256), np.float32), "itq3_t")
  y = itq3s_jax.matmul(np.ones((m, 256), np.float32), qt, method="cpu_native")
  assert y.shape == (m, n) and y.dtype == jnp.float32
  np.testing.assert_array_equal(y, np.zeros((m, n), np.float32))


def test_other_formats_are_refused():
  qt = itq3s_jax.quantize(np.ones((4, 256), np.float32), "uniform3")
  with pytest.raises(NotImplementedError, match="takes .'itq3_t', 'itq3_s', 'iq3_s'"):
    itq3s_jax.matmul(np.ones((1, 256), np.float32), qt, method="cpu_native")


def test_auto_picks_the_kernel_for_few_rows_on_one_device(monkeypatch):
  qt = itq3s_jax.quantize(np.ones((8, 256), np.float32), "itq3_t")
  other = itq3s_jax.quantize(np.ones((8, 256), np.float32), "uniform3")
  few = jax.ShapeDtypeStruct((2, matmul_lib.NATIVE_MAX_ROWS // 2, 256), jnp.float32)
  many = jax.ShapeDtypeStruct((matmul_lib.NATIVE_MAX_ROWS + 1, 256), jnp.float32)
  monkeypatch.setattr(native, "available", lambda: True)
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  assert matmul_lib.choose(few, qt, backend="cpu") == "cpu_native"
  assert matmul_lib.choose(many, qt, backend="cpu") == "xla_act_rotate"
  assert matmul_lib.choose(few, other, backend="cpu") == "xla_act_rotate"
  assert matmul_lib.choose(few, qt, backend="tpu") == "xla_act_rotate"
  monkeypatch.setattr(jax, "device_count", lambda *a: 8)  # a mesh: the method that shards
  assert matmul_lib.choose(few, qt, backend="cpu") == "xla_act_rotate"
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  monkeypatch.setattr(native, "available", lambda: False)  # no compiler, or switched off
  assert matmul_lib.choose(few, qt, backend="cpu") == "xla_act_rotate"


_PROBE = """
import numpy as np, itq3s_jax
from itq3s_jax._src.matmul import api, native
qt = itq3s_jax.quantize(np.ones((8, 256), np.float32), "itq3_t")
x = np.ones((1, 256), np.float32)
print(native.available(), "|", native.unavailable_reason(), "|", api.choose(x, qt))
try:
  itq3s_jax.matmul(x, qt, method="cpu_native")
except NotImplementedError as e:
  print("refused:", e)
np.testing.assert_array_equal(itq3s_jax.matmul(x, qt), itq3s_jax.matmul(x, qt, method="xla_act_rotate"))
"""


@pytest.mark.integration  # subprocesses: the tier CI runs once, not on both Pythons
@pytest.mark.parametrize("env,reason", [
    ({"ITQ3S_NATIVE": "0"}, "switched off (ITQ3S_NATIVE=0)"),
    ({"CXX": "false"}, "false failed"),
])
def test_without_the_kernel_auto_falls_back(tmp_path, env, reason):
  """A process where the kernel is switched off or cannot be built (a compiler that fails,
  an empty cache) says why, refuses the explicit method and computes with XLA."""
  full = {**os.environ, "ITQ3S_CACHE_DIR": str(tmp_path), "XLA_FLAGS": "", **env}
  out = subprocess.run([sys.executable, "-c", _PROBE], env=full, capture_output=True,
                       text=True, timeout=300, check=True).stdout
  first, refused = out.strip().splitlines()[:2]
  available, why, method = (s.strip() for s in first.split("|"))
  assert available == "False" and reason in why and method == "xla_act_rotate"
  assert refused.startswith("refused:") and reason in refused
  assert not list(tmp_path.glob("*.so"))


@pytest.mark.integration
@needs_kernel
def test_kernel_is_built_once_and_cached(tmp_path):
  """A fresh cache directory gets one library; a second process loads it without building."""
  probe = ("from itq3s_jax._src.matmul import native; import time; t = time.time(); "
           "print(native.available(), time.time() - t)")
  env = {**os.environ, "ITQ3S_CACHE_DIR": str(tmp_path), "XLA_FLAGS": ""}
  run = lambda: subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,  # noqa: E731
                               text=True, timeout=600, check=True).stdout.split()
  assert run()[0] == "True"
  libs = list(tmp_path.glob("cpu_dot-*.so"))
  assert len(libs) == 1
  mtime = libs[0].stat().st_mtime_ns
  assert run()[0] == "True"
  assert [p.stat().st_mtime_ns for p in tmp_path.glob("cpu_dot-*.so")] == [mtime]


_PORTABLE = """
import numpy as np, jax.numpy as jnp, itq3s_jax
from itq3s_jax._src.matmul import native
from tests import helpers
assert native.available(), native.unavailable_reason()
for fmt in native.FORMATS:
  qt = itq3s_jax.quantize(np.random.default_rng(0).standard_normal((9, 352)), fmt, seed=2)
  z = np.asarray(itq3s_jax.decode_rotated(qt))
  got = np.asarray(native._call(jnp.eye(z.shape[1], dtype=jnp.float32), qt))
  np.testing.assert_array_equal(got.T.view(np.uint32), z.view(np.uint32))
  x = np.random.default_rng(1).standard_normal((3, 352)).astype(np.float32)
  y = np.asarray(itq3s_jax.matmul(x, qt, method="cpu_native"))
  w64 = helpers.oracle_weights(qt)
  x64 = x.astype(np.float64)
  tol = 1.25 * (z.shape[1] + 9) * 2.0**-24 * np.outer(np.linalg.norm(x64, axis=-1),
                                                       np.linalg.norm(w64, axis=-1))
  assert (np.abs(y - x64 @ w64.T) <= tol).all(), fmt
print("ok")
"""


@pytest.mark.integration
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 targets")
@needs_kernel
def test_portable_code_without_avx2(tmp_path):
  """Built for plain x86-64 (no AVX2, no FMA) the scalar decoders run: the same decoded
  numbers bit for bit, and products within test_matches_float64_oracle's tolerance."""
  env = {**os.environ, "ITQ3S_CACHE_DIR": str(tmp_path), "ITQ3S_NATIVE_MARCH": "x86-64",
         "XLA_FLAGS": ""}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", _PORTABLE], env=env, capture_output=True,
                       text=True, timeout=600, check=False, cwd=root)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
