"""Every private qwix name this package uses, in one place (pinned: qwix 0.1.8).

qwix's public API has no way to add a weight type, so the provider plugs in
through ``PtqProvider``'s private extension keywords (``_qarray_module``,
``_dot_general_fn``, ``_einsum_fn``) and ``quantize_params``'s
``_qarray_module``, delegates other types to qwix's own qarray/dot_general/
einsum, and runs its own kernels with qwix's interception switched off.
``tests/qwix_test.py::test_private_hooks_are_where_we_expect`` fails loudly
when a qwix release moves or renames any of these.
"""

from __future__ import annotations

import inspect

import qwix
from qwix._src import interception
from qwix._src.core import dot_general as _dot_general
from qwix._src.core import einsum as _einsum
from qwix._src.core import qarray as _qarray
from qwix._src.providers import ptq as _ptq

TESTED_QWIX = "0.1.8"

HowToQuantize = _qarray.HowToQuantize
WithAux = _ptq.WithAux
qarray_module = _qarray  # qwix's own quantize/calibrate/... for its types
qwix_dot_general = _dot_general.dot_general
qwix_einsum = _einsum.einsum
disable_interceptions = interception.disable_interceptions

PROVIDER_KEYWORDS = ("_qarray_module", "_dot_general_fn", "_einsum_fn")
QUANTIZE_PARAMS_KEYWORDS = ("_qarray_module",)


def check() -> None:
  """Raises ImportError naming what moved if this qwix lacks a hook we rely on."""
  missing = []
  provider = inspect.signature(qwix.PtqProvider.__init__).parameters
  missing += [f"PtqProvider({k}=)" for k in PROVIDER_KEYWORDS if k not in provider]
  qp = inspect.signature(qwix.quantize_params).parameters
  missing += [f"quantize_params({k}=)" for k in QUANTIZE_PARAMS_KEYWORDS if k not in qp]
  fields = getattr(HowToQuantize, "__dataclass_fields__", {})
  missing += [f"HowToQuantize.{f}" for f in ("qtype", "channelwise_axes", "tiled_axes")
              if f not in fields]
  if {"array", "how"} - set(getattr(WithAux, "__dataclass_fields__", {})):
    missing.append("WithAux(array, how)")
  if missing:
    raise ImportError(f"qwix {getattr(qwix, '__version__', '?')} lacks the private hooks "
                      f"itq3s_jax.qwix uses (tested with {TESTED_QWIX}): {missing}.")


def init_ptq_provider(provider, rules, *, qarray_module, dot_general_fn, einsum_fn, **kwargs):
  """Runs ``qwix.PtqProvider.__init__`` on ``provider`` with our array type and contractions."""
  qwix.PtqProvider.__init__(provider, rules, _qarray_module=qarray_module,
                            _dot_general_fn=dot_general_fn, _einsum_fn=einsum_fn, **kwargs)


def quantize_params(params, abstract, *, qarray_module, **kwargs):
  return qwix.quantize_params(params, abstract, _qarray_module=qarray_module, **kwargs)
