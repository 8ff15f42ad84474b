#!/usr/bin/env bash
# Opt-in check that llama.cpp runs our GGUF files (a benchmark, not CI).
#
#   bash benchmarks/llamacpp_check.sh build     # llama.cpp from the llama-cpp-python sdist
#   bash benchmarks/llamacpp_check.sh run       # convert, quantize, score; prints the table
#   bash benchmarks/llamacpp_check.sh all       # both
#
# build: pip downloads the sdist of llama-cpp-python (it vendors llama.cpp; PyPI is the only
# network this project uses), and builds CPU-only llama-perplexity, llama-quantize and
# llama-imatrix under $WORK (default /tmp/itq3s-llamacpp, outside the repository). ~17 min on
# 2 cores; it runs under `nice` because the machine is usually shared.
# run: see benchmarks/llamacpp_check.py (the same calibration text feeds `itq3s calibrate` and
# llama-imatrix; every file is scored by llama-perplexity on the same evaluation text).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/itq3s-llamacpp}
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}
NICE=${NICE:-19}
SDIST_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
BIN="$WORK/build/bin"

build() {
  mkdir -p "$WORK"
  local tarball="$WORK/llama_cpp_python-$SDIST_VERSION.tar.gz"
  if [ ! -f "$tarball" ]; then
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$SDIST_VERSION" -d "$WORK"
  fi
  local src="$WORK/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
  [ -d "$src" ] || tar -C "$WORK" -xzf "$tarball"
  # A portable AVX2 build: the -march=native + OpenMP build (AVX-512 and AMX detected on this
  # VM) segfaulted in llama-perplexity on every model, llama.cpp's own Q4_1 source included.
  nice -n "$NICE" cmake -S "$src" -B "$WORK/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_OPENMP=OFF -DGGML_NATIVE=OFF \
    -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DBUILD_SHARED_LIBS=OFF
  nice -n "$NICE" cmake --build "$WORK/build" -j "$JOBS" \
    --target llama-perplexity llama-quantize llama-imatrix
  "$BIN/llama-quantize" --help >/dev/null 2>&1 || true
  echo "built: $(ls "$BIN")"
}

run() {
  [ -x "$BIN/llama-perplexity" ] || { echo "no llama.cpp build in $WORK; run '$0 build'" >&2; exit 2; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" benchmarks/llamacpp_check.py --bin "$BIN" --work "$WORK" "$@"
}

case "${1:-all}" in
  build) build ;;
  run) shift; run "$@" ;;
  all) shift || true; build; run "$@" ;;
  *) echo "usage: $0 build|run|all [llamacpp_check.py options]" >&2; exit 2 ;;
esac
