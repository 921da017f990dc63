#!/usr/bin/env bash
# Builds the llama.cpp peer used by benchmarks/llamacpp/gguf_vs_llamacpp.py, outside lowbit:
#   <venv>                 python venv with llama-cpp-python==0.3.36 (from its PyPI sdist) + numpy
#   <venv>/llama.cpp-bin/  llama-quantize, llama-imatrix, llama-perplexity, llama-bench and the
#                          shared libraries (libllama, libggml*), built with cmake from the
#                          llama.cpp vendored in that same sdist (CPU, -march=native, no curl)
# llama.cpp is compiled once: by default pip installs the package with its own llama.cpp build
# turned off (CMAKE_ARGS=-DLLAMA_BUILD=OFF) and the shared libraries of the cmake build above
# (same vendored source) are copied into llama_cpp/lib, which halves the build time on a small
# machine. LLAMACPP_PIP_BUILD=1 lets pip compile llama.cpp itself instead (the ordinary way).
# Usage: bash benchmarks/llamacpp/setup.sh   (env LLAMACPP_VENV overrides /work/venvs/llamacpp,
#        LLAMACPP_JOBS the build parallelism, default 2). Idempotent: skips what already exists.
# Never installs anything into lowbit's own .venv.
set -euo pipefail

VERSION="0.3.36"
VENV="${LLAMACPP_VENV:-/work/venvs/llamacpp}"
JOBS="${LLAMACPP_JOBS:-2}"
PY="${PYTHON:-python3}"
BIN="$VENV/llama.cpp-bin"
SRC="$VENV/src"
TOOLS=(llama-quantize llama-imatrix llama-perplexity llama-bench)
NICE=(nice -n 10)
[ "$(nice)" -ge 10 ] && NICE=()  # already run under nice: do not stack it

log() { echo "[$(date -u +%H:%M:%S)] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
"$VENV/bin/python" -c "import numpy" 2>/dev/null || "$VENV/bin/pip" install -q numpy

mkdir -p "$SRC" "$BIN"
SDIST="$SRC/llama_cpp_python-$VERSION.tar.gz"
if [ ! -f "$SDIST" ]; then
  log "downloading llama-cpp-python==$VERSION sdist"
  "$VENV/bin/pip" download -q --no-binary :all: --no-deps -d "$SRC" "llama-cpp-python==$VERSION"
fi
TREE="$SRC/llama_cpp_python-$VERSION"
[ -d "$TREE" ] || tar -xzf "$SDIST" -C "$SRC"
LLAMA="$TREE/vendor/llama.cpp"
BUILD="$LLAMA/build-shared"

# 1) the command-line tools (the benchmark's instruments) and the shared libraries
missing=0
for t in "${TOOLS[@]}"; do [ -x "$BIN/$t" ] || missing=1; done
[ -f "$BIN/libllama.so" ] || missing=1
if [ "$missing" = 1 ]; then
  log "building ${TOOLS[*]} (shared libraries) from $LLAMA with -j$JOBS"
  "${NICE[@]}" cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_BUILD_RPATH='$ORIGIN' -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
  "${NICE[@]}" cmake --build "$BUILD" --config Release -j"$JOBS" --target llama "${TOOLS[@]}"
  for t in "${TOOLS[@]}"; do cp "$BUILD/bin/$t" "$BIN/"; done
  find "$BUILD" -name 'lib*.so*' -exec cp -P {} "$BIN/" \;
fi
log "tools: $(ls "$BIN" | tr '\n' ' ')"

# 2) llama-cpp-python from the same sdist
if ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  if [ "${LLAMACPP_PIP_BUILD:-0}" = 1 ]; then
    log "pip-building llama-cpp-python==$VERSION with its own llama.cpp build"
    CMAKE_ARGS="-DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
      "${NICE[@]}" "$VENV/bin/pip" install --no-binary llama-cpp-python "$SDIST"
  else
    log "pip-installing llama-cpp-python==$VERSION from the sdist, libraries from $BIN"
    CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" \
      "${NICE[@]}" "$VENV/bin/pip" install --no-binary llama-cpp-python "$SDIST"
    LIB="$("$VENV/bin/python" -c "import importlib.util as u, pathlib; \
print(pathlib.Path(u.find_spec('llama_cpp').origin).parent / 'lib')")"
    mkdir -p "$LIB"
    cp -P "$BIN"/lib*.so* "$LIB/"
  fi
fi
"$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
log "done: venv $VENV, tools $BIN"
