"""The encoders' bytes are pinned: a refactor or a faster path must not change one byte.

The hashes were recorded with the encoders of the first release that had them
(commit cf4977a, before the architecture pass) and checked equal on jax 0.10 and
0.12. A deliberate format change updates them in the same commit, with the reason.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import testing

PINNED = {
    "iq3_s/a/0": "f4349215f367710f",
    "iq3_s/a/7": "f4349215f367710f",
    "iq3_s/b/0": "c51aeb31dd8f502e",
    "iq3_s/d/0": "f0c145016aa5c861",
    "iq3_s/e/0": "91b98bf5b28b556a",
    "iq3_s/f/0": "dd688ce968687112",
    "iq3_s/tail480/0": "95bcbfee25a25663",
    "iq3_s/tail480_gptq/0": "91843b615cb17056",
    "iq3_s/tail480_imp/0": "81dd01c049194b7f",
    # iq4_nl: added with the format (issue 17), re-pinned when its candidate errors got a
    # fixed summation order and FMA-proof roundings (jit/vmap and XLA's optimization level
    # chose different scales on near-ties); the same on jax 0.10 and 0.12, with or without
    # FMA (--xla_cpu_max_isa=AVX) and at --xla_backend_optimization_level=0.
    "iq4_nl/a/0": "08d529599118f1c2",
    "iq4_nl/a/7": "08d529599118f1c2",
    "iq4_nl/b/0": "0a5d90f306cc3366",
    "iq4_nl/d/0": "7e62452fa91e64f7",
    "iq4_nl/e/0": "f2e9caaded1b52f9",
    "iq4_nl/f/0": "a99546799d5e9ac3",
    "iq4_nl/tail480/0": "be1e523e6b397465",
    "iq4_nl/tail480_gptq/0": "ca17f98cf8aab1bb",
    "iq4_nl/tail480_imp/0": "a0e841920c6be00d",
    "itq3_s/a/0": "301195441fa188f8",
    "itq3_s/a/7": "301195441fa188f8",
    "itq3_s/b/0": "cf29b182a23dfed1",
    "itq3_s/d/0": "797b883a5331e5ee",
    "itq3_s/e/0": "b18bb51523d75d3a",
    "itq3_s/f/0": "a3a4239686b406e8",
    "itq3_s/tail480/0": "14d422b6e61ce7bb",
    "itq3_s/tail480_gptq/0": "d0a2b9edfc3e5a7f",
    "itq3_s/tail480_imp/0": "14d422b6e61ce7bb",
    "itq3_t/a/0": "bd85544b23910ce1",
    "itq3_t/a/7": "11cb1200a21237bd",
    "itq3_t/b/0": "25861966b887707e",
    "itq3_t/d/0": "0699bcb5cf1d0ada",
    "itq3_t/e/0": "73ce943c7788dcd3",
    "itq3_t/f/0": "2dad82f9c576914b",
    "itq3_t/tail480/0": "3faa1b831519760c",
    "itq3_t/tail480_gptq/0": "8e705c8a25091793",
    "itq3_t/tail480_gptq_unres/0": "64ce649eeb583242",
    "itq3_t/tail480_imp/0": "3faa1b831519760c",
    "uniform3/a/0": "0de8304148648de7",
    "uniform3/a/7": "0de8304148648de7",
    "uniform3/b/0": "7dd3f86d75297a12",
    "uniform3/d/0": "cd2e55fd5a9d2f06",
    "uniform3/e/0": "ba492f7aa54cbcba",
    "uniform3/f/0": "a69c5f4d1e78f8db",
    "uniform3/tail480/0": "a03179ea95131518",
    "uniform3/tail480_gptq/0": "a9e76cfe5181a50e",
    "uniform3/tail480_gptq_unres/0": "4b9fcc54049f0300",
    "uniform3/tail480_imp/0": "a03179ea95131518",
    "uniform3_rot/a/0": "dde704b575344f0c",
    "uniform3_rot/a/7": "f1aa2f994713e4a1",
    "uniform3_rot/b/0": "9568e1835f255cfd",
    "uniform3_rot/d/0": "243b60440e115d48",
    "uniform3_rot/e/0": "72b068cad564fff4",
    "uniform3_rot/f/0": "90d1048e29f36a01",
    "uniform3_rot/tail480/0": "9a8d0658ccb9e511",
    "uniform3_rot/tail480_gptq/0": "af3f7b5982551a7d",
    "uniform3_rot/tail480_gptq_unres/0": "3373b792b118ac20",
    "uniform3_rot/tail480_imp/0": "9a8d0658ccb9e511",
}


def _cases():
  for tid, w in testing.test_tensors(["a", "b", "d", "e", "f"], rows=8).items():
    yield tid, w, {}
  rng = np.random.default_rng(1)
  w = rng.standard_normal((8, 480)).astype(np.float32)
  yield "tail480", w, {}
  yield "tail480_imp", w, {"importance": rng.uniform(0.1, 2.0, 480).astype(np.float32)}
  x = rng.standard_normal((600, 480)).astype(np.float32) * np.linspace(0.2, 3, 480).astype(
      np.float32)
  h = (x.T @ x / 600).astype(np.float32)
  yield "tail480_gptq", w, {"hessian": h}
  yield "tail480_gptq_unres", w, {"hessian": h,
                                  "gptq": itq3s_jax.GptqConfig(rounding="unrestricted")}


def _keys():
  for name, w, kw in _cases():
    for fmt in itq3s_jax.formats():
      if "gptq" in kw and itq3s_jax.get_format(fmt).snap is not None:
        continue  # unrestricted is the default of codebook formats: same as tail480_gptq
      for seed in (0, 7) if name == "a" else (0,):
        yield f"{fmt}/{name}/{seed}", w, fmt, seed, kw


@pytest.mark.parametrize("fmt", itq3s_jax.formats())
def test_encoded_bytes_are_pinned(fmt):
  got = {}
  for key, w, f, seed, kw in _keys():
    if f == fmt:
      qt = itq3s_jax.quantize(w, f, seed=seed, **kw)
      got[key] = hashlib.sha256(np.asarray(qt.data).tobytes()).hexdigest()[:16]
  want = {k: v for k, v in PINNED.items() if k.startswith(fmt + "/")}
  assert got == want
