"""Probe processes for test_reliability.py; each prints one JSON line at the end.

spike MODEL N_CTX N_PROMPT N_DECODE BUDGET KV_DIR SPIKE_MIB SPIKE_AT
    kv_policy auto: prefill N_PROMPT tokens, decode N_DECODE greedy tokens; after decode step SPIKE_AT
    (if SPIKE_MIB > 0) start an allocator process (same cgroup: a child) that touches SPIKE_MIB MiB of
    anonymous memory and holds it until the decode ends. Reports the tokens, each step's layer paths,
    when the allocator held its memory, the switches and whether the allocator survived.

soak MODEL N_CTX BUDGET KV_DIR N_STEPS
    kv_policy direct: N_STEPS decode steps in cycles (reset or prefix reuse, prefill, decode); the first
    cycle fills the context (the warm-up). Checks the counters after every step and samples VmRSS (and
    its parts) and the open fds from /proc/self every 100 steps and at the end of the warm-up.
"""
import json
import os
import select
import subprocess
import sys
import time

from dualblade import Llama
from dualblade.bench import cgroup

ALLOCATOR = r"""
import mmap, sys
from dualblade.bench import cgroup
n = int(sys.argv[1])
m = mmap.mmap(-1, n << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
chunk = b"\x5a" * (1 << 20)
for _ in range(n):
    m.write(chunk)  # every page touched: anonymous memory charged to the cgroup
print("held", cgroup.current(), flush=True)
sys.stdin.read()  # hold it until the probe is done
print(sum(m[i] for i in range(0, n << 20, 1 << 20)) == 0x5a * n, flush=True)
"""

TEXT = b"the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat " * 400


def spike(model, n_ctx, n_prompt, n_decode, budget, kv_dir, spike_mib, spike_at):
    t0 = time.monotonic()
    llm = Llama(model, n_ctx=int(n_ctx), n_batch=512, flash_attn=True, verbose=False, kv_policy="auto",
                mem_budget=int(budget), kv_dir=kv_dir)
    start = llm.kv_stats()
    llm.eval(llm.tokenize(TEXT)[: int(n_prompt)])
    out, steps = [], []
    alloc, held_step, t_held, alloc_cgroup = None, None, None, None
    for i in range(int(n_decode)):
        tok = llm.sample(temp=0.0)
        out.append(tok)
        llm.eval([tok])
        st = llm.kv_stats()
        steps.append(st["layers_by_path"])
        if i == int(spike_at) and int(spike_mib) > 0:
            alloc = subprocess.Popen([sys.executable, "-c", ALLOCATOR, str(spike_mib)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
            t_spawn = time.monotonic() - t0
        if alloc is not None and held_step is None and select.select([alloc.stdout], [], [], 0)[0]:
            line = alloc.stdout.readline().strip()
            if line.startswith("held "):
                held_step, t_held = i, time.monotonic() - t0
                alloc_cgroup = line[5:]
    alloc_alive = alloc_ok = None
    if alloc is not None:
        if held_step is None:  # decoding ended before the allocator said so: wait for it
            line = alloc.stdout.readline().strip()
            if line.startswith("held "):
                held_step, alloc_cgroup = len(out), line[5:]
        alloc_alive = alloc.poll() is None
        alloc.stdin.close()
        alloc_ok = alloc.stdout.read().strip() == "True"
        alloc.wait()
    st = llm.kv_stats()
    print(json.dumps({"out": out, "steps": steps, "start_paths": start["layers_by_path"], "paths": st["layers_by_path"],
                      "switches": st["switches"], "switch_count": st["switch_count"], "memory": st["memory"],
                      "start_memory": start["memory"], "held_step": held_step, "alloc_alive": alloc_alive,
                      "alloc_ok": alloc_ok, "alloc_rc": alloc.returncode if alloc else None,
                      "t_spawn": t_spawn if alloc else None, "t_held": t_held,
                      "bytes_read": st["bytes_read"], "offloaded_bytes": st["offloaded_bytes"],
                      "kv_bytes_total": st["kv_bytes_total"], "cgroup": str(cgroup.current()),
                      "same_cgroup": None if alloc is None else
                      alloc_cgroup == str(cgroup.current())}), flush=True)
    llm.close()


def _rss() -> dict:
    """VmRSS and its parts (RssAnon: the heap and other private memory; RssFile: mapped files), bytes."""
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(line.split()[1]) * 1024
    return out


def _fds() -> list:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the fd listdir itself used
            pass
    return sorted(out)


def soak(model, n_ctx, budget, kv_dir, n_steps):
    n_ctx, n_steps = int(n_ctx), int(n_steps)
    llm = Llama(model, n_ctx=n_ctx, n_batch=128, flash_attn=True, verbose=False, kv_policy="direct",
                mem_budget=budget, kv_dir=kv_dir)
    text = llm.tokenize(TEXT)
    prefix = text[:96]
    errors, samples, fds = [], {}, {}
    last = {"bytes_read": 0, "bytes_written": 0}
    counts = {"steps": 0, "prefills": 0, "prefix_reuses": 0, "resets": 0, "staged_max": 0, "warm_step": None}
    cycle = 0

    def check(where):
        st = llm.kv_stats()
        for key in ("bytes_read", "bytes_written"):
            if st[key] < last[key]:
                errors.append(f"{where}: {key} went back from {last[key]} to {st[key]}")
            last[key] = st[key]
        layers = st["layers"]  # of the same moment as the totals (one snapshot)
        for key in ("bytes_read", "bytes_written"):
            if sum(l[key] for l in layers) != st[key]:
                errors.append(f"{where}: the layers' {key} {sum(l[key] for l in layers)} != the total {st[key]}")
        pinned = sum(l["bytes"] for l in layers if l["path"] == "ram")
        if st["resident_bytes"] != pinned + st["staged_bytes"]:
            errors.append(f"{where}: resident {st['resident_bytes']} != pinned {pinned} + staged "
                          f"{st['staged_bytes']}")
        if sum(l["bytes"] for l in layers) != st["kv_bytes_total"]:
            errors.append(f"{where}: layer bytes sum to {sum(l['bytes'] for l in layers)}, "
                          f"kv_bytes_total {st['kv_bytes_total']}")
        if pinned + st["offloaded_bytes"] != st["kv_bytes_total"]:
            errors.append(f"{where}: pinned {pinned} + offloaded {st['offloaded_bytes']} != total "
                          f"{st['kv_bytes_total']}")
        if pinned + st["staged_bytes"] > st["budget_bytes"] or st["staged_peak_bytes"] + pinned > st["budget_bytes"]:
            errors.append(f"{where}: pinned {pinned} + staged {st['staged_bytes']} (peak {st['staged_peak_bytes']})"
                          f" over the budget {st['budget_bytes']}")
        counts["staged_max"] = max(counts["staged_max"], st["staged_bytes"])
        return st

    first = check("start")
    if not any(l["path"] == "direct" for l in first["layers"]):
        errors.append("no layer on the direct path")
    while counts["steps"] < n_steps:
        # a cycle: a prompt (sometimes sharing a prefix with what is cached), then decode to near the end
        kind = cycle % 4
        if kind == 0:
            llm.reset()
            counts["resets"] += 1
            toks = text[cycle * 7 % 500:][: 200]
        elif kind in (1, 2):
            # prefix reuse: keep the cached prefix, replace what follows (as generate() does)
            keep = min(llm.n_tokens, 96 + 40 * kind)
            llm.n_tokens = keep
            counts["prefix_reuses"] += 1
            toks = text[1000 + cycle * 13 % 300:][: 150]
        else:
            llm.reset()
            counts["resets"] += 1
            toks = prefix + text[2000 + cycle:][: 64]
        llm.eval(toks)
        counts["prefills"] += 1
        check(f"cycle {cycle} prefill")
        # the first cycle is the warm-up: it fills the context (the compute buffers reach their largest);
        # the later ones stop between 150 and 350 tokens on, or at the end of the context
        end = n_ctx - 8 if cycle == 0 else min(n_ctx - 8, llm.n_tokens + 150 + cycle * 37 % 200)
        while llm.n_tokens < end and counts["steps"] < n_steps:
            tok = llm.sample(temp=0.0)
            llm.eval([tok])
            counts["steps"] += 1
            s = counts["steps"]
            check(f"step {s}")
            if s % 100 == 0:
                samples[s] = _rss()
                fds[s] = _fds()
            if len(errors) > 20:
                break
        if cycle == 0:
            counts["warm_step"] = counts["steps"]
            samples[counts["steps"]] = _rss()
            fds[counts["steps"]] = _fds()
        cycle += 1
        if len(errors) > 20:
            break
    st = check("end")
    print(json.dumps({**counts, "cycles": cycle, "errors": errors, "rss": samples,
                      "fds": {k: v for k, v in fds.items()}, "bytes_read": st["bytes_read"],
                      "bytes_written": st["bytes_written"], "budget": st["budget_bytes"],
                      "paths": st["layers_by_path"], "io_engine": st["io_engine"]}), flush=True)
    llm.close()


if __name__ == "__main__":
    {"spike": spike, "soak": soak}[sys.argv[1]](*sys.argv[2:])
