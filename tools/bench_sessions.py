#!/usr/bin/env python3
"""Persistent sessions against re-prefilling and against llama-cpp-python's save_state/load_state.

    .venv/bin/python tools/bench_sessions.py [--shape kv-heavy] [--ctx 8192] [--prefix 6000] [--budget 25%]
                                             [--policy direct] [--kv-dir DIR] [--json docs/bench-sessions.json]

Every measurement runs in a fresh process (the model's pages dropped from the page cache first where
root allows it), and reports wall times and the process's peak RSS (ru_maxrss):
  prefill   dualblade.Llama (policy, budget): eval the prefix, then one new token: TTFT of re-prefilling;
            then save_session (time, bytes, strategy)
  resume    a fresh dualblade.Llama: load_session, then the same new token: load -> first token
  stock     llama_cpp.Llama (all KV in RAM), same prefix: save_state + pickle to a file (time, bytes);
            a fresh process: unpickle + load_state, the same new token
  diskcache the same through llama-cpp-python's LlamaDiskCache (what create_completion does with set_cache)
The new token's logits must be bit-equal across prefill, resume and (between themselves) the stock runs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def _drop_caches(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    except OSError:
        pass


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _logits_hash(llm) -> str:
    import numpy as np

    lg = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
    return hashlib.sha256(lg.tobytes()).hexdigest()


def child(spec: dict) -> dict:
    import llama_cpp

    from dualblade import Llama

    model, n_ctx, prefix = spec["model"], spec["ctx"], spec["prefix"]
    _drop_caches(model)
    out: dict = {}
    kw = dict(n_ctx=n_ctx, n_batch=512, verbose=False, seed=1, flash_attn=True)
    t0 = time.perf_counter()
    if spec["role"] in ("prefill", "resume"):
        llm = Llama(model, kv_policy=spec["policy"], mem_budget=spec["budget"], kv_dir=spec["kv_dir"], **kw)
    else:
        llm = llama_cpp.Llama(model, **kw)
    out["model_load_s"] = time.perf_counter() - t0
    toks = llm.tokenize(b"The river ran past the old mill. " * (prefix // 4 + 8))[:prefix]
    new = llm.tokenize(b" and then", add_bos=False)[:1]
    out["rss_before"] = _peak_rss()
    if spec["role"] in ("prefill", "stock_save", "diskcache_save"):
        t0 = time.perf_counter()
        llm.eval(toks)
        out["prefill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if spec["role"] == "prefill":
            st = llm.save_session(spec["session"])
            out["save_s"] = time.perf_counter() - t0
            out["save"] = st
        elif spec["role"] == "diskcache_save":  # what create_completion does with llm.set_cache(LlamaDiskCache)
            from llama_cpp.llama_cache import LlamaDiskCache

            cache = LlamaDiskCache(cache_dir=spec["session"], capacity_bytes=4 << 30)
            cache[toks] = llm.save_state()
            cache.cache.close()
            out["save_s"] = time.perf_counter() - t0
        else:
            import pickle

            state = llm.save_state()
            with open(spec["session"], "wb") as f:
                pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
                f.flush()
                os.fsync(f.fileno())
            out["save_s"] = time.perf_counter() - t0
        out["file_bytes"] = sum(f.stat().st_size for f in Path(spec["session"]).rglob("*")) \
            if os.path.isdir(spec["session"]) else os.path.getsize(spec["session"])
        t0 = time.perf_counter()
        llm.eval(new)
        out["new_token_s"] = time.perf_counter() - t0
        out["ttft_reprefill_s"] = out["prefill_s"] + out["new_token_s"]
    else:
        t0 = time.perf_counter()
        if spec["role"] == "resume":
            out["load"] = {k: v for k, v in llm.load_session(spec["session"]).items() if k != "app"}
        elif spec["role"] == "diskcache_load":  # create_completion's lookup: the longest cached prefix
            from llama_cpp.llama_cache import LlamaDiskCache

            cache = LlamaDiskCache(cache_dir=spec["session"], capacity_bytes=4 << 30)
            state = cache[toks + new]
            llm.load_state(state)
            del state
        else:
            import pickle

            with open(spec["session"], "rb") as f:
                state = pickle.load(f)
            llm.load_state(state)
            del state
        out["load_s"] = time.perf_counter() - t0
        llm.eval(new)
        out["load_to_first_token_s"] = time.perf_counter() - t0
    out["logits"] = _logits_hash(llm)
    out["peak_rss"] = _peak_rss()
    llm.close()
    return out


def run(spec: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{spec['role']} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--shape", default="kv-heavy")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--prefix", type=int, default=6000)
    ap.add_argument("--budget", default="25%")
    ap.add_argument("--policy", default="direct")
    ap.add_argument("--kv-dir", default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    from dualblade.gguf_header import model_info
    from dualblade.synthetic import cached_model

    model = str(cached_model(a.shape))
    kv_total = sum(k + v for k, v in model_info(model).layer_kv_bytes(a.ctx, "f16", "f16"))
    budget = int(kv_total * float(a.budget[:-1]) / 100) if a.budget.endswith("%") else a.budget
    kv_dir = a.kv_dir or os.path.expanduser("~/.cache/dualblade/kv")
    os.makedirs(kv_dir, exist_ok=True)
    work = Path(kv_dir) / "bench-sessions"
    work.mkdir(exist_ok=True)
    base = dict(model=model, ctx=a.ctx, prefix=a.prefix, policy=a.policy, budget=budget, kv_dir=kv_dir)
    ses, pkl = str(work / "s.dbkv"), str(work / "s.pickle")
    res = {"shape": a.shape, "ctx": a.ctx, "prefix": a.prefix, "policy": a.policy, "budget_bytes": budget,
           "kv_bytes_total": kv_total, "kernel": os.uname().release}
    res["prefill"] = run({**base, "role": "prefill", "session": ses})
    res["resume"] = run({**base, "role": "resume", "session": ses})
    res["stock_save"] = run({**base, "role": "stock_save", "session": pkl})
    res["stock_load"] = run({**base, "role": "stock_load", "session": pkl})
    dc = str(work / "diskcache")
    res["diskcache_save"] = run({**base, "role": "diskcache_save", "session": dc})
    res["diskcache_load"] = run({**base, "role": "diskcache_load", "session": dc})
    res["exact"] = res["prefill"]["logits"] == res["resume"]["logits"]
    res["diskcache_exact"] = res["diskcache_save"]["logits"] == res["diskcache_load"]["logits"]
    res["stock_exact"] = res["stock_save"]["logits"] == res["stock_load"]["logits"]
    res["speedup_vs_reprefill"] = res["prefill"]["ttft_reprefill_s"] / res["resume"]["load_to_first_token_s"]
    for f in (ses, pkl):
        os.unlink(f)
    import shutil

    shutil.rmtree(dc, ignore_errors=True)
    mib = 2**20
    print(f"{a.shape}, n_ctx {a.ctx}, prefix {a.prefix}, {a.policy} at {a.budget} ({budget / mib:.0f} MiB of "
          f"{kv_total / mib:.0f} MiB KV)")
    p, r, ss, sl = res["prefill"], res["resume"], res["stock_save"], res["stock_load"]
    print(f"  re-prefill TTFT            {p['ttft_reprefill_s']:8.2f} s   peak RSS {p['peak_rss'] / mib:7.0f} MiB")
    print(f"  save_session               {p['save_s']:8.3f} s   {p['file_bytes'] / mib:7.0f} MiB file, "
          f"{p['save']['strategy']}, {p['save']['memory_bytes'] / mib:.0f} MiB from memory")
    print(f"  load_session -> 1st token  {r['load_to_first_token_s']:8.3f} s   (load {r['load_s']:.3f} s)   "
          f"peak RSS {r['peak_rss'] / mib:7.0f} MiB   exact: {res['exact']}   {res['speedup_vs_reprefill']:.1f}x")
    print(f"  stock save_state+pickle    {ss['save_s']:8.3f} s   {ss['file_bytes'] / mib:7.0f} MiB file   "
          f"peak RSS {ss['peak_rss'] / mib:7.0f} MiB (prefill {ss['prefill_s']:.2f} s)")
    print(f"  stock load_state -> 1st    {sl['load_to_first_token_s']:8.3f} s   (load {sl['load_s']:.3f} s)   "
          f"peak RSS {sl['peak_rss'] / mib:7.0f} MiB   exact: {res['stock_exact']}")
    ds, dl = res["diskcache_save"], res["diskcache_load"]
    print(f"  stock LlamaDiskCache save  {ds['save_s']:8.3f} s   {ds['file_bytes'] / mib:7.0f} MiB on disk   "
          f"peak RSS {ds['peak_rss'] / mib:7.0f} MiB")
    print(f"  stock LlamaDiskCache -> 1st{dl['load_to_first_token_s']:8.3f} s   (load {dl['load_s']:.3f} s)   "
          f"peak RSS {dl['peak_rss'] / mib:7.0f} MiB   exact: {res['diskcache_exact']}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
