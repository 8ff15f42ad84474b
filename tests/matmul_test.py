"""``itq3s_jax.matmul``: both XLA methods vs a float64 oracle, dispatch, jit, shard_map.

Oracle: the coding-domain values (decode_rotated: exact float32 numbers) are
inverse-transformed in float64 with scipy's Hadamard matrix, so it shares no
transform code with the library. Tolerances (Cauchy-Schwarz as in
pallas_kernels_test.py, u = 2^-24):
  * "xla" (dequantize, dot): float32 dequantize (8 butterfly stages, <= 8 u per
    element relative to the block norm, i.e. <= 128 u ||x|| ||w|| in the dot)
    plus K float32 accumulations: 1.25 (K + 128) u ||x_m|| ||w_n||;
  * "xla_act_rotate" (rotate x, dot with z_hat; proofs T6): the rotation errs by
    <= phi(n) ||x_b|| per block (T1; phi <= 9 u for n <= 256, odd log2 n
    included), the decoded z_hat is exact, and the Kp-term float32 dot adds
    <= Kp u sum |z_hat| |x_rot| <= Kp u (1 + phi) ||z_hat|| ||x||; with
    ||z_hat_n|| = ||w_n|| (orthonormal): 1.25 (Kp + 9) u ||x_m|| ||w_n||.
"""

from __future__ import annotations

import dataclasses


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import itq3s_jax
from itq3s_jax._src import codec
from itq3s_jax._src.core import registry
from itq3s_jax._src.matmul import api as matmul_lib
from itq3s_jax._src.matmul import xla as xla_matmul
from tests import helpers

_U32 = 2.0**-24
METHODS = ("xla", "xla_act_rotate", "cpu_native", "weight_ifwht", "act_rotate")


def _weights(n, k, seed=0):
  return np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)


@pytest.mark.parametrize("fmt", ["itq3_t", "uniform3", "uniform3_rot"])
@pytest.mark.parametrize("k", [256, 576, 992])
def test_xla_matches_float64_oracle(fmt, k):
  qt = itq3s_jax.quantize(_weights(12, k), fmt, seed=7)
  x = np.random.default_rng(k).standard_normal((2, 5, k)).astype(np.float32)
  w64 = helpers.oracle_weights(qt)
  x64 = x.reshape(-1, k).astype(np.float64)
  y = np.asarray(itq3s_jax.matmul(x, qt, method="xla")).reshape(-1, 12)
  tol = 1.25 * (k + 128) * _U32 * np.outer(np.linalg.norm(x64, axis=-1),
                                            np.linalg.norm(w64, axis=-1))
  assert (np.abs(y - x64 @ w64.T) <= tol).all()


@pytest.mark.parametrize("fmt", itq3s_jax.formats())
def test_act_rotate_matches_float64_oracle_on_every_format(fmt):
  """Tails (pow2: 256 + 64 + 32; pad256: a zero-padded last block), M = 1 and batched x."""
  k = 352
  qt = itq3s_jax.quantize(_weights(12, k), fmt, seed=7)
  kp = -(-k // 256) * 256 if itq3s_jax.get_format(fmt).tail == "pad256" else k
  w64 = helpers.oracle_weights(qt)
  for x in (np.random.default_rng(1).standard_normal((1, k)),
            np.random.default_rng(2).standard_normal((2, 3, k))):
    x = x.astype(np.float32)
    y = np.asarray(itq3s_jax.matmul(x, qt, method="xla_act_rotate")).reshape(-1, 12)
    x64 = x.reshape(-1, k).astype(np.float64)
    tol = 1.25 * (kp + 9) * _U32 * np.outer(np.linalg.norm(x64, axis=-1),
                                            np.linalg.norm(w64, axis=-1))
    assert (np.abs(y - x64 @ w64.T) <= tol).all()


@pytest.mark.parametrize("m", [3, 1])  # one activation row: its own tile size (MATVEC_TILE)
def test_act_rotate_tiles_rows_and_pads_the_last_tile(monkeypatch, m):
  """Several decode tiles (the last one zero-padded) are, like one tile, within the act_rotate
  tolerance of the float64 product (not bit for bit: XLA's dot may order the K sum differently
  for another tile width)."""
  qt = itq3s_jax.quantize(_weights(44, 288, seed=3), "itq3_t", seed=1)
  x = np.random.default_rng(4).standard_normal((m, 288)).astype(np.float32)
  # A fresh function each time: traces are cached by function and shapes, not by module constants.
  fresh = lambda: lambda x, qt: xla_matmul.act_rotate_dot(x, qt)  # noqa: E731
  mapped = lambda: "scan" in str(jax.make_jaxpr(fresh())(x, qt))  # noqa: E731
  whole = np.asarray(jax.jit(fresh())(x, qt))
  assert not mapped()  # one tile
  # 16 rows a tile: 3 tiles (lax.map), 4 pad rows
  monkeypatch.setattr(*((xla_matmul, "MATVEC_TILE") if m == 1 else (codec, "DECODE_TILE")),
                      16 * 288)
  assert codec.tile_rows(44, 288, 16 * 288) == 16 and mapped()
  tiled = np.asarray(jax.jit(fresh())(x, qt))
  w64, x64 = helpers.oracle_weights(qt), x.astype(np.float64)
  tol = 1.25 * (288 + 9) * _U32 * np.outer(np.linalg.norm(x64, axis=-1),
                                           np.linalg.norm(w64, axis=-1))
  for y in (whole, tiled):
    assert (np.abs(y - x64 @ w64.T) <= tol).all()


def test_accelerators_decode_in_one_tile(monkeypatch):
  """Off CPU the tiles run one after another with their own launches (measured on an H200),
  so a weight the CPU tiles at every M decodes in one tile there."""
  assert codec.tile_values("cpu") == codec.DECODE_TILE
  assert codec.tile_values("gpu") == codec.tile_values("tpu") == codec.ACCEL_DECODE_TILE
  qt = itq3s_jax.quantize(_weights(44, 288, seed=3), "itq3_t", seed=1)
  monkeypatch.setattr(xla_matmul, "MATVEC_TILE", 16 * 288)
  monkeypatch.setattr(codec, "DECODE_TILE", 16 * 288)
  traced = lambda x: str(jax.make_jaxpr(  # noqa: E731  (a fresh function: no trace cache)
      lambda x, qt: xla_matmul.act_rotate_dot(x, qt))(x, qt))
  for m in (1, 3):
    x = np.ones((m, 288), np.float32)
    assert "scan" in traced(x)  # 3 tiles on CPU
    with monkeypatch.context() as gpu:
      gpu.setattr(jax, "default_backend", lambda: "gpu")
      assert "scan" not in traced(x)


@pytest.mark.parametrize("fmt", itq3s_jax.formats())
def test_prepared_decode_tiles_give_the_same_product(fmt, monkeypatch):
  """decode_tiles hands act_rotate_dot the bytes it would rearrange itself: same result bit
  for bit, on a weight cut into several tiles; tiles of another shape are refused."""
  monkeypatch.setattr(xla_matmul, "MATVEC_TILE", 16 * 288)  # 44 rows: several tiles at M = 1
  qt = itq3s_jax.quantize(_weights(44, 288, seed=3), fmt, seed=1)
  x = np.random.default_rng(4).standard_normal((1, 288)).astype(np.float32)
  tiles = xla_matmul.decode_tiles(qt, 1)
  assert tiles[0].shape[0] > 1
  f = jax.jit(xla_matmul.act_rotate_dot)
  np.testing.assert_array_equal(np.asarray(f(x, qt, tiles)).view(np.uint32),
                                np.asarray(f(x, qt)).view(np.uint32))
  other = itq3s_jax.quantize(_weights(8, 288, seed=3), fmt, seed=1)  # one tile of 8 rows
  with pytest.raises(ValueError, match="decode_tiles"):
    xla_matmul.act_rotate_dot(x, qt, xla_matmul.decode_tiles(other, 1))


@pytest.mark.parametrize("n,k,m", [(0, 256, 2), (4, 0, 2), (4, 256, 0)])
def test_act_rotate_empty_shapes(n, k, m):
  qt = itq3s_jax.quantize(np.ones((n, k), np.float32), "itq3_t")
  y = itq3s_jax.matmul(np.ones((m, k), np.float32), qt, method="xla_act_rotate")
  assert y.shape == (m, n) and y.dtype == jnp.float32
  np.testing.assert_array_equal(y, np.zeros((m, n), np.float32))


def test_auto_is_xla_act_rotate_off_gpu_without_the_native_kernel(monkeypatch):
  """(With it, CPU dispatch is native_test.py's.)"""
  monkeypatch.setattr(matmul_lib.native, "available", lambda: False)
  qt = itq3s_jax.quantize(_weights(8, 256), "itq3_t")
  x = jax.ShapeDtypeStruct((4, 256), jnp.float32)
  assert matmul_lib.choose(x, qt, backend="cpu") == "xla_act_rotate"
  assert matmul_lib.choose(x, qt, backend="tpu") == "xla_act_rotate"
  if jax.default_backend() != "cpu":  # the rest is what auto runs on this CPU
    return
  y = itq3s_jax.matmul(np.ones((4, 256), np.float32), qt)
  np.testing.assert_array_equal(y, itq3s_jax.matmul(np.ones((4, 256), np.float32), qt,
                                                    method="xla_act_rotate"))


def test_auto_on_gpu_picks_the_measured_kernel_and_falls_back(monkeypatch):
  qt = itq3s_jax.quantize(_weights(8, 288), "uniform3")  # 2 terms x 128 slots: no widening
  wide = itq3s_jax.quantize(_weights(8, 288), "itq3_t")  # 4 x 128: a dot twice as wide
  small = jax.ShapeDtypeStruct((2, matmul_lib.AUTO_GEMV_ROWS // 2, 288), jnp.bfloat16)
  mid = jax.ShapeDtypeStruct((matmul_lib.AUTO_GEMV_ROWS + 1, 288), jnp.bfloat16)
  top = jax.ShapeDtypeStruct((matmul_lib.AUTO_MAX_ROWS, 288), jnp.bfloat16)
  big = jax.ShapeDtypeStruct((matmul_lib.AUTO_MAX_ROWS + 1, 288), jnp.bfloat16)
  assert matmul_lib.choose(small, qt, backend="gpu") == "act_rotate"
  assert matmul_lib.choose(small, wide, backend="gpu") == "act_rotate"
  for x in (mid, top):
    assert matmul_lib.choose(x, qt, backend="gpu") == "act_rotate"
    assert matmul_lib.choose(x, wide, backend="gpu") == "weight_ifwht"
  assert matmul_lib.choose(big, qt, backend="gpu") == "xla"
  assert matmul_lib.choose(big, wide, backend="gpu") == "xla"
  tiny_k = itq3s_jax.quantize(_weights(8, 128), "itq3_t")
  assert matmul_lib.choose(jax.ShapeDtypeStruct((1, 128), jnp.float32), tiny_k,
                           backend="gpu") == "xla"
  monkeypatch.setitem(registry._REGISTRY, "uniform3", dataclasses.replace(
      registry.get_format("uniform3"), kernel_codec=None))  # a format without a decoder (itq3_s)
  assert matmul_lib.choose(small, qt, backend="gpu") == "xla"
  with pytest.raises(NotImplementedError, match="no kernel decoder"):
    itq3s_jax.matmul(np.ones((1, 288), np.float32), qt, method="act_rotate")


@pytest.mark.parametrize("kw,match", [
    (dict(method="cuda"), "unknown matmul method"),
    (dict(k=128), "x has K=128"),
])
def test_errors(kw, match):
  qt = itq3s_jax.quantize(_weights(4, 256), "itq3_t")
  x = np.ones((1, kw.get("k", 256)), np.float32)
  with pytest.raises(ValueError, match=match):
    itq3s_jax.matmul(x, qt, method=kw.get("method", "xla"))


def test_three_dim_weight_rejected():
  qt = itq3s_jax.quantize(_weights(8, 256).reshape(2, 4, 256), "itq3_t")
  with pytest.raises(ValueError, match="2-D weight"):
    itq3s_jax.matmul(np.ones((1, 256), np.float32), qt)


@pytest.mark.parametrize("method", METHODS)
def test_methods_agree_under_jit_without_recompiling(method):
  if method == "cpu_native" and not matmul_lib.native.available():
    pytest.skip(f"native CPU kernel unavailable: {matmul_lib.native.unavailable_reason()}")
  qt = itq3s_jax.quantize(_weights(20, 320, seed=1), "itq3_t", seed=2)
  rng = np.random.default_rng(3)
  x1, x2 = (rng.standard_normal((3, 320)).astype(np.float32) for _ in range(2))
  # jax 0.12 retraces an enclosing jit once after the first Pallas call of a
  # process (jax-side state); one eager call first makes this test order-independent.
  itq3s_jax.matmul(x1, qt, method=method)
  traces = []

  @jax.jit
  def f(x, qt):
    traces.append(1)
    return itq3s_jax.matmul(x, qt, method=method)

  w64 = np.asarray(itq3s_jax.dequantize(qt), np.float64)
  for x in (x1, x2):
    x64 = x.astype(np.float64)
    # Pallas methods: tolerance of pallas_kernels_test.py (K + 256) u; xla: (K + 128) u;
    # xla_act_rotate: (Kp + 9) u (module docstring), all within the first.
    tol = 1.25 * (320 + 256) * _U32 * np.outer(np.linalg.norm(x64, axis=-1),
                                                np.linalg.norm(w64, axis=-1))
    assert (np.abs(np.asarray(f(x, qt)) - x64 @ w64.T) <= tol).all()
  assert len(traces) == 1


@pytest.mark.parametrize("method", [
    "xla", pytest.param("weight_ifwht", marks=pytest.mark.kernel),
    pytest.param("act_rotate", marks=pytest.mark.kernel)])
def test_shard_map_weight_sharded_along_n(method):
  if jax.device_count() < 8:
    pytest.skip(f"needs 8 devices (conftest.py sets them on CPU), got {jax.device_count()}")
  k = 576
  w = np.random.default_rng(0).standard_normal((8 * 5, k)).astype(np.float32)
  qt = itq3s_jax.quantize(w, "itq3_t", seed=4)
  x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
  mesh = jax.make_mesh((8,), ("x",))
  data = jax.device_put(qt.data, jax.sharding.NamedSharding(mesh, P("x", None)))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, P()))
  w64 = np.asarray(itq3s_jax.dequantize(qt), np.float64)
  want = x.astype(np.float64) @ w64.T
  # Error model of pallas_kernels_test.py: 1.25 (K + 256) u ||x_m|| ||w_n||.
  tol = 1.25 * (k + 256) * _U32 * np.outer(np.linalg.norm(x, axis=-1),
                                           np.linalg.norm(w64, axis=-1))

  def local(x, d):  # each device holds N/8 weight rows
    return itq3s_jax.matmul(x, qt.replace(data=d), method=method)

  # check_vma=False for Pallas: jax's Pallas *interpreter* mixes varying and invariant
  # values in its grid loop carry (ValueError in jax 0.10.2); compiled GPU kernels
  # declare the output's varying axes instead (driver.fused).
  f = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("x", None)),
                            out_specs=P(None, "x"), check_vma=method == "xla"))
  y = f(xs, data)
  assert y.sharding.spec == P(None, "x"), y.sharding
  assert (np.abs(np.asarray(y) - want) <= tol).all()
