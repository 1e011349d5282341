"""`dualblade bench --sessions`: what a conversation's saves cost once sessions grow by appending (issue 23).

One process, one context (the first policy and budget given): a prompt of real text, a save (the file written
whole), then replies of --gen-tokens tokens each followed by a save (appended), --appends of them. Reported: the
bytes each save wrote (its own count and the process's write counter, /proc/self/io) against the reply's new KV
rows (every layer's K and V row per token), the whole file's save for comparison, and the load of the grown
file against a fresh whole save of the same context (alternating, the files dropped from the page cache before
each load where the kernel allows: median of 5 each). Flash attention is on, as `chat --session` has it for a new
session: with it off V is stored transposed, and a reply's cells touch a piece of every one of its rows."""
from __future__ import annotations

import os
import statistics
import tempfile
import time
from contextlib import closing
from typing import Callable, Optional

from ..gguf_header import model_info, row_bytes
from ..speculative import workload_tokens
from .matrix import BenchOptions, check_options


def process_write_bytes() -> int:
    """Bytes this process caused to be written to storage (/proc/self/io write_bytes)."""
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    return 0


def _uncache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def row_bytes_per_token(model: str, type_k: str = "f16", type_v: str = "f16") -> int:
    """The KV bytes one token writes: a K and a V row in every layer."""
    return sum(row_bytes(l.n_embd_k_gqa, type_k) + row_bytes(l.n_embd_v_gqa, type_v) for l in model_info(model).layers)


def run_bench_sessions(opts: BenchOptions, appends: int, on_progress: Optional[Callable[[str, int, int], None]] = None,
                       log: Callable[[str], None] = lambda s: None) -> dict:
    from .. import Llama

    _, budgets = check_options(opts)  # the bench's own reading of --budgets (a % of the KV, or a size)
    policy = opts.policies[0]
    reply = opts.gen_tokens
    need = opts.prompt_tokens + appends * reply
    if need > opts.n_ctx:
        raise ValueError(f"--prompt-tokens {opts.prompt_tokens} + --appends {appends} x --gen-tokens {reply} is "
                         f"{need} tokens, more than --ctx-size {opts.n_ctx}")
    per_token = row_bytes_per_token(opts.model)
    # flash attention keeps V by cell, as chat --session has it: a reply's rows are contiguous in every tensor
    kw = {"n_ctx": opts.n_ctx, "verbose": False, "seed": 1, "kv_policy": policy, "flash_attn": True}
    if policy != "ram":
        kw["kv_dir"] = opts.kv_dir or (tempfile.gettempdir(),)
        kw["mem_budget"] = budgets[0][1]
    if opts.threads:
        kw["n_threads"] = opts.threads
    # the session files go to the (first) KV directory
    work = tempfile.mkdtemp(prefix="dualblade-bench-sessions-", dir=kw["kv_dir"][0] if "kv_dir" in kw else None)
    grown, fresh = os.path.join(work, "grown.dbkv"), os.path.join(work, "fresh.dbkv")
    saves = []
    try:
        with closing(Llama(str(opts.model), **kw)) as llm:
            toks = workload_tokens(llm, "fresh", need)
            log(f"prompt of {opts.prompt_tokens} tokens")
            llm.eval(toks[:opts.prompt_tokens])

            def save(path: str, new_tokens: int, compact: bool = False) -> dict:
                before, t0 = process_write_bytes(), time.perf_counter()
                st = llm.save_session(path, compact=compact)
                return {"tokens": llm.n_tokens, "new_tokens": new_tokens, "seconds": time.perf_counter() - t0,
                        "process_write_bytes": process_write_bytes() - before, **st}

            first = save(grown, opts.prompt_tokens)
            for i in range(appends):
                if on_progress:
                    on_progress(f"reply {i + 1} of {appends}, then a save", i, appends)
                at = opts.prompt_tokens + i * reply
                llm.eval(toks[at: at + reply])
                saves.append(save(grown, reply))
            whole = save(fresh, appends * reply, compact=True)
        loads = {"grown": [], "fresh": []}
        with closing(Llama(str(opts.model), **kw)) as llm:
            for k in range(10):
                which = ("grown", "fresh")[k % 2]
                path = grown if which == "grown" else fresh
                _uncache(path)
                t0 = time.perf_counter()
                llm.load_session(path)
                loads[which].append(time.perf_counter() - t0)
        disk = {n: os.stat(p).st_blocks * 512 for n, p in (("grown", grown), ("fresh", fresh))}
        size = {n: os.stat(p).st_size for n, p in (("grown", grown), ("fresh", fresh))}
    finally:
        for p in (grown, fresh):
            if os.path.exists(p):
                os.unlink(p)
        os.rmdir(work)
    new_rows = reply * per_token
    bound = 2 * new_rows + (1 << 20)
    worst = max(saves, key=lambda s: max(s["written_bytes"], s["process_write_bytes"]))
    return {
        "mode": "sessions", "model": str(opts.model), "model_label": opts.model_label, "policy": policy,
        "budget": opts.budgets[0] if policy != "ram" else None, "n_ctx": opts.n_ctx, "prompt_tokens": opts.prompt_tokens,
        "reply_tokens": reply, "appends": appends, "kv_bytes_per_token": per_token, "new_rows_bytes": new_rows,
        "bound_bytes": bound, "first_save": first, "whole_save": whole, "saves": saves,
        "appended_all": all(s["appended"] for s in saves),
        "median_written_bytes": statistics.median(s["written_bytes"] for s in saves),
        "median_process_write_bytes": statistics.median(s["process_write_bytes"] for s in saves),
        "max_written_bytes": max(s["written_bytes"] for s in saves),
        "max_process_write_bytes": max(s["process_write_bytes"] for s in saves),
        "worst_vs_bound": max(worst["written_bytes"], worst["process_write_bytes"]) / bound,
        "median_save_s": statistics.median(s["seconds"] for s in saves), "whole_save_s": whole["seconds"],
        "load_s": {k: statistics.median(v) for k, v in loads.items()}, "loads": loads,
        "load_grown_vs_fresh": statistics.median(loads["grown"]) / statistics.median(loads["fresh"]),
        "disk_bytes": disk, "file_bytes": size,
    }
