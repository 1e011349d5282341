"""`dualblade bench`: the rich front of dualblade.bench (table, progress bar, JSON, plot)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from dualblade.errors import ConfigError
from dualblade.sizes import format_size

from .common import resolve_model



def _model(model: Optional[Path], synthetic: Optional[str]) -> tuple[Path, str]:
    if model and synthetic:
        raise ConfigError("give a model file or --synthetic SHAPE, not both")
    if synthetic:
        from dualblade.synthetic import cached_model

        return cached_model(synthetic), f"synthetic {synthetic}"
    path, _ = resolve_model(model)  # as chat resolves it: the bundled model, or a file checked up front
    return path, "bundled Gemma-3-270M Q4_K_M" if model is None else path.name


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "s":
        return f"{v:.2f}"
    if kind == "ms":
        return f"{v:.1f}"
    if kind == "bytes":
        return format_size(v)
    if kind == "gib":
        return f"{v:.2f}"
    if kind == "pct":
        return f"{100 * v:.0f}%"
    return str(v)


def _short_status(status: str) -> str:
    if status.startswith("BudgetError"):
        return "budget < min"
    if status.startswith("OOM"):
        return "OOM"
    if status.startswith("timeout"):
        return "timeout"
    return status if len(status) <= 12 else "failed"


def _table(title: str, cols: list[tuple[str, str]]) -> Table:
    t = Table(title=title, title_justify="left")
    for name, just in cols:
        t.add_column(name, justify=just)
    return t


def _rows_by_budget(t: Table, rows: list[dict]):
    """The rows, with a section line between budgets."""
    last = None
    for r in rows:
        if last is not None and r["budget"] != last:
            t.add_section()
        last = r["budget"]
        yield r


def _decode_text(r: dict) -> str:
    dec = _fmt(r["decode_ms"], "ms")
    if r.get("decode_ms_range") and r["ok_runs"] > 1:
        lo, hi = r["decode_ms_range"]
        dec += f" [{lo:.1f}, {hi:.1f}]"
    return dec


def _exact(flag) -> str:
    return {True: "yes", False: "NO", None: "-"}[flag]


def _failures(res: dict, console: Console) -> None:
    for r in res["rows"]:
        if r["status"] != "ok" and _short_status(r["status"]) != r["status"]:
            console.print(f"{r['policy']} @ {r['budget']}: {r['status']}", markup=False, soft_wrap=True)


def render(res: dict, console: Console) -> None:
    m, w, p = res["model"], res["workload"], res["probe"]
    title = (f"{m['label'] or m['path']}: KV {format_size(m['kv_bytes_total'])} at {w['n_ctx']} tokens, "
             f"weights {format_size(m['weights_bytes'])}; prompt {w['prompt_tokens']}, {w['gen_tokens']} generated, "
             f"{w['reps']} rep(s)")
    t = _table(title, [("budget", "left"), ("policy", "left"), ("status", "left"), ("TTFT s", "right"),
                       ("decode ms/tok", "right"), ("tok/s", "right"), ("peak mem", "right"), ("peak RSS", "right"),
                       ("read", "right"), ("GiB/s", "right"), ("dev util", "right"), ("CPU ms/tok", "right"),
                       ("io stall s", "right"), ("layers r/m/d", "right"), ("exact", "left")])
    for r in _rows_by_budget(t, res["rows"]):
        lp = r.get("layers_by_path") or {}
        paths = f"{lp.get('ram', 0)}/{lp.get('mmap', 0)}/{lp.get('direct', 0)}" if lp else "-"
        dec, exact = _decode_text(r), _exact(r.get("tokens_equal_ram"))
        t.add_row(f"{r['budget']} ({format_size(r['budget_bytes'])})", r["policy"], _short_status(r["status"]),
                  _fmt(r["ttft_s"], "s"), dec, _fmt(r.get("decode_tok_s"), "ms"), _fmt(r["peak_bytes"], "bytes"),
                  _fmt(r["maxrss_bytes"], "bytes"), _fmt(r["bytes_read"], "bytes"), _fmt(r.get("read_gib_s"), "gib"),
                  _fmt(r.get("device_util"), "pct"),
                  _fmt(r.get("decode_cpu_ms"), "ms"),
                  _fmt(r["io_wait_s"], "s"), paths, exact)
    console.print(t)
    _failures(res, console)
    ref = res["ram_reference"]
    console.print(f"device probe ({res['location'].get('path')}): O_DIRECT read {p['read_gib_s']:.2f} GiB/s "
                  f"({p['in_flight']} x {p['request_bytes'] >> 20} MiB in flight)"
                  + (f", write {p['write_gib_s']:.2f} GiB/s" if p.get("write_gib_s") else ""), markup=False)
    _probe_members(p, console)
    console.print(f"all KV in RAM, no limit: TTFT {_fmt(ref['ttft_s'], 's')} s, decode {_fmt(ref['decode_ms'], 'ms')} "
                  f"ms/token, CPU {_fmt(ref.get('decode_cpu_ms'), 'ms')} ms/token", markup=False)
    engines = {f"{r['io_engine']} ({r.get('io_engine_reason')})" for r in res["rows"] if r.get("io_engine")}
    if engines:
        console.print(f"I/O engine: {', '.join(sorted(engines))}", markup=False)
    _io_shapes(res, console)
    if res["memory_enforced"]:
        console.print(f"memory limit per cell: weights + budget + overhead {format_size(res['overhead_bytes'])} "
                      "(cgroup; RSS + page cache)", markup=False)
    else:
        console.print("NOT memory-enforced (--no-cgroup): the page cache was free to hold everything", style="bold",
                      markup=False)
    for e in res["ratios"]:
        parts = []
        if "auto_vs_mmap_decode" in e:
            parts.append(f"auto vs mmap: decode {e['auto_vs_mmap_decode']:.2f}x")
        if "auto_vs_mmap_prefill" in e:
            parts.append(f"prefill {e['auto_vs_mmap_prefill']:.2f}x")
        if "auto_vs_bound" in e:
            parts.append(f"auto decode / bound {e['auto_vs_bound']:.2f} (bound {e['bound_decode_ms']:.1f} ms: "
                         f"compute {_fmt(e['ram_decode_ms'], 'ms')}, I/O {e['io_bound_ms']:.1f})")
        if e.get("auto_vs_mmap_decode_per_run") and len(e["auto_vs_mmap_decode_per_run"]) > 1:
            parts.append("per rep " + ", ".join(f"{x:.2f}x" for x in e["auto_vs_mmap_decode_per_run"]))
        if "auto_vs_ram_decode" in e:
            parts.append(f"auto / ram: decode {e['auto_vs_ram_decode']:.2f}, prefill {e.get('auto_vs_ram_prefill', 0):.2f}")
        if "auto_vs_ram_cpu" in e:
            parts.append(f"CPU per decoded token {e['auto_vs_ram_cpu']:.2f}x the all-in-RAM run's")
        if "verify_cost_decode" in e:
            parts.append(f"checksums cost the direct path {e['verify_cost_decode']:+.1%} decode, "
                         f"{e.get('verify_cost_prefill', 0):+.1%} prefill")
        if parts:
            console.print(f"budget {e['budget']}: " + "; ".join(parts), markup=False)


def render_gpu(res: dict, console: Console) -> None:
    m, w, p, cp = res["model"], res["workload"], res["probe"], res["copy_probe"]
    gpu = res["machine"].get("gpu") or {}
    title = (f"{m['label'] or m['path']} on {gpu.get('name', 'a GPU')}: KV {format_size(m['kv_bytes_total'])} at "
             f"{w['n_ctx']} tokens, weights {format_size(m['weights_bytes'])}; prompt {w['prompt_tokens']}, "
             f"{w['gen_tokens']} generated, {w['reps']} rep(s); host budget {res['host_budget']['label']} "
             f"({format_size(res['host_budget']['bytes'])})")
    t = _table(title, [("VRAM budget", "left"), ("policy", "left"), ("status", "left"), ("TTFT s", "right"),
                       ("decode ms/tok", "right"), ("tok/s", "right"), ("peak VRAM", "right"), ("peak mem", "right"),
                       ("H2D GiB/tok", "right"), ("copy stall ms/tok", "right"), ("read/tok", "right"),
                       ("layers vram/str", "right"), ("ngl", "right"), ("exact", "left")])
    for r in _rows_by_budget(t, res["rows"]):
        dec = _decode_text(r)
        vl = r.get("vram_layers")
        layers = f"{vl['resident']}/{vl['streamed']}" if vl else "-"
        h2d = r.get("h2d_bytes_per_token")
        read = max(r.get("decode_bytes_read") or 0, r.get("decode_proc_read_bytes") or 0) / w["gen_tokens"] \
            if r.get("decode_ms") else None
        budget = "-" if r["budget_bytes"] is None else f"{r['budget']} ({format_size(r['budget_bytes'])})"
        exact = _exact(r.get("tokens_equal_vram"))
        t.add_row(budget, r["policy"], _short_status(r["status"]), _fmt(r["ttft_s"], "s"), dec,
                  _fmt(r.get("decode_tok_s"), "ms"), _fmt(r.get("peak_vram_bytes"), "bytes"),
                  _fmt(r["peak_bytes"], "bytes"), "-" if h2d is None else f"{h2d / 2**30:.3f}",
                  _fmt(r.get("copy_wait_ms_per_token"), "ms"), "-" if read is None else format_size(read), layers,
                  _fmt(r.get("n_gpu_layers"), ""), exact)
    console.print(t)
    _failures(res, console)
    console.print(f"device probe ({res['location'].get('path')}): O_DIRECT read {p['read_gib_s']:.2f} GiB/s; "
                  + (f"host-to-device copy (pinned, torch) {cp['h2d_gib_s']:.1f} GiB/s, back "
                     f"{cp.get('d2h_gib_s', 0):.1f} GiB/s" if cp.get("h2d_gib_s")
                     else f"no copy probe ({cp.get('why')}): the bounds lack their copy term"), markup=False)
    _probe_members(p, console)
    _io_shapes(res, console)
    if res["memory_enforced"]:
        console.print(f"host memory limit per cell: mmap/direct/auto: host weights "
                      f"{format_size(m['host_weights_bytes'])} + host budget + overhead "
                      f"{format_size(res['overhead_bytes'])}; the others: all weights + all KV + overhead (cgroup)",
                      markup=False)
    else:
        console.print("NOT memory-enforced (--no-cgroup): the page cache was free to hold everything", style="bold",
                      markup=False)
    for e in res["ratios"]:
        parts = []
        if "auto_vs_mmap_decode" in e:
            parts.append(f"auto vs mmap: decode {e['auto_vs_mmap_decode']:.2f}x, prefill "
                         f"{e.get('auto_vs_mmap_prefill', 0):.2f}x")
        if "auto_vs_bound" in e:
            parts.append(f"auto decode / bound {e['auto_vs_bound']:.2f} (bound {e['auto_bound_ms']:.1f} ms: VRAM "
                         f"{_fmt(e['vram_decode_ms'], 'ms')}, storage {_fmt(e['auto_io_bound_ms'], 'ms')} at "
                         f"{e['storage_gib_s'] or 0:.2f} GiB/s ({e['storage_gib_s_from']}), copy "
                         f"{_fmt(e['auto_copy_bound_ms'], 'ms')})")
        if "auto_vs_best_decode" in e:
            parts.append(f"auto vs the faster of mmap and direct: decode {e['auto_vs_best_decode']:.2f}x, prefill "
                         f"{e.get('auto_vs_best_prefill', 0):.2f}x")
        if "mmap_vs_ram_decode" in e:
            parts.append(f"mmap decode / ram {e['mmap_vs_ram_decode']:.2f}")
        if e.get("prefill_read_vs_written"):
            parts.append("prefill read/written " + ", ".join(f"{p} {x:.2f}" for p, x in
                                                              e["prefill_read_vs_written"].items()))
        if "ram_vs_bound" in e:
            parts.append(f"ram decode / bound {e['ram_vs_bound']:.2f} (bound {e['ram_bound_ms']:.1f} ms: VRAM "
                         f"{_fmt(e['vram_decode_ms'], 'ms')}, copy {_fmt(e['ram_copy_bound_ms'], 'ms')})")
        if "ram_vs_vram_prefill" in e:
            parts.append(f"ram prefill / all-in-VRAM {e['ram_vs_vram_prefill']:.2f}")
        if "ram_vs_nkvo_decode" in e:
            parts.append(f"ram decode {e['ram_vs_nkvo_decode']:.2f}x faster than {e['nkvo_fastest']}")
        if e.get("ngl_n_gpu_layers") is not None:
            parts.append(f"ngl {e['ngl_n_gpu_layers']}")
        if parts:
            console.print(f"VRAM budget {e['budget']}: " + "; ".join(parts), markup=False)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib; install it with: pip install matplotlib") from None
    return plt


def plot_gpu(res: dict, path: Path) -> None:
    """One bar per cell and VRAM budget: decode ms/token and time to first token (log scales: the cells span
    two orders of magnitude), with each budget's bounds as lines."""
    plt = _pyplot()
    rows = [r for r in res["rows"] if r.get("decode_ms")]
    labels = [r["policy"] if r["budget_bytes"] is None else f"{r['policy']}\n{r['budget']}" for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = range(len(rows))
    ax1.bar(xs, [r["decode_ms"] for r in rows], color="tab:blue")
    ax2.bar(xs, [r["ttft_s"] for r in rows], color="tab:orange")
    for e in res["ratios"]:
        for key, style, name in (("auto_bound_ms", "k--", "auto's bound"), ("ram_bound_ms", "k:", "ram's bound")):
            if e.get(key):
                ax1.axhline(e[key], linestyle=style[1:], color="k", linewidth=1, label=f"{name} ({e['budget']})")
    for ax, unit in ((ax1, "decode time per token, ms"), (ax2, "time to first token, s")):
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3, axis="y")
    if ax1.get_legend_handles_labels()[0]:
        ax1.legend(fontsize=8)
    m, w = res["model"], res["workload"]
    gpu = (res["machine"].get("gpu") or {}).get("name", "GPU")
    fig.suptitle(f"{m['label'] or m['path']} on {gpu}: {w['prompt_tokens']}-token prompt, n_ctx {w['n_ctx']}, "
                 f"host budget {res['host_budget']['label']}" + ("" if res["memory_enforced"] else " (no memory limit)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot(res: dict, path: Path):
    if res.get("mode") == "gpu":
        return plot_gpu(res, path)
    plt = _pyplot()
    budgets = [e["budget_bytes"] / res["model"]["kv_bytes_total"] * 100 for e in res["ratios"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    order = ["stock", "ram", "mmap", "direct", "direct-noverify", "auto"]
    policies = sorted({r["policy"] for r in res["rows"]}, key=lambda p: (order.index(p) if p in order else len(order), p))
    for pol in policies:
        xs, dec, ttft = [], [], []
        for x, e in zip(budgets, res["ratios"]):
            row = next((r for r in res["rows"] if r["policy"] == pol and r["budget"] == e["budget"]), None)
            if row and row["decode_ms"]:
                xs.append(x)
                dec.append(row["decode_ms"])
                ttft.append(row["ttft_s"])
        if xs:
            ax1.plot(xs, dec, marker="o", label=pol)
            ax2.plot(xs, ttft, marker="o", label=pol)
    ax1.plot(budgets, [e["bound_decode_ms"] for e in res["ratios"]], "k--", label="bound")
    ax1.set_xlabel("memory budget, % of the KV cache")
    ax1.set_ylabel("decode time per token, ms")
    ax2.set_xlabel("memory budget, % of the KV cache")
    ax2.set_ylabel("time to first token, s")
    for ax in (ax1, ax2):
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{res['model']['label']}: {res['workload']['prompt_tokens']}-token prompt, "
                 f"n_ctx {res['workload']['n_ctx']}" + ("" if res["memory_enforced"] else " (no memory limit)"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render_speculative(res: dict, console: Console) -> None:
    m, w, p = res["model"], res["workload"], res["probe"]
    t = _table(f"{m['label'] or m['path']}: speculative decoding ({w['draft']}) against plain, prompt "
               f"{w['prompt_tokens']} of {w['n_ctx']}, {w['gen_tokens']} generated, {w['reps']} rep(s)",
               [("workload", "left"), ("budget", "left"), ("policy", "left"), ("plain tok/s", "right"),
                ("drafts tok/s", "right"), ("x", "right"), ("accepted len", "right"), ("plain io wait", "right"),
                ("read/tok plain", "right"), ("read/tok drafts", "right"), ("differ", "right")])
    for e in res["pairs"]:
        t.add_row(e["workload"], e["budget"], e["policy"], _fmt(e["plain_tok_s"], "ms"), _fmt(e["draft_tok_s"], "ms"),
                  _fmt(e.get("draft_vs_plain"), "s"), _fmt(e["mean_accepted_length"], "s"),
                  _fmt(e["plain_io_wait_share"], "pct"), _fmt(e["plain_bytes_per_token"], "bytes"),
                  _fmt(e["draft_bytes_per_token"], "bytes"), _fmt(e.get("tokens_differ_vs_plain"), "n"))
    console.print(t)
    bad = [r for r in res["rows"] if r.get("tokens_equal_ram") is False]
    oracle = "all-in-VRAM" if res.get("reference") == "vram" else "all-in-RAM"
    gpu = (res["machine"].get("gpu") or {}).get("name") if res.get("gpu") else None
    if gpu:
        hb = res.get("host_budget") or {}
        console.print(f"on {gpu}: budgets are VRAM budgets; the host tiers' budget {hb.get('label')}", markup=False)
    console.print(f"exact: every cell's tokens equal the {oracle} run's with the same drafts" if not bad else
                  f"NOT EXACT: {', '.join(r['workload'] + '/' + r['policy'] for r in bad)}", markup=False)
    failed = [r for r in res["rows"] if r["status"] != "ok"]
    for r in failed:
        console.print(f"{r['workload']} {r['draft'] or 'plain'} {r['policy']} @ {r['budget']}: {r['status']}",
                      markup=False)
    console.print(f"device probe ({res['location'].get('path')}): O_DIRECT read {p['read_gib_s']:.2f} GiB/s; "
                  "'differ': tokens that differ between the plain and the speculative run (batched and single-token "
                  "evaluation round differently)", markup=False)
    _probe_members(p, console)


def render_sessions(res: dict, console: Console) -> None:
    mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
    console.print(f"{res['model_label'] or res['model']}: {res['policy']}"
                  f"{' @ ' + res['budget'] if res['budget'] else ''}, n_ctx {res['n_ctx']}: a {res['prompt_tokens']}-"
                  f"token prompt saved, then {res['appends']} replies of {res['reply_tokens']} tokens, each saved "
                  f"({'all appended' if res['appended_all'] else 'NOT all appended'})", markup=False)
    t = _table("session saves", [("save", "left"), ("writes (own count)", "right"), ("writes (/proc write_bytes)", "right"),
                                 ("seconds", "right")])
    fs, ws = res["first_save"], res["whole_save"]
    t.add_row(f"first ({fs['tokens']} tokens, whole)", mib(fs["written_bytes"]), mib(fs["process_write_bytes"]),
              f"{fs['seconds']:.3f}")
    t.add_row(f"after a reply (median of {res['appends']})", mib(res["median_written_bytes"]),
              mib(res["median_process_write_bytes"]), f"{res['median_save_s']:.3f}")
    t.add_row("after a reply (largest)", mib(res["max_written_bytes"]), mib(res["max_process_write_bytes"]), "")
    t.add_row(f"whole ({ws['tokens']} tokens, compact)", mib(ws["written_bytes"]), mib(ws["process_write_bytes"]),
              f"{ws['seconds']:.3f}")
    console.print(t)
    console.print(f"a reply's new KV rows: {mib(res['new_rows_bytes'])} ({res['reply_tokens']} x "
                  f"{res['kv_bytes_per_token']} bytes); target 2x that + 1 MiB = {mib(res['bound_bytes'])}; "
                  f"largest save / target {res['worst_vs_bound']:.2f}", markup=False)
    console.print(f"load after {res['appends']} appends {res['load_s']['grown']:.3f} s, fresh whole save "
                  f"{res['load_s']['fresh']:.3f} s: grown / fresh {res['load_grown_vs_fresh']:.2f}; on disk "
                  f"{mib(res['disk_bytes']['grown'])} vs {mib(res['disk_bytes']['fresh'])}", markup=False)


def render_stripes(res: dict, console: Console) -> None:
    w, m = res["workload"], res["model"]
    t = _table(f"{m['label'] or m['path']}: decode with the KV striped over 1..{len(res['members'])} devices, "
               f"{w['policy']} @ {w['budget']}, prompt {w['prompt_tokens']}, {w['gen_tokens']} generated, "
               f"{w['reps']} rep(s)",
               [("devices", "right"), ("status", "left"), ("TTFT s", "right"), ("decode ms/tok", "right"),
                ("tok/s", "right"), ("x one", "right"), ("target", "right"), ("read/tok", "right"),
                ("io wait", "right"), ("shares", "left"), ("exact", "left")])
    for r in res["rows"]:
        shares = ",".join(str(x.get("share")) for x in r.get("store_members") or []) or "-"
        t.add_row(str(r["members"]), r["status"], _fmt(r.get("ttft_s"), "s"), _fmt(r.get("decode_ms"), "ms"),
                  _fmt(r.get("decode_tok_s"), "ms"), _fmt(r.get("vs_one"), "s"), f"{r['target']:.2f}",
                  _fmt(r.get("decode_bytes_read_per_token"), "bytes"),
                  f"{r['decode_io_wait_share']:.0%}" if r.get("decode_io_wait_share") is not None else "-", shares,
                  {True: "yes", False: "NO", None: "-"}[r.get("tokens_equal_ram")])
    console.print(t)
    met = [r for r in res["rows"][1:] if r.get("met") is not None]
    console.print("target (decode tok/s >= 0.85 x N the one-device run): " +
                  ("-" if not met else "met" if all(r["met"] for r in met) else "NOT met") +
                  f"; all in RAM decodes at {_fmt(res.get('ram_decode_tok_s'), 'ms')} tok/s", markup=False)


def _io_shapes(res: dict, console: Console) -> None:
    """The shape each cell's store read with at its end (tuned: measured on its own reads; fixed: the environment)."""
    shapes = [f"{r['policy']} {r['io_shape']['now']}" + (" (DUALBLADE_IO_SHAPE)" if r["io_shape"]["fixed"] else "")
              for r in res["rows"] if r.get("io_shape") and r["policy"] in ("direct", "auto")]
    if shapes:
        console.print(f"O_DIRECT request shape (size x in flight, picked by measuring): {', '.join(shapes)}",
                      markup=False)


def _probe_members(p: dict, console: Console) -> None:
    """A striped store's probe: each member's reads while all of them read at once."""
    if p.get("members"):
        console.print("  all members read at once: " + "; ".join(
            f"{m['path']} {m['read_gib_s']:.2f} GiB/s" for m in p["members"]), markup=False)


def run_bench_cli(model, synthetic, policies, budgets, ctx_size, prompt_tokens, gen_tokens, reps, kv_dir, kv_device,
                  no_cgroup, overhead, threads, json_path, plot_path, probe_size, timeout=None, force=False,
                  gpu=False, host_budget=None, ubatch=None, draft=None, sessions=None, stripes=False,
                  draft_model=None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dualblade.bench import GPU_POLICIES, BenchOptions, check_options, run_bench
    from dualblade.sizes import parse_size

    console, err = Console(), Console(stderr=True)
    if not console.is_terminal:
        console = Console(width=200)  # a file or a pipe: the whole table, unwrapped
    if force and kv_device is None:
        raise ConfigError("--force takes over a --kv-device, and no --kv-device was given; give --kv-device, or "
                          "drop --force")
    if sessions is not None:
        if gpu or draft is not None or plot_path:
            raise ConfigError("--sessions measures session saves on its own; drop --gpu, --draft and --plot")
        if sessions < 1:
            raise ConfigError(f"--sessions {sessions}: give the number of replies (each then saved), 1 or more")
        policies = policies or "direct"
        if policies.split(",")[0].strip() == "stock":
            raise ConfigError("--sessions needs a dualblade policy (ram, mmap, direct or auto) first in --policies")
        budgets = budgets or "256M"
        if prompt_tokens + sessions * gen_tokens > ctx_size:
            raise ConfigError(f"--prompt-tokens {prompt_tokens} + --sessions {sessions} replies x --gen-tokens "
                              f"{gen_tokens} is {prompt_tokens + sessions * gen_tokens} tokens, more than --ctx-size "
                              f"{ctx_size}; give a larger --ctx-size or fewer tokens")
    if stripes:
        if gpu or draft is not None or sessions is not None or plot_path:
            raise ConfigError("--stripes measures striping on its own; drop --gpu, --draft, --sessions and --plot")
        policies = policies or "direct"
        budgets = budgets or "25%"
    if policies is None:
        policies = ",".join(GPU_POLICIES) if gpu else "stock,ram,mmap,direct,auto"
    if budgets is None:
        budgets = "25%" if gpu else "100%,50%,25%,10%"
    path, label = _model(model, synthetic)
    for target in (json_path, plot_path):
        if target is not None and target.exists():
            raise ConfigError(f"{target} exists and would be overwritten; choose another name or remove it")
        if target is not None and not os.access(target.parent if str(target.parent) else ".", os.W_OK):
            raise ConfigError(f"cannot write {target}: its directory is missing or read-only; choose another path")
    opts = BenchOptions(model=path, policies=[p.strip() for p in policies.split(",") if p.strip()],
                        budgets=[b for b in budgets.split(",") if b.strip()], n_ctx=ctx_size,
                        prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, reps=reps,
                        kv_dir=kv_dir, kv_device=kv_device,
                        force=force, use_cgroup=not no_cgroup, overhead=parse_size(overhead) if overhead else None,
                        threads=threads, probe_bytes=parse_size(probe_size), model_label=label, timeout=timeout,
                        gpu=gpu, host_budget=host_budget, ubatch=ubatch)
    check_options(opts)  # before the progress bar, whose end would leave a line above the error
    if stripes:
        from dualblade.bench.stripes import check_stripes

        check_stripes(opts)
    if draft is not None or draft_model is not None:
        from dualblade.gguf_header import model_info
        from dualblade.speculative import check_draft_model, lookup

        try:
            if draft_model is not None:
                if draft is not None:
                    raise ValueError("--draft and --draft-model both choose where drafts come from; give one of them")
                # the file and its vocabulary checked here, before any cell; each cell loads it itself
                check_draft_model(str(draft_model), model_info(path).n_vocab)
                draft = f"model:{os.path.abspath(draft_model)}"
            else:
                lookup(draft)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if plot_path:
            raise ConfigError("--plot has no plot for --draft; drop --plot (--json keeps every figure)")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as prog:
        task = prog.add_task("bench", total=None)

        def on_progress(what: str, done: int, total: int) -> None:
            prog.update(task, description=what, completed=done, total=total)

        if stripes:
            from dualblade.bench.stripes import run_bench_stripes

            res = run_bench_stripes(opts, on_progress=on_progress, log=lambda s: prog.update(task, description=s))
        elif sessions is not None:
            from dualblade.bench.sessions import run_bench_sessions

            res = run_bench_sessions(opts, sessions, on_progress=on_progress,
                                     log=lambda s: prog.update(task, description=s))
        elif draft is not None:
            from dualblade.bench.speculative import run_bench_speculative

            res = run_bench_speculative(opts, draft, on_progress=on_progress,
                                        log=lambda s: prog.update(task, description=s))
        else:
            res = run_bench(opts, on_progress=on_progress, log=lambda s: prog.update(task, description=s))
    {"gpu": render_gpu, "speculative": render_speculative, "sessions": render_sessions,
     "stripes": render_stripes}.get(res.get("mode"), render)(res, console)
    if json_path:
        json_path.write_text(json.dumps(res, indent=1) + "\n")
        err.print(f"raw figures: {json_path}", markup=False)
    if plot_path:
        plot(res, plot_path)
        err.print(f"plot: {plot_path}", markup=False)
