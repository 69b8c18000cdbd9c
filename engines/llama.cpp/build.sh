#!/usr/bin/env bash
# Build the llama.cpp tools layerboost's GGUF exports are tested and benchmarked in:
# the llama.cpp vendored by llama-cpp-python==$LLAMA_CPP_PYTHON (llama.cpp 0c1e57098), fetched from
# the package registry as a source package, with deci-sliding-window.patch applied (per-layer sliding
# windows in the `deci` architecture, so one model holds softmax, sliding-window and no-attention layers;
# such files are named `layerboost-deci`, an architecture only this build registers, so a stock llama.cpp
# refuses them instead of running them with every token in view).
#
#   engines/llama.cpp/build.sh            # -> $LAYERBOOST_LLAMA_CPP (default ~/.cache/layerboost/llama.cpp)
#
# Rerunning is cheap: the source is fetched once, a changed patch is swapped in place (the old one
# reversed), and CMake rebuilds only what changed. The tools land in $LAYERBOOST_LLAMA_CPP/bin.
set -euo pipefail
LLAMA_CPP_PYTHON=0.3.36
HERE="$(cd "$(dirname "$0")" && pwd)"
DEST="${LAYERBOOST_LLAMA_CPP:-$HOME/.cache/layerboost/llama.cpp}"
SRC="$DEST/src"
PATCH="$HERE/deci-sliding-window.patch"
TARGETS="llama-completion llama-bench llama-batched-bench llama-perplexity llama-tokenize llama-server"
JOBS="${JOBS:-$(nproc)}"

mkdir -p "$DEST"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    echo "fetching llama-cpp-python==$LLAMA_CPP_PYTHON (source package) from the registry"
    tmp="$(mktemp -d)"
    pip download --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp" -q
    tar -xzf "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz" -C "$tmp"
    rm -rf "$SRC" && mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp" "$SRC"
    rm -rf "$tmp"
fi

# Apply the patch; a different patch applied earlier is reversed first (only the files it touches change).
if ! cmp -s "$PATCH" "$DEST/applied.patch" 2>/dev/null; then
    if [ -f "$DEST/applied.patch" ]; then
        patch -d "$SRC" -p1 -R --quiet < "$DEST/applied.patch"
        rm "$DEST/applied.patch"
    fi
    patch -d "$SRC" -p1 --forward --quiet < "$PATCH"
    cp "$PATCH" "$DEST/applied.patch"
fi

# No AMX kernels: on CPUs with AMX this llama.cpp's AMX path for quantized weights (q8_0 among them) dies on the
# first prompt (SIGILL with one thread, SIGSEGV with two: its tile config and the per-thread tile permission,
# upstream ggml-org/llama.cpp#26954). Explicit -mno-amx-* win over -march=native; float weights never use AMX here.
NO_AMX=""
if [ "$(uname -m)" = "x86_64" ]; then NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"; fi
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
      -DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX" \
      -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF > "$DEST/cmake.log" 2>&1 || { tail -30 "$DEST/cmake.log"; exit 1; }
# shellcheck disable=SC2086
cmake --build "$DEST/build" -j "$JOBS" --target $TARGETS > "$DEST/build.log" 2>&1 || { tail -30 "$DEST/build.log"; exit 1; }
mkdir -p "$DEST/bin"
for t in $TARGETS; do ln -sf "$DEST/build/bin/$t" "$DEST/bin/$t"; done
echo "llama.cpp tools (llama-cpp-python $LLAMA_CPP_PYTHON + deci-sliding-window.patch) in $DEST/bin"
