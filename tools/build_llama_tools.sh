#!/usr/bin/env bash
# Build llama.cpp's llama-quantize, llama-perplexity and llama-bench from the llama.cpp tree that the
# llama-cpp-python sdist vendors (the same llama.cpp the Python engine runs). No network is needed
# once the sdist is here; ~6 min on 2 cores.
#
#   tools/build_llama_tools.sh [SRC] [BUILD_DIR]
#     SRC        llama.cpp source tree, or a llama-cpp-python sdist (.tar.gz) to unpack
#                (default: $LLAMA_CPP_SRC, /tmp/lcpsrc/llama_cpp_python-0.3.36/vendor/llama.cpp,
#                 else `pip download --no-deps llama-cpp-python==0.3.36` into the build dir)
#     BUILD_DIR  default: ${LFQ_EXPORT_CACHE:-~/.cache/lfq-export}/llama-tools
#   TARGETS="llama-quantize" builds only that tool (what the test suite needs; CI does this).
# The binaries end up in BUILD_DIR/bin; run them with LD_LIBRARY_PATH=BUILD_DIR/bin.
set -euo pipefail

VERSION=0.3.36
CACHE="${LFQ_EXPORT_CACHE:-$HOME/.cache/lfq-export}"
BUILD="${2:-$CACHE/llama-tools}"
SRC="${1:-${LLAMA_CPP_SRC:-/tmp/lcpsrc/llama_cpp_python-$VERSION/vendor/llama.cpp}}"
mkdir -p "$BUILD"

if [[ "$SRC" == *.tar.gz ]]; then
    tar -xzf "$SRC" -C "$BUILD"
    SRC="$BUILD/llama_cpp_python-$VERSION/vendor/llama.cpp"
elif [[ ! -f "$SRC/CMakeLists.txt" ]]; then
    echo "no llama.cpp tree at $SRC: downloading the llama-cpp-python $VERSION sdist" >&2
    pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$BUILD"
    tar -xzf "$BUILD/llama_cpp_python-$VERSION.tar.gz" -C "$BUILD"
    SRC="$BUILD/llama_cpp_python-$VERSION/vendor/llama.cpp"
fi

cmake -S "$SRC" -B "$BUILD/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_CURL=OFF
# shellcheck disable=SC2086
cmake --build "$BUILD/build" -j "${JOBS:-2}" --target ${TARGETS:-llama-quantize llama-perplexity llama-bench}
rm -rf "$BUILD/bin"
ln -s "$BUILD/build/bin" "$BUILD/bin"
ls -la "$BUILD/bin/"
echo "built: $BUILD/bin (export LD_LIBRARY_PATH=$BUILD/bin)"
