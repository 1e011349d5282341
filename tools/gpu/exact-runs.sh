#!/usr/bin/env bash
# The GPU host tiers' exactness (run through device-test.sh, carry [".gpu"]): the bench's exact column (tokens
# equal to all-in-VRAM), llama-1b, 32K context, a 16K prompt, 25% (where run 2 found cells inexact).
#   tools/gpu/exact-runs.sh          the bisection of run 3: the page cache with and without its copy threads
#                                    (DUALBLADE_PCOPY=0), without reading ahead (DUALBLADE_READ_AHEAD=0), with the
#                                    stock 512-token prompt ubatch; the direct path under a limit likewise
#   tools/gpu/exact-runs.sh check    every policy with the defaults, no limit and under the limit (the check of a fix;
#                                    DUALBLADE_AHEAD_MAX_ROWS=1000000 in the environment: without the prompt's guard)
#   tools/gpu/exact-runs.sh check noguard   the check, then the same cells without the guard
set -uo pipefail
R=$PWD
export XDG_CACHE_HOME=$R/build/xdg
. "$R/tools/gpu/deadline.sh"
STEP_FILTER='│ [0-9-]|exact|Error|error|auto vs|mmap decode'
cd /tmp
python3 -c 'from dualblade.synthetic import cached_model; print(cached_model("llama-1b"))'
B="python3 -m dualblade.cli.app bench --gpu --synthetic llama-1b -n 16 -r 1 --timeout 120 --budgets 25% --host-budget 25%"
S="-c 32768 -p 16384"
if [ "${1:-}" = check ]; then
    step 40 free $B $S --policies vram,ram,mmap,direct,auto --no-cgroup --json $OUT/check-free.json
    step 40 cgroup $B $S --policies vram,mmap,direct,auto --json $OUT/check-cgroup.json
    # "check noguard": again without the prompt's guard (reads ahead during large ubatches too)
    [ "${2:-}" = noguard ] || exit 0
    step 40 free-noguard env DUALBLADE_AHEAD_MAX_ROWS=1000000 $B $S --policies vram,mmap,direct,auto --no-cgroup \
        --json $OUT/check-free-noguard.json
    step 40 cgroup-noguard env DUALBLADE_AHEAD_MAX_ROWS=1000000 $B $S --policies vram,mmap,direct,auto \
        --json $OUT/check-cgroup-noguard.json
    exit 0
fi
step 40 free-default $B $S --policies vram,mmap,direct,auto --no-cgroup --json $OUT/free-default.json
step 30 free-nopcopy env DUALBLADE_PCOPY=0 $B $S --policies vram,mmap --no-cgroup --json $OUT/free-nopcopy.json
step 30 free-noreadahead env DUALBLADE_READ_AHEAD=0 $B $S --policies vram,mmap --no-cgroup --json $OUT/free-nora.json
step 40 cg-direct $B $S --policies vram,direct --json $OUT/cg-direct.json
step 40 cg-direct-noreadahead env DUALBLADE_READ_AHEAD=0 $B $S --policies vram,direct --json $OUT/cg-direct-nora.json
step 30 free-ub512 $B $S --policies vram,mmap --no-cgroup --ubatch 512 --json $OUT/free-ub512.json
step 40 cg-direct-ub512 $B $S --policies vram,direct --ubatch 512 --json $OUT/cg-direct-ub512.json
