"""`dualblade bench`: the paper's comparison on the user's own machine.

A matrix of policies x budgets, each cell a fresh process (dualblade.bench_cell) in a cgroup limited
to weights + budget + a fixed overhead, so that the page cache counts as the kernel counts it. Stock
llama_cpp.Llama runs at the same limits ("OOM" is a valid result). A device probe measures the KV
location's O_DIRECT read bandwidth in the same run, so every decode figure can be set against the
I/O bound. Cells are interleaved (each repetition walks the whole matrix) because the disks of
shared machines drift: compare within a run, quote ratios and medians.
"""
from __future__ import annotations

import json
import mmap
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import cgroup, vram
from .config import KVConfig, mem_total
from .errors import ConfigError, StoreError
from .gguf_header import model_info
from .sizes import parse_size

MiB = 1 << 20
GiB = 1 << 30
# direct-noverify: the direct path without its per-block checksums, to measure what they cost
POLICIES = ("stock", "ram", "mmap", "direct", "auto", "direct-noverify")
# --gpu: stock llama_cpp with all KV in VRAM (the upper bound, the reference for tokens), with the KV in host
# RAM (offload_kqv=False) and flash attention on / off, with the most layers that fit the VRAM budget (ngl); and
# dualblade with every layer on the GPU, a VRAM budget, and the host tier pinned RAM (ram) or as in the CPU mode
GPU_POLICIES = ("vram", "nkvo-fa", "nkvo", "ngl", "ram", "mmap", "direct", "auto")
GPU_REFERENCE = ("vram", "nkvo-fa", "nkvo")  # independent of the budgets: run once per repetition
REF_LABEL = "-"                              # their budget label
GPU_STOCK = ("vram", "nkvo-fa", "nkvo", "ngl")  # stock llama_cpp.Llama (dualblade.bench_cell.GPU_STOCK)
HOST_BUDGET = "25%"                          # --host-budget's default: of the KV


@dataclass
class BenchOptions:
    model: Path
    policies: list[str]
    budgets: list[str]  # "25%" of the KV, or a size
    n_ctx: int
    prompt_tokens: int
    gen_tokens: int
    reps: int = 1
    kv_dir: Optional[str] = None
    kv_device: Optional[str] = None
    force: bool = False  # take over a kv_device that holds something else
    use_cgroup: bool = True
    overhead: Optional[int] = None
    threads: Optional[int] = None
    probe_bytes: int = 512 * MiB
    timeout: Optional[float] = None  # per cell; default: 8x the all-in-RAM run's time, at least 120 s
    model_label: str = ""
    gpu: bool = False                  # GPU cells: budgets are VRAM budgets
    host_budget: Optional[str] = None  # --gpu: the dualblade cells' mem_budget (default HOST_BUDGET)
    copy_probe_bytes: int = 512 * MiB


@dataclass
class Cell:
    policy: str
    budget_label: str
    budget_bytes: Optional[int]
    limit_bytes: Optional[int]
    runs: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


def parse_budgets(items: list[str], kv_total: int) -> list[tuple[str, int]]:
    out = []
    for item in items:
        item = item.strip()
        if item.endswith("%"):
            try:
                frac = float(item[:-1]) / 100
            except ValueError:
                raise ConfigError(f"budget {item!r} is not a percentage; write e.g. 25%") from None
            if not 0 < frac <= 1:
                raise ConfigError(f"budget {item!r} must be between 0% and 100% of the KV cache")
            if int(kv_total * frac) < 1:
                raise ConfigError(f"budget {item!r} is less than a byte of the KV cache; give a larger percentage")
            out.append((item, int(kv_total * frac)))
        else:
            out.append((item, parse_size(item)))
    return out


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem_total() or 0, "kernel": platform.release(),
            "python": platform.python_version()}


def describe_location(kv_dir: Optional[str], kv_device: Optional[str]) -> dict:
    path = kv_device or kv_dir
    desc = {"path": path, "kind": "device" if kv_device else "file"}
    try:
        out = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", "--target", path], capture_output=True,
                             text=True, timeout=5).stdout.split()
        if out and not kv_device:
            desc["device"], desc["fs"] = out[0], out[1] if len(out) > 1 else "?"
    except (OSError, subprocess.SubprocessError):
        pass
    dev = kv_device or desc.get("device")
    if dev and dev.startswith("/dev/"):
        name = os.path.basename(os.path.realpath(dev))
        base = name.rstrip("0123456789") if not name.startswith("nvme") else name.split("p")[0]
        for key, f in (("rotational", "queue/rotational"), ("read_ahead_kb", "queue/read_ahead_kb")):
            try:
                desc[key] = int(Path(f"/sys/block/{base}/{f}").read_text())
            except (OSError, ValueError):
                pass
    return desc


# --------------------------------------------------------------------------- device probe


def probe_read_bandwidth(kv_dir: Optional[str], kv_device: Optional[str], nbytes: int) -> dict:
    """O_DIRECT sequential read bandwidth of the KV location: 8 MiB reads, 4 in flight (what the
    direct path keeps in flight). A file is written first (O_DIRECT too) and deleted after."""
    chunk, depth = 8 * MiB, 4
    nbytes = max(chunk * depth, nbytes // chunk * chunk)
    if kv_device:
        fd = os.open(kv_device, os.O_RDONLY | os.O_DIRECT)
        size = os.lseek(fd, 0, os.SEEK_END)
        nbytes = min(nbytes, (size - MiB) // chunk * chunk)
        base, write_gib_s, tmp = MiB, None, None
    else:
        fd, tmp = tempfile.mkstemp(dir=kv_dir, prefix=".dualblade-probe-")
        os.close(fd)
        fd = os.open(tmp, os.O_RDWR | os.O_DIRECT)
        os.unlink(tmp)
        buf = mmap.mmap(-1, chunk)
        buf.write(os.urandom(1 << 16) * (chunk >> 16))
        t0 = time.perf_counter()
        for off in range(0, nbytes, chunk):
            os.pwritev(fd, [buf], off)
        os.fsync(fd)
        write_gib_s = nbytes / (time.perf_counter() - t0) / GiB
        base = 0
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
    offsets = list(range(base, base + nbytes, chunk))
    lock = threading.Lock()
    errors: list[Exception] = []

    def worker():
        b = mmap.mmap(-1, chunk)
        while True:
            with lock:
                if not offsets:
                    return
                off = offsets.pop(0)
            try:
                os.preadv(fd, [b], off)
            except OSError as e:
                errors.append(e)
                return

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(depth)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    os.close(fd)
    if errors:
        raise OSError(f"probing {kv_device or kv_dir} with O_DIRECT failed: {errors[0]}")
    return {"read_gib_s": nbytes / dt / GiB, "write_gib_s": write_gib_s, "bytes": nbytes,
            "request_bytes": chunk, "in_flight": depth}


# --------------------------------------------------------------------------- running cells


def _cell_args(opts: BenchOptions, policy: str, budget: Optional[int], prompt_tokens: int, gen_tokens: int,
               n_ctx: int, extra: Optional[dict] = None) -> list[str]:
    a = {"model": str(opts.model), "policy": policy, "budget": budget, "n_ctx": n_ctx,
         "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "kv_dir": opts.kv_dir,
         "kv_device": opts.kv_device, "kv_force": opts.force, "threads": opts.threads, **(extra or {})}
    return [sys.executable, "-m", "dualblade.bench_cell", json.dumps(a)]


def _run_cell(opts: BenchOptions, policy: str, budget: Optional[int], limit: Optional[int], prompt_tokens: int,
              gen_tokens: int, n_ctx: int, timeout: Optional[float] = None, extra: Optional[dict] = None) -> dict:
    cmd = _cell_args(opts, policy, budget, prompt_tokens, gen_tokens, n_ctx, extra)
    t0 = time.perf_counter()
    timeout = timeout or opts.timeout or 1800
    try:
        if limit is not None:
            r = cgroup.run_limited(cmd, limit, timeout=timeout)
            rc, out, err, peak, oom, version = r.returncode, r.stdout, r.stderr, r.peak_bytes, r.oom_killed, r.version
        else:
            cgroup.drop_caches()
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            rc, out, err, peak, oom, version = p.returncode, p.stdout, p.stderr, None, False, None
    except subprocess.TimeoutExpired:
        # under a limit that squeezes the weights out of the page cache a run can crawl for hours
        return {"ok": False, "error": f"timeout: not done after {timeout:.0f} s (thrashing)", "peak_bytes": None,
                "oom_killed": False, "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    res: dict = {}
    for line in reversed(out.strip().splitlines()):
        try:
            res = json.loads(line)
            break
        except ValueError:
            continue
    if not res:
        tail = " ".join(err.strip().splitlines()[-2:])[-300:]
        res = {"ok": False, "error": "OOM-killed" if oom or rc == -9 else f"exit {rc}: {tail}"}
    res.update({"peak_bytes": peak, "oom_killed": oom, "wall_s": wall, "cgroup_version": version})
    if oom:
        res["ok"] = False
        res["error"] = "OOM-killed"
    return res


def calibrate_overhead(opts: BenchOptions, weights: int) -> int:
    """The memory a run needs besides weights and KV (interpreter, libraries, compute buffers; with --gpu the
    CUDA runtime's host memory), from a small stock run, plus room for compute buffers that grow with the
    context."""
    if opts.gpu:
        r = _run_cell(opts, "vram", None, 8 * GiB, 64, 4, 512, extra={"gpu": True})
    else:
        r = _run_cell(opts, "stock", None, 8 * GiB, 64, 4, 512)
    if not r.get("ok") or not r.get("peak_bytes"):
        raise RuntimeError(f"the calibration run failed: {r.get('error')}")
    kv_small = sum(model_info(opts.model).layer_bytes(512))
    return max(64 * MiB, r["peak_bytes"] - weights - kv_small) + 64 * MiB


# --------------------------------------------------------------------------- summary


def _median(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _spread(runs: list[dict], key: str):
    vals = [r[key] for r in runs if r.get("ok") and r.get(key) is not None]
    return (min(vals), max(vals)) if vals else None


def summarize(cells: list[Cell]) -> list[dict]:
    rows = []
    for c in cells:
        ok = [r for r in c.runs if r.get("ok")]
        row = {"policy": c.policy, "budget": c.budget_label, "budget_bytes": c.budget_bytes,
               "limit_bytes": c.limit_bytes, "runs": len(c.runs), "ok_runs": len(ok),
               "status": "ok" if ok else (c.runs[0].get("error", "failed") if c.runs else "not run")}
        for key in ("ttft_s", "prefill_tok_s", "decode_ms", "peak_bytes", "maxrss_bytes", "bytes_read",
                    "bytes_written", "decode_bytes_read", "user_s", "sys_s", "io_wait_s", "decode_io_wait_s",
                    "proc_read_bytes", "proc_write_bytes", "offloaded_bytes", "load_s", "decode_cpu_ms",
                    "decode_proc_read_bytes", "peak_vram_bytes", "h2d_bytes", "d2h_bytes", "copy_wait_s",
                    "decode_h2d_bytes", "decode_d2h_bytes", "decode_copy_wait_s"):
            row[key] = _median(c.runs, key)
        row["decode_ms_range"] = _spread(c.runs, "decode_ms")
        row["ttft_s_range"] = _spread(c.runs, "ttft_s")
        if row["decode_ms"]:
            row["decode_tok_s"] = 1e3 / row["decode_ms"]
        if ok:
            row["layers_by_path"] = ok[-1].get("layers_by_path")
            row["switch_count"] = ok[-1].get("switch_count")
            row["io_engine"] = ok[-1].get("io_engine")
            row["io_engine_reason"] = ok[-1].get("io_engine_reason")
            row["n_gpu_layers"] = ok[-1].get("n_gpu_layers")
            v = ok[-1].get("vram")
            if v:
                row["vram_layers"] = {"resident": v.get("resident_layers"), "streamed": v.get("streamed_layers")}
        rows.append(row)
    return rows


def c_runs(cells: list[Cell], policy: str, label: str) -> list[dict]:
    return next((c.runs for c in cells if c.policy == policy and c.budget_label == label), [])


def _paired(cells: list[Cell], label: str, key: str, slow: str, fast: str) -> list[float]:
    """slow / fast for key, repetition by repetition (the matrix is interleaved: each pair ran close in time)."""
    a = {r["rep"]: r for r in c_runs(cells, slow, label) if r.get("ok") and r.get(key)}
    b = {r["rep"]: r for r in c_runs(cells, fast, label) if r.get("ok") and r.get(key)}
    return [a[k][key] / b[k][key] for k in sorted(a) if k in b]


def decode_bound_ms(offloaded_fraction_bytes_per_token: float, probe: dict, ram_decode_ms: Optional[float]):
    io_ms = offloaded_fraction_bytes_per_token / (probe["read_gib_s"] * GiB) * 1e3 if probe else 0.0
    return max(ram_decode_ms or 0.0, io_ms), io_ms


# --------------------------------------------------------------------------- the whole run


def check_options(opts: BenchOptions):
    """Refuses what cannot run, before anything starts; returns the model's header and the budgets."""
    valid = GPU_POLICIES if opts.gpu else POLICIES
    for p in opts.policies:
        if p not in valid:
            raise ConfigError(f"unknown policy {p!r} for the {'--gpu ' if opts.gpu else ''}benchmark; choose from "
                              f"{', '.join(valid)}")
    if opts.host_budget is not None and not opts.gpu:
        raise ConfigError("--host-budget is the host tier's budget of a --gpu run; add --gpu, or give the "
                          "memory budgets with --budgets")
    info = model_info(opts.model)
    if opts.prompt_tokens + opts.gen_tokens + 8 > opts.n_ctx:
        raise ConfigError(f"--prompt-tokens {opts.prompt_tokens} + --gen-tokens {opts.gen_tokens} do not fit "
                          f"--ctx-size {opts.n_ctx}; raise --ctx-size or lower them")
    budgets = parse_budgets(opts.budgets, sum(info.layer_bytes(opts.n_ctx)))
    if opts.gpu:
        host_budget(opts, info)
        why = gpu_missing()
        if why:
            raise ConfigError(f"--gpu needs a GPU build of dualblade and a GPU ({why}); reinstall with "
                              "CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install ., or leave --gpu out")
    # where the KV goes, checked as Llama checks it (and the store as the C module would open it, every layer
    # offloaded, writing nothing): a bad --kv-dir or --kv-device stops here, not in the first cell
    KVConfig.from_args(None, "direct", opts.kv_dir, opts.kv_device, opts.force)
    if any(p not in ("stock", "ram", *GPU_STOCK) for p in opts.policies):
        from . import _native
        from .llama import default_kv_dir

        layout = [(l.il, "direct", k, v) for l, (k, v) in zip(info.layers, info.layer_kv_bytes(opts.n_ctx))]
        why = _native.store_check("direct", None if opts.kv_device else opts.kv_dir or default_kv_dir(),
                                  opts.kv_device, opts.force, layout)
        if why:
            raise StoreError(why)
    return info, budgets


def _prepare(opts: BenchOptions, log: Callable[[str], None]) -> dict:
    """What every run does before its cells: the KV location (default: dualblade's), the cgroup check, and the
    location's O_DIRECT read probe (returned)."""
    if opts.kv_dir is None and opts.kv_device is None:
        from .llama import default_kv_dir

        opts.kv_dir = default_kv_dir()
    reason = cgroup.available() if opts.use_cgroup else None
    if opts.use_cgroup and reason:
        raise ConfigError(f"cannot make a memory-limited cgroup here ({reason}); run as root on a machine with "
                          "cgroup v1 or v2, or pass --no-cgroup (numbers then are not memory-enforced)")
    log(f"probing {opts.kv_device or opts.kv_dir} with O_DIRECT ...")
    return probe_read_bandwidth(opts.kv_dir, opts.kv_device, opts.probe_bytes)


def run_bench(opts: BenchOptions, on_progress: Optional[Callable[[str, int, int], None]] = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    if opts.gpu:
        return run_bench_gpu(opts, on_progress, log)
    info, budgets = check_options(opts)
    kv_total = sum(info.layer_bytes(opts.n_ctx))
    weights = os.path.getsize(opts.model)
    probe = _prepare(opts, log)
    overhead = opts.overhead
    if opts.use_cgroup and overhead is None:
        log("calibrating the memory overhead ...")
        overhead = calibrate_overhead(opts, weights)

    cells = [Cell(p, label, b, weights + b + overhead if opts.use_cgroup else None)
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
            r = _run_cell(opts, c.policy, budget, c.limit_bytes, opts.prompt_tokens, opts.gen_tokens, opts.n_ctx,
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
    ram_decode = _median(ram_ref.runs, "decode_ms")
    ram_ttft = _median(ram_ref.runs, "ttft_s")
    ram_cpu = _median(ram_ref.runs, "decode_cpu_ms")
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
            entry["auto_vs_mmap_decode_per_run"] = _paired(cells, label, "decode_ms", "mmap", "auto")
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


# --------------------------------------------------------------------------- --gpu: the VRAM tier


def gpu_missing() -> Optional[str]:
    """Why GPU cells cannot run here (None: they can), as dualblade.Llama refuses vram_budget."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        return "this build or machine has none"
    return None


def host_budget(opts: BenchOptions, info) -> tuple[str, int]:
    """--host-budget (default 25% of the KV, or a size): the mem_budget of the GPU run's dualblade cells."""
    label = (opts.host_budget or HOST_BUDGET).strip()
    try:
        return parse_budgets([label], sum(info.layer_bytes(opts.n_ctx)))[0]
    except (ConfigError, ValueError) as e:
        raise ConfigError(f"--host-budget: {e}") from None


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


_COPY_PROBE = r"""
import json, statistics, sys, time
try:
    import torch
except ImportError:
    print(json.dumps({"h2d_gib_s": None, "why": "torch is not installed"})); sys.exit()
if not torch.cuda.is_available():
    print(json.dumps({"h2d_gib_s": None, "why": "torch sees no GPU"})); sys.exit()
n = int(sys.argv[1])
h = torch.empty(n, dtype=torch.uint8, pin_memory=True); h.fill_(1)
d = torch.empty(n, dtype=torch.uint8, device="cuda")
def timed(dst, src):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True); torch.cuda.synchronize()
    return time.perf_counter() - t0
timed(d, h); timed(h, d)
up = [timed(d, h) for _ in range(5)]
down = [timed(h, d) for _ in range(5)]
print(json.dumps({"h2d_gib_s": n / statistics.median(up) / 2**30, "d2h_gib_s": n / statistics.median(down) / 2**30,
                  "h2d_best_gib_s": n / min(up) / 2**30, "bytes": n, "runs": 5, "device": torch.cuda.get_device_name(),
                  "torch": torch.__version__}))
"""


def probe_copy_bandwidth(nbytes: int) -> dict:
    """Host-to-device (and back) copy bandwidth from pinned memory, measured with torch in a subprocess (median
    of 5 copies of nbytes). h2d_gib_s None, with why, where torch or its GPU is missing: the bound then lacks
    its copy term."""
    try:
        p = subprocess.run([sys.executable, "-c", _COPY_PROBE, str(nbytes)], capture_output=True, text=True,
                           timeout=300)
    except subprocess.TimeoutExpired:
        return {"h2d_gib_s": None, "why": "the copy probe did not finish in 300 s"}
    for line in reversed(p.stdout.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    tail = " ".join(p.stderr.strip().splitlines()[-2:])[-300:]
    return {"h2d_gib_s": None, "why": f"the copy probe failed: exit {p.returncode}: {tail}"}


def gpu_machine() -> dict:
    """The GPU the numbers were measured on (nvidia-smi; empty without it)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30).stdout
        name, total, driver = [x.strip() for x in out.splitlines()[0].split(",")]
        return {"name": name, "memory_total_bytes": int(float(total)) << 20, "driver": driver}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {}


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
    probe = _prepare(opts, log)
    log("probing the host-to-device copy bandwidth ...")
    copy = probe_copy_bandwidth(opts.copy_probe_bytes)
    overhead = opts.overhead
    if opts.use_cgroup and overhead is None:
        log("calibrating the memory overhead (a small all-in-VRAM run) ...")
        overhead = calibrate_overhead(opts, weights)

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
            r = _run_cell(opts, c.policy, budget, c.limit_bytes, opts.prompt_tokens, opts.gen_tokens, opts.n_ctx,
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
            e["auto_vs_mmap_decode_per_run"] = _paired(cells, e["budget"], "decode_ms", "mmap", "auto")
            e["auto_vs_mmap_prefill_per_run"] = _paired(cells, e["budget"], "ttft_s", "mmap", "auto")
    return {
        "mode": "gpu",
        "command": " ".join(["dualblade", "bench", *sys.argv[2:]]) if sys.argv[1:2] == ["bench"] else None,
        "machine": {**machine(), "gpu": gpu_machine()},
        "location": describe_location(opts.kv_dir, opts.kv_device),
        "model": {"path": str(opts.model), "label": opts.model_label, "arch": info.arch,
                  "n_layer": len(info.layers), "weights_bytes": weights, "host_weights_bytes": host_w,
                  "kv_bytes_total": kv_total},
        "workload": {"n_ctx": opts.n_ctx, "prompt_tokens": opts.prompt_tokens, "gen_tokens": opts.gen_tokens,
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
