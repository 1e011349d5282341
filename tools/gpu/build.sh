#!/usr/bin/env bash
# Builds dualblade with the patched llama.cpp, from the repo root, on the GPU machine (no internet: the source
# and the wheels come from .gpu/, made here by tools/gpu/pack.sh and carried) or here.
#   tools/gpu/build.sh [cpu] [-- COMMAND...]
# CUDA (sm_90, the H200) into build/cuda; `cpu` or DUALBLADE_GPU=0: without CUDA, into build/cpu.
# COMMAND then runs with PYTHONPATH=<build>/install:<repo>:/tmp/site (llama_cpp with its lib/ from the
# install, dualblade from the working tree, the wheels), the same that this prints at the end.
# PYTHON (default python3) is the interpreter; it needs numpy, jinja2, typing_extensions, typer, rich.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=$(command -v "${PYTHON:-python3}")
gpu=${DUALBLADE_GPU:-1}
[ "${1:-}" = cpu ] && { gpu=0; shift; }
[ "${1:-}" = -- ] && shift

B=build/cuda; [ "$gpu" = 0 ] && B=build/cpu
args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DDUALBLADE_BUILD_TESTS=ON -DCMAKE_INSTALL_PREFIX="$PWD/$B/install"
      -DPython_EXECUTABLE="$PYTHON")
if [ "$gpu" = 0 ]; then
    args+=(-DGGML_CUDA=OFF)
else
    # a pinned architecture: `native` needs a GPU visible at configure time, the default list builds many
    args+=(-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90)
    command -v nvcc >/dev/null || [ -n "${CUDACXX:-}" ] || export CUDACXX=/usr/local/cuda/bin/nvcc
fi
t0=$SECONDS

# ggml from an earlier call where .gpu/ggml holds it for this key (tools/gpu/ggml-cache.sh): only llama.cpp's own
# sources and libdualblade are built then (DUALBLADE_GGML_CACHE=0: build it all)
ggml=/tmp/ggml-prebuilt prebuilt=0
# (a warm machine keeps what an earlier call unpacked: a later call need not carry the pieces again)
key=$(tools/gpu/ggml-cache.sh key)
if [ "$gpu" = 1 ] && [ "${DUALBLADE_GGML_CACHE:-1}" = 1 ] &&
    { [ "$(cat "$ggml/.key" 2>/dev/null)" = "$key" ] ||
      { tools/gpu/ggml-cache.sh unpack .gpu/ggml "$ggml" && echo "$key" >"$ggml/.key"; }; }; then
    args+=(-DLLAMA_USE_SYSTEM_GGML=ON -Dggml_DIR="$ggml/lib/cmake/ggml")
    prebuilt=1
fi

# The patched llama.cpp: the packed tree where there is none or it is not current for patches/ (a warm
# machine keeps the vendor/ of an earlier call). There, tools/vendor.py prepare cannot download the sdist.
if ! "$PYTHON" tools/vendor.py status 2>/dev/null | grep -q ': current;'; then
    [ -f .gpu/vendor.tar.gz ] && tar xzf .gpu/vendor.tar.gz
    "$PYTHON" tools/vendor.py status | grep -q ': current;' ||
        echo "build.sh: vendor tree not current for patches/ (run tools/gpu/pack.sh again); trying to prepare it" >&2
fi

# Python packages the image lacks (gguf, diskcache, ...), beside it rather than into it
if compgen -G ".gpu/whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl
fi
export PYTHONPATH="$PWD/$B/install:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

# logs in the build folder; only a failure's lines printed (the device returns the last 12,000 characters)
mkdir -p "$B"
cmake -S . -B "$B" "${args[@]}" >"$B/configure.log" 2>&1 || { tail -40 "$B/configure.log"; exit 1; }
t1=$SECONDS
cmake --build "$B" -j"$(nproc)" >"$B/build.log" 2>&1 ||
    { grep -E -A5 "error|FAILED" "$B/build.log" | head -80; tail -5 "$B/build.log"; exit 1; }
t2=$SECONDS
cmake --install "$B" >/dev/null
[ "$prebuilt" = 0 ] || cp -a "$ggml"/lib/libggml*.so* "$B/install/llama_cpp/lib/"
echo "$prebuilt" >"$B/ggml-prebuilt"
# dualblade imported from the working tree looks for its tokenizers in dualblade/data/vocab (synthetic.py's
# VOCAB_DIR), where a wheel has them; ignored through .git/info/exclude (tools/gpu/pack.sh)
mkdir -p dualblade/data/vocab && cp "$B"/install/dualblade/data/vocab/*.gguf dualblade/data/vocab/
echo "== build.sh: configure $((t1 - t0)) s, build $((t2 - t1)) s, install $((SECONDS - t2)) s ($B; ggml $([ $prebuilt = 1 ] && echo carried || echo built))"
"$PYTHON" -c "import llama_cpp, dualblade; print('== llama_cpp', llama_cpp.__version__, 'from', llama_cpp.__file__,
      '| GPU offload:', llama_cpp.llama_supports_gpu_offload())"
echo "== PYTHONPATH=$PYTHONPATH"
[ $# -eq 0 ] || exec "$@"
