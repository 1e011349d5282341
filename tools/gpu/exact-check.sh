#!/usr/bin/env bash
# The check of the fix for what tools/gpu/exact-runs.sh found (run through device-test.sh, carry [".gpu"]): the
# bench's exact column with the default prompt ubatch, no memory limit and under the limit.
set -uo pipefail
R=$PWD
DEADLINE=${DEADLINE:-300}
export XDG_CACHE_HOME=$R/build/xdg
left() { echo $((DEADLINE - SECONDS)); }
step() {
    local need=$1 name=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then echo "== $name: skipped ($(left) s left)"; return; fi
    echo "== $name ($(left) s left)"; timeout "$(left)" "$@" 2>&1 | grep -E "│ [0-9-]|exact|Error|error|auto vs|mmap decode" ; echo "== $name: at ${SECONDS}s"
}
cd /tmp
python3 -c 'from dualblade.synthetic import cached_model; print(cached_model("llama-1b"))'
B="python3 -m dualblade.cli.app bench --gpu --synthetic llama-1b -n 16 -r 1 --timeout 120 --budgets 25% --host-budget 25%"
S="-c 32768 -p 16384"
step 40 free $B $S --policies vram,ram,mmap,direct,auto --no-cgroup --json $OUT/check-free.json
step 40 cgroup $B $S --policies vram,mmap,direct,auto --json $OUT/check-cgroup.json
