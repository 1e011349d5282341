"""`dualblade bench --stripes`: decode with the KV striped over 1, 2, 4, ... of the given devices (issue 23).

The members are --kv-device (or --kv-dir) A,B,...; each count N (1, 2, 4, ... up to all of them) runs the first N
members as one striped store, every cell a fresh process under the host bench's memory limit, at the first of
--budgets with the first storage policy of --policies (default direct: the path whose decode reads the offloaded KV
from storage every token). Reported per N: decode tokens/s and its ratio to N = 1 (the target: at least 0.85 x N in
the storage-bound regime), bytes read per token, the share of the decode spent waiting for storage, each member's
share of the stripes, and whether the tokens equal the all-in-RAM run's. Repetitions walk the counts up, then down,
so that drift in the machine does not favour one end."""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable, Optional

from ..errors import ConfigError
from .matrix import BenchOptions, Cell, check_options, host_cell_limit, median, memory_overhead, run_cell, summarize
from .probes import machine

STORAGE_POLICIES = ("direct", "mmap", "auto")


def member_counts(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n itself."""
    out, k = [], 1
    while k < n:
        out.append(k)
        k *= 2
    return out + [n]


def check_stripes(opts: BenchOptions) -> tuple[tuple[str, ...], str]:
    """The members and the policy --stripes measures (after check_options); ConfigError naming the fix."""
    members = tuple(opts.kv_device or opts.kv_dir or ())
    if len(members) < 2:
        raise ConfigError("--stripes compares striping over several devices: give two or more, as --kv-device A,B "
                          "or --kv-dir A,B")
    policy = next((p for p in opts.policies if p in STORAGE_POLICIES), None)
    if policy is None:
        raise ConfigError("--stripes needs a storage policy (direct, mmap or auto) in --policies")
    return members, policy


def run_bench_stripes(opts: BenchOptions, on_progress: Optional[Callable[[str, int, int], None]] = None,
                      log: Callable[[str], None] = lambda s: None) -> dict:
    info, budgets = check_options(opts)
    members, policy = check_stripes(opts)
    field = "kv_device" if opts.kv_device else "kv_dir"
    label, budget = budgets[0]
    weights = os.path.getsize(opts.model)
    overhead = memory_overhead(opts, weights, log)
    limit = host_cell_limit(opts, weights, budget, overhead)
    counts = member_counts(len(members))
    ram = Cell("ram", "unlimited", None, None)
    cells = {k: Cell(policy, label, budget, limit) for k in counts}
    total, done = opts.reps * (len(counts) + 1), 0
    for rep in range(opts.reps):
        order = counts if rep % 2 == 0 else counts[::-1]
        for k in [None] + order:
            c = ram if k is None else cells[k]
            if on_progress:
                on_progress(f"{'ram' if k is None else f'{k} device(s)'} (rep {rep + 1}/{opts.reps})", done, total)
            o = opts if k is None else dataclasses.replace(opts, **{field: members[:k]})
            r = run_cell(o, c.policy, None if k is None else budget, None if k is None else limit,
                         opts.prompt_tokens, opts.gen_tokens, opts.n_ctx, opts.timeout or 1800)
            r["rep"] = rep
            c.runs.append(r)
            done += 1
    if on_progress:
        on_progress("done", total, total)

    ref = next((r["tokens"] for r in ram.runs if r.get("ok")), None)
    rows = []
    for k, row in zip(counts, summarize([cells[k] for k in counts])):
        oks = [r for r in cells[k].runs if r.get("ok")]
        row["members"] = k
        row["decode_bytes_read_per_token"] = median(cells[k].runs, "decode_bytes_read_per_token")
        row["decode_io_wait_share"] = median(cells[k].runs, "decode_io_wait_share")
        row["store_members"] = oks[-1].get("store_members") if oks else None
        row["tokens_equal_ram"] = None if not oks or ref is None else all(r["tokens"] == ref for r in oks)
        rows.append(row)
    base = rows[0].get("decode_tok_s")
    for row in rows:
        t = row.get("decode_tok_s")
        row["vs_one"] = t / base if t and base else None
        row["target"] = 0.85 * row["members"]
        row["met"] = None if row["vs_one"] is None else row["vs_one"] >= row["target"]
    return {
        "mode": "stripes",
        "command": " ".join(["dualblade", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "machine": machine(),
        "members": list(members),
        "model": {"path": str(opts.model), "label": opts.model_label, "arch": info.arch,
                  "n_layer": len(info.layers), "weights_bytes": weights,
                  "kv_bytes_total": sum(info.layer_bytes(opts.n_ctx))},
        "workload": {"n_ctx": opts.n_ctx, "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens,
                     "reps": opts.reps, "threads": opts.threads, "policy": policy, "budget": label},
        "memory_enforced": opts.use_cgroup,
        "overhead_bytes": overhead,
        "ram_decode_tok_s": 1e3 / median(ram.runs, "decode_ms") if median(ram.runs, "decode_ms") else None,
        "rows": rows,
        "cells": [dataclasses.asdict(ram)] + [dict(dataclasses.asdict(cells[k]), members=k) for k in counts],
    }
