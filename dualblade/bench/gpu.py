"""The `--gpu` matrix of `dualblade bench`: the VRAM tier against stock llama.cpp on the GPU (budgets are VRAM
budgets), the fair rules it is measured by (ngl_fit, gpu_cell_limit) and its bounds (gpu_ratios)."""
from __future__ import annotations

import os
import sys
from dataclasses import asdict
from typing import Callable, Optional

from .. import vram
from .matrix import GPU_STOCK, BenchOptions, Cell, cell_batch, cell_ubatch, check_options, host_budget, memory_overhead, paired, \
    prepare, run_cell, summarize
from .probes import GiB, describe_location, gpu_machine, machine, probe_copy_bandwidth

GPU_REFERENCE = ("vram", "nkvo-fa", "nkvo")  # independent of the budgets: run once per repetition
REF_LABEL = "-"                              # their budget label


def ngl_fit(block_bytes: list[int], kv_bytes: list[int], output_bytes: int, vram_budget: int) -> int:
    """Stock's n_gpu_layers for a VRAM budget, the fair rule: the largest n whose GPU share (weights and KV)
    fits the VRAM the dualblade cells hold, every weight plus the budget:
        output_bytes + sum(block + KV of the GPU layers) <= output_bytes + sum(every block) + vram_budget.
    As llama.cpp counts n_gpu_layers (llama_model::load_tensors): n >= 1 puts the output layer on the GPU, and
    the last n - 1 repeating layers; n = n_layer + 1 is everything. block_bytes / kv_bytes: per layer, in order."""
    n_layer = len(block_bytes)
    allowed = output_bytes + sum(block_bytes) + vram_budget
    for n in range(n_layer + 1, 0, -1):
        on = range(n_layer - (n - 1), n_layer)
        if output_bytes + sum(block_bytes[i] + kv_bytes[i] for i in on) <= allowed:
            return n
    return 0


def ngl_for_budget(info, n_ctx: int, vram_budget: int) -> int:
    """ngl_fit from the GGUF tensor table (vram.layer_weight_bytes) and the KV of each layer at n_ctx (f16, as
    the cells run)."""
    blocks, out = vram.layer_weight_bytes(info)
    kv = [0] * len(blocks)
    for l, b in zip(info.layers, info.layer_bytes(n_ctx)):
        kv[l.il] += b
    return ngl_fit(blocks, kv, out, vram_budget)


def host_weights(info, weights: int) -> int:
    """The weights that stay in host memory with every layer on the GPU: the input embeddings (llama.cpp keeps
    token_embd on the CPU); the whole file if the table does not name it."""
    return info.tensor_bytes.get("token_embd.weight", weights)


def gpu_cell_limit(policy: str, weights: int, host_w: int, kv_total: int, host_bytes: int, overhead: int) -> int:
    """The host memory limit (cgroup) of a GPU cell. The dualblade cells whose host tier is bounded (mmap,
    direct, auto) get the host weights + the host budget + the overhead: most of the offloaded KV goes to
    storage. The references (stock cells, and ram: every host copy pinned) get room for all weights and the
    whole KV: the issue's 'whole offloaded KV fitting the host limit'."""
    if policy in ("mmap", "direct", "auto"):
        return host_w + host_bytes + overhead
    return weights + kv_total + overhead


def _ms(nbytes: Optional[float], gib_s: Optional[float]) -> Optional[float]:
    return nbytes / (gib_s * GiB) * 1e3 if nbytes is not None and gib_s else None


def gpu_ratios(rows: list[dict], labels: list[str], read_gib_s: Optional[float], h2d_gib_s: Optional[float],
               gen_tokens: int) -> list[dict]:
    """Issue 12's figures per VRAM budget, from the summarized rows (the references under REF_LABEL):
    auto vs mmap (prefill: TTFT; decode: ms per token; >1 = auto faster); auto's decode against its bound,
    max(all-in-VRAM decode, its storage bytes per token / the storage bandwidth, its host-to-device bytes per token /
    the copy probe), where the storage bandwidth is the O_DIRECT probe's or the fastest any cell read at while
    decoding, whichever is higher (a probe that undershoots must not flatter the ratio); the pinned-RAM tier (ram) against max(all-in-VRAM decode, its copy time), its prefill against
    all-in-VRAM, and the faster stock offload_kqv=False cell's decode against it (>1 = ram faster)."""
    ref = {r["policy"]: r for r in rows if r["budget"] == REF_LABEL and r.get("status") == "ok"}
    vram_dec = ref.get("vram", {}).get("decode_ms")
    vram_ttft = ref.get("vram", {}).get("ttft_s")
    nkvo = [(ref[p]["decode_ms"], p) for p in ("nkvo-fa", "nkvo") if p in ref and ref[p].get("decode_ms")]
    seen = max((r.get("read_gib_s") or 0 for r in rows if r.get("status") == "ok"), default=0)
    storage_gib_s = max(read_gib_s or 0, seen) or None
    out = []
    for label in labels:
        by = {r["policy"]: r for r in rows if r["budget"] == label and r.get("status") == "ok"}
        e: dict = {"budget": label, "vram_decode_ms": vram_dec, "vram_ttft_s": vram_ttft}
        a, m, ram = by.get("auto"), by.get("mmap"), by.get("ram")
        if a and m and a.get("decode_ms") and m.get("decode_ms"):
            e["auto_vs_mmap_decode"] = m["decode_ms"] / a["decode_ms"]
        if a and m and a.get("ttft_s") and m.get("ttft_s"):
            e["auto_vs_mmap_prefill"] = m["ttft_s"] / a["ttft_s"]
        # auto never loses: against the faster of the page cache and the direct path (>= 0.95)
        d = by.get("direct")
        for key, name in (("decode_ms", "decode"), ("ttft_s", "prefill")):
            others = [x[key] for x in (m, d) if x and x.get(key)]
            if a and a.get(key) and others:
                e[f"auto_vs_best_{name}"] = min(others) / a[key]
        # the page-cache tier against the pinned one (decode with the KV in the page cache: <= 1.5)
        if m and ram and m.get("decode_ms") and ram.get("decode_ms"):
            e["mmap_vs_ram_decode"] = m["decode_ms"] / ram["decode_ms"]
        prefill = {p: r["prefill_read_vs_written"] for p, r in by.items() if r.get("prefill_read_vs_written") is not None}
        if prefill:
            e["prefill_read_vs_written"] = prefill
        if a and a.get("decode_ms"):
            storage = max(a.get("decode_bytes_read") or 0, a.get("decode_proc_read_bytes") or 0) / gen_tokens
            h2d = (a.get("decode_h2d_bytes") or 0) / gen_tokens
            io_ms, copy_ms = _ms(storage, storage_gib_s), _ms(h2d, h2d_gib_s)
            terms = [x for x in (vram_dec, io_ms, copy_ms) if x is not None]
            e.update({"auto_storage_bytes_per_token": storage, "auto_h2d_bytes_per_token": h2d,
                      "storage_gib_s": storage_gib_s, "storage_gib_s_from": "probe" if storage_gib_s == read_gib_s
                      else "the fastest cell",
                      "auto_io_bound_ms": io_ms, "auto_copy_bound_ms": copy_ms,
                      "auto_bound_complete": len(terms) == 3})
            if terms:
                e["auto_bound_ms"] = max(terms)
                e["auto_vs_bound"] = a["decode_ms"] / e["auto_bound_ms"]
            if vram_dec:
                e["auto_vs_vram_decode"] = a["decode_ms"] / vram_dec
        if ram and ram.get("decode_ms"):
            h2d = (ram.get("decode_h2d_bytes") or 0) / gen_tokens
            copy_ms = _ms(h2d, h2d_gib_s)
            terms = [x for x in (vram_dec, copy_ms) if x is not None]
            e.update({"ram_h2d_bytes_per_token": h2d, "ram_copy_bound_ms": copy_ms,
                      "ram_bound_complete": len(terms) == 2})
            if terms:
                e["ram_bound_ms"] = max(terms)
                e["ram_vs_bound"] = ram["decode_ms"] / e["ram_bound_ms"]
            if ram.get("ttft_s") and vram_ttft:
                e["ram_vs_vram_prefill"] = ram["ttft_s"] / vram_ttft
            if nkvo:
                best, which = min(nkvo)
                e["ram_vs_nkvo_decode"] = best / ram["decode_ms"]
                e["nkvo_fastest"] = which
        if by.get("ngl"):
            e["ngl_n_gpu_layers"] = by["ngl"].get("n_gpu_layers")
        out.append(e)
    return out


def run_bench_gpu(opts: BenchOptions, on_progress: Optional[Callable[[str, int, int], None]] = None,
                  log: Callable[[str], None] = lambda s: None) -> dict:
    """The GPU matrix: the references (all KV in VRAM, stock offload_kqv=False) once per repetition, the other
    policies per VRAM budget; each cell a fresh process in a host-memory-limited cgroup (gpu_cell_limit), its
    peak VRAM sampled by NVML (VRAM has no cgroup)."""
    info, budgets = check_options(opts)
    kv_total = sum(info.layer_bytes(opts.n_ctx))
    host_label, host_bytes = host_budget(opts, info)
    weights = os.path.getsize(opts.model)
    host_w = host_weights(info, weights)
    probe = prepare(opts, log)
    log("probing the host-to-device copy bandwidth ...")
    copy = probe_copy_bandwidth(opts.copy_probe_bytes)
    overhead = memory_overhead(opts, weights, log)

    def limit(policy: str) -> Optional[int]:
        return gpu_cell_limit(policy, weights, host_w, kv_total, host_bytes, overhead) if opts.use_cgroup else None

    refs = ["vram"] + [p for p in GPU_REFERENCE if p != "vram" and p in opts.policies]
    cells = [Cell(p, REF_LABEL, None, limit(p)) for p in refs]
    cells += [Cell(p, label, b, limit(p)) for label, b in budgets for p in opts.policies if p not in GPU_REFERENCE]
    ngl = {label: ngl_for_budget(info, opts.n_ctx, b) for label, b in budgets}
    total = opts.reps * len(cells)
    done = 0
    for rep in range(opts.reps):
        for c in cells:
            if on_progress:
                on_progress(f"{c.policy} @ {c.budget_label} (rep {rep + 1}/{opts.reps})", done, total)
            extra = {"gpu": True}
            if c.policy == "ngl":
                extra["n_gpu_layers"] = ngl[c.budget_label]
            elif c.policy not in GPU_STOCK:
                extra["vram_budget"] = c.budget_bytes
            budget = host_bytes if c.policy in ("mmap", "direct", "auto") else None  # ram: every host copy pinned
            ref_wall = [x["wall_s"] for x in cells[0].runs if x.get("ok")]
            timeout = opts.timeout or (max(120.0, 8 * max(ref_wall)) if ref_wall else 1800)
            r = run_cell(opts, c.policy, budget, c.limit_bytes, opts.prompt_tokens, opts.gen_tokens, opts.n_ctx,
                         timeout, extra)
            r["rep"] = rep
            c.runs.append(r)
            done += 1
    if on_progress:
        on_progress("done", total, total)

    ref_tokens = next((r["tokens"] for r in cells[0].runs if r.get("ok")), None)
    rows = summarize(cells)
    for row, c in zip(rows, cells):
        oks = [r for r in c.runs if r.get("ok")]
        row["tokens_equal_vram"] = None if not oks or ref_tokens is None else all(r["tokens"] == ref_tokens
                                                                                   for r in oks)
        row["host_budget_bytes"] = host_bytes if c.policy in ("mmap", "direct", "auto") else None
        if row.get("decode_h2d_bytes") is not None:
            row["h2d_bytes_per_token"] = row["decode_h2d_bytes"] / opts.gen_tokens
            row["copy_wait_ms_per_token"] = (row["decode_copy_wait_s"] or 0) / opts.gen_tokens * 1e3
        if row.get("decode_bytes_read") and row.get("decode_ms"):
            row["read_gib_s"] = row["decode_bytes_read"] / opts.gen_tokens / (row["decode_ms"] / 1e3) / GiB
            row["device_util"] = row["read_gib_s"] / probe["read_gib_s"]
    ratios = gpu_ratios(rows, [label for label, _ in budgets], probe.get("read_gib_s"), copy.get("h2d_gib_s"),
                        opts.gen_tokens)
    for e in ratios:
        if "auto_vs_mmap_decode" in e:
            e["auto_vs_mmap_decode_per_run"] = paired(cells, e["budget"], "decode_ms", "mmap", "auto")
            e["auto_vs_mmap_prefill_per_run"] = paired(cells, e["budget"], "ttft_s", "mmap", "auto")
    return {
        "mode": "gpu",
        "command": " ".join(["dualblade", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "machine": {**machine(), "gpu": gpu_machine()},
        "location": describe_location(opts.kv_dir, opts.kv_device),
        "model": {"path": str(opts.model), "label": opts.model_label, "arch": info.arch,
                  "n_layer": len(info.layers), "weights_bytes": weights, "host_weights_bytes": host_w,
                  "kv_bytes_total": kv_total},
        "workload": {"n_ctx": opts.n_ctx, "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens,
                     "ubatch": cell_ubatch(opts, opts.n_ctx), "batch": cell_batch(opts, opts.n_ctx),
                     "reps": opts.reps, "threads": opts.threads},
        "host_budget": {"label": host_label, "bytes": host_bytes},
        "ngl": ngl,
        "memory_enforced": opts.use_cgroup,
        "cgroup_version": next((r.get("cgroup_version") for c in cells for r in c.runs if r.get("cgroup_version")),
                               None),
        "overhead_bytes": overhead,
        "probe": probe,
        "copy_probe": copy,
        "rows": rows,
        "ratios": ratios,
        "cells": [asdict(c) for c in cells],
    }
