"""Regenerates benchmarks/RESULTS.md and benchmarks/plots/*.png from the benchmark scripts.

Every number comes from a benchmark's JSON output: ``accuracy.py --json`` and
``speed.py --json`` are run here (or read from files given with
``--accuracy-json`` / ``--speed-json``); the slow parts are included when their
JSON files are given (``itq3s eval --json OUT``, ``calibration.py --json OUT``).
The err/bound histogram re-codes a subset of rows of the test tensors with the
accuracy command's own jitted codec. Nothing in RESULTS.md is typed by hand.

  python benchmarks/report.py                              # accuracy + speed, ~10 min
  python benchmarks/report.py --accuracy-json a.json --speed-json s.json \
      --eval-json eval.json --calibration-json calib.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import anchors  # noqa: E402  (benchmarks/anchors.py)

HIST_ROWS = 64  # rows per test tensor for the err/bound histogram (all blocks of those rows)


def run_json(script: str, args: list[str]) -> dict:
  """Runs ``benchmarks/<script> --json ...`` in a fresh process; returns its parsed stdout."""
  out = subprocess.run([sys.executable, os.path.join(HERE, script), "--json", *args],
                       check=True, capture_output=True, text=True).stdout
  return json.loads(out)


def load_or_run(path: str | None, script: str, args: list[str]) -> dict:
  if path:
    with open(path) as f:
      return json.load(f)
  return run_json(script, args)


def _md(headers: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  lines += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(lines)


def _f(v, spec: str) -> str:
  if v is None:
    return "-"
  if isinstance(v, bool):
    return "yes" if v else "**NO**"
  return format(v, spec)


def accuracy_section(acc: dict) -> str:
  from itq3s_jax import testing  # pylint: disable=g-import-not-at-top
  fmts = [s["format"] for s in acc["formats"]]
  summ = {s["format"]: s for s in acc["formats"]}
  cell = {(r["format"], r["tensor"]): r for r in acc["results"]}
  tids = list(dict.fromkeys(r["tensor"] for r in acc["results"]))
  cols = [a for a in acc["anchors"] if a["name"] in anchors.DEFAULT_COLUMNS]
  heads = ["tensor"] + [f"`{f}`" for f in fmts] + [f"*{a['name']}" for a in cols]
  rows = [[f"{t} {testing.DESCRIPTIONS.get(t, '')}"] + [_f(cell[f, t]["rel_mse"], ".4f") for f in fmts]
          + [_f(a["rel_mse"].get(t), ".4f") for a in cols] for t in tids]
  rows.append(["bpw"] + [_f(max(cell[f, t]["bpw"] for t in tids), ".4f") for f in fmts]
              + [_f(a["bpw"], ".4f") for a in cols])
  rows.append(["bpw at K = 576"] + [_f(summ[f]["bpw_k576"], ".4f") for f in fmts] + ["-"] * len(cols))
  ratios = [[cell[f, t]["max_ratio"] for t in tids if cell[f, t]["max_ratio"] is not None] for f in fmts]
  rows.append(["max err / ε_q"] + [_f(max(r) if r else None, ".3f") for r in ratios]
              + [_f(max(a["max_ratio"].values()) if a["max_ratio"] else None, ".3f") for a in cols])
  holds = [[cell[f, t]["bound_holds"] for t in tids if cell[f, t]["bound_holds"] is not None]
           for f in fmts]
  rows.append(["float32 bound holds"] + [_f(all(h) if h else None, "") for h in holds]
              + ["-"] * len(cols))
  rows.append(["llama.cpp cos metric"] + [_f(summ[f]["cos_metric"], ".6f") for f in fmts]
              + [_f(a["cos_metric"], ".6f") for a in cols])
  scope = "full tensors" if not acc.get("rows") else f"{acc['rows']} rows per tensor"
  out = [f"## Accuracy: rel-MSE on the nine test tensors ({scope}, seed {acc['seed']})", "",
         "rel-MSE = Σ(w − ŵ)² / Σw² in float64; ε_q = the certified per-block bound; "
         "columns marked * are anchor numbers from benchmarks/anchors.py (llama.cpp C library / numpy "
         "prototypes, imatrix NULL unless named), not measured here. Produced by "
         "`benchmarks/accuracy.py --json`.", "", _md(heads, rows), ""]
  for tid, why in (acc.get("skipped") or {}).items():
    out.append(f"Skipped tensor {tid}: {why}")
  if acc.get("itq3_t_targets"):
    out += ["", "itq3_t targets (issue 2):", "",
            _md(["target", "measured", "limit", "met"],
                [[t["target"], ("holds on every block" if t["measured"] == 0 else "VIOLATED")
                  if "bound" in t["target"] else f"{t['measured']:.4f}", f"{t['limit']}",
                  "yes" if t["met"] else "**no**"] for t in acc["itq3_t_targets"]])]
  src = "; ".join(f"{a['name']}: {a['source']}" for a in cols)
  return "\n".join(out + ["", f"Anchor sources: {src}.", ""])


def speed_section(sp: dict) -> str:
  base = sp["numpy_baseline"]
  rows = [[f"`{r['format']}`", f"{r['bpw']:.4f}", f"{r['quantize']:.3g}",
           f"{r['quantize'] / base['quantize']:.3f}", f"{r['dequantize']:.3g}",
           f"{r['dequantize'] / base['dequantize']:.3f}", f"{r['first_call_s']:.1f}"]
          for r in sp["formats"]]
  rows.append(["numpy RTN baseline", "-", f"{base['quantize']:.3g}", "1", f"{base['dequantize']:.3g}",
               "1", "-"])
  out = [f"## Speed: weights per second ({sp['weights'] / 1e6:.1f}M float32 N(0,1) weights, "
         "rows x 4096)", "",
         f"Machine: {sp['machine']} (load average when the speed run ended). Jitted "
         "`quantize(w, fmt).data` and `dequantize(qt)`, median of timed runs after a warm-up; "
         "the numpy baseline (absmax 3-bit RTN per 256-block) runs in the same process, so the "
         "ratios compare across machines while the absolute numbers are only as good as the "
         "machine's load. Produced by `benchmarks/speed.py --json`.", "",
         _md(["format", "bpw", "quantize w/s", "× numpy", "dequantize w/s", "× numpy",
              "first call s"], rows)]
  ours = [r for r in sp["formats"] if r["format"] == "itq3_t"]
  if ours and sp.get("itq3_t_targets"):
    out += ["", "itq3_t speed targets (issue 2, 2-core CPU): " + "; ".join(
        f"{k} {ours[0][k]:.3g} w/s vs target ≥ {v:.0e} ({'met' if ours[0][k] >= v else 'missed'})"
        for k, v in sp["itq3_t_targets"].items())]
  return "\n".join(out + [""])


def eval_section(ev: dict) -> str:
  from itq3s_jax import eval_tables  # pylint: disable=g-import-not-at-top
  parts = ["## Model quality (`itq3s eval --json`)", "",
           f"Python {ev.get('python')}, {ev.get('platform')}, rules {ev.get('rules')}; total wall "
           f"time {ev.get('wall_seconds', 0):.0f} s.", "", "```"]
  if "smollm2" in ev:
    parts.append(eval_tables.render_smollm2(ev["smollm2"]))
  if "minilm" in ev:
    parts.append(eval_tables.render_minilm(ev["minilm"]))
  return "\n".join(parts + ["```", ""])


def calibration_section(cal) -> str:
  rows_in = cal["rows"] if isinstance(cal, dict) else cal
  keys = [k for k in ("format", "method", "rounding", "layer", "ppl", "delta_ppl", "delta_se",
                      "quantize_seconds") if any(k in r for r in rows_in)]
  extra = sorted({k for r in rows_in for k in r} - set(keys) - {"scales"})
  keys += extra

  def cell(v):
    return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

  head = ["## Calibration (`benchmarks/calibration.py --json`)", ""]
  if isinstance(cal, dict):
    info = {k: v for k, v in cal.items() if k != "rows"}
    head += ["Run: " + ", ".join(f"{k} = {cell(v)}" for k, v in info.items()), ""]
  return "\n".join(head + [_md(keys, [[cell(r.get(k)) for k in keys] for r in rows_in]), ""])


def plot_rate_distortion(acc: dict, path: str) -> None:
  """bpw vs rel-MSE: per format (ours) and anchor, the mean over tensors with a min-max bar."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  series = []
  for s in acc["formats"]:
    rs = [r for r in acc["results"] if r["format"] == s["format"]]
    series.append((s["format"], max(r["bpw"] for r in rs), [r["rel_mse"] for r in rs], "o"))
  series += [("*" + a["name"], a["bpw"], list(a["rel_mse"].values()), "x") for a in acc["anchors"]]
  cmap = plt.get_cmap("tab20")
  seen: dict[float, int] = {}
  for i, (name, bpw, v, marker) in enumerate(series):
    k = seen[bpw] = seen.get(bpw, -1) + 1  # spread series that share a bpw
    x = bpw + 0.012 * k
    mean = float(np.mean(v))
    ax.errorbar([x], [mean], yerr=[[mean - min(v)], [max(v) - mean]], fmt=marker, ms=6,
                capsize=2, color=cmap(i % 20), label=name)
  ax.set_yscale("log")
  ax.set_xlabel("bits per weight")
  ax.set_ylabel("rel-MSE: mean, min–max over the test tensors")
  ax.set_title("Rate–distortion (o measured here, x anchors from benchmarks/anchors.py)")
  ax.legend(fontsize=7, ncol=2, loc="upper right")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def block_ratios(formats, seed: int = 0) -> dict[str, np.ndarray]:
  """Per-256-block ||w - w_hat|| / eps_q on HIST_ROWS rows of every test tensor, bounded formats."""
  import itq3s_jax  # pylint: disable=g-import-not-at-top
  from itq3s_jax import accuracy  # pylint: disable=g-import-not-at-top
  from itq3s_jax import testing  # pylint: disable=g-import-not-at-top
  tensors = testing.test_tensors(rows=HIST_ROWS)
  blocks = np.concatenate([np.asarray(w, np.float32).reshape(-1, 256) for w in tensors.values()])
  out = {}
  for f in formats:
    if not itq3s_jax.has_bound(f):
      continue
    w_hat, eps, _ = accuracy.code_blocks(blocks, f, seed)
    err = np.linalg.norm(blocks.astype(np.float64) - w_hat.astype(np.float64), axis=-1)
    out[f] = err[eps > 0] / eps[eps > 0].astype(np.float64)
  return out


def plot_ratio_hist(ratios: dict[str, np.ndarray], path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for i, (f, r) in enumerate(ratios.items()):
    ax.hist(r, bins=100, range=(0, 1.05), histtype="step", lw=1.5, color=f"C{i}",
            label=f"{f} (max {r.max():.3f}, {r.size} blocks)")
  ax.axvline(1.0, color="k", ls="--", lw=1)
  ax.set_xlabel("‖w_b − ŵ_b‖₂ / ε_q(b) per 256-block")
  ax.set_ylabel("blocks")
  ax.set_title(f"Error over the certified bound ({HIST_ROWS} rows of each test tensor)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--accuracy-json", help="output of accuracy.py --json (default: run it)")
  p.add_argument("--speed-json", help="output of speed.py --json (default: run it)")
  p.add_argument("--speed-rows", type=int, default=1024, help="rows of the speed tensor (x 4096)")
  p.add_argument("--eval-json", help="output of `itq3s eval --json OUT` (optional)")
  p.add_argument("--calibration-json", help="output of calibration.py --json OUT (optional)")
  p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"))
  p.add_argument("--plots", default=os.path.join(HERE, "plots"))
  args = p.parse_args(argv)
  load_start = os.getloadavg()
  acc = load_or_run(args.accuracy_json, "accuracy.py", [])
  sp = load_or_run(args.speed_json, "speed.py", ["--rows", str(args.speed_rows), "--repeats", "3",
                                                  "--budget", "10"])
  os.makedirs(args.plots, exist_ok=True)
  plot_rate_distortion(acc, os.path.join(args.plots, "rate_distortion.png"))
  plot_ratio_hist(block_ratios([s["format"] for s in acc["formats"]], acc["seed"]),
                  os.path.join(args.plots, "err_over_bound.png"))
  load_end = os.getloadavg()
  commit = subprocess.run(["git", "-C", HERE, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip() or "unknown"
  import jax  # pylint: disable=g-import-not-at-top
  rel = os.path.relpath(args.plots, os.path.dirname(os.path.abspath(args.out)))
  parts = [
      "# itq3s-jax benchmark results", "",
      "Generated by `python benchmarks/report.py` — do not edit by hand. "
      f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {commit}, "
      f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
      f"jax {jax.__version__}. Load average (1 min) {load_start[0]:.1f} at the start and "
      f"{load_end[0]:.1f} at the end of the report run"
      + (" (inputs read from JSON files; their own runs may have seen another load)"
         if args.accuracy_json or args.speed_json else "")
      + ": the machine is shared, so absolute timings are pessimistic.", "",
      accuracy_section(acc),
      f"![rate–distortion]({rel}/rate_distortion.png)", "",
      f"![err over bound]({rel}/err_over_bound.png)", "",
      speed_section(sp),
  ]
  optional = [
      (args.eval_json, eval_section, "Model quality (perplexity) not included: run `itq3s eval "
       "--json eval.json` and pass `--eval-json eval.json`.\n"),
      (args.calibration_json, calibration_section, "Calibration not included: run `python "
       "benchmarks/calibration.py --json calib.json` and pass `--calibration-json calib.json`.\n"),
  ]
  for path, section, missing in optional:
    if path:
      with open(path) as f:
        parts.append(section(json.load(f)))
    else:
      parts.append(missing)
  with open(args.out, "w") as f:
    f.write("\n".join(parts))
  print(f"wrote {args.out} and {args.plots}/*.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
