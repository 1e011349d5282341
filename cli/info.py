"""`dualblade info`: KV geometry and placement plan from a GGUF header alone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from dualblade import placement, vram
from dualblade.config import KVConfig, size_arg
from dualblade.errors import BudgetError, ConfigError, StoreError
from dualblade.gguf_header import CACHE_TYPES
from dualblade.sizes import format_size

from .common import check_ctx, describe_member, resolve_model


def build_report(model: Optional[Path], ctx_size: Optional[int], mem_budget: Optional[str], policy: str,
                 cache_type: str, n_gpu_layers: int = 0, vram_budget: Optional[str] = None,
                 kv_dir: Optional[str] = None, kv_device: Optional[str] = None, force: bool = False,
                 probe: bool = False) -> dict:
    path, info = resolve_model(model)
    n_ctx = ctx_size if ctx_size is not None else (info.n_ctx_train or 4096)
    check_ctx(n_ctx, info)
    cfg = KVConfig.from_args(mem_budget, policy, kv_dir, kv_device, force)
    if probe and not cfg.kv_dir:
        raise ConfigError("--probe opens the store in a --kv-dir to probe its members; give --kv-dir" if not
                          cfg.kv_device else "--probe would write this plan's header on the --kv-device (a run with "
                          "another context would then need --force); give --kv-dir, or see a device's members with "
                          "'dualblade chat --verbose --kv-device ...'")
    auto = vram_budget is not None and vram_budget.strip().lower() == vram.AUTO
    vram_bytes = None if vram_budget is None or auto else size_arg(vram_budget, "--vram-budget")
    if vram_budget is not None and not n_gpu_layers:
        raise ConfigError("--vram-budget plans the KV of the layers on the GPU, and -ngl is 0; give -ngl 99 (all "
                          "layers), or leave --vram-budget out")
    found = vram.gpus() if vram_budget is not None else []
    if auto:  # from this machine's free VRAM: it needs a GPU here
        if not found:
            raise ConfigError("--vram-budget auto plans from the VRAM this machine's GPUs have free, and this build "
                              "or machine has no GPU; give a size such as --vram-budget 2G to plan for another")
        try:
            vram_bytes, _ = vram.budget_from_free(vram.AUTO, info, n_gpu_layers, found=found)
        except vram.VramExceedsFree as e:
            raise BudgetError(str(e).replace("vram_budget='auto'", "--vram-budget auto")) from None
    kv = info.layer_kv_bytes(n_ctx, cache_type)
    # a plan for a GPU build (the header is all it needs, whether or not this machine has one)
    gpu = placement.gpu_layers(len(info.layers), n_gpu_layers, True, True)
    try:
        placed = placement.place([(l.il, k, v) for l, (k, v) in zip(info.layers, kv)], cfg.policy,
                                 cfg.budget_bytes, gpu, vram_bytes, quantized=cache_type not in ("f16", "f32", "bf16"))
    except placement.VramTooSmall as e:
        raise BudgetError(f"--vram-budget {vram_budget} is below the minimum for this model at this context "
                          f"({format_size(e.args[0])}); give --vram-budget {-(-e.args[0] // 2**20)}M or more, or a "
                          "smaller --ctx-size") from None
    except MemoryError as e:
        raise BudgetError(f"memory budget {mem_budget} is below the minimum working set of the {policy} policy "
                          f"at this context ({format_size(e.args[0])}); give --mem-budget "
                          f"{-(-e.args[0] // 2**20)}M or more, or a smaller --ctx-size") from None
    layer_bytes = [k + v for k, v in kv]
    paths = [e[1] for e in placed.layout]
    streamed = [e[4] for e in placed.layout]
    staging = placed.staging_bytes
    resident = sum(b for b, p in zip(layer_bytes, paths) if p == "ram")
    store = store_report(cfg, placed.layout, force, probe) if cfg.members else None
    return {
        "model": str(path),
        "name": info.name,
        "architecture": info.arch,
        "file_bytes": info.file_bytes,
        "n_layer": info.n_layer,
        "n_kv_layers": len(info.layers),
        "n_ctx_train": info.n_ctx_train,
        "n_ctx": n_ctx,
        "n_embd": info.n_embd,
        "n_head": info.n_head,
        "n_head_kv": sorted(set(info.n_head_kv)),
        "head_dim_k": info.head_dim_k,
        "head_dim_v": info.head_dim_v,
        "sliding_window": info.n_swa,
        "swa_layers": [l.il for l in info.layers if l.swa],
        "chat_template": bool(info.chat_template),
        "cache_types": {
            t: {"kv_bytes_per_token": info.kv_bytes_per_token(t), "kv_bytes_total": sum(info.layer_bytes(n_ctx, t))}
            for t in CACHE_TYPES
        },
        "plan": {
            "policy": cfg.policy,
            "cache_type": cache_type,
            "budget_bytes": cfg.budget_bytes,
            "staging_bytes": staging,
            "resident_bytes": resident,
            "offloaded_bytes": sum(b for b, p in zip(layer_bytes, paths) if p in ("mmap", "direct")),
            "n_gpu_layers": n_gpu_layers,
            "vram_budget_bytes": vram_bytes,
            "vram_budget_auto": auto,
            "gpus": [{"name": g.name, "free": g.free, "total": g.total} for g in found],
            "vram_bytes": placed.vram.vram_bytes,
            "vram_slots": placed.vram.slots,
            "vram_slot_bytes": placed.vram.slot_bytes,
            "layers": [{"layer": l.il, "swa": l.swa, "bytes": b, "path": p, "streamed": st}
                       for l, b, p, st in zip(info.layers, layer_bytes, paths, streamed)],
        },
        "store": store,
    }


def store_report(cfg: KVConfig, layout: list, force: bool, probe: bool) -> dict:
    """The store the plan's offloaded layers need (every layer, where the plan offloads none) in cfg's members,
    checked as a run opens it, writing nothing (StoreError: why not); probe: opened (a KV file, unnamed, goes at
    close), each member's read bandwidth probed and its share of the stripes given."""
    from dualblade import _native

    offloaded = [e for e in layout if e[1] in ("mmap", "direct")]
    if not offloaded:  # checked for what the smallest budget of the direct path would put there
        layout = [(e[0], "direct", *e[2:]) for e in layout]
    policy = cfg.policy if offloaded else "direct"
    why = _native.store_check(policy, cfg.kv_dir, cfg.kv_device, force, layout)
    if why:
        raise StoreError(why)
    kind = "device" if cfg.kv_device else "file"
    out = {"kind": kind, "sized_for": "offloaded layers" if offloaded else "every layer", "probed": probe,
           "stripe_unit": None,
           "members": [{"path": p, "kind": kind, "bytes": None, "read_bps": None, "share": None, "n_pattern": None}
                       for p in cfg.members]}
    if probe:
        try:
            kv = _native.KV(policy, cfg.budget_bytes, cfg.kv_dir, cfg.kv_device, layout, force=force)
        except _native.KVError as e:
            raise StoreError(str(e)) from None
        try:
            out["members"] = kv.store_members()
            out["stripe_unit"] = kv.store()["stripe_unit"] or None
        finally:
            kv.release()
    return out


def run_info(model, ctx_size, mem_budget, policy, cache_type, as_json, n_gpu_layers=0, vram_budget=None,
             kv_dir=None, kv_device=None, force=False, probe=False) -> None:
    r = build_report(model, ctx_size, mem_budget, policy, cache_type, n_gpu_layers, vram_budget, kv_dir, kv_device,
                     force, probe)
    if as_json:
        print(json.dumps(r, indent=1))
        return
    con = Console()
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_row("model", f"{r['name']}  ({r['model']}, {format_size(r['file_bytes'])})")
    head.add_row("architecture", f"{r['architecture']}, {r['n_layer']} layers ({r['n_kv_layers']} with KV)")
    heads_kv = "/".join(map(str, r["n_head_kv"]))
    head.add_row("attention", f"{r['n_head']} heads, {heads_kv} KV heads, head dim K {r['head_dim_k']} / "
                              f"V {r['head_dim_v']}")
    if r["swa_layers"]:
        head.add_row("sliding window", f"{r['sliding_window']} tokens on {len(r['swa_layers'])} layers "
                                       f"(full-size cache, as llama-cpp-python allocates it)")
    head.add_row("context", f"{r['n_ctx']} tokens (trained {r['n_ctx_train']})")
    head.add_row("chat template", "yes" if r["chat_template"] else "none in the file")
    con.print(head)

    sizes = Table(title="KV cache size")
    for c in ("type", "per token", f"at {r['n_ctx']} tokens"):
        sizes.add_column(c, justify="right" if c != "type" else "left")
    for t, v in r["cache_types"].items():
        sizes.add_row(t, format_size(v["kv_bytes_per_token"]), format_size(v["kv_bytes_total"]))
    con.print(sizes)

    p = r["plan"]
    budget = "no budget" if p["budget_bytes"] is None else f"budget {format_size(p['budget_bytes'])}"
    plan = Table(title=f"Placement: policy {p['policy']}, {budget}, {p['cache_type']}")
    for c in ("layer", "kind", "bytes", "path"):
        plan.add_column(c, justify="right" if c in ("layer", "bytes") else "left")
    for l in p["layers"]:
        where = f"{l['path']} -> VRAM slot" if l["streamed"] else ("VRAM" if l["path"] == "vram" else l["path"])
        plan.add_row(str(l["layer"]), "window" if l["swa"] else "global", format_size(l["bytes"]), where)
    con.print(plan)
    if p["n_gpu_layers"]:
        slots = (f", {p['vram_slots']} slots of {format_size(p['vram_slot_bytes'])} the streamed layers take "
                 "turns in" if p["vram_slots"] else "")
        auto = " (--vram-budget auto: the free VRAM less the weights and compute buffers)" if p["vram_budget_auto"] else ""
        con.print(f"VRAM (a GPU build with -ngl {p['n_gpu_layers']}): {format_size(p['vram_bytes'])}{slots}{auto}")
        for g in p["gpus"]:
            con.print(f"  {g['name']}: {format_size(g['free'])} free of {format_size(g['total'])}", markup=False)
    con.print(f"resident {format_size(p['resident_bytes'])}, offloaded {format_size(p['offloaded_bytes'])}, "
              f"direct-path staging {format_size(p['staging_bytes'])}")
    if p["policy"] == "auto" and p["offloaded_bytes"]:
        con.print("auto: the offloaded layers go to the page cache or the direct path (shown) as the memory "
                  "available at run time allows, and move when it changes", markup=False)
    s = r["store"]
    if s is not None:
        what = "the plan's offloaded layers" if s["sized_for"] == "offloaded layers" else \
            "every layer (the plan offloads none)"
        striped = f", striped in {format_size(s['stripe_unit'])} stripes" if s["stripe_unit"] else ""
        n = len(s["members"])
        con.print(f"KV store: {n} {s['kind']} member{'s' if n > 1 else ''} for {what}{striped}", markup=False,
                  soft_wrap=True)
        for m in s["members"]:
            size = f", {format_size(m['bytes'])}" if m["bytes"] is not None else ""
            con.print(f"  {describe_member(m)}{size}", markup=False, soft_wrap=True)
        con.print("checked as a run opens it: it can take the KV" + (
            "; opened to probe each member's O_DIRECT reads, which set its share of the stripes" if s["probed"]
            else " (nothing written; --probe measures each member's reads and gives its share)"),
            markup=False, soft_wrap=True)
