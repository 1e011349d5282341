#!/usr/bin/env bash
# Issue 22 on the GPU machine (through device-test.sh): speculative decoding over the VRAM tier, on real text.
# The machine cannot install the bundled model's packages and a call carries at most 64 MiB, so the Gemma-3-270M
# GGUF (242 MiB) comes in pieces over several calls of one warm machine: tools/gpu/split-model.sh cuts it into
# .gm/p0 ... .gm/p4 here (git-ignored), each call carries one piece and keeps it in /tmp/gm (a call's tree holds only
# the ignored paths it carries: `mkdir -p /tmp/gm && cp -r .gm/p* /tmp/gm/`), and this script joins them and checks
# the sum. Then: DIAG=1 tools/gpu/spec-diag.py, tests/test_gpu_speculative.py, and `bench --draft lookup --gpu`
# (16K context, a 14,000-token prompt, 64 tokens, the direct and auto host tiers under the bench's host limit, 20%
# host budget: Gemma-3-270M's direct path needs 32 MiB at 16K, 10% is 29). Results under $OUT.
set -uo pipefail
R=$PWD
export XDG_CACHE_HOME=$R/build/xdg
. "$R/tools/gpu/deadline.sh"
G=/tmp/gemma-3-270m-q4_k_m.gguf
mkdir -p /tmp/gm && cp -r .gm/p* /tmp/gm/ 2>/dev/null
cat /tmp/gm/p*/g.* >$G 2>/dev/null
[ "$(sha256sum $G | cut -c1-64)" = "$(cat /tmp/gm/p4/sha256 2>/dev/null)" ] ||
    { echo "speculative-runs.sh: the model's pieces are missing or damaged: $(ls /tmp/gm/p*/ 2>&1 | tr '\n' ' ')"; exit 4; }
export DUALBLADE_TEST_GEMMA=$G
cd /tmp
[ "${DIAG:-0}" = 1 ] && step 60 spec-diag python3 "$R/tools/gpu/spec-diag.py" $G
step 60 pytest-spec bash -c "timeout 240 python3 -m pytest -q -rs -p no:cacheprovider --rootdir=$R $R/tests/test_gpu_speculative.py >$OUT/pytest-spec.log 2>&1; tail -3 $OUT/pytest-spec.log"
step 90 bench-spec python3 -m dualblade.cli.app bench $G --draft lookup --gpu -c 16384 -p 14000 -n 64 -r ${REPS:-1} \
    --budgets ${BUDGETS:-25%} --host-budget ${HOST_BUDGET:-20%} --policies ${POLICIES:-direct,auto} --timeout 200 \
    --json "$OUT/bench-spec-gpu.json"
