"""A prefill reads each offloaded layer about once (issue 21), on the CPU build, through kv_stats()'s byte counters.

A layer's rows below a ubatch are read back (staged from storage, or copied into VRAM) once per graph that computes
the layer. A context with offloaded layers takes its prompt in batches of several large ubatches
(placement.prefill_batch, placement.prefill_ubatch), which llama.cpp computes layer by layer (patch 0006: every
ubatch through a segment of the layers before the next segment), so a layer is staged once per batch; its compute
buffers are reserved for the outputs a ubatch asks for rather than for every token's logits (patch 0005).
DUALBLADE_LAYER_MAJOR=0 keeps llama.cpp's order (each ubatch through every layer), which reads O(P^2/ubatch)."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import heavy_direct, last_logits, min_budget, prompt_tokens
from dualblade import Llama, placement
from dualblade.gguf_header import model_info

N_CTX = 4096
PROMPT = 3600


def _bytes(llm) -> tuple[int, int]:
    """Storage bytes read and written by the offloaded layers so far."""
    layers = [layer for layer in llm.kv_stats()["layers"] if layer["path"] in ("mmap", "direct")]
    assert layers, "no layer is offloaded"
    return sum(layer["bytes_read"] for layer in layers), sum(layer["bytes_written"] for layer in layers)


def _direct(heavy_path, tmp_path, **kw):
    return heavy_direct(heavy_path, tmp_path, N_CTX, **kw)


@pytest.mark.slow
def test_a_prefill_reads_each_offloaded_layer_about_once(heavy_path, tmp_path, monkeypatch):
    llm = _direct(heavy_path, tmp_path)
    try:
        info = model_info(heavy_path)
        assert llm.context_params.n_ubatch == placement.prefill_ubatch(info, N_CTX, gpu=False) == 1536  # n_ctx/3
        assert llm.n_batch == placement.prefill_batch(info, N_CTX, 1536, gpu=False) == N_CTX  # the prompt in one batch
        llm.eval(prompt_tokens(llm, PROMPT))
        read, written = _bytes(llm)
        assert written > PROMPT * 16 * 1024  # most of the prompt's rows are on storage (32 KiB a token)
        # three ubatches, layer by layer: nothing of a layer was on storage before its first ubatch stored it, and
        # its later ubatches find its rows still staged
        assert read <= 0.05 * written, (read, written)
        # the next turn reads the layers once more
        llm.eval(prompt_tokens(llm, 400)[:300])
        read2, written2 = _bytes(llm)
        assert read2 - read <= 1.1 * written + (written2 - written)
    finally:
        llm.close()

    # llama.cpp's order, in the same ubatches: 1536, 1536, 528; the second reads 1536 rows, the third 3072
    monkeypatch.setenv("DUALBLADE_LAYER_MAJOR", "0")
    stock = _direct(heavy_path, tmp_path)
    try:
        stock.eval(prompt_tokens(stock, PROMPT))
        read, written = _bytes(stock)
        assert 1.1 * written < read <= 1.35 * written, (read, written)
    finally:
        stock.close()

    # 512-token ubatches in one batch: layer by layer they read no more; in llama.cpp's order once per ubatch
    for order, lo, hi in (("1", 0.0, 0.05), ("0", 2.5, 8.0)):
        monkeypatch.setenv("DUALBLADE_LAYER_MAJOR", order)
        small = _direct(heavy_path, tmp_path, n_batch=N_CTX, n_ubatch=512)
        try:
            small.eval(prompt_tokens(small, PROMPT))
            read, written = _bytes(small)
            assert lo * written <= read <= hi * written, (order, read, written)
        finally:
            small.close()


@pytest.mark.slow
def test_a_prompt_computed_layer_by_layer_is_exact(heavy_path, tmp_path, monkeypatch):
    """The same prompt in the same ubatches: layer by layer on the direct path, in llama.cpp's order on the direct
    path, and all in RAM. The last logits are the same bytes, and so are the greedy tokens after them."""
    def run(order, **kw):
        monkeypatch.setenv("DUALBLADE_LAYER_MAJOR", order)
        llm = Llama(str(heavy_path), n_ctx=N_CTX, n_batch=N_CTX, n_ubatch=512, flash_attn=True, verbose=False, **kw)
        try:
            llm.eval(prompt_tokens(llm, PROMPT))
            logits, tokens = last_logits(llm), []
            for _ in range(6):
                tokens.append(int(np.argmax(last_logits(llm))))
                llm.eval(tokens[-1:])
            read, _ = _bytes(llm) if kw.get("kv_policy") else (0, 0)
            return logits, tokens, read
        finally:
            llm.close()

    ram = run("1", mem_budget="4G")
    budget = dict(mem_budget=min_budget(heavy_path, N_CTX, "direct"), kv_dir=str(tmp_path))
    layer_major = run("1", kv_policy="direct", **budget)
    stock = run("0", kv_policy="direct", **budget)
    assert layer_major[0].tobytes() == ram[0].tobytes() == stock[0].tobytes()
    assert layer_major[1] == ram[1] == stock[1]
    assert layer_major[2] < stock[2]  # and it did read less


def test_the_prefill_batch(heavy_path, gemma_path, monkeypatch):
    info = model_info(heavy_path)
    monkeypatch.delenv("DUALBLADE_LAYER_MAJOR", raising=False)
    # the CPU: up to 8 ubatches a batch, as far as the stash holds their hidden states (4 x n_embd a token)
    assert placement.prefill_batch(info, 4096, 1536, gpu=False) == 4096
    assert placement.prefill_batch(info, 131072, 3840, gpu=False) == 8 * 3840
    assert placement.prefill_batch(info, 131072, 512, gpu=False) == min(8, placement.PREFILL_STASH // (4 * info.n_embd * 512)) * 512
    # streamed layers, an iSWA model, or llama.cpp's order asked for: one ubatch
    assert placement.prefill_batch(info, 131072, 4096, gpu=True) == 4096
    assert placement.prefill_batch(model_info(gemma_path), 8192, 2816, gpu=False) == 2816
    monkeypatch.setenv("DUALBLADE_LAYER_MAJOR", "0")
    assert placement.prefill_batch(info, 4096, 1536, gpu=False) == 1536
    monkeypatch.setenv("DUALBLADE_LAYER_MAJOR", "1")
    assert placement.prefill_batch(info, 131072, 4096, gpu=True) == 8 * 4096


def test_the_prefill_ubatch_follows_the_compute_allowance(heavy_path):
    info = model_info(heavy_path)
    # small contexts: the whole context in one ubatch
    assert placement.prefill_ubatch(info, 2048, gpu=False) == 2048
    # longer ones: a third of the context (each layer read about once by a prompt that fills it), in 256s
    assert placement.prefill_ubatch(info, 16384, gpu=False) == placement.prefill_ubatch(info, 16384, gpu=True) == 5632
    # long ones: as large as the allowance holds (the mask grows with the context), larger on a GPU
    host, gpu = placement.prefill_ubatch(info, 131072, gpu=False), placement.prefill_ubatch(info, 131072, gpu=True)
    assert 512 <= host < gpu < 131072 // 3 and host % 256 == 0 and gpu % 256 == 0
    per_token = 2 * 131072 + 4 * (3 * info.n_ff + 4 * info.n_embd)
    assert host * per_token <= placement.PREFILL_COMPUTE_HOST < (host + 256) * per_token
    assert gpu * 2 * 131072 <= placement.PREFILL_MASK_HOST  # the GPU's masks stay in host memory
