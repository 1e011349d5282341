#!/usr/bin/env bash
# Packs, into the git-ignored .gpu/, what a build on the GPU machine needs and cannot fetch there (it has no
# internet, and only the working tree plus carried folders travel, 64 MiB in all):
#   .gpu/vendor.tar.gz  the patched llama.cpp tree (tools/vendor.py prepare), trimmed to a CUDA build's needs;
#   .gpu/whl/           wheels of the Python packages we import that the machine's image lacks.
# Run it here from the repo root, again whenever patches/ or vendor.lock change, then
# run(carry=[".gpu"], command="tools/gpu/build.sh && ...").
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
PY=.venv/bin/python; [ -x "$PY" ] || PY=python3

"$PY" tools/vendor.py prepare

# local-only ignore rules (.gitignore is tracked); build.sh copies the vocab files into dualblade/data/
exclude=$(git rev-parse --git-path info/exclude)
for p in /.gpu/ /dualblade/data/; do grep -qxF "$p" "$exclude" 2>/dev/null || echo "$p" >>"$exclude"; done
mkdir -p .gpu/whl

# --- the vendor tree -------------------------------------------------------------------------------
V=vendor/llama-cpp-python L=vendor/llama-cpp-python/vendor/llama.cpp
# ggml/src/CMakeLists.txt enters a backend's folder only when its GGML_<NAME> option is on: keep CPU,
# CUDA (and BLAS, small) and drop the rest. app/, tools/, examples/, tests/ are entered only with options
# our CMakeLists.txt turns off (LLAMA_BUILD_APP follows LLAMA_STANDALONE, off under add_subdirectory).
drop=()
for d in "$L"/ggml/src/ggml-*/; do
    case $(basename "$d") in ggml-cpu | ggml-cuda | ggml-blas) ;; *) drop+=(--exclude="${d%/}") ;; esac
done
# the stamp goes along so that tools/vendor.py prepare there sees a current tree and does not download
tar -c --sort=name --owner=0 --group=0 --numeric-owner \
    --exclude=__pycache__ --exclude="$V/llama_cpp/lib" "${drop[@]}" \
    "$V"/{.dualblade-stamp,CMakeLists.txt,pyproject.toml,llama_cpp} \
    "$L"/{CMakeLists.txt,LICENSE,cmake,ggml,src,include,common,vendor,licenses} \
    "$L"/models/ggml-vocab-llama-{spm,bpe}.gguf |
    gzip -9n >.gpu/vendor.tar.gz.part
mv .gpu/vendor.tar.gz.part .gpu/vendor.tar.gz

# --- wheels ----------------------------------------------------------------------------------------
# Missing from the image (/work/.library/device/KINDS.md, "Python packages already there"): gguf (dualblade
# .synthetic; its needs numpy, pyyaml, requests, tqdm are there), diskcache (llama_cpp imports it),
# pexpect + ptyprocess (tests/test_cli.py). Same versions as in .venv; one version of each.
pins=()
for n in gguf diskcache pexpect ptyprocess; do
    pins+=("$n==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$n")")
done
for pin in "${pins[@]}"; do
    ls .gpu/whl/"${pin/==/-}"-*.whl >/dev/null 2>&1 && continue   # already there: no download
    rm -f .gpu/whl/"${pin%%==*}"-*.whl                                 # another version of it
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .gpu/whl "$pin"
done

du -ah .gpu | sort -k2
echo "total $(du -sh .gpu | cut -f1); carry it: run(carry=[\".gpu\"], command=\"tools/gpu/build.sh && ...\")"
