#!/usr/bin/env bash
# ggml built once, carried to later calls: the CUDA backend is most of a fresh GPU machine's build (about 200 s of
# its 30 device minutes), and our patches touch it only through 0002. An install of ggml (lib/, include/,
# lib/cmake/ggml) is packed into pieces a call can bring back, and a later call builds llama.cpp's own sources
# and libdualblade against it (LLAMA_USE_SYSTEM_GGML). The key is what ggml's build depends on: the locked sdist,
# patch 0002 (ggml-cuda), our CMakeLists.txt (ggml's options), the CUDA architecture and this script.
#   tools/gpu/ggml-cache.sh key                 the key
#   tools/gpu/ggml-cache.sh pack BUILD DEST     install ggml from BUILD, pack it into DEST/ggml-<key>.tgz.NN
#   tools/gpu/ggml-cache.sh unpack SRC DIR      from pieces in SRC with this key: ggml into DIR; exit 1 if none
# Here: copy the pieces a call returned into .gpu/ggml/ (git-ignored), then carry .gpu.
set -euo pipefail
cd "$(dirname "$0")/../.."
arch=${CMAKE_CUDA_ARCHITECTURES:-90}
key() {
    cat vendor.lock patches/0002-*.patch CMakeLists.txt tools/gpu/ggml-cache.sh | sha256sum | cut -c1-12 | sed "s/^/sm$arch-/"
}
case "${1:-}" in
key) key ;;
pack)
    build=$2 dest=$3 k=$(key) tmp=$(mktemp -d)
    # ggml's own install rules: its libraries, headers and CMake package, relocatable (PACKAGE_INIT)
    cmake --install "$build" --prefix "$tmp" >/dev/null
    mkdir -p "$dest"
    tar -C "$tmp" -c lib/cmake/ggml $(cd "$tmp" && ls -d lib/libggml*.so* include/ggml*.h include/gguf.h) |
        gzip -1 | split -b 15M -d - "$dest/ggml-$k.tgz."
    rm -rf "$tmp"
    ls -l "$dest"/ggml-"$k".tgz.* | awk '{s += $5} END {printf "== ggml-cache: %d pieces, %.1f MB\n", NR, s / 1e6}'
    ;;
unpack)
    src=$2 dir=$3 k=$(key)
    compgen -G "$src/ggml-$k.tgz.*" >/dev/null || { echo "== ggml-cache: none for key $k in $src"; exit 1; }
    rm -rf "$dir" && mkdir -p "$dir"
    cat "$src"/ggml-"$k".tgz.* | tar -C "$dir" -xz
    echo "== ggml-cache: ggml $k from $src"
    ;;
*) echo "usage: $0 key | pack BUILD DEST | unpack SRC DIR" >&2; exit 2 ;;
esac
