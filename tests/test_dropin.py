"""dualblade.Llama is a drop-in for llama_cpp.Llama: same answers, same methods, plus kv_stats()."""
import pickle
import warnings
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from conftest import tiny_direct_budget
from dualblade import ConfigError, FlashAttentionWarning, Llama
from dualblade.gguf_header import model_info

PROMPT = "The three largest cities of France are"


def _pair(path, **kw):
    kw.setdefault("n_ctx", 1024)
    kw.setdefault("verbose", False)
    kw.setdefault("seed", 7)
    return Llama(str(path), **kw), llama_cpp.Llama(str(path), **kw)


@pytest.fixture(scope="module")
def gemma_pair(gemma_path):
    ours, stock = _pair(gemma_path, logits_all=True)
    yield ours, stock
    ours.close()
    stock.close()


def test_is_a_llama_cpp_llama(gemma_pair):
    ours, _ = gemma_pair
    assert isinstance(ours, llama_cpp.Llama)


def test_greedy_completion_identical(gemma_pair):
    ours, stock = gemma_pair
    a = ours.create_completion(PROMPT, max_tokens=48, temperature=0)
    b = stock.create_completion(PROMPT, max_tokens=48, temperature=0)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"] == b["usage"]
    assert a["usage"]["completion_tokens"] > 0


def test_logits_identical_to_the_last_bit(gemma_pair):
    ours, stock = gemma_pair
    toks = ours.tokenize(PROMPT.encode())
    assert toks == stock.tokenize(PROMPT.encode())
    ours.reset()
    stock.reset()
    ours.eval(toks)
    stock.eval(toks)
    a = np.array(ours.scores[: ours.n_tokens])
    b = np.array(stock.scores[: stock.n_tokens])
    assert a.shape == b.shape and a.shape[0] == len(toks)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_streaming_and_chat_identical(gemma_pair):
    ours, stock = gemma_pair
    sa = "".join(c["choices"][0]["text"] for c in ours.create_completion(PROMPT, max_tokens=24, temperature=0, stream=True))
    sb = "".join(c["choices"][0]["text"] for c in stock.create_completion(PROMPT, max_tokens=24, temperature=0, stream=True))
    assert sa == sb and sa
    msgs = [{"role": "user", "content": "Name a color."}]
    ca = ours.create_chat_completion(msgs, max_tokens=16, temperature=0)
    cb = stock.create_chat_completion(msgs, max_tokens=16, temperature=0)
    assert ca["choices"][0]["message"]["content"] == cb["choices"][0]["message"]["content"]


def test_tokenize_roundtrip(gemma_pair):
    ours, stock = gemma_pair
    t = ours.tokenize(b"Hello, world")
    assert t == stock.tokenize(b"Hello, world")
    assert ours.detokenize(t) == stock.detokenize(t)


def test_save_and_load_state(gemma_pair):
    results = []
    for llm in gemma_pair:
        llm.reset()
        first = llm.create_completion(PROMPT, max_tokens=12, temperature=0)["choices"][0]["text"]
        state = llm.save_state()
        follow = PROMPT + first + " Also,"
        x = llm.create_completion(follow, max_tokens=16, temperature=0)["choices"][0]["text"]
        llm.create_completion("Something else entirely, about", max_tokens=8, temperature=0)
        llm.load_state(state)
        assert llm.n_tokens == state.n_tokens
        y = llm.create_completion(follow, max_tokens=16, temperature=0)["choices"][0]["text"]
        assert x == y and x
        results.append((first, x))
    assert results[0] == results[1]  # and the same as stock


def test_embeddings_identical(gemma_path):
    ours, stock = _pair(gemma_path, embedding=True, n_ctx=512)
    try:
        a, b = np.array(ours.embed("a small test")), np.array(stock.embed("a small test"))
        assert a.shape == b.shape and a.size > 0
        assert np.array_equal(a, b)
    finally:
        ours.close()
        stock.close()


def test_kv_stats_come_from_the_c_module(gemma_path):
    info = model_info(gemma_path)
    for n_ctx in (512, 1024 + 256):
        llm = Llama(str(gemma_path), n_ctx=n_ctx, verbose=False)
        try:
            st = llm.kv_stats()
            assert st["policy"] == "auto" and st["budget_bytes"] is None  # no budget: all pinned
            assert [l["layer"] for l in st["layers"]] == list(range(18))
            assert all(l["path"] == "ram" for l in st["layers"])
            # what llama.cpp allocated, as the patched cache reported it, equals the header's geometry
            assert [l["bytes"] for l in st["layers"]] == info.layer_bytes(n_ctx)
            assert st["kv_bytes_total"] == st["resident_bytes"] == sum(info.layer_bytes(n_ctx))
            assert st["bytes_read"] == st["bytes_written"] == 0 and st["io_wait_s"] == 0
        finally:
            llm.close()


def test_stock_llama_beside_ours_is_not_registered(gemma_path):
    ours = Llama(str(gemma_path), n_ctx=512, verbose=False, mem_budget="1G")
    stock = llama_cpp.Llama(str(gemma_path), n_ctx=2048, verbose=False)
    try:
        st = ours.kv_stats()
        assert len(st["layers"]) == 18 and st["budget_bytes"] == 1 << 30
        assert st["kv_bytes_total"] == sum(model_info(gemma_path).layer_bytes(512))
    finally:
        stock.close()
        ours.close()


def test_quantized_cache_types(gemma_path):
    for name, tid in (("q8_0", 8), ("q4_0", 2)):
        llm = Llama(str(gemma_path), n_ctx=512, verbose=False, flash_attn=True, type_k=tid, type_v=tid)
        try:
            assert [l["bytes"] for l in llm.kv_stats()["layers"]] == model_info(gemma_path).layer_bytes(512, name)
        finally:
            llm.close()


@pytest.mark.parametrize("kw,match", [
    ({"mem_budget": "2X"}, "unknown unit"),
    ({"mem_budget": 0}, "zero"),
    ({"kv_policy": "fast"}, "unknown KV policy"),
    ({"kv_dir": "/nonexistent/dir"}, "does not exist"),
    ({"kv_device": "/etc/hostname"}, "not a block device"),
    ({"kv_dir": "/tmp", "kv_device": "/dev/null"}, "only one"),
    ({"mem_budget": "1M", "kv_policy": "direct", "n_ctx": 4096}, "minimum working set"),
    ({"mem_budget": "8M", "kv_policy": "direct", "kv_dir": "/dev/shm"}, "tmpfs"),
    ({"mem_budget": "8M", "kv_policy": "direct", "type_k": 6}, "not a KV type"),
])
def test_bad_arguments(gemma_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        Llama(str(gemma_path), **kw)


def test_synthetic_dense_gqa_model(tiny_path):
    ours, stock = _pair(tiny_path, n_ctx=512)
    try:
        a = ours.create_completion("Once upon a time", max_tokens=32, temperature=0)["choices"][0]["text"]
        b = stock.create_completion("Once upon a time", max_tokens=32, temperature=0)["choices"][0]["text"]
        assert a == b
        st = ours.kv_stats()
        # 8 layers, 2 KV heads x 32 dims, f16: K+V = 2 * 64 * 2 bytes per cell
        assert [l["bytes"] for l in st["layers"]] == [512 * 256] * 8
    finally:
        ours.close()
        stock.close()


# --- what llama-cpp-python's own tests found missing (issue 11) ---

VOCABS = sorted((Path(__file__).resolve().parent.parent / "vendor" / "llama-cpp-python" / "vendor" / "llama.cpp"
                 / "models").glob("ggml-vocab-*.gguf"))


@pytest.mark.skipif(not VOCABS, reason="llama.cpp's vocab-only files come with the vendored source (pip install .)")
def test_vocab_only_files_load_as_stock_loads_them():
    """llama.cpp's vocab-only GGUF files have no tensors and no data section: not truncated; with vocab_only
    there is no KV, so no plan and no budget (even a budget far below any working set is fine)."""
    loaded = 0
    for path in VOCABS:
        try:
            stock = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        except ValueError:
            continue  # a tokenizer this llama.cpp does not load: nothing to compare
        text = "Hello world, 1234 is ünïcödé"
        ours = Llama(str(path), vocab_only=True, verbose=False)
        small = Llama(str(path), vocab_only=True, verbose=False, kv_policy="direct", mem_budget="4K")
        try:
            assert ours.tokenize(text.encode()) == stock.tokenize(text.encode()) == small.tokenize(text.encode())
            assert small.kv_stats()["offloaded_bytes"] == 0 and small.kv_stats()["store"] is None
        finally:
            for llm in (ours, small, stock):
                llm.close()
        loaded += 1
    assert loaded >= len(VOCABS) // 2, f"only {loaded} of {len(VOCABS)} vocab files loaded"


def test_pickling_keeps_every_dualblade_setting(tiny_path, tmp_path):
    kw = dict(n_ctx=1024, verbose=False, seed=3, kv_policy="direct", kv_dir=str(tmp_path), kv_verify=False,
              mem_budget=tiny_direct_budget(tiny_path))
    llm = Llama(str(tiny_path), **kw)
    try:
        again = pickle.loads(pickle.dumps(llm))
        try:
            a, b = llm.kv_stats(), again.kv_stats()
            for key in ("policy", "budget_bytes", "kv_dir", "verify", "flash_attn", "flash_attn_forced"):
                assert a[key] == b[key], key
            assert b["policy"] == "direct" and not b["verify"]
            assert [l["path"] for l in a["layers"]] == [l["path"] for l in b["layers"]]
            out = [x.create_completion("Once upon a time", max_tokens=12, temperature=0)["choices"][0]["text"]
                   for x in (llm, again)]
            assert out[0] == out[1]
            state = again.__getstate__()
            assert state["kv_policy"] == "direct" and state["kv_dir"] == str(tmp_path) and "flash_attn" not in state
        finally:
            again.close()
    finally:
        llm.close()


def test_flash_attention_switched_on_is_said_once(tiny_path, tmp_path):
    """llama_cpp's default is off; offloaded layers need it on. Left out: switched on, with a warning and in
    kv_stats(); asked off: the same; asked on: no warning. Pinned layers: nothing changes."""
    kw = dict(n_ctx=1024, verbose=False, kv_policy="direct", kv_dir=str(tmp_path),
              mem_budget=tiny_direct_budget(tiny_path))
    for given, warned in ((None, True), (False, True), (True, False)):
        extra = {} if given is None else {"flash_attn": given}
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            llm = Llama(str(tiny_path), **kw, **extra)
        try:
            fa = [w for w in seen if issubclass(w.category, FlashAttentionWarning)]
            assert len(fa) == (1 if warned else 0), [str(w.message) for w in seen]
            st = llm.kv_stats()
            assert st["flash_attn"] and st["flash_attn_forced"] == warned
        finally:
            llm.close()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        llm = Llama(str(tiny_path), n_ctx=1024, verbose=False)  # every layer pinned: stock's default stays
    try:
        assert not [w for w in seen if issubclass(w.category, FlashAttentionWarning)]
        assert not llm.kv_stats()["flash_attn"] and not llm.kv_stats()["flash_attn_forced"]
    finally:
        llm.close()
