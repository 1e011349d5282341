#!/usr/bin/env bash
# On the GPU machine (the device tool, `.gpu` carried: tools/gpu/pack.sh makes it), from the repo root:
# builds the CUDA variant (tools/gpu/build.sh), lays the Python package out under /tmp/site as a wheel
# does (the tests refuse to run from the source tree), runs the C tests, then the arguments. Logs: $OUT.
#   tools/gpu/device-test.sh python3 -m pytest -x -q tests/test_gpu.py
set -uo pipefail
# the image's pytest plugins load another libstdc++ into the test process, and llama.cpp's model loader
# then crashes printing the model's info (std::ostream from the wrong library): run pytest bare
export PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out} PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
tools/gpu/build.sh; rc=$?
# (a call brings back 8 files at most: the build's logs only when it failed)
[ $rc -eq 0 ] || { cp build/cuda/*.log "$OUT/" 2>/dev/null; exit $rc; }
# a ggml built here goes back for the next call (tools/gpu/ggml-cache.sh: copy the pieces into .gpu/ggml/)
[ "$(cat build/cuda/ggml-prebuilt)" = 1 ] || tools/gpu/ggml-cache.sh pack build/cuda "$OUT"
mkdir -p /tmp/site/dualblade/cli && cp -r build/cuda/install/. /tmp/site/ && cp -r dualblade/. /tmp/site/dualblade/ &&
    cp cli/*.py /tmp/site/dualblade/cli/ || exit 1
export PYTHONPATH=/tmp/site
# memory limits for the benchmark's cells (cgroup v2): the command's group offers "memory" but holds our
# processes, and a group with processes cannot delegate a controller ("no internal processes"); move every
# process into a leaf, then delegate memory: dualblade.bench.cgroup puts its children beside the leaf
cg=/sys/fs/cgroup$(sed -n 's/^0:://p' /proc/self/cgroup)
if [ -w "$cg/cgroup.subtree_control" ] && ! grep -qw memory "$cg/cgroup.subtree_control"; then
    mkdir -p "$cg/leaf" && for p in $(cat "$cg/cgroup.procs"); do echo "$p" >"$cg/leaf/cgroup.procs" 2>/dev/null; done
    echo +memory >"$cg/cgroup.subtree_control" && echo "== cgroup: memory delegated under $cg" ||
        echo "== cgroup: cannot delegate memory under $cg (benchmarks need --no-cgroup)"
fi
# (SKIP_CTEST=1: a later call on a warm machine, whose C tests ran in the first)
[ "${SKIP_CTEST:-0}" = 1 ] ||
    (cd build/cuda && ctest --output-on-failure -j4 >/tmp/ctest.log 2>&1; echo "== ctest rc=$? $(tail -1 /tmp/ctest.log)")
"$@"
