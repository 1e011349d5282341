"""KV residency is exact: ram, page-cache path, direct path on a file and on a loop device give the
same tokens and bit-identical logits, on Gemma-3-270M (iSWA) and on a dense GQA llama model."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import last_logits as _logits, min_budget, prompt_tokens
from dualblade import Llama
from dualblade.gguf_header import GGML_TYPE_IDS, model_info

N_CTX = 4096
PROMPT_TOKENS = 2048
GEN_TOKENS = 128


@pytest.fixture(scope="module")
def loop_device(tmp_path_factory):
    """A real loop device over a sparse file, detached afterwards."""
    if os.geteuid() != 0 or not shutil.which("losetup"):
        pytest.skip("loop devices need root and losetup")
    backing = tmp_path_factory.mktemp("loop") / "kv.img"
    with open(backing, "wb") as f:
        f.truncate(1 << 30)
    r = subprocess.run(["losetup", "-f", "--show", "--direct-io=on", str(backing)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"losetup refused here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def run_greedy(path, cache_type: str, **kv) -> dict:
    """Prompt then greedy tokens, one eval at a time; every step's logits hashed bit for bit."""
    tid = GGML_TYPE_IDS[cache_type]
    llm = Llama(str(path), n_ctx=N_CTX, n_batch=512, flash_attn=True, type_k=tid, type_v=tid, verbose=False, **kv)
    try:
        toks = prompt_tokens(llm, PROMPT_TOKENS)
        llm.eval(toks)
        hashes, out = [], []
        for _ in range(GEN_TOKENS):
            lg = _logits(llm)
            hashes.append(hashlib.sha256(lg.tobytes()).hexdigest())
            tok = int(np.argmax(lg))
            out.append(tok)
            llm.eval([tok])
        stats = llm.kv_stats()  # before save_state, which stages every layer for the copy
        # save/load state: the same fixed continuation twice from the saved point, logits bit for bit
        # (fixed tokens: llama-cpp-python does not restore the last logits with the state)
        state = llm.save_state()
        cont = []
        for tok in (5, 6, 7, 8):
            llm.eval([tok])
            cont.append(hashlib.sha256(_logits(llm).tobytes()).hexdigest())
        llm.load_state(state)
        again = []
        for tok in (5, 6, 7, 8):
            llm.eval([tok])
            again.append(hashlib.sha256(_logits(llm).tobytes()).hexdigest())
        # prefix reuse: generate() keeps the matching prefix and removes the rest with seq_rm
        text = llm.detokenize(toks[:600]).decode(errors="ignore")
        c1 = llm.create_completion(text, max_tokens=12, temperature=0)["choices"][0]["text"]
        c2 = llm.create_completion(text + c1 + " Then", max_tokens=12, temperature=0)["choices"][0]["text"]
        return {"tokens": out, "hashes": hashes, "state": (cont, again), "reuse": (c1, c2), "stats": stats}
    finally:
        llm.close()


def _budget_quarter(path, cache_type: str) -> int:
    """A budget of 25% of the KV, or the direct path's minimum working set where that is more (the tiny
    model: every layer offloaded): at least 75% of the KV offloaded (the plan reserves the staging)."""
    layers = model_info(path).layer_bytes(N_CTX, cache_type)
    return max(sum(layers) // 4, min_budget(path, N_CTX, "direct", cache_type))


@pytest.fixture(scope="module")
def references(gemma_path, tiny_path):
    cache = {}

    def get(name, cache_type):
        if (name, cache_type) not in cache:
            path = {"gemma": gemma_path, "tiny": tiny_path}[name]
            cache[(name, cache_type)] = run_greedy(path, cache_type, kv_policy="ram")
        return cache[(name, cache_type)]

    return get


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
@pytest.mark.parametrize("model", ["gemma", "tiny"])
@pytest.mark.parametrize("where", ["mmap", "direct-file", "direct-device"])
def test_offloaded_equals_ram(model, cache_type, where, references, gemma_path, tiny_path, tmp_path, request):
    path = {"gemma": gemma_path, "tiny": tiny_path}[model]
    ref = references(model, cache_type)
    kv = {"kv_policy": "mmap" if where == "mmap" else "direct", "mem_budget": _budget_quarter(path, cache_type)}
    if where == "direct-device":
        kv["kv_device"] = request.getfixturevalue("loop_device")
        kv["kv_force"] = True  # the previous parameter's run left a header of another geometry
    else:
        kv["kv_dir"] = str(tmp_path)
    got = run_greedy(path, cache_type, **kv)
    st = got["stats"]

    assert st["offloaded_bytes"] >= 0.75 * st["kv_bytes_total"]
    assert {l["path"] for l in st["layers"]} >= {"mmap" if where == "mmap" else "direct"}
    assert got["tokens"] == ref["tokens"]
    assert got["hashes"] == ref["hashes"]  # logits equal to the last bit, every step
    # across save/load_state: the same as RAM (for Gemma's iSWA cache stock llama.cpp itself does not
    # continue identically after a restore; the dense model does)
    assert got["state"] == ref["state"]
    if model == "tiny":
        assert got["state"][0] == got["state"][1]
    assert got["reuse"] == ref["reuse"]
    if where != "mmap":
        assert st["bytes_read"] > 0 and st["bytes_written"] > 0
        assert st["store"]["kind"] == ("device" if where == "direct-device" else "file")
        # the pipeline stages as deep as the budget allows, never more: pinned + staged <= budget
        pinned = sum(l["bytes"] for l in st["layers"] if l["path"] == "ram")
        assert 0 < st["staged_peak_bytes"] <= st["budget_bytes"] - pinned
    assert not os.listdir(tmp_path)  # the KV file is unnamed: nothing left behind


@pytest.mark.parametrize("model", ["gemma", "tiny"])
def test_switching_paths_mid_generation_is_exact(model, references, gemma_path, tiny_path, tmp_path):
    """Layers move between the page cache and the direct path between decode steps (as the auto
    policy does under changing memory): same tokens and the same logits, bit for bit, as RAM."""
    path = {"gemma": gemma_path, "tiny": tiny_path}[model]
    ref = references(model, "f16")
    tid = GGML_TYPE_IDS["f16"]
    llm = Llama(str(path), n_ctx=N_CTX, n_batch=512, flash_attn=True, type_k=tid, type_v=tid, verbose=False,
                kv_policy="auto", mem_budget=_budget_quarter(path, "f16"), kv_dir=str(tmp_path))
    try:
        st = llm.kv_stats()
        offloaded = [l["layer"] for l in st["layers"] if l["path"] != "ram"]
        start = st["switches"][0]
        assert start["layer"] is None and start["reason"].startswith("start")
        # no memory limit here: the page cache has room, auto starts there
        assert {l["path"] for l in st["layers"] if l["path"] != "ram"} == {"mmap"}
        llm.eval(prompt_tokens(llm, PROMPT_TOKENS))
        out, hashes = [], []
        for step in range(GEN_TOKENS):
            lg = _logits(llm)
            hashes.append(hashlib.sha256(lg.tobytes()).hexdigest())
            tok = int(np.argmax(lg))
            out.append(tok)
            il = offloaded[step % len(offloaded)]
            now = {l["layer"]: l["path"] for l in llm.kv_stats()["layers"]}[il]
            llm.kv_set_path(il, "direct" if now == "mmap" else "mmap")
            llm.eval([tok])
        st = llm.kv_stats()
        assert out == ref["tokens"]
        assert hashes == ref["hashes"]
        assert st["switch_count"] >= GEN_TOKENS  # every request applied (plus the start entry)
        # with memory ample, auto itself moves layers sent to the direct path back to the page cache
        reasons = {e["reason"].split(":")[0] for e in st["switches"]}
        assert "requested" in reasons and reasons <= {"start", "requested", "memory available again"}
        with pytest.raises(ValueError):
            llm.kv_set_path(offloaded[0], "ram")
    finally:
        llm.close()


def _io_uring_allowed() -> bool:
    try:
        return Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() == "0"
    except OSError:
        return True  # a kernel older than the switch


def test_direct_path_reports_engine_and_depth(tiny_path, tmp_path):
    """The build needs no liburing: where the kernel allows io_uring, that is the engine (a fresh machine
    with the README's two commands gets it), and the reason says why."""
    llm = Llama(str(tiny_path), n_ctx=1024, verbose=False, kv_policy="direct", mem_budget=min_budget(tiny_path, 1024),
                kv_dir=str(tmp_path))
    try:
        llm.eval(llm.tokenize(b"x " * 300))
        st = llm.kv_stats()
        forced = os.environ.get("DUALBLADE_IO_ENGINE")
        if forced in ("io_uring", "threads"):
            assert st["io_engine"] == forced and "forced" in st["io_engine_reason"], st
        elif _io_uring_allowed():
            assert st["io_engine"] == "io_uring" and st["io_engine_reason"] == "available", st
        else:
            assert st["io_engine"] == "threads" and "io_uring unavailable" in st["io_engine_reason"], st
        assert st["pipeline_depth"] >= 1
        assert st["memory"] is None  # only auto samples memory
    finally:
        llm.close()


def test_request_shape_is_reported_and_can_be_fixed(references, tiny_path, tmp_path, monkeypatch):
    """The store's O_DIRECT requests: by default their shape is picked by measuring (native/tests/test_shape.c
    tests the picking on real reads); DUALBLADE_IO_SHAPE fixes one, reads with it stay exact (64 KiB chunks cut
    this model's layers into several), and a value that is no shape is refused with its reason."""
    kv = {"kv_policy": "direct", "mem_budget": _budget_quarter(tiny_path, "f16"), "kv_dir": str(tmp_path)}
    monkeypatch.delenv("DUALBLADE_IO_SHAPE", raising=False)
    llm = Llama(str(tiny_path), n_ctx=N_CTX, verbose=False, flash_attn=True, **kv)
    try:
        shape = llm.kv_stats()["io_shape"]
        assert shape["now"] == "4 MiB x16" and not shape["fixed"], shape  # what reads take until measured
        assert set(shape["measured"]) == {"4 MiB x16", "1 MiB x4", "1 MiB x16", "4 MiB x4", "8 MiB x4"}
    finally:
        llm.close()

    monkeypatch.setenv("DUALBLADE_IO_SHAPE", "64K:2")
    got = run_greedy(tiny_path, "f16", **kv)
    assert got["stats"]["io_shape"] == {"now": "64 KiB x2", "fixed": True, "measured": {}}
    assert got["stats"]["bytes_read"] > 0
    ref = references("tiny", "f16")
    assert got["tokens"] == ref["tokens"] and got["hashes"] == ref["hashes"]

    monkeypatch.setenv("DUALBLADE_IO_SHAPE", "4M")
    with pytest.raises(Exception, match=r"DUALBLADE_IO_SHAPE=4M is not a request shape: use auto, or SIZE:DEPTH"):
        Llama(str(tiny_path), n_ctx=N_CTX, verbose=False, flash_attn=True, **kv)
    assert not os.listdir(tmp_path)


def test_counters_match_the_layout(tiny_path, tmp_path):
    """Prefill N tokens then decode one: bytes read and written are exactly what the layout implies."""
    info = model_info(tiny_path)
    n_ctx, n = 1024, 300
    # the minimum budget: every layer offloaded
    llm = Llama(str(tiny_path), n_ctx=n_ctx, verbose=False, kv_policy="direct", mem_budget=min_budget(tiny_path, n_ctx),
                kv_dir=str(tmp_path))
    try:
        st = llm.kv_stats()
        assert all(l["path"] == "direct" for l in st["layers"])
        rows = [(l.n_embd_k_gqa * 2, l.n_embd_v_gqa * 2) for l in info.layers]  # f16 row bytes
        blk = 4096
        up = lambda x: -(-x // blk) * blk  # noqa: E731

        llm.eval(llm.tokenize(b"x " * 400)[:n])
        llm._kv.flush()
        st = llm.kv_stats()
        assert st["bytes_read"] == 0  # nothing was on storage yet
        assert st["bytes_written"] == sum(up(n * rk) + up(n * rv) for rk, rv in rows)
        written0 = st["bytes_written"]

        llm.eval([42])  # one decode step
        llm._kv.flush()
        st = llm.kv_stats()
        assert st["bytes_read"] == sum(up(n * rk) + up(n * rv) for rk, rv in rows)
        step_written = st["bytes_written"] - written0
        expect = sum((up((n + 1) * r) - (n * r) // blk * blk) for rk, rv in rows for r in (rk, rv))
        assert step_written == expect  # only the blocks the new row lands in
        assert st["io_wait_s"] > 0

        # decode without a flush: the page the newest rows land in stays in memory and is written
        # once full (or at the flush): every page of the new rows is written exactly once, where
        # writing each step's blocks would write ~steps times as much
        written1, m, steps = st["bytes_written"], n + 1, 24
        for t in range(steps):
            llm.eval([40 + t])
        llm._kv.flush()
        st = llm.kv_stats()
        once = sum(up((m + steps) * r) - (m * r) // blk * blk for rk, rv in rows for r in (rk, rv))
        assert st["bytes_written"] - written1 == once
        assert once < steps * expect / 4
    finally:
        llm.close()


def test_clear_does_not_rewrite_storage(tiny_path, tmp_path):
    llm = Llama(str(tiny_path), n_ctx=2048, verbose=False, kv_policy="direct", mem_budget=min_budget(tiny_path, 2048),
                kv_dir=str(tmp_path))
    try:
        llm.eval(llm.tokenize(b"hello " * 300))
        # the pipeline at rest first: the worker may still be writing back the prompt's last rows, which are
        # not the clear's doing (seen: 72 KiB of them landing between the two snapshots, 2 runs in 12)
        llm._kv.flush()
        before = llm.kv_stats()
        llm._ctx.kv_cache_clear()
        llm.reset()
        after = llm.kv_stats()
        assert after["bytes_written"] - before["bytes_written"] < 64 * 1024
        assert after["staged_bytes"] == 0
        # and generation afterwards reads nothing stale
        out = llm.create_completion("Once", max_tokens=4, temperature=0)
        assert out["choices"][0]["text"] is not None
    finally:
        llm.close()


def _rss_anon() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def test_trim_gives_the_staging_pool_back_and_changes_nothing(gemma_path, tmp_path):
    """kv_trim (an idle server calls it): the direct path's staging pool gives its pages back, the next layers
    staged fault fresh ones in, and the tokens and logits stay those of the run without it."""
    budget = _budget_quarter(gemma_path, "f16")

    def run(trim: bool):
        llm = Llama(str(gemma_path), n_ctx=N_CTX, flash_attn=True, verbose=False, kv_policy="direct",
                    mem_budget=budget, kv_dir=str(tmp_path))
        try:
            llm.eval(prompt_tokens(llm, 600))
            seen, gave = [], None
            for i in range(24):
                if trim and i == 12:
                    pool, rss = llm.kv_stats()["staging"]["pool_bytes"], _rss_anon()
                    gave = llm.kv_trim()
                    st = llm.kv_stats()
                    gave = (pool, gave, st["staging"]["pool_bytes"], st["staged_bytes"], rss - _rss_anon())
                lg = _logits(llm)
                seen.append(hashlib.sha256(lg.tobytes()).hexdigest())
                llm.eval([int(np.argmax(lg))])
            return seen, gave, llm.kv_stats()["staging"]["pool_bytes"]
        finally:
            llm.close()

    plain, _, _ = run(False)
    trimmed, (pool, gave, pool_after, staged_after, rss_drop), pool_end = run(True)
    assert trimmed == plain
    assert pool > 0 and gave == pool and pool_after == 0 and staged_after == 0
    assert rss_drop >= pool * 3 // 4, (rss_drop, pool)  # the pages left the process
    assert pool_end > 0  # and came back on use


def test_context_shift_refused_when_offloaded(tiny_path, tmp_path):
    import llama_cpp

    llm = Llama(str(tiny_path), n_ctx=1024, verbose=False, kv_policy="direct", mem_budget=min_budget(tiny_path, 1024),
                kv_dir=str(tmp_path))
    try:
        mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
        assert not llama_cpp.llama_memory_can_shift(mem)
    finally:
        llm.close()
    ram = Llama(str(tiny_path), n_ctx=1024, verbose=False)
    try:
        assert llama_cpp.llama_memory_can_shift(llama_cpp.llama_get_memory(ram._ctx.ctx))
    finally:
        ram.close()


def test_state_moves_between_policies(tiny_path, tmp_path):
    """A state saved from the direct path loads into a RAM-only Llama and continues identically."""
    direct = Llama(str(tiny_path), n_ctx=1024, flash_attn=True, verbose=False, kv_policy="direct",
                   mem_budget=min_budget(tiny_path, 1024), kv_dir=str(tmp_path))
    ram = Llama(str(tiny_path), n_ctx=1024, flash_attn=True, verbose=False, kv_policy="ram")
    try:
        direct.eval(direct.tokenize(b"the state of things " * 40))
        state = direct.save_state()
        assert direct.kv_stats()["staged_bytes"] == 0  # released once the copy was made
        ram.load_state(state)
        for tok in (11, 12, 13):
            direct.eval([tok])
            ram.eval([tok])
            assert np.array_equal(_logits(direct).view(np.uint32), _logits(ram).view(np.uint32))
    finally:
        direct.close()
        ram.close()


def test_auto_reserves_the_compute_buffers_a_prompt_fills(tiny_path, tmp_path):
    """auto's first room leaves out the host compute buffers of a full prompt ubatch (llama.cpp allocates them after
    the KV opens, and a first long prompt fills them): reserved until prompts have touched them, then counted by the
    monitor as the process's own memory, and the reserve goes."""
    from dualblade import placement

    llm = Llama(str(tiny_path), n_ctx=2048, verbose=False, kv_policy="auto", kv_dir=str(tmp_path), flash_attn=True,
                mem_budget=min_budget(tiny_path, 2048, "auto"))
    try:
        info, ub = model_info(tiny_path), llm.context_params.n_ubatch
        m = llm.kv_stats()["memory"]
        full = placement.prefill_host_bytes(info, 2048, ub, False)
        assert ub == 2048 and m["buffers_reserve_bytes"] == full > 0
        assert m["reserve_bytes"] == m["weights_reserve_bytes"] + full
        # the CPU's compute buffer is malloc'ed, resident only once touched (a GPU build's page-locked one is counted
        # as it is allocated: test_gpu.py)
        assert llm._reserve["touched"] == 0
        llm.eval(llm.tokenize(b"the state of things " * 200)[:300])
        m = llm.kv_stats()["memory"]
        assert m["buffers_reserve_bytes"] == full - placement.prefill_host_bytes(info, 300, 300, False)
        assert m["reserve_bytes"] == m["weights_reserve_bytes"] + m["buffers_reserve_bytes"]
        llm.eval(llm.tokenize(b" and of others" * 700, add_bos=False)[:2048 - 300])  # the context full
        m = llm.kv_stats()["memory"]
        assert m["buffers_reserve_bytes"] < full // 4 and m["reserve_bytes"] < m["weights_reserve_bytes"] + full // 4
    finally:
        llm.close()


def test_load_log_records_buffer_sizes():
    """llama.cpp's log lines of model and compute buffers, by buffer type; the page-locked host ones ("<backend>_Host")
    are what a GPU build's compute buffers hold resident from the start."""
    from dualblade.llama_log import LoadLog

    log = LoadLog()
    for line in ("load_tensors:   CPU_Mapped model buffer size =   242.00 MiB",
                 "llama_context:      CUDA0 compute buffer size =   300.50 MiB",
                 "llama_context:  CUDA_Host compute buffer size =   743.00 MiB",
                 "llama_context:        CPU compute buffer size =    10.00 MiB",
                 "llama_context: graph nodes  = 1234"):
        log.note(line)
    assert log.buffers == {"CPU_Mapped": 242 << 20}
    assert log.compute == {"CUDA0": round(300.5 * 2**20), "CUDA_Host": 743 << 20, "CPU": 10 << 20}
    assert log.pinned_compute_bytes() == 743 << 20
    assert LoadLog().pinned_compute_bytes() == 0


def test_auto_places_again_once_loaded(tiny_path, tmp_path):
    """auto's first placement is made when the KV opens, before llama.cpp loads the weights and makes the context
    (on a GPU build: the driver's host memory, the ring); set_reserve, which the drop-in calls once both exist, places
    the layers that hold no rows yet again from memory as it is then. Here a reserve larger than the machine leaves
    the page cache no room: every offloaded layer goes to the direct path before its first row, and says why."""
    llm = Llama(str(tiny_path), n_ctx=2048, verbose=False, kv_policy="auto", kv_dir=str(tmp_path), flash_attn=True,
                mem_budget=min_budget(tiny_path, 2048, "auto"))
    try:
        st = llm.kv_stats()
        offloaded = st["layers_by_path"]["mmap"] + st["layers_by_path"]["direct"]
        assert offloaded > 0 and st["layers_by_path"]["mmap"] == offloaded, st["switches"]  # ample memory here
        llm._kv.set_reserve(1 << 50)
        llm.eval(prompt_tokens(llm, 300))
        st = llm.kv_stats()
        assert st["layers_by_path"]["direct"] == offloaded, st["switches"]
        moved = [s for s in st["switches"] if s["layer"] is not None]
        assert len(moved) == offloaded and all(s["from"] == "mmap" and s["to"] == "direct" for s in moved), moved
        assert all(s["reason"].startswith("loaded: 0 MiB of the offloaded layers fit") for s in moved), moved
        llm._kv.set_reserve(0)  # the layers hold rows now: placed again no more (the samples decide from here on)
        llm.eval([5])
        st = llm.kv_stats()
        assert st["layers_by_path"]["direct"] == offloaded and st["switch_count"] == len(moved) + 1, st["switches"]
    finally:
        llm.close()


def test_auto_leaves_the_weights_what_they_keep_cached(heavy_path, gemma_path, tmp_path):
    """auto's page-cache room leaves the mmap'ed weights their working set, not the file's size: every tensor
    but the token-embedding table (a token reads one row of it) unless it is also the output matrix (Gemma
    ties them), less what llama.cpp repacked into anonymous memory; nothing when the weights are not mmap'ed."""
    def reserve(path, **kw):
        llm = Llama(str(path), n_ctx=2048, verbose=False, kv_policy="auto", kv_dir=str(tmp_path), flash_attn=True,
                    mem_budget=min_budget(path, 2048, "auto"), **kw)
        try:
            return llm.kv_stats()["memory"]["weights_reserve_bytes"]
        finally:
            llm.close()

    heavy = model_info(heavy_path)
    assert "output.weight" in heavy.tensor_bytes
    assert reserve(heavy_path) == sum(heavy.tensor_bytes.values()) - heavy.tensor_bytes["token_embd.weight"]
    assert reserve(heavy_path) < 0.8 * heavy.file_bytes  # the embedding table is a quarter of this file
    gemma = model_info(gemma_path)
    assert "output.weight" not in gemma.tensor_bytes  # tied: the embedding table is read whole every token
    r = reserve(gemma_path)
    assert 0.5 * sum(gemma.tensor_bytes.values()) < r <= sum(gemma.tensor_bytes.values())
    assert reserve(gemma_path, use_mmap=False) == 0
