"""Every Pallas kernel cross-lowers for CUDA from a CPU-only machine (Triton custom call).

Interpret mode accepts programs the Triton backend rejects (scratch, slices,
gathers, non-power-of-two loads; benchmarks/KERNELS.md), so each interpret-mode test
has this twin. It proves jaxpr -> Triton IR; tests/kernel_report_test.py
compiles that IR on to cubin, and speed needs a GPU (benchmarks/gpu_check.sh).
The abstract mesh names a GPU device, which jax >= 0.11 requires for lowering
without one and 0.10.2 ignores.

Interpret mode follows the platform lowered for (``lax.platform_dependent``),
so the default ``interpret=None`` lowers to the Triton kernel for CUDA and to
the interpreter for CPU, from the same traced function; ``jax.export`` from
this CPU host for CUDA carries the kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice
from jax.sharding import AbstractMesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import itq3s_jax
from itq3s_jax._src.core import kernel_codec
from itq3s_jax.pallas_kernels import driver as _driver
from itq3s_jax.pallas_kernels import act_rotate
from itq3s_jax.pallas_kernels import weight_ifwht

try:
  from jax.sharding import use_abstract_mesh
except ImportError:  # older jax keeps it private
  from jax._src.mesh import use_abstract_mesh  # pylint: disable=g-import-not-at-top

TRITON_CALL = "__gpu$xla.gpu.triton"
KERNELS = {"weight_ifwht": weight_ifwht.weight_ifwht, "act_rotate": act_rotate.act_rotate}


def _gpu_mesh(n: int = 1) -> AbstractMesh:
  return AbstractMesh((n,), ("x",), abstract_device=AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))


def _lower_for_cuda(f, *args) -> str:
  with use_abstract_mesh(_gpu_mesh()):
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("fmt", sorted(kernel_codec.formats()))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_to_one_triton_call(name, fmt, dtype):
  """interpret=None (the default): the CUDA lowering holds the kernel, not the interpreter."""
  qt = itq3s_jax.quantize(np.random.default_rng(0).standard_normal((40, 576)), fmt)
  x = jnp.ones((3, 576), dtype)
  text = _lower_for_cuda(KERNELS[name], x, qt)
  assert text.count(TRITON_CALL) == 1
  assert f"itq3s_{name}" in text


def test_cpu_lowering_of_the_same_call_interprets():
  """The CPU lowering of the same default call has no Triton call (it runs on CPU)."""
  qt = itq3s_jax.quantize(np.random.default_rng(0).standard_normal((40, 576)), "itq3_t")
  x = jnp.ones((3, 576), jnp.bfloat16)
  text = jax.jit(KERNELS["act_rotate"]).trace(x, qt).lower(lowering_platforms=("cpu",)).as_text()
  assert TRITON_CALL not in text


@pytest.mark.parametrize("fmt", ["itq3_t", "itq3_s"])
def test_export_from_cpu_host_for_cuda_contains_the_kernel(fmt):
  """A user exporting a quantized matmul on a CPU host for GPU serving gets the kernel.

  Pallas' Triton custom call has no serialization-compatibility guarantee, so
  jax.export must be told to accept it (the exported artifact is then tied to
  this jax/XLA version, as any Pallas kernel is).
  """
  qt = itq3s_jax.quantize(np.random.default_rng(2).standard_normal((64, 512)), fmt)
  f = jax.jit(lambda x, d: itq3s_jax.matmul(x, qt.replace(data=d), method="act_rotate"))
  allow = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)]
  with use_abstract_mesh(_gpu_mesh()):
    exported = jax.export.export(f, platforms=["cuda"], disabled_checks=allow)(
        jax.ShapeDtypeStruct((2, 512), jnp.bfloat16), qt.data)
  text = exported.mlir_module()
  assert text.count(TRITON_CALL) == 1 and "itq3s_act_rotate" in text
  assert exported.platforms == ("cuda",)


@pytest.mark.parametrize("config", [_driver.heuristic(1, 8192, 8192),
                                    _driver.heuristic(256, 8192, 28672),
                                    _driver.Config(block_m=32, block_n=128, num_warps=8),
                                    _driver.Config(block_m=16, block_n=64, split_k=4)])
def test_benchmark_tilings_lower(config):
  """The tiles the heuristic picks for the benchmark shapes (and a wide one) lower too."""
  qt = itq3s_jax.quantize(np.random.default_rng(1).standard_normal((64, 1024)), "itq3_t")
  x = jnp.ones((5, 1024), jnp.bfloat16)
  for name, kernel in KERNELS.items():
    f = functools.partial(kernel, config=config)
    assert _lower_for_cuda(f, x, qt).count(TRITON_CALL) == 1, name


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_shard_map_with_varying_axes_lowers(name):
  """Under shard_map(check_vma=True) on 4 abstract GPUs the kernel declares its varying axes."""
  k = 512
  qt = itq3s_jax.quantize(np.random.default_rng(3).standard_normal((64, k)), "itq3_t")
  mesh = _gpu_mesh(4)

  def local(x, d):
    q = itq3s_jax.QuantizedTensor(data=d, format=qt.format, k=k, seed=qt.seed)
    return KERNELS[name](x, q)

  f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("x", None)), out_specs=P(None, "x"))
  x = jax.ShapeDtypeStruct((2, k), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
  d = jax.ShapeDtypeStruct(qt.data.shape, jnp.uint8, sharding=NamedSharding(mesh, P("x", None)))
  with use_abstract_mesh(mesh):
    text = jax.jit(f).trace(x, d).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count(TRITON_CALL) == 1
