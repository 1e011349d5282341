#!/usr/bin/env bash
# issue 21 item 6 on the GPU machine (through device-test.sh): why the build's C++ runtime is static, and
# whether numpy imported first still crashes (stock llama_cpp, and dualblade)
set -uo pipefail
R=$PWD
echo "== link flags"; grep -E '^CMAKE_(CXX|SHARED|EXE|MODULE)_LINKER_FLAGS|^CMAKE_CXX_FLAGS:|^CMAKE_CXX_COMPILER:' build/cuda/CMakeCache.txt
env | grep -E 'FLAGS|CXX|CC=' ; g++ -dumpspecs 2>/dev/null | grep -n -A2 'static-libstdc\|^\*link:' | head -12
(cd build/cuda && ninja -t commands llama 2>/dev/null | tail -1 | tr ' ' '\n' | grep -E 'static|stdc|^-Wl' | sort | uniq -c)
for f in build/cuda/install/llama_cpp/lib/lib{llama,ggml-base,ggml-cuda}.so*; do [ -L "$f" ] || { echo "$f: $(readelf -d $f | grep -c 'libstdc++') needs libstdc++, $(nm -D --defined-only $f | grep -c _ZNSo) ostream symbols"; }; done
cd /tmp
python3 -c "from dualblade import synthetic; synthetic.write_model('/tmp/g3.gguf', 'gemma3-tiny')"
P="llama_cpp.Llama('/tmp/g3.gguf', n_ctx=512, verbose=False); print('ok')"
python3 -c "import numpy, llama_cpp; $P" 2>&1 | tail -1; echo "== stock, numpy first: rc ${PIPESTATUS[0]}"
python3 -c "import numpy, dualblade, llama_cpp; $P" 2>&1 | tail -1; echo "== numpy, dualblade, stock Llama: rc ${PIPESTATUS[0]}"
python3 -c "import numpy, dualblade; dualblade.Llama('/tmp/g3.gguf', n_ctx=512, verbose=False); print('ok')" 2>&1 | tail -1; echo "== numpy, dualblade.Llama: rc ${PIPESTATUS[0]}"
timeout 120 python3 -m pytest -q -rs -p no:cacheprovider --rootdir=$R "$R/tests/test_gpu.py${PYTEST_K:-}" >$OUT/pytest-gpu.log 2>&1; tail -3 $OUT/pytest-gpu.log
