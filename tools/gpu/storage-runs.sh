#!/usr/bin/env bash
# Issue 21's GPU runs in one device call (run it through device-test.sh; the first call of a machine carries
# [".gpu"]), each step inside what is left of a deadline (DEADLINE seconds from the start, default 560) so that
# the call comes back with what it has. `bench --gpu` on llama-1b at 32K context, in the regimes REGIMES names:
#   16k-cgroup  a 16K prompt, 25% of the KV in VRAM and as host budget, under a host memory limit (cgroup)
#   30k-cgroup  a 30K prompt, 15%, under a limit
#   16k-free    a 16K prompt, 25%, no limit (the page cache may hold everything)
#   128k        128K context, a 64K prompt, 1 GiB of VRAM and 1 GiB of host budget, under a limit
# REPS repetitions (default 1), POLICIES (default vram,ram,mmap,direct,auto), SHAPE (default llama-1b: another
# synthetic shape, e.g. kv-heavy, names its files bench-SHAPE-REGIME.json), VARIANTS
# (e.g. "DUALBLADE_WRITE_AROUND=0 -": each regime once per environment setting, "-" for none, files
# ...-DUALBLADE_WRITE_AROUND-0.json and ...-default.json, a value's other characters as '-': DUALBLADE_IO_SHAPE=4M:16
# gives ...-DUALBLADE_IO_SHAPE-4M-16.json; side by side in one call). TESTS=1 (the default) first runs
# tests/test_gpu.py and the numpy-first checks (tools/gpu/numpy-first.sh). BENCH_RING=N first runs
# native/tests/bench_ring.c for N rounds on the disk the benches' store lives on (the read-ahead lanes' settings
# side by side, no GPU needed). CGSTAT=1 samples the cells' cgroups beside the runs (tools/gpu/cgstat.sh, started
# here: after device-test.sh has delegated the memory controller, which a process of the command's own group
# left running would refuse). Results under $OUT: bench-*.json, pytest-gpu.log, numpy-first.log, bench-ring.log,
# cgstat.log.
set -uo pipefail
R=$PWD
export XDG_CACHE_HOME=$R/build/xdg
. "$R/tools/gpu/deadline.sh"
if [ "${CGSTAT:-0}" = 1 ]; then
    "$R/tools/gpu/cgstat.sh" >"$OUT/cgstat.log" 2>&1 &
    trap "kill $! 2>/dev/null" EXIT
fi
if [ "${BENCH_RING:-0}" -gt 0 ]; then
    ring=$(find -L "$R/build/cuda" -name bench_ring -type f | head -1) fake=$(find -L "$R/build/cuda" -name libfake_cuda.so | head -1)
    mkdir -p "$XDG_CACHE_HOME"
    [ -n "$ring" ] && [ -n "$fake" ] || echo "== bench-ring: no bench_ring or libfake_cuda.so under build/cuda"
    [ -n "$ring" ] && [ -n "$fake" ] && step 40 bench-ring bash -c "cd /tmp && DUALBLADE_TEST_DIR=$XDG_CACHE_HOME DUALBLADE_CUDA_LIB=$fake $ring direct $BENCH_RING >$OUT/bench-ring.log 2>&1; tail -1 $OUT/bench-ring.log"
fi
if [ "${TESTS:-1}" = 1 ]; then
    step 60 numpy-first bash -c "PYTEST_K=::test_numpy_imported_first tools/gpu/numpy-first.sh >$OUT/numpy-first.log 2>&1; grep -E '^==|passed|failed|needs' $OUT/numpy-first.log"
    step 60 pytest-gpu bash -c "cd /tmp; timeout 150 python3 -m pytest -q -rs -p no:cacheprovider --rootdir=$R $R/tests/test_gpu.py >$OUT/pytest-gpu.log 2>&1; tail -3 $OUT/pytest-gpu.log"
fi
cd /tmp
S=${SHAPE:-llama-1b}
step 60 weights python3 -c "from dualblade.synthetic import cached_model; print(cached_model('$S'))"
B="python3 -m dualblade.cli.app bench --gpu --synthetic $S -n 16 -r ${REPS:-1} --timeout 150 --policies ${POLICIES:-vram,ram,mmap,direct,auto}"
for regime in ${REGIMES:-16k-cgroup 30k-cgroup 16k-free}; do
for variant in ${VARIANTS:-none}; do
    J=$OUT/bench-$regime; [ "$S" = llama-1b ] || J=$OUT/bench-$S-$regime
    case $variant in
    none) ;;
    -) J=$J-default ;;
    *=*) v=${variant#*=}; J=$J-${variant%%=*}-${v//[^A-Za-z0-9_.-]/-}; export "${variant?}" ;; # (what a call brings back: no ':')
    *) echo "storage-runs.sh: a variant is NAME=VALUE or -, not $variant"; continue ;;
    esac
    J=$J.json
    case $regime in
    16k-cgroup) step 60 bench-$regime $B -c 32768 -p 16384 --budgets 25% --host-budget 25% --json "$J" ;;
    30k-cgroup) step 90 bench-$regime $B -c 32768 -p 30720 --budgets 15% --host-budget 15% --json "$J" ;;
    16k-free) step 60 bench-$regime $B -c 32768 -p 16384 --budgets 25% --host-budget 25% --no-cgroup --json "$J" ;;
    128k) step 120 bench-$regime $B -c 131072 -p 65536 --budgets 1G --host-budget 1G --timeout 400 --json "$J" ;;
    *) echo "storage-runs.sh: unknown regime $regime" ;;
    esac
    case $variant in *=*) unset "${variant%%=*}" ;; esac
done
done
