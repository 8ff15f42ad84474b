"""Static GPU report of the fused kernels, made on a CPU host: cubin, registers, a roofline.

For every kernel x format x activation dtype x benchmark shape it lowers the
jitted method for CUDA from this CPU machine (abstract H100 mesh), captures the
Triton IR that Pallas builds (``lower_jaxpr_to_triton_module``), compiles it
with the PyPI ``triton`` package (its wheel ships ptxas, nvdisasm) to sm_80 and
sm_90 cubin and reads off:

  regs, spill    registers per thread and spill bytes (stores + loads), ptxas -v
  smem           shared memory per program (Triton's dynamic + static)
  CTAs/SM        resident programs per SM (registers, shared memory, warps)
  loop           static SASS instructions of the K loop (the largest backward branch)
  instr/w        thread-instructions per weight in the K loop:
                 loop * 32 * num_warps / (block_n * 256)
  pred           roofline: max(HBM bytes / bandwidth, issue time), issue time =
                 ceil(programs / SMs) * (loop * iterations + rest) * warps /
                 (4 schedulers * clock); no latency stalls, every instruction one
                 issue slot (slower pipes, LSU wavefronts not modelled)
  floors         the same bytes at 3.4375 bits per weight (``3.44``) and the bf16
                 ``jnp.dot`` of the dense weight (``bf16``), both memory-only

Instruction counts per 256-block do not depend on N or K, so each distinct
(kernel, format decoder, dtype, tiling) is compiled once, at the first shape
that uses it. XLA compiles the same Triton IR with its own (newer or older)
Triton pipeline on a GPU; this is a close proxy, not the same binary.

  python benchmarks/kernel_report.py                    # the full table
  python benchmarks/kernel_report.py --quick            # M=1, 8192^2 only
  python benchmarks/kernel_report.py --tune             # best tiling per shape
  python benchmarks/kernel_report.py --json out.json    # also write the rows
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering as _triton_lowering  # jax internal: no public Triton IR
from jax.sharding import AbstractDevice
from jax.sharding import AbstractMesh

try:
  from jax.sharding import use_abstract_mesh
except ImportError:  # older jax keeps it private
  from jax._src.mesh import use_abstract_mesh  # pylint: disable=g-import-not-at-top

import itq3s_jax
from itq3s_jax.pallas_kernels import act_rotate
from itq3s_jax.pallas_kernels import driver
from itq3s_jax.pallas_kernels import terms as terms_lib
from itq3s_jax.pallas_kernels import weight_ifwht

KERNELS = {"act_rotate": act_rotate.act_rotate, "weight_ifwht": weight_ifwht.weight_ifwht}
FORMATS = ("itq3_t", "itq3_s", "iq3_s", "uniform3", "uniform3_rot")
DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32}
ROWS = (1, 16, 256)
SHAPES = ((4096, 4096), (8192, 8192), (8192, 28672), (28672, 8192))
ARCHS = (80, 90)
BPW_FLOOR = 3.4375  # itq3_t / iq3_s / itq3_s bits per weight


@dataclasses.dataclass(frozen=True)
class Gpu:
  name: str
  sms: int
  clock_hz: float
  bandwidth: float  # HBM bytes/s (spec sheet)


# H100 SXM5 and H200: 132 SMs at 1.83 GHz (the clock behind H100's 989 TFLOPS bf16),
# HBM3 3.35 TB/s and HBM3e 4.8 TB/s.
GPUS = (Gpu("H100", 132, 1.83e9, 3.35e12), Gpu("H200", 132, 1.83e9, 4.8e12))
# Per-SM limits: registers, shared memory usable by one program (bytes), warps, programs.
_SM_LIMITS = {80: (65536, 163 * 1024, 64, 32), 90: (65536, 227 * 1024, 64, 32)}


def _gpu_mesh() -> AbstractMesh:
  return AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
      device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu"))


# ------------------------------------------------------------------ capture
@dataclasses.dataclass(frozen=True)
class Captured:
  """One Triton kernel as Pallas lowered it."""

  name: str
  ttir: str
  num_warps: int
  num_stages: int


def capture(fn, *args) -> list[Captured]:
  """Lowers jitted ``fn(*args)`` for CUDA on this host; the Triton modules it builds."""
  modules = []
  orig = _triton_lowering.lower_jaxpr_to_triton_module

  def spy(*a, **kw):
    result = orig(*a, **kw)
    modules.append(result.module.operation.get_asm())
    return result

  _triton_lowering.lower_jaxpr_to_triton_module = spy
  try:
    with use_abstract_mesh(_gpu_mesh()):
      text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  finally:
    _triton_lowering.lower_jaxpr_to_triton_module = orig
  calls = re.findall(r'name = "([^"]+)", num_stages = (\d+) : i32, num_warps = (\d+) : i32',
                     text)
  if len(calls) != len(modules):
    raise RuntimeError(f"{len(modules)} Triton modules but {len(calls)} custom calls.")
  return [Captured(nm, m, int(w), int(s)) for m, (nm, s, w) in zip(modules, calls)]


# ------------------------------------------------------------------ compile
@dataclasses.dataclass(frozen=True)
class Binary:
  """A cubin and what ptxas said about it."""

  arch: int
  regs: int
  spill: int  # bytes, stores + loads
  smem: int  # bytes per program
  cubin_bytes: int
  sass: str


def tool(name: str) -> str:
  """Path of a CUDA binary shipped in the triton wheel (ptxas, nvdisasm, cuobjdump)."""
  import triton  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


_CACHE: dict[tuple[str, int], Binary] = {}


def compile_cubin(cap: Captured, arch: int) -> Binary:
  """Triton IR text -> cubin for sm_<arch> (triton.compile; ptxas log captured)."""
  key = (hashlib.sha256(f"{cap.num_warps},{cap.num_stages},{cap.ttir}".encode()).hexdigest(),
         arch)
  if key in _CACHE:
    return _CACHE[key]
  import triton  # pylint: disable=g-import-not-at-top
  from triton import knobs  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default XLA and Triton use
  knobs.compilation.always_compile = True  # the ptxas log is printed only on a compile
  knobs.nvidia.dump_ptxas_log = True
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "kernel.ttir")
    with open(path, "w") as f:
      f.write(cap.ttir)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
      c = triton.compile(path, target=GPUTarget("cuda", arch, 32),
                         options=dict(num_warps=cap.num_warps, num_stages=cap.num_stages))
    cubin = os.path.join(d, "kernel.cubin")
    with open(cubin, "wb") as f:
      f.write(c.asm["cubin"])
    sass = subprocess.run([tool("nvdisasm"), "-c", cubin], capture_output=True, text=True,
                          check=True).stdout
  ptxas = log.getvalue()
  regs = re.search(r"Used (\d+) registers", ptxas)
  spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
  smem = re.search(r"(\d+) bytes smem", ptxas)
  if regs is None or spill is None:
    raise RuntimeError(f"no ptxas -v report for sm_{arch}:\n{ptxas[-2000:]}")
  out = Binary(arch=arch, regs=int(regs.group(1)),
               spill=int(spill.group(1)) + int(spill.group(2)),
               smem=int(c.metadata.shared) + (int(smem.group(1)) if smem else 0),
               cubin_bytes=len(c.asm["cubin"]), sass=sass)
  _CACHE[key] = out
  return out


_INSTR = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"BRA\s+`?\(?(\.L_x_\d+)")


@dataclasses.dataclass(frozen=True)
class Loop:
  """The K loop of a kernel in SASS."""

  body: int  # static instructions in the loop body (branch included)
  total: int  # static instructions of the kernel
  opcodes: dict[str, int]  # opcode (no modifiers) -> count in the body


def k_loop(sass: str) -> Loop:
  """The largest backward-branch loop of a disassembly (the kernels have one K loop)."""
  labels, instrs = {}, []
  for line in sass.splitlines():
    m = _LABEL.match(line)
    if m:
      labels[m.group(1)] = len(instrs)
      continue
    m = _INSTR.match(line)
    if m:
      instrs.append((m.group(1), line))
  best = None
  for i, (op, line) in enumerate(instrs):
    t = _TARGET.search(line) if op.startswith("BRA") else None
    if t and t.group(1) in labels and labels[t.group(1)] < i:
      body = instrs[labels[t.group(1)]:i + 1]
      if best is None or len(body) > len(best):
        best = body
  if best is None:
    raise ValueError("no loop found in the SASS")
  ops = collections.Counter(op.split(".")[0] for op, _ in best)
  return Loop(body=len(best), total=len(instrs), opcodes=dict(ops))


def occupancy(b: Binary, threads: int) -> int:
  """Resident programs per SM on sm_<arch> (registers allocated per warp in 256s)."""
  regs_sm, smem_max, warps_sm, ctas_sm = _SM_LIMITS[b.arch]
  warps = threads // 32
  per_warp = -(-b.regs * 32 // 256) * 256
  by_regs = regs_sm // (per_warp * warps)
  by_smem = smem_max // (b.smem + 1024) if b.smem else ctas_sm  # 1 KB reserved per program
  return max(0, min(by_regs, by_smem, warps_sm // warps, ctas_sm))


# ------------------------------------------------------------------ model
def hbm_bytes(kernel: str, fmt: str, dtype: str, m: int, n: int, k: int,
              cfg: driver.Config) -> int:
  """Bytes the kernel moves from/to HBM: coded weight, activation operand, partial outputs."""
  p = driver.plan(fmt, k)
  width = (terms_lib.get(fmt).terms * terms_lib.get(fmt).slots if kernel == "act_rotate"
           else 256)
  item = 4 if dtype == "f32" else 2  # act_rotate float32: two float16 planes
  splits, np_, mp = driver.out_shape(m, n, cfg)
  return n * p.byte_stop + p.n_blocks * width * mp * item + splits * np_ * mp * 4


def predict(loop: Loop, cfg: driver.Config, nblocks: int, m: int, n: int, nbytes: int,
            gpu: Gpu) -> dict[str, float]:
  """Roofline seconds: memory, issue, and their max."""
  splits, np_, mp = driver.out_shape(m, n, cfg)
  programs = splits * (np_ // cfg.block_n) * (mp // cfg.block_m)
  iters = -(-nblocks // cfg.split_k)
  warp_instr = (loop.body * iters + loop.total - loop.body) * cfg.num_warps
  issue = math.ceil(programs / gpu.sms) * warp_instr / (4 * gpu.clock_hz)
  mem = nbytes / gpu.bandwidth
  return dict(mem=mem, issue=issue, pred=max(mem, issue))


def floors(m: int, n: int, k: int, gpu: Gpu) -> dict[str, float]:
  io_bytes = m * k * 2 + m * n * 4
  return dict(bf16=(n * k * 2 + io_bytes) / gpu.bandwidth,
              bpw=(n * k * BPW_FLOOR / 8 + io_bytes) / gpu.bandwidth)


# ------------------------------------------------------------------ rows
def _decoder_key(kernel: str, fmt: str) -> str:
  """Formats whose kernels are the same program share one compile."""
  if kernel == "act_rotate":
    return {"itq3_s": "iq3_s", "uniform3_rot": "uniform3"}.get(fmt, fmt)
  return fmt


def compile_case(kernel: str, fmt: str, dtype: str, m: int, n: int, k: int,
                 cfg: driver.Config, archs=ARCHS) -> tuple[Captured, dict[int, Binary]]:
  """Lower one case for CUDA and compile its kernel for each arch."""
  qt = itq3s_jax.QuantizedTensor(
      data=jax.ShapeDtypeStruct((n, itq3s_jax.row_nbytes(fmt, k)), jnp.uint8), format=fmt, k=k,
      seed=0)
  f = functools.partial(KERNELS[kernel], config=cfg)
  caps = capture(f, jax.ShapeDtypeStruct((m, k), DTYPES[dtype]), qt)
  if len(caps) != 1:
    raise RuntimeError(f"expected one Triton kernel, got {len(caps)}")
  return caps[0], {a: compile_cubin(caps[0], a) for a in archs}


def rows(kernels, formats, dtypes, ms, shapes, archs=ARCHS, config_fn=None, log=print):
  """One dict per case (see module docstring for the fields)."""
  config_fn = config_fn or (lambda kernel, fmt, dtype, m, n, k: driver.heuristic(
      m, n, k, rotate=kernel == "act_rotate", half=dtype != "f32", format=fmt))
  compiled = {}
  out = []
  for kernel in kernels:
    for fmt in formats:
      for dtype in dtypes:
        for m in ms:
          for n, k in shapes:
            cfg = config_fn(kernel, fmt, dtype, m, n, k)
            key = (kernel, _decoder_key(kernel, fmt), dtype, dataclasses.replace(cfg, split_k=1))
            t0 = time.time()
            if key not in compiled:
              compiled[key] = compile_case(kernel, fmt, dtype, m, n, k, cfg, archs)
              log(f"  compiled {kernel} {fmt} {dtype} {cfg} in {time.time() - t0:.1f} s",
                  file=sys.stderr)
            cap, bins = compiled[key]
            out.append(_row(kernel, fmt, dtype, m, n, k, cfg, cap, bins))
  return out


def _row(kernel, fmt, dtype, m, n, k, cfg, cap, bins):
  b90 = bins.get(90) or next(iter(bins.values()))
  loop = k_loop(b90.sass)
  nblocks = driver.plan(fmt, k).n_blocks
  nbytes = hbm_bytes(kernel, fmt, dtype, m, n, k, cfg)
  row = dict(kernel=kernel, format=fmt, dtype=dtype, m=m, n=n, k=k,
             config=dataclasses.asdict(cfg), loop=loop.body,
             instr_per_weight=loop.body * 32 * cap.num_warps / (cfg.block_n * 256),
             opcodes=dict(collections.Counter(loop.opcodes).most_common(12)), bytes=nbytes)
  for arch, b in bins.items():
    row[f"sm{arch}"] = dict(regs=b.regs, spill=b.spill, smem=b.smem, cubin=b.cubin_bytes,
                            ctas_per_sm=occupancy(b, 32 * cap.num_warps))
  for gpu in GPUS:
    pr = predict(loop, cfg, nblocks, m, n, nbytes, gpu)
    fl = floors(m, n, k, gpu)
    row[gpu.name] = {**{f"{k_}_us": v * 1e6 for k_, v in pr.items()},
                     **{f"floor_{k_}_us": v * 1e6 for k_, v in fl.items()},
                     "pred_over_bpw_floor": pr["pred"] / fl["bpw"]}
  return row


def table(rs) -> str:
  """Markdown table of rows."""
  head = ("| kernel | format | x | M | N x K | tile (bm,bn,w,s,split) | regs 80/90 | spill 80/90 "
          "| smem KB | CTAs/SM 90 | loop | instr/w | MB | H100 pred us (mem/issue) | H100 3.44 "
          "| H100 bf16 | pred/3.44 | H200 pred us | H200 bf16 |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rs:
    c = r["config"]
    s80, s90 = r.get("sm80", {}), r.get("sm90", {})
    h1, h2 = r["H100"], r["H200"]
    lines.append(
        f"| {r['kernel']} | {r['format']} | {r['dtype']} | {r['m']} | {r['n']}x{r['k']} "
        f"| {c['block_m']},{c['block_n']},{c['num_warps']},{c['num_stages']},{c['split_k']} "
        f"| {s80.get('regs', '-')}/{s90.get('regs', '-')} "
        f"| {s80.get('spill', '-')}/{s90.get('spill', '-')} | {s90.get('smem', 0) / 1024:.0f} "
        f"| {s90.get('ctas_per_sm', '-')} | {r['loop']} | {r['instr_per_weight']:.1f} "
        f"| {r['bytes'] / 1e6:.1f} | {h1['pred_us']:.1f} ({h1['mem_us']:.1f}/{h1['issue_us']:.1f}) "
        f"| {h1['floor_bpw_us']:.1f} | {h1['floor_bf16_us']:.1f} | {h1['pred_over_bpw_floor']:.2f} "
        f"| {h2['pred_us']:.1f} | {h2['floor_bf16_us']:.1f} |")
  return "\n".join(lines)


# ------------------------------------------------------------------ tuning
CANDIDATES = tuple(driver.Config(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
                   for bm in (16, 64, 128) for bn in (32, 64, 128) for w in (4, 8)
                   for s in (1, 2))
# The issue-time model ignores latency: GEMV tilings (block_m 16) keep >= 2 programs of 4
# warps per SM; larger tiles are tensor-core bound and may take all 255.
MAX_REGS = 128


def tune(kernel, fmt, dtype, ms, shapes, gpu=GPUS[0], log=print):
  """{(m, n, k): (pred seconds, Config, regs, loop)}: the candidate tiling (split-K
  included) with 0 spills (and <= MAX_REGS registers for block_m 16) and the
  lowest prediction on ``gpu``, for each case. block_m 16 for m <= 16, else 64 or 128."""
  best = {}
  for base in CANDIDATES:
    cases = [(m, n, k) for m in ms for n, k in shapes if (m <= 16) == (base.block_m == 16)]
    if not cases:
      continue
    m0, n0, k0 = cases[0]
    t0 = time.time()
    try:
      _, bins = compile_case(kernel, fmt, dtype, m0, n0, k0, base, archs=(90,))
    except Exception as e:  # a tiling Triton rejects is just not a candidate
      log(f"  {base}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
      continue
    b = bins[90]
    loop = k_loop(b.sass)
    log(f"  {kernel} {fmt} {dtype} {base}: regs {b.regs} spill {b.spill} loop {loop.body} "
        f"({time.time() - t0:.0f} s)", file=sys.stderr)
    if b.spill or (base.block_m == 16 and b.regs > MAX_REGS):
      continue
    for m, n, k in cases:
      for split in (1, 2, 4, 8):
        cfg = dataclasses.replace(base, split_k=split)
        nb = hbm_bytes(kernel, fmt, dtype, m, n, k, cfg)
        pr = predict(loop, cfg, driver.plan(fmt, k).n_blocks, m, n, nb, gpu)["pred"]
        if (m, n, k) not in best or pr < best[(m, n, k)][0]:
          best[(m, n, k)] = (pr, cfg, b.regs, loop.body)
  return best


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--kernels", nargs="*", default=list(KERNELS))
  p.add_argument("--formats", nargs="*", default=list(FORMATS))
  p.add_argument("--dtypes", nargs="*", default=list(DTYPES))
  p.add_argument("--rows", nargs="*", type=int, default=list(ROWS))
  p.add_argument("--shapes", nargs="*", default=[f"{n}x{k}" for n, k in SHAPES])
  p.add_argument("--archs", nargs="*", type=int, default=list(ARCHS))
  p.add_argument("--quick", action="store_true", help="M=1, 8192x8192 only")
  p.add_argument("--tune", action="store_true", help="print the best tiling per case")
  p.add_argument("--json", help="write the rows here")
  args = p.parse_args(argv)
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
  ms = args.rows
  if args.quick:
    ms, shapes = [1], [(8192, 8192)]
  import triton  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__}, triton {triton.__version__}, "
        f"ptxas {subprocess.run([tool('ptxas'), '--version'], capture_output=True, text=True).stdout.split()[-1]}",
        file=sys.stderr)
  t0 = time.time()
  if args.tune:
    for kernel in args.kernels:
      for fmt in args.formats:
        for dtype in args.dtypes:
          for (m, n, k), (pred, cfg, regs, loop) in sorted(
              tune(kernel, fmt, dtype, ms, shapes).items()):
            print(f"{kernel} {fmt} {dtype} M={m} {n}x{k}: {pred * 1e6:.1f} us {cfg} "
                  f"regs {regs} loop {loop}", flush=True)
    return 0
  rs = rows(args.kernels, args.formats, args.dtypes, ms, shapes, args.archs)
  print(table(rs))
  print(f"\n{len(rs)} rows in {time.time() - t0:.0f} s", file=sys.stderr)
  if args.json:
    write_json(args.json, rs, triton.__version__)
  return 0


def write_json(path: str, rs, triton_version: str) -> None:
  """The rows, one per line (benchmarks/gpu_check.py reads the H100/H200 predictions)."""
  head = dict(jax=jax.__version__, triton=triton_version, gpus=[dataclasses.asdict(g) for g in GPUS])
  with open(path, "w") as f:
    f.write(json.dumps(head)[:-1] + ', "rows": [\n')
    f.write(",\n".join(json.dumps(r, separators=(",", ":")) for r in rs))
    f.write("\n]}\n")


if __name__ == "__main__":
  sys.exit(main())
