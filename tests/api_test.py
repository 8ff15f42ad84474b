"""The public surface: __all__ documented and re-exported only; the ``itq3s accuracy`` command.

Every ``>>>`` example of the package runs as a doctest (``--doctest-modules`` in
pyproject.toml collects ``itq3s_jax``).
"""

from __future__ import annotations

import ast
import inspect
import json

import numpy as np
import pytest

import itq3s_jax
from itq3s_jax import cli
from itq3s_jax import testing
from itq3s_jax._src.commands import accuracy


def test_all_is_sorted_unique_and_importable():
  assert list(itq3s_jax.__all__) == sorted(set(itq3s_jax.__all__))
  for name in itq3s_jax.__all__:
    assert hasattr(itq3s_jax, name), name


@pytest.mark.parametrize("name", itq3s_jax.__all__)
def test_every_public_name_has_a_docstring(name):
  doc = inspect.getdoc(getattr(itq3s_jax, name))
  assert doc and len(doc.strip()) > 10, f"itq3s_jax.{name} has no docstring"


def test_public_init_only_re_exports():
  tree = ast.parse(inspect.getsource(itq3s_jax))
  defs = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
  assert not defs, f"itq3s_jax/__init__.py defines {defs}; define them in _src"


# ------------------------------------------------------------ itq3s accuracy


def _run(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_accuracy_command_prints_the_table(capsys):
  code, out, err = _run(capsys, "accuracy", "--rows", "2", "--tensors", "a", "f",
                        "--formats", "uniform3")
  assert code == 0, err
  lines = out.splitlines()
  assert "1 formats x 2 test tensors (2 evenly spaced rows" in lines[0]
  assert lines[1].split() == ["tensor", "uniform3"]
  for label in ("a  N(0,1)", "f  cos", "bpw", "bpw K=576", "max err/eps", "bound holds",
                "cos metric"):
    assert any(line.startswith(label) for line in lines), label


def test_accuracy_command_json(capsys):
  code, out, _ = _run(capsys, "accuracy", "--rows", "2", "--tensors", "e", "--formats",
                      "uniform3", "--json")
  assert code == 0
  doc = json.loads(out)
  (res,) = doc["results"]
  assert res["format"] == "uniform3" and res["tensor"] == "e" and res["shape"] == [2, 4096]
  assert res["bound_holds"] is True and 0 < res["rel_mse"] < 1
  (summ,) = doc["formats"]
  assert summ["format"] == "uniform3" and summ["cos_metric"] > 0


@pytest.mark.parametrize("argv, match", [
    (["--formats", "bogus"], "unknown format(s) ['bogus']"),
    (["--tensors", "zz"], "unknown tensor id(s) ['zz']"),
    (["--rows", "-1"], "--rows -1 must be >= 0"),
    (["--seed", "-2"], "--seed -2 must be >= 0"),
])
def test_accuracy_command_user_errors_are_one_line(capsys, argv, match):
  code, out, err = _run(capsys, "accuracy", *argv)
  assert code == 2 and not out
  assert err.count("\n") == 1 and match in err and err.startswith("itq3s accuracy: error:")


def test_measure_equals_quantizing_the_tensor_directly():
  # The command codes (R*K/256, 256) block rows; the numbers must be those of the tensor.
  w = testing.test_tensor("c", rows=3)
  (res,), (summ,) = accuracy.measure(["uniform3_rot"], {"c": w}, seed=1)
  qt = itq3s_jax.quantize(w, "uniform3_rot", seed=1)
  w_hat = np.asarray(itq3s_jax.dequantize(qt))
  assert res.rel_mse == pytest.approx(testing.rel_mse(w, w_hat), rel=1e-12)
  assert res.bpw == qt.bits_per_weight
  err = np.linalg.norm((w.astype(np.float64) - w_hat).reshape(-1, 256), axis=-1)
  eps = np.asarray(itq3s_jax.error_bound(qt, include_rounding=False), np.float64).reshape(-1)
  assert res.max_ratio == pytest.approx(np.max(err / eps), rel=1e-6)
  x = testing.cos_data()
  x_hat = np.asarray(itq3s_jax.dequantize(itq3s_jax.quantize(x[None], "uniform3_rot", seed=1)))
  assert summ.cos_metric == pytest.approx(testing.llamacpp_metric(x, x_hat[0]), rel=1e-12)
