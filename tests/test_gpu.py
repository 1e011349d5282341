"""The VRAM tier (issue 12): KV layers streamed from the host tiers into VRAM are exact.

Needs a GPU build (CMAKE_ARGS="-DGGML_CUDA=on") and a GPU; everywhere else every test here skips with
the reason. Reference: the same model with every KV layer in VRAM (stock placement, flash attention
on), whose tokens and logits the streamed runs must equal bit for bit.
"""
from __future__ import annotations

import warnings
from contextlib import closing

import numpy as np
import pytest

import llama_cpp

import dualblade
from conftest import last_logits

pytestmark = pytest.mark.skipif(not llama_cpp.llama_supports_gpu_offload(),
                                reason="no GPU: this llama_cpp build or machine offloads nothing (CI has no GPU)")

N_CTX = 32768  # tiny: 8 MiB of KV per layer, more than a VRAM slot's 2 MiB granules
PROMPT = ("The history of computing is the story of memory that was always too small: "
          "registers, caches, main memory, disks, each a level that holds what the one above cannot. ") * 6
N_GEN = 12


def _run(llm, prompt=PROMPT, n_gen=N_GEN):
    """Greedy tokens after the prompt and the logits the prompt's last position gave, as bytes."""
    toks = llm.tokenize(prompt.encode())
    llm.reset()
    llm.eval(toks)
    logits = last_logits(llm).tobytes()
    assert np.isfinite(np.frombuffer(logits, np.float32)).all() and len(set(logits)) > 16
    out = []
    for _ in range(n_gen):
        t = llm.sample(temp=0.0)
        out.append(t)
        llm.eval([t])
    return out, logits


def _llm(model, **kw):
    args = dict(n_ctx=N_CTX, n_gpu_layers=-1, flash_attn=True, verbose=False, seed=1)
    args.update(kw)
    return dualblade.Llama(str(model), **args)


@pytest.fixture(scope="module", params=["tiny", "gemma3-tiny"])
def model(request, tmp_path_factory):
    from dualblade.synthetic import SHAPES, write_model

    if request.param not in SHAPES:
        pytest.skip(f"no synthetic shape {request.param}")
    return write_model(tmp_path_factory.mktemp("gpu") / f"{request.param}.gguf", request.param, seed=3)


@pytest.fixture(scope="module")
def reference(model):
    """Every KV layer in VRAM: the stock placement (no vram_budget), per KV type."""
    refs = {}
    for type_kv in (1, 8):  # f16, q8_0
        with closing(_llm(model, type_k=type_kv, type_v=type_kv)) as llm:
            assert llm.kv_stats()["vram"]["streamed_layers"] == 0
            refs[type_kv] = _run(llm)
    return refs


def _minimum(model, arg, **kw):
    """The smallest budget that runs (the BudgetError names it): streams most layers / offloads most."""
    with pytest.raises(dualblade.BudgetError) as e:
        _llm(model, **{arg: 1}, **kw)
    return e.value.args[0].split(f"{arg}='")[1].split("'")[0]


def _streamed_budget(model, type_kv):
    return _minimum(model, "vram_budget", type_k=type_kv, type_v=type_kv)


@pytest.mark.parametrize("type_kv", [1, 8], ids=["f16", "q8_0"])
@pytest.mark.parametrize("host", ["ram", "mmap", "mmap-ring", "direct", "device", "pageable"])
def test_streamed_layers_are_exact(model, reference, type_kv, host, tmp_path, request, monkeypatch):
    kw = dict(type_k=type_kv, type_v=type_kv, vram_budget=_streamed_budget(model, type_kv))
    if host == "mmap-ring":
        # the page cache with a budget that holds the direct path's staging: the ring takes it, and the page
        # cache is copied into it by several threads (the run without: "mmap", 1M)
        kw.update(kv_policy="mmap", kv_dir=str(tmp_path))
        kw["mem_budget"] = _minimum(model, "mem_budget", **{**kw, "kv_policy": "direct"})
    elif host == "pageable":
        # DUALBLADE_PIN=0: nothing page-locked, as a failing lock leaves it (the direct path's ring too)
        monkeypatch.setenv("DUALBLADE_PIN", "0")
        kw.update(kv_policy="direct", kv_dir=str(tmp_path))
        kw["mem_budget"] = _minimum(model, "mem_budget", **kw)
    elif host == "device":
        # the direct path on a raw block device (a loop device: root only)
        kw.update(kv_policy="direct", kv_device=request.getfixturevalue("make_loop")(1 << 30))
        kw["mem_budget"] = _minimum(model, "mem_budget", **kw)
    elif host != "ram":
        # the host copies of the streamed layers on the page cache / the direct path (a file): the page
        # cache needs no budget of its own, the direct path its staging
        kw.update(kv_policy=host, kv_dir=str(tmp_path))
        kw["mem_budget"] = "1M" if host == "mmap" else _minimum(model, "mem_budget", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", dualblade.PinnedMemoryWarning)  # DUALBLADE_PIN=0 is asked for: no warning
        llm = _llm(model, **kw)
    with closing(llm):
        got = _run(llm)
        st = llm.kv_stats()
    assert st["vram"]["streamed_layers"] > 0, st["vram"]
    assert st["vram"]["h2d_bytes"] > 0 and st["vram"]["d2h_bytes"] > 0
    if host == "ram":
        assert st["vram"]["h2d_pinned_bytes"] == st["vram"]["h2d_bytes"]  # page-locked host copies
    else:
        path = {"device": "direct", "pageable": "direct", "mmap-ring": "mmap"}.get(host, host)
        assert st["layers_by_path"][path] > 0, st["layers_by_path"]
    if host in ("mmap-ring", "direct", "pageable"):
        # read ahead into the ring, copied from there
        assert st["vram"]["ring_bytes"] > 0 and st["vram"]["ring_read_bytes"] > 0, st["vram"]
    if host == "pageable":
        assert st["vram"]["pin_failed"] == "DUALBLADE_PIN=0" and st["vram"]["h2d_pinned_bytes"] == 0, st["vram"]
    else:
        assert st["vram"]["pin_failed"] is None, st["vram"]
    assert got[0] == reference[type_kv][0]
    assert got[1] == reference[type_kv][1], "logits differ from the all-in-VRAM run"


def test_one_slot_per_layer_is_the_same(model, reference, monkeypatch):
    """DUALBLADE_VRAM_SLOTS=0 gives every streamed layer VRAM of its own: no sharing, the oracle."""
    budget = _streamed_budget(model, 1)
    monkeypatch.setenv("DUALBLADE_VRAM_SLOTS", "0")
    with closing(_llm(model, vram_budget=budget)) as llm:
        got = _run(llm)
        st = llm.kv_stats()["vram"]
    assert st["slots"] == st["streamed_layers"] > 1
    assert got == reference[1]


def _state_roundtrip(model, **kw):
    """Logits after: half the prompt, its state saved, the rest (a); the state restored, the rest again
    (b); the state loaded into a fresh context, the rest (c). Split evaluations run other kernels than a
    whole prompt does, so these are compared with the same steps in the stock placement."""
    with closing(_llm(model, **kw)) as llm:
        toks = llm.tokenize(PROMPT.encode())
        half = len(toks) // 2
        llm.reset()
        llm.eval(toks[:half])
        state = llm.save_state()
        llm.eval(toks[half:])  # continues from the first half (prefix reuse inside one context)
        a = last_logits(llm).tobytes()
        llm.load_state(state)  # back to the first half: the streamed layers' host copies restored
        llm.eval(toks[half:])
        b = last_logits(llm).tobytes()
    with closing(_llm(model, **kw)) as llm:
        llm.load_state(state)  # the saved bytes are the KV itself, not another layer's slot
        llm.eval(toks[half:])
        c = last_logits(llm).tobytes()
    return a, b, c


def test_prefix_reuse_and_state_roundtrip(model):
    stock = _state_roundtrip(model)
    assert stock[0] == stock[1] == stock[2]
    assert _state_roundtrip(model, vram_budget=_streamed_budget(model, 1)) == stock
    # the host copies on the direct path: restored rows are written back to storage
    assert _state_roundtrip(model, vram_budget=_streamed_budget(model, 1), kv_policy="direct",
                            mem_budget=_minimum(model, "mem_budget", kv_policy="direct",
                                                vram_budget=_streamed_budget(model, 1))) == stock


def _session_roundtrip(model, path, **kw):
    """As _state_roundtrip, through save_session/load_session: (a) half the prompt saved to a session file,
    the rest evaluated; (b) the session loaded back into that context, the rest again; (c) loaded into a fresh
    context, the rest."""
    with closing(_llm(model, **kw)) as llm:
        toks = llm.tokenize(PROMPT.encode())
        half = len(toks) // 2
        llm.reset()
        llm.eval(toks[:half])
        llm.save_session(path)
        llm.eval(toks[half:])
        a = last_logits(llm).tobytes()
        llm.load_session(path)  # the rows the last graph left in VRAM are not written back over it
        llm.eval(toks[half:])
        b = last_logits(llm).tobytes()
    with closing(_llm(model, **kw)) as llm:
        llm.load_session(path, verify=True)
        llm.eval(toks[half:])
        c = last_logits(llm).tobytes()
    return a, b, c


def test_sessions_of_streamed_layers(model, tmp_path):
    stock = _session_roundtrip(model, tmp_path / "stock.dbs")
    assert stock[0] == stock[1] == stock[2]
    streamed = _streamed_budget(model, 1)
    assert _session_roundtrip(model, tmp_path / "pinned.dbs", vram_budget=streamed) == stock
    # host copies on the direct path: the session's rows go through the KV store
    direct = _minimum(model, "mem_budget", kv_policy="direct", vram_budget=streamed)
    assert _session_roundtrip(model, tmp_path / "direct.dbs", vram_budget=streamed, kv_policy="direct",
                              mem_budget=direct) == stock


def test_streamed_layers_switch_paths_exactly(model, reference, tmp_path):
    """auto moves streamed layers between the page cache and the direct path mid-decode (every limited GPU run
    demotes some; with room again it promotes them): the ring then reads a layer's rows from its new path. Each
    step here flips one streamed layer, both ways in turn: the tokens equal all-in-VRAM's."""
    kw = dict(vram_budget=_streamed_budget(model, 1), kv_policy="direct", kv_dir=str(tmp_path))
    kw.update(kv_policy="auto", mem_budget=_minimum(model, "mem_budget", **kw))
    with closing(_llm(model, **kw)) as llm:
        layers = [l for l in llm.kv_stats()["layers"] if l["streamed"] and l["path"] != "ram"]
        assert layers, llm.kv_stats()["layers"]
        llm.reset()
        llm.eval(llm.tokenize(PROMPT.encode()))
        assert last_logits(llm).tobytes() == reference[1][1], "logits differ from the all-in-VRAM run"
        out = []
        for step in range(N_GEN):
            t = llm.sample(temp=0.0)
            out.append(t)
            il = layers[step % len(layers)]["layer"]
            now = {l["layer"]: l["path"] for l in llm.kv_stats()["layers"]}[il]
            llm.kv_set_path(il, "direct" if now == "mmap" else "mmap")
            llm.eval([t])
        st = llm.kv_stats()
    assert out == reference[1][0]
    assert st["vram"]["streamed_layers"] > 0 and st["vram"]["ring_read_bytes"] > 0, st["vram"]
    moved = [e for e in st["switches"] if e["layer"] is not None and e["reason"].startswith("requested")]
    assert {e["to"] for e in moved} == {"mmap", "direct"}, st["switches"]  # both ways


def test_a_prompt_computed_layer_by_layer_is_exact(model, tmp_path, monkeypatch):
    """DUALBLADE_LAYER_MAJOR=1 computes a prompt batch of several ubatches layer by layer with its layers streamed
    into VRAM too (off by default on a GPU, where each graph copies its ubatch's masks over: GPU run 16). Its tokens
    and logits equal all-in-VRAM's in the same ubatches, and its layers are copied into VRAM once per batch, not once
    per ubatch as in llama.cpp's order (an iSWA model's, whose sliding-window cells a later ubatch reuses, keeps
    that order)."""
    ub = dict(n_batch=N_CTX, n_ubatch=64)  # the prompt in 3 ubatches, one batch
    with closing(_llm(model, **ub)) as llm:
        ref = _run(llm)
    kw = dict(vram_budget=_streamed_budget(model, 1), kv_policy="direct", kv_dir=str(tmp_path), **ub)
    kw["mem_budget"] = _minimum(model, "mem_budget", **kw)
    copied = {}
    for order in ("1", "0"):
        monkeypatch.setenv("DUALBLADE_LAYER_MAJOR", order)
        with closing(_llm(model, **kw)) as llm:
            assert llm.kv_stats()["vram"]["streamed_layers"] > 0
            toks = llm.tokenize(PROMPT.encode())
            assert len(toks) > 2 * 64
            h2d0 = llm.kv_stats()["vram"]["h2d_bytes"]
            llm.reset()
            llm.eval(toks)
            copied[order] = llm.kv_stats()["vram"]["h2d_bytes"] - h2d0
            assert last_logits(llm).tobytes() == ref[1], f"DUALBLADE_LAYER_MAJOR={order}: logits differ from all-in-VRAM"
            out = []
            for _ in range(N_GEN):
                out.append(llm.sample(temp=0.0))
                llm.eval(out[-1:])
            assert out == ref[0], f"DUALBLADE_LAYER_MAJOR={order}"
    from dualblade.gguf_header import model_info

    if any(layer.swa for layer in model_info(model).layers):
        assert copied["1"] == copied["0"], copied  # an iSWA cache keeps llama.cpp's order (patch 0006)
    else:
        assert copied["1"] < copied["0"], copied


def test_auto_counts_page_locked_compute_buffers_once(model, tmp_path):
    """A GPU build keeps a prompt ubatch's attention masks in page-locked host memory (CUDA_Host), resident from the
    context's creation and counted by auto's monitor (shmem): not reserved on top. Run 14 found them counted twice
    (auto's room was 0 under every limit) and, before, not at all (its page-cache layers thrashed)."""
    kw = dict(vram_budget=_streamed_budget(model, 1), kv_policy="direct", kv_dir=str(tmp_path))
    kw.update(kv_policy="auto", mem_budget=_minimum(model, "mem_budget", **kw))
    with closing(_llm(model, **kw)) as llm:
        m = llm.kv_stats()["memory"]
        assert llm._reserve is not None and llm._reserve["buffers"] > 0
        assert m["buffers_reserve_bytes"] == 0, m
        assert m["reserve_bytes"] == m["weights_reserve_bytes"], m


def test_under_a_limit_streamed_layers_wait_for_the_first_prompt(model, tmp_path):
    """Under a memory limit auto keeps a GPU build's offloaded layers on the direct path until the first evaluation
    has run (its memory is not foreseen: GPU runs 15 and 16), then places them from what it left. In a child
    process under a real cgroup limit (generous: only that there is one matters)."""
    import json
    import sys

    from dualblade.bench import cgroup

    if cgroup.available() is not None:
        pytest.skip(f"no memory cgroup: {cgroup.available()}")
    kw = dict(vram_budget=_streamed_budget(model, 1), kv_policy="direct", kv_dir=str(tmp_path))
    kw.update(kv_policy="auto", mem_budget=_minimum(model, "mem_budget", **kw))
    script = f"""
import json, dualblade
llm = dualblade.Llama({str(model)!r}, n_ctx={N_CTX}, n_gpu_layers=-1, flash_attn=True, verbose=False, seed=1, **{kw!r})
st = llm.kv_stats()
before = dict(hold=st["memory"]["first_prompt_hold"], limit=st["memory"]["limit_bytes"],
              paths=sorted({{l["path"] for l in st["layers"] if l["streamed"] and l["path"] != "ram"}}))
llm.eval(llm.tokenize({PROMPT!r}.encode()))
print(json.dumps(dict(before=before, after=llm.kv_stats()["memory"]["first_prompt_hold"])))
llm.close()
"""
    r = cgroup.run_limited([sys.executable, "-c", script], 16 << 30, timeout=300, cold=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["before"]["limit"] and out["before"]["hold"], out
    assert out["before"]["paths"] == ["direct"], out
    assert out["after"] is False, out


def test_without_vram_budget_a_gpu_build_is_stock(model):
    toks_stock = None
    with closing(llama_cpp.Llama(str(model), n_ctx=N_CTX, n_gpu_layers=-1, flash_attn=True, verbose=False)) as llm:
        toks_stock = _run(llm)
    with closing(_llm(model, mem_budget=None)) as llm:
        assert llm.kv_stats()["vram"]["streamed_layers"] == 0
        assert _run(llm) == toks_stock


def test_vram_budget_auto_takes_the_free_vram(model, reference):
    """auto: this small model's KV fits the H200's free VRAM: every layer resident, as stock."""
    free = sum(g.free for g in dualblade.vram.gpus())
    assert free > 1 << 30
    with closing(_llm(model, vram_budget="auto")) as llm:
        st = llm.kv_stats()["vram"]
        assert st["streamed_layers"] == 0 and st["resident_layers"] > 0
        assert _run(llm) == reference[1]


def test_layers_left_on_the_cpu_are_warned(model):
    """-ngl short of every layer: a warning; the CPU layers keep their KV in the host tiers, the rest as planned."""
    from dualblade.gguf_header import model_info

    n_layer = model_info(model).n_layer
    with pytest.warns(UserWarning, match=f"leaves 2 of {n_layer} layers on the CPU"):
        llm = _llm(model, n_gpu_layers=n_layer - 1, vram_budget=_streamed_budget(model, 1))
    with closing(llm):
        assert llm.kv_stats()["vram"]["streamed_layers"] > 0
        toks, _ = _run(llm)
    assert len(toks) == N_GEN


def test_vram_budget_errors(model):
    with pytest.raises(dualblade.BudgetError, match="more than the free VRAM .*CUDA0"):
        _llm(model, vram_budget="100T")
    with pytest.raises(dualblade.BudgetError, match="vram_budget .* below the minimum"):
        _llm(model, vram_budget="1M")
    with pytest.raises(dualblade.ConfigError, match="n_gpu_layers is 0"):
        _llm(model, n_gpu_layers=0, vram_budget="1G")
    with pytest.raises(dualblade.ConfigError, match="offload_kqv=False"):
        _llm(model, offload_kqv=False, vram_budget="1G")


def test_numpy_imported_first(model, tmp_path):
    """`import numpy` before dualblade, then a model: the GPU image's numpy loads libstdc++ privately and ggml's
    static copy of it used to take libllama's references (SIGSEGV in llama_model::print_info, issue 21)."""
    import sys

    code = ("import numpy; import dualblade; from contextlib import closing; "
            f"llm = dualblade.Llama({str(model)!r}, n_ctx=512, n_gpu_layers=-1, verbose=False); "
            "print(llm.tokenize(b'hello')); llm.close(); print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), (p.returncode, p.stderr[-2000:])
