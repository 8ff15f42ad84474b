"""Anchor numbers measured outside this package, recorded here once with their source.

rel-MSE = sum (w - w_hat)^2 / sum w^2 (float64) on the nine test tensors of
``itq3s_jax.testing`` (ids a..g3). All llama.cpp rows come from the ggml C
library (its quantize/dequantize functions, float64 metrics); "NULL" / "ones" = the
imatrix passed. The numpy rows (B1b, B2b, B3) are prototypes of the baselines.
This file is the record of these numbers; nothing here is recomputed.
``cos_metric`` is llama.cpp's test-quantize-fns metric sqrt(sum d^2)/n on
``testing.cos_data()``.
"""

from __future__ import annotations

import dataclasses

IDS = ("a", "b", "c", "d", "e", "f", "g1", "g2", "g3")


@dataclasses.dataclass(frozen=True)
class Anchor:
  name: str  # column title
  bpw: float
  source: str  # how the row was measured
  rel_mse: dict[str, float]  # tensor id -> rel-MSE
  cos_metric: float | None = None  # test-quantize-fns metric; None where not measured
  max_ratio: dict[str, float] | None = None  # max err / eps_q per tensor, bounded formats


def _row(*values: float) -> dict[str, float]:
  assert len(values) == len(IDS)
  return dict(zip(IDS, values))


ANCHORS: tuple[Anchor, ...] = (
    Anchor("Q2_K", 2.625, "ggml C library, imatrix NULL",
           _row(0.0880, 0.1234, 0.1106, 0.0848, 0.0543, 0.0443, 0.0959, 0.0903, 0.0917),
           cos_metric=0.004672),
    Anchor("IQ3_XXS", 3.0625, "ggml C library, imatrix NULL",
           _row(0.0454, 0.0811, 0.0588, 0.0596, 0.0369, 0.0381, 0.0534, 0.0463, 0.0469),
           cos_metric=0.004345),
    Anchor("IQ3_S", 3.4375, "ggml C library, imatrix NULL",
           _row(0.0276, 0.0488, 0.0357, 0.0357, 0.0204, 0.0198, 0.0334, 0.0283, 0.0287),
           cos_metric=0.003118),
    Anchor("Q3_K", 3.4375, "ggml C library, imatrix NULL",
           _row(0.0228, 0.0359, 0.0310, 0.0253, 0.0157, 0.0129, 0.0258, 0.0235, 0.0239),
           cos_metric=0.002510),
    Anchor("Q4_K", 4.5, "ggml C library, imatrix NULL",
           _row(0.0051, 0.0086, 0.0069, 0.0061, 0.0030, 0.0019, 0.0057, 0.0053, 0.0053),
           cos_metric=0.000982),
    Anchor("IQ3_S ones", 3.4375, "ggml C library, imatrix ones",
           _row(0.0188, 0.0351, 0.0241, 0.0261, 0.0159, 0.0150, 0.0236, 0.0192, 0.0194),
           cos_metric=0.002706),
    Anchor("Q3_K ones", 3.4375, "ggml C library, imatrix ones",
           _row(0.0209, 0.0339, 0.0288, 0.0239, 0.0140, 0.0116, 0.0238, 0.0216, 0.0219),
           cos_metric=0.002386),
    Anchor("ITQ3_S pub", 3.4375, "published ITQ3_S code, imatrix NULL",
           _row(0.0275, 0.0264, 0.0274, 0.0264, 0.0277, 0.0401, 0.0273, 0.0277, 0.0275),
           cos_metric=0.005003),
    Anchor("ITQ3_S pub ones", 3.4375, "published ITQ3_S code, imatrix ones",
           _row(0.0187, 0.0182, 0.0186, 0.0182, 0.0187, 0.0308, 0.0187, 0.0188, 0.0187),
           cos_metric=0.004084),
    Anchor("T9", 3.4375, "ITQ3_S prototype with PRNG signs",
           _row(0.0256, 0.0237, 0.0252, 0.0240, 0.0256, 0.0263, 0.0250, 0.0255, 0.0254),
           cos_metric=0.003685,
           max_ratio=_row(0.636, 0.637, 0.648, 0.636, 0.640, 0.624, 0.645, 0.637, 0.642)),
    Anchor("B1b", 3.0625, "numpy RTN {-4..3}, d = -m/4, no rotation",
           _row(0.0496, 0.1802, 0.1184, 0.1362, 0.0212, 0.0137, 0.0789, 0.0546, 0.0575),
           cos_metric=0.002595),
    Anchor("B2b", 3.0625, "numpy: B1b after the random-sign FWHT",
           _row(0.0495, 0.0450, 0.0484, 0.0455, 0.0501, 0.0457, 0.0485, 0.0492, 0.0494),
           cos_metric=0.004580),
    Anchor("B3", 3.2625, "numpy: rotated 9-level, searched scale",
           _row(0.0295, 0.0271, 0.0290, 0.0273, 0.0297, 0.0287, 0.0289, 0.0295, 0.0294),
           cos_metric=0.003685),
)

# Columns shown next to our formats by default (the rest are in --json).
DEFAULT_COLUMNS = ("IQ3_S", "Q3_K", "IQ3_S ones", "ITQ3_S pub", "T9", "B1b", "B2b")

# The same-named format of ours that each baseline row corresponds to.
COUNTERPARTS = {"uniform3": "B1b", "uniform3_rot": "B2b"}

# llama.cpp test-quantize-fns thresholds.
LLAMACPP_3BIT_BAR = 0.0040


@dataclasses.dataclass(frozen=True)
class Target:
  """An issue-2 target for itq3_t (source: `issues show 2`, "Targets")."""
  name: str
  limit: float


ITQ3_T_TARGETS = (
    Target("rel-MSE on every test tensor", 0.0256),
    Target("rel-MSE on a = N(0,1) (stretch, Q3_K's level)", 0.0228),
    Target("bits per weight", 3.4375),
    Target("llama.cpp cos metric", LLAMACPP_3BIT_BAR),
    Target("max err / certified bound (incl. float32 slack)", 1.0),
    Target("bits per weight at K = 576", 3.6),
)
# weights/s on the 2-core CPU (issue 2).
ITQ3_T_SPEED_TARGETS = {"quantize": 5e7, "dequantize": 2e8}


def by_name(name: str) -> Anchor:
  for a in ANCHORS:
    if a.name == name:
      return a
  raise KeyError(f"no anchor {name!r}; known: {[a.name for a in ANCHORS]}")
