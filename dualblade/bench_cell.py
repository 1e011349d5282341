"""One cell of `dualblade bench`, run in a fresh process (inside the cell's memory-limited cgroup).

Input: one JSON argument. Output: one JSON line on stdout with every raw figure of the run.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

TEXT = (b"In the long evening the travellers told stories of rivers and mountains, of cities built on "
        b"old harbours, of markets where every language was spoken and every coin was weighed twice. ")


def _proc_io() -> dict:
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def run(a: dict) -> dict:
    t_load = time.perf_counter()
    kw = dict(n_ctx=a["n_ctx"], n_batch=512, n_ubatch=512, flash_attn=True, verbose=False, seed=1)
    if a.get("threads"):
        kw["n_threads"] = a["threads"]
    if a["policy"] == "stock":
        import llama_cpp

        llm = llama_cpp.Llama(a["model"], **kw)
    else:
        from dualblade import Llama

        policy, _, variant = a["policy"].partition("-")
        llm = Llama(a["model"], kv_policy=policy, mem_budget=a["budget"], kv_dir=a.get("kv_dir"),
                    kv_device=a.get("kv_device"), kv_force=bool(a.get("kv_force")),
                    kv_verify=variant != "noverify", **kw)
    toks = llm.tokenize(TEXT)
    while len(toks) < a["prompt_tokens"]:
        toks += llm.tokenize(TEXT, add_bos=False)
    toks = toks[: a["prompt_tokens"]]
    # warm the weights (mmap'ed: the first pass pages them in), then forget that KV
    llm.eval(toks[:8])
    llm._ctx.kv_cache_clear()
    llm.reset()
    load_s = time.perf_counter() - t_load

    io0, ru0 = _proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    st0 = llm.kv_stats() if hasattr(llm, "kv_stats") else None
    t0 = time.perf_counter()
    llm.eval(toks)
    tok = llm.sample(temp=0.0)
    ttft = time.perf_counter() - t0
    st1 = llm.kv_stats() if st0 is not None else None
    ru_dec = resource.getrusage(resource.RUSAGE_SELF)
    steps, out = [], [tok]
    for _ in range(a["gen_tokens"]):
        ts = time.perf_counter()
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
        steps.append(time.perf_counter() - ts)
        out.append(tok)
    io1, ru1 = _proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    res = {
        "ok": True,
        "load_s": load_s,
        "ttft_s": ttft,
        "prefill_tok_s": len(toks) / ttft,
        "decode_ms": statistics.median(steps) * 1e3 if steps else None,
        "decode_ms_mean": statistics.fmean(steps) * 1e3 if steps else None,
        "decode_ms_sd": statistics.stdev(steps) * 1e3 if len(steps) > 1 else 0.0,
        "tokens": out,
        "user_s": ru1.ru_utime - ru0.ru_utime,
        "sys_s": ru1.ru_stime - ru0.ru_stime,
        # every thread's CPU time (compute, the I/O worker, the kernel's for this process) per decoded token
        "decode_cpu_ms": (ru1.ru_utime - ru_dec.ru_utime + ru1.ru_stime - ru_dec.ru_stime) / len(steps) * 1e3
        if steps else None,
        "maxrss_bytes": ru1.ru_maxrss * 1024,
        "proc_read_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "proc_write_bytes": io1.get("write_bytes", 0) - io0.get("write_bytes", 0),
    }
    if st0 is not None:
        st = llm.kv_stats()
        res.update({
            "bytes_read": st["bytes_read"] - st0["bytes_read"],
            "bytes_written": st["bytes_written"] - st0["bytes_written"],
            "decode_bytes_read": st["bytes_read"] - st1["bytes_read"],
            "io_wait_s": st["io_wait_s"] - st0["io_wait_s"],
            "decode_io_wait_s": st["io_wait_s"] - st1["io_wait_s"],
            "kv_bytes_total": st["kv_bytes_total"],
            "offloaded_bytes": st["offloaded_bytes"],
            "layers_by_path": st["layers_by_path"],
            "switch_count": st["switch_count"],
            "switches": st["switches"][-8:],
            "io_engine": st["io_engine"],
            "io_engine_reason": st["io_engine_reason"],
            "staging": st["staging"],
            "pipeline_depth": st["pipeline_depth"],
            "staged_peak_bytes": st["staged_peak_bytes"],
        })
    llm.close()
    return res


def main() -> None:
    a = json.loads(sys.argv[1])
    try:
        res = run(a)
    except Exception as e:  # noqa: BLE001 - reported as the cell's result
        res = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    os._exit(0)  # no slow teardown of the mapped model inside the cgroup


if __name__ == "__main__":
    main()
