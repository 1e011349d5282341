"""What the host and the GPU matrices of `dualblade bench` share: the options and their checks, a cell run in a
fresh process (cell.py) under a memory limit (cgroup.py), the calibration of that limit, and the summary of the
runs."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..config import KVConfig
from ..errors import ConfigError, StoreError
from ..gguf_header import model_info
from ..sizes import parse_size
from . import cgroup
from .probes import GiB, MiB, probe_read_bandwidth

# direct-noverify: the direct path without its per-block checksums, to measure what they cost
POLICIES = ("stock", "ram", "mmap", "direct", "auto", "direct-noverify")
# --gpu: stock llama_cpp with all KV in VRAM (the upper bound, the reference for tokens), with the KV in host
# RAM (offload_kqv=False) and flash attention on / off, with the most layers that fit the VRAM budget (ngl); and
# dualblade with every layer on the GPU, a VRAM budget, and the host tier pinned RAM (ram) or as in the CPU mode
GPU_POLICIES = ("vram", "nkvo-fa", "nkvo", "ngl", "ram", "mmap", "direct", "auto")
GPU_STOCK = ("vram", "nkvo-fa", "nkvo", "ngl")  # stock llama_cpp.Llama (their arguments: cell.GPU_STOCK)
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
    kv_dir: Any = None     # a path, several (a list, or comma-separated); check_options makes it KVConfig's tuple
    kv_device: Any = None
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
    ubatch: Optional[int] = None       # every cell's n_batch = n_ubatch (None: the prompt ubatch dualblade picks
                                       # for a context with offloaded KV, placement.prefill_ubatch)


@dataclass
class Cell:
    policy: str
    budget_label: str
    budget_bytes: Optional[int]
    limit_bytes: Optional[int]
    runs: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- options, checked before anything runs


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
    cfg = KVConfig.from_args(None, "direct", opts.kv_dir, opts.kv_device, opts.force)
    opts.kv_dir, opts.kv_device = cfg.kv_dir, cfg.kv_device  # the members, as a tuple, from here on
    if any(p not in ("stock", "ram", *GPU_STOCK) for p in opts.policies):
        from .. import _native
        from ..llama import default_kv_dir

        layout = [(l.il, "direct", k, v) for l, (k, v) in zip(info.layers, info.layer_kv_bytes(opts.n_ctx))]
        why = _native.store_check("direct", None if opts.kv_device else opts.kv_dir or (default_kv_dir(),),
                                  opts.kv_device, opts.force, layout)
        if why:
            raise StoreError(why)
    return info, budgets


def prepare(opts: BenchOptions, log: Callable[[str], None]) -> dict:
    """What every run does before its cells: the KV location (default: dualblade's), the cgroup check, and the
    location's O_DIRECT read probe (returned)."""
    if opts.kv_dir is None and opts.kv_device is None:
        from ..llama import default_kv_dir

        opts.kv_dir = (default_kv_dir(),)
    reason = cgroup.available() if opts.use_cgroup else None
    if opts.use_cgroup and reason:
        raise ConfigError(f"cannot make a memory-limited cgroup here ({reason}); run as root on a machine with "
                          "cgroup v1 or v2, or pass --no-cgroup (numbers then are not memory-enforced)")
    log(f"probing {', '.join(opts.kv_device or opts.kv_dir)} with O_DIRECT ...")
    return probe_read_bandwidth(opts.kv_dir, opts.kv_device, opts.probe_bytes)


# --------------------------------------------------------------------------- running cells


def _cell_args(opts: BenchOptions, policy: str, budget: Optional[int], prompt_tokens: int, gen_tokens: int,
               n_ctx: int, extra: Optional[dict] = None) -> list[str]:
    a = {"model": str(opts.model), "policy": policy, "budget": budget, "n_ctx": n_ctx, "ubatch": cell_ubatch(opts, n_ctx),
         "batch": cell_batch(opts, n_ctx),
         "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "kv_dir": opts.kv_dir,
         "kv_device": opts.kv_device, "kv_force": opts.force, "threads": opts.threads, **(extra or {})}
    return [sys.executable, "-m", "dualblade.bench.cell", json.dumps(a)]


def cell_ubatch(opts: BenchOptions, n_ctx: int) -> int:
    """The ubatch every cell processes its prompt in: the same for all, so that they compare at one ubatch (the one
    dualblade picks for a context with offloaded KV, unless --ubatch says)."""
    if opts.ubatch:
        return opts.ubatch
    from ..gguf_header import model_info
    from ..placement import prefill_ubatch

    return prefill_ubatch(model_info(opts.model), n_ctx, gpu=opts.gpu)


def cell_batch(opts: BenchOptions, n_ctx: int) -> int:
    """The tokens every cell's llama_decode takes (n_batch): the ubatch with --ubatch, else the batch dualblade picks
    (placement.prefill_batch: several ubatches, computed layer by layer where the KV is offloaded)."""
    ubatch = cell_ubatch(opts, n_ctx)
    if opts.ubatch:
        return ubatch
    from ..gguf_header import model_info
    from ..placement import prefill_batch

    return prefill_batch(model_info(opts.model), n_ctx, ubatch, opts.gpu)


def run_cell(opts: BenchOptions, policy: str, budget: Optional[int], limit: Optional[int], prompt_tokens: int,
             gen_tokens: int, n_ctx: int, timeout: Optional[float] = None, extra: Optional[dict] = None) -> dict:
    """One cell in a fresh process (cell.py), in a child cgroup limited to `limit` bytes if one is given; its
    figures, with the peak memory charged to the group, whether it was OOM-killed, and its wall time."""
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
    CUDA runtime's host memory), from a small stock run, plus what the cells' compute buffers take in host memory
    with their ubatch and the context full (placement.prefill_host_bytes: the masks grow with both)."""
    from ..placement import prefill_host_bytes, prefill_stash_bytes

    if opts.gpu:
        r = run_cell(opts, "vram", None, 8 * GiB, 64, 4, 512, extra={"gpu": True})
    else:
        r = run_cell(opts, "stock", None, 8 * GiB, 64, 4, 512)
    if not r.get("ok") or not r.get("peak_bytes"):
        raise RuntimeError(f"the calibration run failed: {r.get('error')}")
    info = model_info(opts.model)
    kv_small = sum(info.layer_bytes(512))
    ubatch, batch = cell_ubatch(opts, opts.n_ctx), cell_batch(opts, opts.n_ctx)
    compute = prefill_host_bytes(info, opts.n_ctx, ubatch, opts.gpu) + prefill_stash_bytes(info, batch, ubatch, opts.gpu)
    return max(64 * MiB, r["peak_bytes"] - weights - kv_small) + compute + 64 * MiB


def memory_overhead(opts: BenchOptions, weights: int, log: Callable[[str], None]) -> Optional[int]:
    """The overhead in every cell's limit: --overhead, else calibrated (None without a cgroup: no limit)."""
    if opts.overhead is not None or not opts.use_cgroup:
        return opts.overhead
    log("calibrating the memory overhead ...")
    return calibrate_overhead(opts, weights)


def host_cell_limit(opts: BenchOptions, weights: int, budget: int, overhead: Optional[int]) -> Optional[int]:
    """A host cell's memory limit: weights + budget + overhead (None without a cgroup)."""
    return weights + budget + overhead if opts.use_cgroup else None


# --------------------------------------------------------------------------- summary


def median(runs: list[dict], key: str):
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
                    "decode_h2d_bytes", "decode_d2h_bytes", "decode_copy_wait_s", "prefill_bytes_read",
                    "prefill_bytes_written", "decode_ring_read_bytes"):
            row[key] = median(c.runs, key)
        if row.get("prefill_bytes_written"):
            # a prefill reads each offloaded layer about once: read back / written (issue 21: <= 1.3)
            row["prefill_read_vs_written"] = (row.get("prefill_bytes_read") or 0) / row["prefill_bytes_written"]
        row["decode_ms_range"] = _spread(c.runs, "decode_ms")
        row["ttft_s_range"] = _spread(c.runs, "ttft_s")
        if row["decode_ms"]:
            row["decode_tok_s"] = 1e3 / row["decode_ms"]
        if ok:
            row["layers_by_path"] = ok[-1].get("layers_by_path")
            row["switch_count"] = ok[-1].get("switch_count")
            row["io_engine"] = ok[-1].get("io_engine")
            row["io_engine_reason"] = ok[-1].get("io_engine_reason")
            row["io_shape"] = ok[-1].get("io_shape")
            row["n_gpu_layers"] = ok[-1].get("n_gpu_layers")
            v = ok[-1].get("vram")
            if v:
                row["vram_layers"] = {"resident": v.get("resident_layers"), "streamed": v.get("streamed_layers")}
        rows.append(row)
    return rows


def c_runs(cells: list[Cell], policy: str, label: str) -> list[dict]:
    return next((c.runs for c in cells if c.policy == policy and c.budget_label == label), [])


def paired(cells: list[Cell], label: str, key: str, slow: str, fast: str) -> list[float]:
    """slow / fast for key, repetition by repetition (the matrix is interleaved: each pair ran close in time)."""
    a = {r["rep"]: r for r in c_runs(cells, slow, label) if r.get("ok") and r.get(key)}
    b = {r["rep"]: r for r in c_runs(cells, fast, label) if r.get("ok") and r.get(key)}
    return [a[k][key] / b[k][key] for k in sorted(a) if k in b]

