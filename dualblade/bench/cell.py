"""One cell of `dualblade bench`, run in a fresh process (inside the cell's memory-limited cgroup).

Input: one JSON argument. Output: one JSON line on stdout with every raw figure of the run.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time

TEXT = (b"In the long evening the travellers told stories of rivers and mountains, of cities built on "
        b"old harbours, of markets where every language was spoken and every coin was weighed twice. ")


def _proc_io() -> dict:
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def _memory_now(kv_stats: dict | None) -> dict:
    """The process's resident memory by kind (/proc/self/status) and, under auto, its page-cache room and
    reserve (from kv_stats, taken then): what a cell holds after loading, after its prompt and at its end
    (auto's first room is measured before the prompt; what the prompt allocates on top is the difference)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    out[key.lower().replace("rss", "rss_") + "_bytes"] = int(value.split()[0]) * 1024
    except OSError:
        pass
    mem = (kv_stats or {}).get("memory") or {}
    for key in ("page_cache_room_bytes", "page_cache_need_bytes", "reserve_bytes"):
        out[key] = mem.get(key)
    return out


class VramSampler:
    """The GPU's used memory, sampled in a background thread (NVML through pynvml, else nvidia-smi): the
    baseline before the model loads and the peak after. peak_bytes() - baseline is what the cell took
    (samples every 10 ms with NVML, 100 ms with nvidia-smi: a shorter spike can be missed)."""

    def __init__(self):
        self.source, self.total, self._read, interval = None, None, None, 0.01
        index = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        index = int(index) if index.isdigit() else 0
        try:
            import pynvml

            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.total = int(pynvml.nvmlDeviceGetMemoryInfo(h).total)
            self._read, self.source = (lambda: int(pynvml.nvmlDeviceGetMemoryInfo(h).used)), "nvml"
        except Exception:  # noqa: BLE001 - no pynvml, or no driver: try nvidia-smi
            cmd = ["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]

            def smi() -> int:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
                return int(float(out.split()[0]) * (1 << 20))
            try:
                smi()
                self._read, self.source, interval = smi, "nvidia-smi", 0.1
            except Exception:  # noqa: BLE001 - no GPU tool at all: no VRAM figures
                pass
        self.baseline = self._read() if self._read else None
        self.peak = self.baseline
        self._stop = threading.Event()
        if self._read:
            self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)
            self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.peak = max(self.peak, self._read())
            except Exception:  # noqa: BLE001 - a failed sample is skipped
                pass

    def stop(self) -> dict:
        if not self._read:
            return {"vram_source": None}
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._read())
        return {"vram_source": self.source, "vram_baseline_bytes": self.baseline, "vram_total_bytes": self.total,
                "peak_vram_bytes": self.peak - self.baseline}


# GPU cells (bench --gpu): stock llama_cpp.Llama's keyword arguments by policy; the dualblade policies
# (ram, mmap, direct, auto) run dualblade.Llama with every layer on the GPU and a VRAM budget
GPU_STOCK = {
    "vram": dict(n_gpu_layers=-1, flash_attn=True),                      # all KV in VRAM: the upper bound
    "nkvo-fa": dict(n_gpu_layers=-1, offload_kqv=False, flash_attn=True),  # KV in host RAM, attention on the CPU
    "nkvo": dict(n_gpu_layers=-1, offload_kqv=False, flash_attn=False),
    "ngl": dict(flash_attn=True),                                         # n_gpu_layers from the cell's argument
}


def _make_llm(a: dict, kw: dict):
    if a.get("gpu") and a.get("dropin") and a["policy"] == "vram":
        # bench --draft --gpu: stock llama_cpp cannot run draft_model=, the drop-in places as stock does
        from dualblade import Llama

        kw.update(GPU_STOCK["vram"])
        return Llama(a["model"], **kw)
    if a.get("gpu") and a["policy"] in GPU_STOCK:
        import llama_cpp

        kw.update(GPU_STOCK[a["policy"]])
        if a["policy"] == "ngl":
            kw["n_gpu_layers"] = a["n_gpu_layers"]
        return llama_cpp.Llama(a["model"], **kw)
    if a["policy"] == "stock":
        import llama_cpp

        return llama_cpp.Llama(a["model"], **kw)
    from dualblade import Llama

    policy, _, variant = a["policy"].partition("-")
    if a.get("gpu"):
        kw.update(n_gpu_layers=-1, vram_budget=a["vram_budget"])
    return Llama(a["model"], kv_policy=policy, mem_budget=a["budget"], kv_dir=a.get("kv_dir"),
                 kv_device=a.get("kv_device"), kv_force=bool(a.get("kv_force")),
                 kv_verify=variant != "noverify", **kw)


def run_generate(a: dict, llm, load_s: float) -> dict:
    """A workload cell (bench --draft): real text (speculative.workload_tokens), greedy tokens through
    llm.generate as a user's completion runs them, with the draft model or without; tokens per second of the
    decode, and what it read from storage per generated token."""
    from dualblade.speculative import workload_tokens

    toks = workload_tokens(llm, a["workload"], a["prompt_tokens"])
    io0 = _proc_io()
    st0 = llm.kv_stats()
    t0 = time.perf_counter()
    out, t_first, st1, io1 = [], None, None, None
    for t in llm.generate(toks, temp=0.0, top_k=1):
        out.append(t)
        if t_first is None:
            t_first, st1, io1 = time.perf_counter(), llm.kv_stats(), _proc_io()
        if len(out) > a["gen_tokens"]:
            break
    t_end = time.perf_counter()
    st, io2 = llm.kv_stats(), _proc_io()
    n = len(out) - 1  # generated after the first token (its time is the prefill's)
    decode_s = t_end - t_first
    res = {
        "ok": True, "load_s": load_s, "ttft_s": t_first - t0, "prefill_tok_s": len(toks) / (t_first - t0),
        "decode_ms": decode_s / n * 1e3, "decode_tok_s": n / decode_s, "tokens": out,
        "workload": a["workload"], "draft": a.get("draft"), "speculation": st.get("speculation"),
        "decode_bytes_read": st["bytes_read"] - st1["bytes_read"],
        "decode_bytes_read_per_token": (st["bytes_read"] - st1["bytes_read"]) / n,
        "decode_proc_read_bytes": io2.get("read_bytes", 0) - io1.get("read_bytes", 0),
        "decode_io_wait_s": st["io_wait_s"] - st1["io_wait_s"],
        # how storage-bound the decode is: the share of its time the graph waited for the disk
        "decode_io_wait_share": (st["io_wait_s"] - st1["io_wait_s"]) / decode_s,
        "prefill_bytes_read": st1["bytes_read"] - st0["bytes_read"],
        "proc_read_bytes": io2.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "offloaded_bytes": st["offloaded_bytes"], "layers_by_path": st["layers_by_path"],
        "store_members": st.get("store_members"),
    }
    llm.close()
    return res


def run(a: dict) -> dict:
    vram = VramSampler() if a.get("gpu") else None  # the baseline before anything is loaded
    t_load = time.perf_counter()
    ubatch = a.get("ubatch") or 512
    kw = dict(n_ctx=a["n_ctx"], n_batch=a.get("batch") or ubatch, n_ubatch=ubatch, flash_attn=True, verbose=False, seed=1)
    if a.get("threads"):
        kw["n_threads"] = a["threads"]
    if a.get("draft"):
        from dualblade.speculative import draft_from_args

        # "lookup[:N]", or "model:PATH" (a draft model, its own small KV in RAM)
        path = a["draft"][len("model:"):] if a["draft"].startswith("model:") else None
        kw["draft_model"] = draft_from_args(None if path else a["draft"], path, 0, a["n_ctx"])
    llm = _make_llm(a, kw)
    if a.get("workload"):
        return run_generate(a, llm, time.perf_counter() - t_load)
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
    memory_at = {"loaded": _memory_now(st0)}
    t0 = time.perf_counter()
    llm.eval(toks)
    tok = llm.sample(temp=0.0)
    ttft = time.perf_counter() - t0
    st1 = llm.kv_stats() if st0 is not None else None
    memory_at["prefilled"] = _memory_now(st1)
    ru_dec, io_dec = resource.getrusage(resource.RUSAGE_SELF), _proc_io()
    steps, out = [], [tok]
    for _ in range(a["gen_tokens"]):
        ts = time.perf_counter()
        llm.eval([tok])
        tok = llm.sample(temp=0.0)
        steps.append(time.perf_counter() - ts)
        out.append(tok)
    io1, ru1 = _proc_io(), resource.getrusage(resource.RUSAGE_SELF)
    st = llm.kv_stats() if st0 is not None else None
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
        # what the decode read from storage, as the kernel counts it (O_DIRECT reads and page-cache misses)
        "decode_proc_read_bytes": io1.get("read_bytes", 0) - io_dec.get("read_bytes", 0),
        "memory_at": {**memory_at, "end": _memory_now(st)},
    }
    if vram is not None:
        res.update(vram.stop())
        res["n_gpu_layers"] = kw.get("n_gpu_layers")
        res["offload_kqv"] = kw.get("offload_kqv", True)
        res["flash_attn"] = kw.get("flash_attn")
    if st0 is not None:
        res.update({
            "bytes_read": st["bytes_read"] - st0["bytes_read"],
            "bytes_written": st["bytes_written"] - st0["bytes_written"],
            "decode_bytes_read": st["bytes_read"] - st1["bytes_read"],
            # the prefill: what it read back against what it wrote (each offloaded layer read about once)
            "prefill_bytes_read": st1["bytes_read"] - st0["bytes_read"],
            "prefill_bytes_written": st1["bytes_written"] - st0["bytes_written"],
            "io_wait_s": st["io_wait_s"] - st0["io_wait_s"],
            "decode_io_wait_s": st["io_wait_s"] - st1["io_wait_s"],
            "kv_bytes_total": st["kv_bytes_total"],
            "offloaded_bytes": st["offloaded_bytes"],
            "layers_by_path": st["layers_by_path"],
            "switch_count": st["switch_count"],
            "switches": st["switches"][-8:],
            "io_engine": st["io_engine"],
            "io_engine_reason": st["io_engine_reason"],
            "io_shape": st["io_shape"],
            "staging": st["staging"],
            "pipeline_depth": st["pipeline_depth"],
            "staged_peak_bytes": st["staged_peak_bytes"],
            "store_members": st.get("store_members"),
        })
        if steps:
            res["decode_bytes_read_per_token"] = res["decode_bytes_read"] / len(steps)
            # how storage-bound the decode is: the share of its time the graph waited for the disk
            res["decode_io_wait_share"] = res["decode_io_wait_s"] / sum(steps)
        if vram is not None:  # the VRAM tier's copies: the whole run and the decode alone
            v, v0, v1 = st["vram"], st0["vram"], st1["vram"]
            res["vram"] = v
            for key in ("h2d_bytes", "h2d_pinned_bytes", "d2h_bytes", "copy_wait_s", "ring_read_bytes"):
                res[key] = v[key] - v0[key]
                res[f"decode_{key}"] = v[key] - v1[key]
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
