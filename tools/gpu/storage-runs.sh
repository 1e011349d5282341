#!/usr/bin/env bash
# Issue 21's GPU runs in one device call (run it through device-test.sh, carry [".gpu"]): the GPU tests, the
# numpy-first crash's stderr, then `bench --gpu` on llama-1b in three regimes, each step inside what is left of
# a deadline (DEADLINE seconds from the start, default 560) so that the call comes back with what it has:
#   32K context, a 16K prompt, 25% of the KV in VRAM and as host budget, under a host memory limit (cgroup)
#   32K, a 30K prompt, 15%, under a limit
#   32K, a 16K prompt, 25%, no limit (the page cache may hold everything)
# Results under $OUT: bench-*.json, pytest-gpu.log, numpy-first.log.
set -uo pipefail
R=$PWD
export XDG_CACHE_HOME=$R/build/xdg
. "$R/tools/gpu/deadline.sh"
cd /tmp
step 20 numpy-first bash -c 'python3 -c "from dualblade import synthetic; synthetic.write_model(\"/tmp/g3.gguf\", \"gemma3-tiny\")";
  P="import numpy, llama_cpp; llama_cpp.Llama(\"/tmp/g3.gguf\", n_ctx=512, verbose=False); print(\"ok\")";
  python3 -X faulthandler -c "$P" >$OUT/numpy-first.log 2>&1; echo "rc $?" >>$OUT/numpy-first.log;
  OPENBLAS_NUM_THREADS=1 python3 -c "$P" >>$OUT/numpy-first.log 2>&1; echo "rc $? (OPENBLAS_NUM_THREADS=1)" >>$OUT/numpy-first.log;
  python3 -c "import numpy, ctypes; ctypes.CDLL(\"libgomp.so.1\", mode=ctypes.RTLD_GLOBAL); $P" >>$OUT/numpy-first.log 2>&1; echo "rc $? (libgomp global first)" >>$OUT/numpy-first.log;
  timeout 150 cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 -c "$P" >>$OUT/numpy-first.log 2>&1;
  grep -E "^rc|^#[0-9]|SIGSEGV" $OUT/numpy-first.log | head -40'
step 60 weights python3 -c 'from dualblade.synthetic import cached_model; print(cached_model("llama-1b"))'
B="python3 -m dualblade.cli.app bench --gpu --synthetic llama-1b -n 16 -r 1 --timeout 120 --policies vram,ram,mmap,direct,auto"
step 60 bench-16k-cgroup $B -c 32768 -p 16384 --budgets 25% --host-budget 25% --json "$OUT/bench-16k-cgroup.json"
step 60 pytest-gpu bash -c "timeout 150 python3 -m pytest -q -rs -p no:cacheprovider --rootdir=$R $R/tests/test_gpu.py >$OUT/pytest-gpu.log 2>&1; tail -5 $OUT/pytest-gpu.log"
step 90 bench-30k-cgroup $B -c 32768 -p 30720 --budgets 15% --host-budget 15% --json "$OUT/bench-30k-cgroup.json"
step 60 bench-16k-free $B -c 32768 -p 16384 --budgets 25% --host-budget 25% --no-cgroup --json "$OUT/bench-16k-free.json"
