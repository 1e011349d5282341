"""Run inside a memory-limited cgroup by test_memory.py: fill a context, print what happened."""
import json
import resource
import sys

from dualblade import Llama

model, policy, budget, n_ctx, n_tokens, kv_dir = sys.argv[1:7]
budget = None if budget == "none" else int(budget)
llm = Llama(model, n_ctx=int(n_ctx), n_batch=512, flash_attn=True, verbose=False, kv_policy=policy,
            mem_budget=budget, kv_dir=kv_dir)
toks = (llm.tokenize(b"the quick brown fox jumps over the lazy dog " * 2000))[: int(n_tokens)]
llm.eval(toks)
out = []
for _ in range(8):  # a few decode steps over the full context
    tok = llm.sample(temp=0.0)
    out.append(tok)
    llm.eval([tok])
st = llm.kv_stats()
print(json.dumps({"n_tokens": llm.n_tokens, "out": out, "kv_bytes_total": st["kv_bytes_total"],
                  "offloaded_bytes": st["offloaded_bytes"], "bytes_read": st["bytes_read"],
                  "paths": st["layers_by_path"],
                  "switches": st["switches"], "memory": st["memory"],
                  "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
