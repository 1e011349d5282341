"""First numbers for the VRAM tier on one GPU (not yet `dualblade bench --gpu`): prefill and decode of the
kv-heavy shape (32 KiB of f16 KV per token) at a long depth, each cell a fresh process.
Usage: perf.py [n_ctx] [n_prompt] [n_gen]"""
import json
import os
import subprocess
import sys
import tempfile

CELLS = {
    "vram (stock, FA on)": "dict()",
    "stock offload_kqv=False, FA on": "dict(offload_kqv=False)",
    "stock offload_kqv=False, FA off": "dict(offload_kqv=False, flash_attn=False)",
    "dualblade 25% VRAM, host RAM (pinned)": "dict(vram_budget=Q)",
    "dualblade 25% VRAM, host direct": "dict(vram_budget=Q, kv_policy='direct', mem_budget=Q, kv_dir=D)",
}
BODY = """
import json, sys, time
from contextlib import closing
import dualblade, llama_cpp
p, n_ctx, n_prompt, n_gen, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
Q = str(n_ctx * 32 * 1024 // 4 // 2**20) + 'M'
kw = dict(n_ctx=n_ctx, n_gpu_layers=-1, flash_attn=True, verbose=False, n_batch=2048, n_ubatch=512)
kw.update({cell})
cls = dualblade.Llama if 'vram_budget' in kw or 'kv_policy' in kw else llama_cpp.Llama
llm = cls(p, **kw)
toks = [(i * 7919) % 30000 + 100 for i in range(n_prompt)]
t0 = time.perf_counter(); llm.eval(toks); t1 = time.perf_counter()
for _ in range(n_gen):
    llm.eval([llm.sample(temp=0.0)])
t2 = time.perf_counter()
st = llm.kv_stats()['vram'] if hasattr(llm, 'kv_stats') else None
print('RESULT ' + json.dumps(dict(prefill_s=t1 - t0, decode_ms=(t2 - t1) / n_gen * 1e3, vram=st)), flush=True)
llm.close()
"""

n_ctx, n_prompt, n_gen = (int(a) for a in (sys.argv[1:4] + ["32768", "16384", "32"][len(sys.argv[1:4]):]))
out = os.environ.get("OUT", "/tmp")
from dualblade.synthetic import write_model  # noqa: E402

with tempfile.TemporaryDirectory(dir="/tmp") as d:
    model = str(write_model(d + "/kv-heavy.gguf", "kv-heavy", seed=1))
    rows = {}
    for name, cell in CELLS.items():
        r = subprocess.run([sys.executable, "-c", BODY.format(cell=cell), model, str(n_ctx), str(n_prompt),
                            str(n_gen), d], capture_output=True, text=True, timeout=400)
        res = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
        rows[name] = json.loads(res[0][7:]) if res else {"error": (r.stderr.strip().splitlines() or ["?"])[-1]}
        print(f"{name:42s} {rows[name]}", flush=True)
    json.dump(dict(n_ctx=n_ctx, n_prompt=n_prompt, n_gen=n_gen, cells=rows), open(f"{out}/perf.json", "w"), indent=1)
