#!/usr/bin/env bash
# A bisection of the GPU host tiers' exactness (run through device-test.sh, carry [".gpu"]): the bench's exact
# column (tokens equal to all-in-VRAM) for the page cache with and without its parallel copies out of the
# mapping (DUALBLADE_PCOPY=0), without reading ahead (DUALBLADE_READ_AHEAD=0) and with the stock 512-token prompt
# ubatch; the direct path under a limit likewise. 32K context, a 16K prompt, 25%: where run 2 found cells inexact.
set -uo pipefail
R=$PWD
DEADLINE=${DEADLINE:-540}
export XDG_CACHE_HOME=$R/build/xdg
left() { echo $((DEADLINE - SECONDS)); }
step() {
    local need=$1 name=$2; shift 2
    if [ "$(left)" -lt "$need" ]; then echo "== $name: skipped ($(left) s left)"; return; fi
    echo "== $name ($(left) s left)"; timeout "$(left)" "$@" 2>&1 | grep -E "│ [0-9-]|exact|Error|error" ; echo "== $name: at ${SECONDS}s"
}
cd /tmp
python3 -c 'from dualblade.synthetic import cached_model; print(cached_model("llama-1b"))'
B="python3 -m dualblade.cli.app bench --gpu --synthetic llama-1b -n 16 -r 1 --timeout 120 --budgets 25% --host-budget 25%"
S="-c 32768 -p 16384"
step 40 free-default $B $S --policies vram,mmap,direct,auto --no-cgroup --json $OUT/free-default.json
step 30 free-nopcopy env DUALBLADE_PCOPY=0 $B $S --policies vram,mmap --no-cgroup --json $OUT/free-nopcopy.json
step 30 free-noreadahead env DUALBLADE_READ_AHEAD=0 $B $S --policies vram,mmap --no-cgroup --json $OUT/free-nora.json
step 40 cg-direct $B $S --policies vram,direct --json $OUT/cg-direct.json
step 40 cg-direct-noreadahead env DUALBLADE_READ_AHEAD=0 $B $S --policies vram,direct --json $OUT/cg-direct-nora.json
step 30 free-ub512 $B $S --policies vram,mmap --no-cgroup --ubatch 512 --json $OUT/free-ub512.json
step 40 cg-direct-ub512 $B $S --policies vram,direct --ubatch 512 --json $OUT/cg-direct-ub512.json
