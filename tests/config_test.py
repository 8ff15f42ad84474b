"""Typed configuration: QuantRule.decide (shared by surgery and conversion) and GptqConfig."""

from __future__ import annotations

import numpy as np
import pytest

import itq3s_jax


@pytest.mark.parametrize("name,shape,dtype,kw,want", [
    ("a.q_proj.weight", (64, 256), np.float32, {}, "quantized"),
    ("a.q_proj.weight", (64, 256), np.int32, {}, "kept: int32"),
    ("a.norm.weight", (256,), np.float32, {}, "kept: 1-D"),
    ("embed_tokens.weight", (64, 256), np.float32, {}, "kept: embedding"),
    ("embed_tokens.weight", (64, 256), np.float32, {"quantize_embeddings": True}, "quantized"),
    ("lm_head.weight", (64, 256), np.float32, {}, "kept: embedding"),
    ("output.weight", (64, 256), np.float32, {}, "kept: embedding"),
    ("a.q_proj.weight", (8, 32), np.float32, {"min_size": 4096}, "kept: fewer than"),
    ("a.q_proj.weight", (8, 32), np.float32, {}, "quantized"),
    ("a.q_proj.weight", (0, 256), np.float32, {}, "kept: empty"),
    ("a.q_proj.weight", (64, 250), np.float32, {}, "kept: K=250"),
    ("a.q_proj.weight", (64, 256), np.float32, {"exclude": "q_proj"}, "kept: matches exclude"),
    ("a.k_proj.weight", (64, 256), np.float32, {"include": "q_proj"}, "kept: does not match"),
])
def test_rule_table(name, shape, dtype, kw, want):
  d = itq3s_jax.QuantRule(**kw).decide(name, shape, np.dtype(dtype))
  assert d.reason.startswith(want), d.reason
  assert d.quantize == want.startswith("quantized")


def test_rule_k_axis_of_flax_kernels():
  p = itq3s_jax.QuantRule()
  assert p.decide("d/kernel", (256, 100), np.dtype(np.float32), k_axis=0).quantize
  assert not p.decide("d/kernel", (100, 256), np.dtype(np.float32), k_axis=0).quantize


@pytest.mark.parametrize("kw,err,match", [
    (dict(format="q9"), ValueError, "unknown format"),
    (dict(seed=-1), ValueError, "seed=-1"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
    (dict(include="("), ValueError, "not a valid regex"),
    (dict(exclude=3), TypeError, "exclude must be a regex string"),
    (dict(min_size=-1), ValueError, "min_size=-1"),
])
def test_bad_rules_raise(kw, err, match):
  with pytest.raises(err, match=match):
    itq3s_jax.QuantRule(**kw)


@pytest.mark.parametrize("kw,err,match", [
    (dict(rounding="stochastic"), ValueError, "unknown rounding"),
    (dict(rounding="nearest"), ValueError, "unknown rounding"),
    (dict(scales="joint"), ValueError, "unknown scales"),
    (dict(damp=0.0), ValueError, "damp=0.0 must be"),
    (dict(damp=float("nan")), ValueError, "damp=nan must be"),
    (dict(act_order=1), TypeError, "act_order must be a bool"),
])
def test_bad_gptq_configs_raise(kw, err, match):
  with pytest.raises(err, match=match):
    itq3s_jax.GptqConfig(**kw)


def test_gptq_rounding_resolves_per_format():
  assert itq3s_jax.GptqConfig().resolve("itq3_t").rounding == "two_neighbour"
  assert itq3s_jax.GptqConfig().resolve("iq3_s").rounding == "unrestricted"
  with pytest.raises(ValueError, match="rounding='unrestricted'"):
    itq3s_jax.GptqConfig(rounding="two_neighbour").resolve("itq3_s")


def test_rule_with_several_contracted_axes():
  """LinearGeneral/Einsum kernels: K is the product of the contracted axes, any rank."""
  p = itq3s_jax.QuantRule()
  f32 = np.dtype(np.float32)
  assert p.decide("ein/kernel", (4, 16, 64), f32, k_axis=(0, 1)).quantize  # K = 64
  d = p.decide("ein/kernel", (64, 2, 16), f32, k_axis=(1, 2))  # K = 32, N = 64
  assert d.quantize
  assert p.decide("ein/kernel", (64, 2, 8), f32, k_axis=(1, 2)).reason.startswith("kept: K=16")
  assert p.decide("w", (8, 32), f32, k_axis=(0, 1)).reason == (
      "kept: every axis is contracted (no output axis)")
  assert p.decide("b", (64,), f32, k_axis=(0,)).reason.startswith("kept: 1-D")
  assert p.decide("w3", (4, 16, 64), f32, k_axis=0).reason.startswith("kept: 3-D")
  with pytest.raises(ValueError, match="names an axis twice"):
    p.decide("w", (8, 32), f32, k_axis=(1, -1))
  with pytest.raises(ValueError, match="must name axes"):
    p.decide("w", (8, 32), f32, k_axis=(2,))
