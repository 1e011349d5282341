"""`dualblade bench --draft lookup[:N]`: speculative decoding against plain decoding (issue 22).

Each dualblade policy x budget runs two workloads of real text (speculative.workload_tokens: 'repeat', where drafts
from the context win, and 'fresh', where they fail), each with the drafts and without, every cell a fresh process
under the host bench's memory limit (weights + budget + overhead). Reported per pair: tokens per second of the
decode, the mean accepted length, storage bytes read per generated token, and how storage-bound the run without
drafts is (the share of its decode the graph waited for the disk). Tokens are compared with the all-in-RAM run of
the same workload and drafts (exactness), and the plain run's are compared with the speculative one's (batched and
single-token evaluation may round differently: counted, not hidden)."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Callable, Optional

from ..speculative import WORKLOADS
from .matrix import GPU_STOCK, BenchOptions, Cell, check_options, host_budget, host_cell_limit, median, \
    memory_overhead, prepare, run_cell, summarize
from .probes import describe_location, gpu_machine, machine


def run_bench_speculative(opts: BenchOptions, draft: str,
                          on_progress: Optional[Callable[[str, int, int], None]] = None,
                          log: Callable[[str], None] = lambda s: None) -> dict:
    info, budgets = check_options(opts)
    weights = os.path.getsize(opts.model)
    probe = prepare(opts, log)
    overhead = memory_overhead(opts, weights, log)
    # stock llama_cpp 0.3.36 cannot run draft_model=: the references are the drop-in with every layer in RAM, or
    # on a GPU (--gpu; the budgets are VRAM budgets) with every layer in VRAM as stock places them
    ref = "vram" if opts.gpu else "ram"
    policies = [p for p in opts.policies if p not in ("stock", ref) and p not in GPU_STOCK]
    if opts.gpu:
        from .gpu import gpu_cell_limit, host_weights

        host_label, host_bytes = host_budget(opts, info)
        kv_total = sum(info.layer_bytes(opts.n_ctx))

        def limit(p: str, b: Optional[int]) -> Optional[int]:  # the reference too: all its weights and KV
            return gpu_cell_limit(p, weights, host_weights(info, weights), kv_total, host_bytes, overhead) \
                if opts.use_cgroup else None
    else:
        host_label, host_bytes = None, None

        def limit(p: str, b: Optional[int]) -> Optional[int]:  # the reference (every layer in RAM): none
            return None if p == ref else host_cell_limit(opts, weights, b, overhead)
    cells: list[tuple[str, Optional[str], Cell]] = []
    for w in WORKLOADS:
        for d in (None, draft):
            cells.append((w, d, Cell(ref, "unlimited", None, limit(ref, None))))
            for label, b in budgets:
                for p in policies:
                    cells.append((w, d, Cell(p, label, b, limit(p, b))))
    total, done = opts.reps * len(cells), 0
    for rep in range(opts.reps):
        for w, d, c in cells:
            if on_progress:
                on_progress(f"{w} {'drafts' if d else 'plain'} {c.policy} @ {c.budget_label} (rep {rep + 1})", done,
                            total)
            extra = {"workload": w, "draft": d}
            if opts.gpu:  # every layer on the GPU; the VRAM budget, and the host budget of the host tiers
                extra.update(gpu=True, dropin=True, vram_budget=c.budget_bytes)
                budget = host_bytes if c.policy in ("mmap", "direct", "auto") else None
            else:
                budget = None if c.policy == "ram" else c.budget_bytes
            r = run_cell(opts, c.policy, budget, c.limit_bytes, opts.prompt_tokens, opts.gen_tokens, opts.n_ctx,
                         opts.timeout or 1800, extra=extra)
            r["rep"] = rep
            c.runs.append(r)
            done += 1
    if on_progress:
        on_progress("done", total, total)

    rows = []
    for (w, d, c), row in zip(cells, summarize([c for _, _, c in cells])):
        oks = [r for r in c.runs if r.get("ok")]
        row.update({"workload": w, "draft": d})
        for key in ("decode_tok_s", "decode_bytes_read_per_token", "decode_io_wait_share"):
            row[key] = median(c.runs, key)
        spec = oks[-1].get("speculation") if oks else None
        row["mean_accepted_length"] = spec["mean_accepted_length"] if spec else None
        row["acceptance"] = spec["acceptance"] if spec else None
        row["_tokens"] = oks[-1]["tokens"] if oks else None
        rows.append(row)

    def find(w, d, policy, label):
        return next((r for r in rows if r["workload"] == w and r["draft"] == d and r["policy"] == policy
                     and r["budget"] == label), None)

    for r in rows:  # exact: the all-in-RAM (all-in-VRAM) run of the same workload and drafts
        oracle = find(r["workload"], r["draft"], ref, "unlimited")
        r["tokens_equal_ram"] = None if not oracle or not r["_tokens"] or not oracle["_tokens"] else \
            r["_tokens"] == oracle["_tokens"]
    pairs = []
    for w in WORKLOADS:
        for policy, label in {(r["policy"], r["budget"]) for r in rows}:
            plain, spec = find(w, None, policy, label), find(w, draft, policy, label)
            if not plain or not spec:
                continue
            e = {"workload": w, "policy": policy, "budget": label,
                 "plain_tok_s": plain.get("decode_tok_s"), "draft_tok_s": spec.get("decode_tok_s"),
                 "plain_io_wait_share": plain.get("decode_io_wait_share"),
                 "mean_accepted_length": spec.get("mean_accepted_length"),
                 "plain_bytes_per_token": plain.get("decode_bytes_read_per_token"),
                 "draft_bytes_per_token": spec.get("decode_bytes_read_per_token")}
            if e["plain_tok_s"] and e["draft_tok_s"]:
                e["draft_vs_plain"] = e["draft_tok_s"] / e["plain_tok_s"]
            if plain["_tokens"] and spec["_tokens"]:
                e["tokens_differ_vs_plain"] = sum(a != b for a, b in zip(plain["_tokens"], spec["_tokens"]))
            pairs.append(e)
    pairs.sort(key=lambda e: (e["workload"], e["policy"] != ref, e["policy"], e["budget"]))
    for r in rows:
        r.pop("_tokens")
    return {
        "mode": "speculative",
        "command": " ".join(["dualblade", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "machine": {**machine(), "gpu": gpu_machine()} if opts.gpu else machine(),
        "location": describe_location(opts.kv_dir, opts.kv_device),
        "model": {"path": str(opts.model), "label": opts.model_label, "arch": info.arch,
                  "n_layer": len(info.layers), "weights_bytes": weights,
                  "kv_bytes_total": sum(info.layer_bytes(opts.n_ctx))},
        "workload": {"n_ctx": opts.n_ctx, "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens,
                     "reps": opts.reps, "threads": opts.threads, "draft": draft, "workloads": list(WORKLOADS)},
        "gpu": opts.gpu,
        "reference": ref,
        "host_budget": {"label": host_label, "bytes": host_bytes} if opts.gpu else None,
        "memory_enforced": opts.use_cgroup,
        "overhead_bytes": overhead,
        "probe": probe,
        "rows": rows,
        "pairs": pairs,
        "cells": [dict(asdict(c), workload=w, draft=d) for w, d, c in cells],
    }
