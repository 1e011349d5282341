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

from . import cgroup
from .config import KVConfig, mem_total
from .errors import ConfigError, StoreError
from .gguf_header import model_info
from .sizes import parse_size

MiB = 1 << 20
GiB = 1 << 30
# direct-noverify: the direct path without its per-block checksums, to measure what they cost
POLICIES = ("stock", "ram", "mmap", "direct", "auto", "direct-noverify")


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
               n_ctx: int) -> list[str]:
    a = {"model": str(opts.model), "policy": policy, "budget": budget, "n_ctx": n_ctx,
         "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "kv_dir": opts.kv_dir,
         "kv_device": opts.kv_device, "kv_force": opts.force, "threads": opts.threads}
    return [sys.executable, "-m", "dualblade.bench_cell", json.dumps(a)]


def _run_cell(opts: BenchOptions, policy: str, budget: Optional[int], limit: Optional[int], prompt_tokens: int,
              gen_tokens: int, n_ctx: int, timeout: Optional[float] = None) -> dict:
    cmd = _cell_args(opts, policy, budget, prompt_tokens, gen_tokens, n_ctx)
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
    """The memory a run needs besides weights and KV (interpreter, libraries, compute buffers),
    from a small stock run, plus room for compute buffers that grow with the context."""
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
                    "proc_read_bytes", "proc_write_bytes", "offloaded_bytes", "load_s", "decode_cpu_ms"):
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
    for p in opts.policies:
        if p not in POLICIES:
            raise ConfigError(f"unknown policy {p!r} for the benchmark; choose from {', '.join(POLICIES)}")
    info = model_info(opts.model)
    if opts.prompt_tokens + opts.gen_tokens + 8 > opts.n_ctx:
        raise ConfigError(f"--prompt-tokens {opts.prompt_tokens} + --gen-tokens {opts.gen_tokens} do not fit "
                          f"--ctx-size {opts.n_ctx}; raise --ctx-size or lower them")
    budgets = parse_budgets(opts.budgets, sum(info.layer_bytes(opts.n_ctx)))
    # where the KV goes, checked as Llama checks it (and the store as the C module would open it, every layer
    # offloaded, writing nothing): a bad --kv-dir or --kv-device stops here, not in the first cell
    KVConfig.from_args(None, "direct", opts.kv_dir, opts.kv_device, opts.force)
    if any(p not in ("stock", "ram") for p in opts.policies):
        from . import _native
        from .llama import default_kv_dir

        layout = [(l.il, "direct", k, v) for l, (k, v) in zip(info.layers, info.layer_kv_bytes(opts.n_ctx))]
        why = _native.store_check("direct", None if opts.kv_device else opts.kv_dir or default_kv_dir(),
                                  opts.kv_device, opts.force, layout)
        if why:
            raise StoreError(why)
    return info, budgets


def run_bench(opts: BenchOptions, on_progress: Optional[Callable[[str, int, int], None]] = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
    info, budgets = check_options(opts)
    kv_total = sum(info.layer_bytes(opts.n_ctx))
    weights = os.path.getsize(opts.model)
    if opts.kv_dir is None and opts.kv_device is None:
        from .llama import default_kv_dir

        opts.kv_dir = default_kv_dir()

    reason = cgroup.available() if opts.use_cgroup else None
    if opts.use_cgroup and reason:
        raise ConfigError(f"cannot make a memory-limited cgroup here ({reason}); run as root on a machine with "
                          "cgroup v1 or v2, or pass --no-cgroup (numbers then are not memory-enforced)")
    log(f"probing {opts.kv_device or opts.kv_dir} with O_DIRECT ...")
    probe = probe_read_bandwidth(opts.kv_dir, opts.kv_device, opts.probe_bytes)
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
