"""The host matrix of `dualblade bench`: policies x memory budgets, each cell under a limit of weights + budget +
overhead, against the all-in-RAM run (the compute bound, and the reference for the tokens) and the I/O bound that
the device probe gives."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Callable, Optional

from .matrix import BenchOptions, Cell, c_runs, cell_batch, cell_ubatch, check_options, host_cell_limit, median, memory_overhead, \
    paired, prepare, run_cell, summarize
from .probes import GiB, describe_location, machine


def decode_bound_ms(offloaded_fraction_bytes_per_token: float, probe: dict, ram_decode_ms: Optional[float]):
    io_ms = offloaded_fraction_bytes_per_token / (probe["read_gib_s"] * GiB) * 1e3 if probe else 0.0
    return max(ram_decode_ms or 0.0, io_ms), io_ms


def run_bench_host(opts: BenchOptions, on_progress: Optional[Callable[[str, int, int], None]] = None,
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """The host matrix, every repetition walking all of it; the summary, the ratios and every raw figure."""
    info, budgets = check_options(opts)
    kv_total = sum(info.layer_bytes(opts.n_ctx))
    weights = os.path.getsize(opts.model)
    probe = prepare(opts, log)
    overhead = memory_overhead(opts, weights, log)
    cells = [Cell(p, label, b, host_cell_limit(opts, weights, b, overhead))
             for label, b in budgets for p in opts.policies]
    # the compute bound: all KV in RAM, no limit (once per repetition)
    ram_ref = Cell("ram", "unlimited", None, None)
    total = opts.reps * (len(cells) + 1)
    done = 0
    for rep in range(opts.reps):
        for c in [ram_ref] + cells:
            if on_progress:
                on_progress(f"{c.policy} @ {c.budget_label} (rep {rep + 1}/{opts.reps})", done, total)
            budget = None if c.policy in ("stock", "ram") else c.budget_bytes
            ref_wall = [x["wall_s"] for x in ram_ref.runs if x.get("ok")]
            timeout = opts.timeout or (max(120.0, 8 * max(ref_wall)) if ref_wall else 1800)
            r = run_cell(opts, c.policy, budget, c.limit_bytes, opts.prompt_tokens, opts.gen_tokens, opts.n_ctx,
                         timeout)
            r["rep"] = rep
            c.runs.append(r)
            done += 1
    if on_progress:
        on_progress("done", total, total)

    # tokens must agree with the all-in-RAM reference: exactness is part of the result
    ref_tokens = next((r["tokens"] for r in ram_ref.runs if r.get("ok")), None)
    rows = summarize(cells)
    for row, c in zip(rows, cells):
        oks = [r for r in c.runs if r.get("ok")]
        row["tokens_equal_ram"] = None if not oks or ref_tokens is None else all(r["tokens"] == ref_tokens for r in oks)
        if row.get("decode_bytes_read") and row.get("decode_ms"):
            row["read_gib_s"] = row["decode_bytes_read"] / opts.gen_tokens / (row["decode_ms"] / 1e3) / GiB
            row["device_util"] = row["read_gib_s"] / probe["read_gib_s"]
    ram_decode = median(ram_ref.runs, "decode_ms")
    ram_ttft = median(ram_ref.runs, "ttft_s")
    ram_cpu = median(ram_ref.runs, "decode_cpu_ms")
    # the I/O bound per budget: offloaded KV in use per decode token / probed bandwidth
    used_frac = (opts.prompt_tokens + opts.gen_tokens / 2) / opts.n_ctx
    ratios = []
    for label, b in budgets:
        by = {row["policy"]: row for row in rows if row["budget"] == label}
        # what auto has to read: its own offloaded layers (other policies pin differently)
        src = by.get("auto") if by.get("auto") and by["auto"].get("offloaded_bytes") is not None else None
        off = src["offloaded_bytes"] if src else max((row.get("offloaded_bytes") or 0 for row in by.values()), default=0)
        bound, io_ms = decode_bound_ms(off * used_frac, probe, ram_decode)
        entry = {"budget": label, "budget_bytes": b, "offloaded_bytes": off, "bound_decode_ms": bound,
                 "io_bound_ms": io_ms, "ram_decode_ms": ram_decode}
        a, m = by.get("auto"), by.get("mmap")
        if a and m and a.get("decode_ms") and m.get("decode_ms"):
            entry["auto_vs_mmap_decode"] = m["decode_ms"] / a["decode_ms"]
        if a and m and a.get("ttft_s") and m.get("ttft_s"):
            entry["auto_vs_mmap_prefill"] = m["ttft_s"] / a["ttft_s"]
        if a and a.get("decode_ms") and bound:
            entry["auto_vs_bound"] = a["decode_ms"] / bound
        if a and a.get("decode_ms") and ram_decode:
            entry["auto_vs_ram_decode"] = a["decode_ms"] / ram_decode
        if a and a.get("ttft_s") and ram_ttft:
            entry["auto_vs_ram_prefill"] = a["ttft_s"] / ram_ttft
        if a and a.get("decode_cpu_ms") and ram_cpu:
            # CPU time per decoded token against the all-in-RAM run: what waiting for the disk costs in CPU
            entry["auto_vs_ram_cpu"] = a["decode_cpu_ms"] / ram_cpu
            entry["auto_cpu_per_run"] = [r["decode_cpu_ms"] / ram_cpu for r in c_runs(cells, "auto", label) if
                                         r.get("ok") and r.get("decode_cpu_ms")]
        if a and m:
            entry["auto_vs_mmap_decode_per_run"] = paired(cells, label, "decode_ms", "mmap", "auto")
        d, dn = by.get("direct"), by.get("direct-noverify")
        if d and dn and d.get("decode_ms") and dn.get("decode_ms"):
            entry["verify_cost_decode"] = d["decode_ms"] / dn["decode_ms"] - 1
        if d and dn and d.get("ttft_s") and dn.get("ttft_s"):
            entry["verify_cost_prefill"] = d["ttft_s"] / dn["ttft_s"] - 1
        ratios.append(entry)
    return {
        "command": " ".join(["dualblade", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "machine": machine(),
        "location": describe_location(opts.kv_dir, opts.kv_device),
        "model": {"path": str(opts.model), "label": opts.model_label, "arch": info.arch,
                  "n_layer": len(info.layers), "weights_bytes": weights, "kv_bytes_total": kv_total},
        "workload": {"n_ctx": opts.n_ctx, "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens,
                     "ubatch": cell_ubatch(opts, opts.n_ctx), "batch": cell_batch(opts, opts.n_ctx),
                     "reps": opts.reps, "threads": opts.threads},
        "memory_enforced": opts.use_cgroup,
        "cgroup_version": next((r.get("cgroup_version") for c in cells for r in c.runs if r.get("cgroup_version")),
                               None),
        "overhead_bytes": overhead,
        "probe": probe,
        "ram_reference": {"decode_ms": ram_decode, "ttft_s": ram_ttft, "decode_cpu_ms": ram_cpu,
                          "runs": ram_ref.runs},
        "rows": rows,
        "ratios": ratios,
        "cells": [asdict(c) for c in cells],
    }

