"""``x @ dequantize(qt).T`` on the CPU by a native kernel that decodes inside the product.

Method ``"cpu_native"``: the act_rotate algebra of ``xla.act_rotate_dot`` (rotate
the activations in XLA, multiply by coding-domain values), but the codes are
decoded block by block inside a C++ loop (``cpu_dot.cc``, XLA FFI custom calls
on the CPU) instead of being written out by XLA and read back by a dot.
Formats: ``itq3_t`` (its own decoder), ``itq3_s`` and ``iq3_s`` (the IQ3_S
decoder; the rotation, or none, is the XLA side's). Rows of x: any; the decode
is shared by every row.

The kernel is built the first time it is needed, with the machine's C++
compiler (``$CXX``, else ``c++``/``g++``/``clang++``; ``-march=native`` unless
``$ITQ3S_NATIVE_MARCH`` names another target) against the installed
jaxlib's FFI headers, and cached in ``$ITQ3S_CACHE_DIR`` (default
``~/.cache/itq3s_jax``) under a key of the source, the headers, the compiler
and the CPU, so a later process only loads it. :func:`available` says whether
it could be built and why not; without it ``matmul``'s ``"auto"`` keeps the
XLA method. ``ITQ3S_NATIVE=0`` switches it off.

Gradients flow to x (``jax.custom_vjp``: the backward pass is the transpose of
``xla.act_rotate_dot``), so models using it can still be tuned.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np

from itq3s_jax._src import codec
from itq3s_jax._src.core import qtensor
from itq3s_jax._src.formats import iq3s_grid
from itq3s_jax._src.formats import itq3_t
from itq3s_jax._src.matmul import xla

# format -> the library symbol of its handler (cpu_dot.cc) and the table it reads. itq3_s and
# iq3_s share the IQ3_S decoder; their rotations differ on the XLA side only.
_IQ3S = ("Iq3sCpuDot", lambda: iq3s_grid.grid().reshape(-1))
_DECODERS = {
    "itq3_t": ("Itq3tCpuDot", lambda: np.concatenate([itq3_t.SUPER, itq3_t.MULT])),
    "itq3_s": _IQ3S,
    "iq3_s": _IQ3S,
}
FORMATS = tuple(_DECODERS)
SOURCE = pathlib.Path(__file__).with_name("cpu_dot.cc")
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")


def _flags() -> tuple[str, ...]:
  """FLAGS and the target: -march=native, or $ITQ3S_NATIVE_MARCH (e.g. x86-64, which has no
  AVX2: the portable scalar code, tested so)."""
  return (*FLAGS, f"-march={os.environ.get('ITQ3S_NATIVE_MARCH', 'native')}")

_lock = threading.Lock()
_state: dict[str, object] = {}


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_key() -> str:
  """What -march=native compiles for: the CPU's model and flags where Linux says."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
    lines = sorted({l for l in info if l.startswith(("flags", "model name", "Features"))})
  except OSError:
    lines = []
  return "\n".join([platform.machine(), platform.processor(), *lines])


def _cache_dir() -> pathlib.Path:
  base = os.environ.get("ITQ3S_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "itq3s_jax")
  return pathlib.Path(base)


def _build() -> pathlib.Path:
  """Compiles the kernel (or finds it in the cache); RuntimeError saying why not."""
  cxx = _compiler()
  if cxx is None:
    raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
  include = pathlib.Path(jax.ffi.include_dir())
  header = include / "xla" / "ffi" / "api"
  h = hashlib.sha256()
  for part in (SOURCE.read_bytes(), *(p.read_bytes() for p in sorted(header.glob("*.h"))),
               cxx.encode(), " ".join(_flags()).encode(), _cpu_key().encode()):
    h.update(hashlib.sha256(part).digest())
  out = _cache_dir() / f"cpu_dot-{h.hexdigest()[:24]}.so"
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  # Build beside the target, then rename: concurrent processes (pytest-xdist) never load a
  # half-written library.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
  os.close(fd)
  try:
    res = subprocess.run([cxx, *_flags(), "-I", str(include), str(SOURCE), "-o", tmp],
                         capture_output=True, text=True, timeout=600, check=False)
    if res.returncode:
      raise RuntimeError(f"{os.path.basename(cxx)} failed: {res.stderr.strip()[-2000:]}")
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return out


def _load() -> str | None:
  """Builds, loads and registers the kernel once per process; None, or why it is unavailable."""
  with _lock:
    if "reason" not in _state:
      reason = None
      if os.environ.get("ITQ3S_NATIVE", "1") == "0":
        reason = "switched off (ITQ3S_NATIVE=0)"
      else:
        try:
          lib = ctypes.cdll.LoadLibrary(str(_build()))
          for symbol in sorted({s for s, _ in _DECODERS.values()}):
            jax.ffi.register_ffi_target(_target(symbol), jax.ffi.pycapsule(getattr(lib, symbol)),
                                        platform="cpu")
          _state["lib"] = lib  # keep the library loaded for the process
        except (RuntimeError, OSError, AttributeError, subprocess.SubprocessError) as e:
          reason = str(e) or type(e).__name__
      _state["reason"] = reason
    return _state["reason"]  # type: ignore[return-value]


def available() -> bool:
  """Whether the native CPU kernel is built and registered (builds it on the first call)."""
  return _load() is None


def unavailable_reason() -> str | None:
  """None when :func:`available`, else why the kernel could not be built or loaded."""
  return _load()


def supports(qt: qtensor.QuantizedTensor) -> bool:
  """Whether the kernel takes this weight's format (whether it is built aside)."""
  return qt.format in FORMATS and len(qt.shape) == 2


def _target(symbol: str) -> str:
  return f"itq3s_{symbol}"


def _plan(qt: qtensor.QuantizedTensor) -> np.ndarray:
  segs = qtensor.segments(qt.format, qt.k)
  return np.asarray([(s.n, s.count, s.nbytes, s.byte_start, s.coded_start) for s in segs],
                    np.int32).reshape(len(segs), 5)


def _call(xr: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  symbol, table = _DECODERS[qt.format]
  out = jax.ShapeDtypeStruct((xr.shape[0], qt.shape[0]), jnp.float32)
  return jax.ffi.ffi_call(_target(symbol), out, vmap_method="sequential")(
      xr, qt.data, _plan(qt), np.asarray(table(), np.float32))


@jax.custom_vjp
def _dot(x2: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  xr = codec.rotate(x2, jnp.asarray(codec.signs(qt.format, qt.seed)), qt.format)
  return _call(xr, qt)


def _dot_fwd(x2, qt):
  return _dot(x2, qt), qt


def _dot_bwd(qt, g):
  # x -> act_rotate_dot(x, qt) is linear in x, so its transpose is the input gradient; the
  # integer codes get the zero (float0) cotangent.
  (dx,) = jax.linear_transpose(lambda v: xla.act_rotate_dot(v, qt),
                               jax.ShapeDtypeStruct((g.shape[0], qt.k), jnp.float32))(g)
  zero = jax.tree.map(lambda a: np.zeros(np.shape(a), jax.dtypes.float0), qt)
  return dx, zero


_dot.defvjp(_dot_fwd, _dot_bwd)


def native_dot(x: jax.Array, qt: qtensor.QuantizedTensor) -> jax.Array:
  """float32 (..., N): ``x @ dequantize(qt).T`` with the native CPU kernel.

  Args:
    x: float (..., K) activations (computed in float32).
    qt: 2-D weight (N, K) in one of :data:`FORMATS`.

  Returns:
    float32 (..., N), equal to ``xla.act_rotate_dot(x, qt)`` up to the order of
    float32 sums (the decoded values are the same numbers).

  Raises:
    NotImplementedError: a format outside :data:`FORMATS`, or the kernel could
      not be built (:func:`unavailable_reason`).
  """
  if not supports(qt):
    raise NotImplementedError(f"the native CPU kernel takes {FORMATS}, not {qt.format!r}.")
  if jax.default_backend() != "cpu":
    raise NotImplementedError(f"the native kernel runs on the CPU, not {jax.default_backend()}.")
  reason = _load()
  if reason is not None:
    raise NotImplementedError(f"the native CPU kernel is unavailable: {reason}")
  n_out, k = qt.shape
  lead = x.shape[:-1]
  x2 = x.reshape(-1, k).astype(jnp.float32)  # a 1-D x is one row
  if n_out == 0 or x2.shape[0] == 0:
    return jnp.zeros((*lead, n_out), jnp.float32)
  return _dot(x2, qt).reshape(*lead, n_out)
